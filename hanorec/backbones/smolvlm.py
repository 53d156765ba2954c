"""SmolVLM and Idefics3: a SigLIP-style vision transformer, a pixel-shuffle connector that folds
scale_factor^2 patches into one visual token, and a Llama-style text model (``text_model``).

Each image is one global tile here (image splitting off, for real checkpoints too), written as
``<fake_token_around_image><global-img>`` + ``<image>`` per visual token + ``<fake_token_around_image>``,
as the family's processor writes a tile. Positions are plain 1-D. The chat template of the real
checkpoints reads a list of content parts, so the content is given as text and image parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hanorec.backbones.base import Backbone, square_images, tiny_vision

if TYPE_CHECKING:
    import torch


# like hanorec.models.TINY_CHAT_TEMPLATE, reading content given as parts (as the family's own template does)
PARTS_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}<image>{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class SmolVLM(Backbone):
    family = "smolvlm"
    label = "SmolVLM / Idefics3"
    model_types = ("smolvlm", "idefics3")
    preset = "tiny-smolvlm"
    order = 40
    checkpoints = ("HuggingFaceTB/SmolVLM2-2.2B-Instruct", "HuggingFaceTB/SmolVLM-Instruct")
    gpu_config = "configs/gpu-smolvlm-2.2b.yaml"
    chat_marker = "<image>"
    image_token = "<image>"
    tiny_tokens = ("<fake_token_around_image>", "<global-img>", "<image>")
    tiny_chat_template = PARTS_CHAT_TEMPLATE
    language_model = "text_model"
    vision_modules = ("vision_model", "connector")
    tiny_vision_size = 64
    # HuggingFaceTB/SmolVLM2-2.2B-Instruct's config.json (SmolLM2-1.7B text model, SigLIP at 384 with 14-pixel
    # patches, 3x3 pixel shuffle: 81 visual tokens per tile) and preprocessor_config.json
    published = {
        "HuggingFaceTB/SmolVLM2-2.2B-Instruct": {
            "text": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49280, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 130000.0}),
            "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=384, patch_size=14),
            "top": dict(scale_factor=3, tie_word_embeddings=False),
            "processor": dict(do_image_splitting=False, size={"longest_edge": 1536},
                              max_image_size={"longest_edge": 384}, image_mean=[0.5, 0.5, 0.5],
                              image_std=[0.5, 0.5, 0.5]),
        },
    }  # fmt: skip

    def build_published(self, name: str, tok, layers: int | None):
        from transformers import (
            LlamaConfig,
            SmolVLMConfig,
            SmolVLMForConditionalGeneration,
            SmolVLMImageProcessorPil,
        )

        spec = self.published[name]
        text = dict(spec["text"], **self.special_ids(tok))
        text["num_hidden_layers"] = self.cut(text["num_hidden_layers"], layers)
        vision = dict(spec["vision"], num_hidden_layers=self.cut(spec["vision"]["num_hidden_layers"], layers))
        cfg = SmolVLMConfig(vision_config=vision, text_config=LlamaConfig(**text).to_dict(),
                            image_token_id=tok.convert_tokens_to_ids("<image>"), **spec["top"])  # fmt: skip
        return SmolVLMForConditionalGeneration(cfg), SmolVLMImageProcessorPil(**spec["processor"])

    def build_tiny_model(self, tok, text: dict, image_size: int):
        from transformers import (
            LlamaConfig,
            SmolVLMConfig,
            SmolVLMForConditionalGeneration,
            SmolVLMImageProcessorPil,
        )

        size = self.tiny_vision_size
        cfg = SmolVLMConfig(
            vision_config=tiny_vision(image_size=size, patch_size=8),
            text_config=LlamaConfig(**text).to_dict(),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            scale_factor=2,  # 8x8 patches folded 2x2 -> 16 visual tokens per image
            tie_word_embeddings=False,
        )
        proc = SmolVLMImageProcessorPil(
            do_image_splitting=False, size={"longest_edge": size}, max_image_size={"longest_edge": size}
        )
        return SmolVLMForConditionalGeneration(cfg), proc

    def chat_content(self, content: str):
        parts = []
        for k, piece in enumerate(content.split("<image>")):
            if k:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        return parts

    def image_ids(self, bundle, n: int) -> list[int]:
        tok = bundle.tokenizer
        fake, glob = tok.convert_tokens_to_ids("<fake_token_around_image>"), tok.convert_tokens_to_ids("<global-img>")
        return [fake, glob] + [bundle.image_token_id] * n + [fake]

    def tokens_per_image(self, bundle) -> int:
        cfg = bundle.base_model().config
        patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        return patches // (cfg.scale_factor**2)

    def process_images(self, bundle, images: Sequence):
        images = square_images(images, bundle.image_size)
        out = bundle.image_processor(images=[list(images)], return_tensors="pt")  # one sample, n images
        pixels = out["pixel_values"][0]  # (n, 3, H, W)
        return pixels, None, [self.tokens_per_image(bundle)] * len(images)

    def pixel_inputs(self, prompts) -> dict:
        out = super().pixel_inputs(prompts)
        if out:  # the model takes (batch, images, 3, H, W); all images as one row's images
            out["pixel_values"] = out["pixel_values"].unsqueeze(0)
        return out

    def pixel_arrays(self, bundle, prompt) -> list[torch.Tensor]:
        return list(prompt.pixel_values.float().cpu())

    def per_image_means(self, feats, n_images: int) -> torch.Tensor:
        import torch

        flat = torch.cat(list(feats), dim=0) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
        return flat.float().reshape(n_images, -1, flat.shape[-1]).mean(1)

    def load_image_processor(self, name: str, trust_remote_code: bool = False):
        proc = super().load_image_processor(name, trust_remote_code)
        proc.do_image_splitting = False  # one global tile per image (see the module docstring)
        return proc
