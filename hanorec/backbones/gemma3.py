"""Gemma 3: a SigLIP vision tower whose patch features are average-pooled to a fixed number of soft
tokens per image, and a Gemma 3 language model that mixes sliding-window and full attention layers.

Two things differ from a plain causal LM and are mirrored in the shared-prefix mask: the soft tokens of
one image attend to each other bidirectionally (the forward does this from ``token_type_ids``), and the
sliding layers see only the last ``sliding_window`` positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hanorec.backbones.base import Backbone, square_images, tiny_heads, tiny_vision

if TYPE_CHECKING:
    import torch



class Gemma3(Backbone):
    family = "gemma3"
    label = "Gemma 3"
    model_types = ("gemma3",)
    preset = "tiny-gemma3"
    order = 30
    checkpoints = ("google/gemma-3-4b-it", "google/gemma-3-12b-it")
    gpu_config = "configs/gpu-gemma3-4b.yaml"
    chat_marker = "<start_of_image>"  # what Gemma 3's chat template writes for an image
    split_token = "<start_of_image>"
    image_token = "<image_soft_token>"
    tiny_tokens = ("<start_of_image>", "<image_soft_token>", "<end_of_image>")
    vision_modules = ("vision_tower", "multi_modal_projector")
    tiny_vision_size = 32
    zero_centred_norms = True  # Gemma's RMSNorm scales by (1 + w)
    tiny_sliding_window = 48  # shorter than a tiny prompt, so the sliding layers really slide in tests
    # google/gemma-3-4b-it's config.json (5 sliding-window layers, then 1 global) and preprocessor_config.json
    published = {
        "google/gemma-3-4b-it": {
            "text": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, vocab_size=262208,
                         sliding_window=1024, max_position_embeddings=131072, rms_norm_eps=1e-6,
                         rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                          "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                             "rope_theta": 1000000.0}}),
            "global_every": 6,
            "vision": dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=27, num_attention_heads=16, image_size=896, patch_size=14,
                           layer_norm_eps=1e-6),
            "top": dict(mm_tokens_per_image=256, tie_word_embeddings=True),
            "processor": dict(size={"height": 896, "width": 896}, do_pan_and_scan=False, image_mean=[0.5, 0.5, 0.5],
                              image_std=[0.5, 0.5, 0.5]),
        },
    }  # fmt: skip

    def build_published(self, name: str, tok, layers: int | None):
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil

        spec = self.published[name]
        text = dict(spec["text"], **self.special_ids(tok))
        n = self.cut(text["num_hidden_layers"], layers, least=2)  # a sliding-window layer and a global one
        every = spec["global_every"]
        kinds = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
        if "full_attention" not in kinds:
            kinds[-1] = "full_attention"
        text.update(num_hidden_layers=n, layer_types=kinds)
        vision = dict(spec["vision"], num_hidden_layers=self.cut(spec["vision"]["num_hidden_layers"], layers))
        cfg = Gemma3Config(
            text_config=text, vision_config=vision,
            boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
            image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"), **spec["top"],
        )  # fmt: skip
        return Gemma3ForConditionalGeneration(cfg), Gemma3ImageProcessorPil(**spec["processor"])

    def build_tiny_model(self, tok, text: dict, image_size: int):
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil

        _, head_dim = tiny_heads(text["hidden_size"])
        text = dict(
            text,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=self.tiny_sliding_window,
            layer_types=(["sliding_attention"] * (text["num_hidden_layers"] - 1) + ["full_attention"]),
        )
        size = self.tiny_vision_size
        cfg = Gemma3Config(
            text_config=text,
            vision_config=tiny_vision(model_type="siglip_vision_model", image_size=size, patch_size=8),
            mm_tokens_per_image=(size // 8) ** 2,  # 4x4 patches, pooled 1:1 -> 16 soft tokens per image
            boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
            image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
            tie_word_embeddings=False,
        )
        proc = Gemma3ImageProcessorPil(size={"height": size, "width": size}, do_pan_and_scan=False)
        return Gemma3ForConditionalGeneration(cfg), proc

    def image_ids(self, bundle, n: int) -> list[int]:
        """As Gemma 3's processor expands an image: a blank line, <start_of_image>, the soft tokens,
        <end_of_image>, a blank line."""
        tok = bundle.tokenizer
        gap = tok("\n\n", add_special_tokens=False)["input_ids"]
        boi, eoi = tok.convert_tokens_to_ids("<start_of_image>"), tok.convert_tokens_to_ids("<end_of_image>")
        return gap + [boi] + [bundle.image_token_id] * n + [eoi] + gap

    def process_images(self, bundle, images: Sequence):
        images = square_images(images, bundle.image_size)
        out = bundle.image_processor(images=list(images), return_tensors="pt")
        n = int(bundle.base_model().config.mm_tokens_per_image)
        return out["pixel_values"], None, [n] * len(images)

    def extra_inputs(self, bundle, input_ids: torch.Tensor) -> dict:
        # the forward makes each image's soft tokens attend to each other from these
        return {"token_type_ids": (input_ids == bundle.image_token_id).long()}

    def packed_mask(self, bundle, allowed, input_ids, positions):
        import torch

        is_image = input_ids == bundle.image_token_id  # (P, L)
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        block = torch.where(is_image, torch.cumsum(starts.long(), dim=1), 0)  # image run number, 0 = text
        same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] > 0)
        full = allowed | same.unsqueeze(1)
        text_cfg = bundle.base_model().config.get_text_config()
        window = getattr(text_cfg, "sliding_window", None)
        if not window:
            return full
        near = (positions[:, :, None] - positions[:, None, :]) < window  # query - key position
        return {"full_attention": full, "sliding_attention": full & near.unsqueeze(1)}
