"""Qwen3-VL: Qwen2.5-VL's image handling and M-RoPE ids (interleaved sections), with a learned position
embedding in the vision tower and DeepStack: vision features of several tower layers are added to the first
language-model layers' hidden states at the image tokens, so the features computed once keep them too.
"""

from __future__ import annotations

from hanorec.backbones.base import tiny_heads
from hanorec.backbones.qwen2_5_vl import Qwen25VL


class Qwen3VL(Qwen25VL):
    family = "qwen3_vl"
    label = "Qwen3-VL"
    model_types = ("qwen3_vl",)
    preset = "tiny-qwen3-vl"
    order = 20
    checkpoints = ("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct")
    gpu_config = "configs/gpu-qwen3-vl-4b.yaml"
    # Qwen/Qwen3-VL-4B-Instruct's config.json and preprocessor_config.json
    published = {
        "Qwen/Qwen3-VL-4B-Instruct": {
            "text": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                         rms_norm_eps=1e-6, hidden_act="silu",
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
            "vision": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh"),
            "top": dict(tie_word_embeddings=True),
            "processor": dict(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=65536,
                              max_pixels=16777216, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
        },
    }  # fmt: skip

    def build_tiny_model(self, tok, text: dict, image_size: int):
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        _, head_dim = tiny_heads(text["hidden_size"])
        text = {k: v for k, v in text.items() if k not in ("bos_token_id", "eos_token_id", "tie_word_embeddings")}
        text["head_dim"] = head_dim
        text["rope_parameters"] = {
            "rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": self.mrope_section(head_dim), "mrope_interleaved": True,
        }  # fmt: skip
        cfg = Qwen3VLConfig(
            text_config=text,
            vision_config=self.tiny_vision(
                text,
                num_position_embeddings=64,  # an 8x8 grid, interpolated to each image's patch grid
                deepstack_visual_indexes=[0],  # tower layer 0 feeds language layer 0
            ),
            **self.token_ids(tok),
            tie_word_embeddings=False,
        )
        # 64x64 with 8x8 patches merged 2x2 -> 16 visual tokens per image
        return Qwen3VLForConditionalGeneration(cfg), self.tiny_processor(image_size)

    def cut_vision(self, vision: dict, layers: int | None) -> dict:
        """The tower cut to ``layers`` blocks (at least 2), keeping the DeepStack taps inside it and at least one."""
        depth = self.cut(vision["depth"], layers, least=2)
        taps = [i for i in vision["deepstack_visual_indexes"] if i < depth] or [depth - 2]
        return dict(vision, depth=depth, deepstack_visual_indexes=taps)

    def build_published(self, name: str, tok, layers: int | None):
        from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

        spec = self.published[name]
        text = dict(spec["text"], pad_token_id=tok.pad_token_id)
        text["num_hidden_layers"] = self.cut(text["num_hidden_layers"], layers)
        cfg = Qwen3VLConfig(text_config=text, vision_config=self.cut_vision(spec["vision"], layers),
                            **self.token_ids(tok), **spec["top"])  # fmt: skip
        return Qwen3VLForConditionalGeneration(cfg), Qwen2VLImageProcessorPil(**spec["processor"])

    def encode_images(self, inner, pixel_inputs: dict) -> dict:
        """The merged features and the DeepStack features (both read by the forward)."""
        out = inner.get_image_features(pixel_inputs["pixel_values"], pixel_inputs["image_grid_thw"], return_dict=True)
        out.last_hidden_state = None  # not read by the forward: do not keep the tower's last layer alive
        return {"image": out}
