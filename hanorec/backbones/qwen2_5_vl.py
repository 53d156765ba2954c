"""Qwen2.5-VL (and Qwen2-VL): the paper's backbone.

Images become patch rows (patches x C*T*p*p) with a (t, h, w) grid; 2x2 patches merge into one visual
token; positions are 3-D M-RoPE ids from the model's own ``get_rope_index``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hanorec.backbones.base import Backbone, BackboneError, square_images, tiny_heads, tiny_vision

if TYPE_CHECKING:
    import torch



class Qwen25VL(Backbone):
    family = "qwen2_5_vl"
    label = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl", "qwen2_vl")
    preset = "tiny-qwen2.5-vl"
    order = 0
    checkpoints = ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct")
    gpu_config = "configs/gpu-qwen2.5-vl-3b.yaml"
    chat_marker = "<|vision_start|><|image_pad|><|vision_end|>"
    image_token = "<|image_pad|>"
    tiny_tokens = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
    vision_modules = ("visual",)
    mrope = True
    tiny_patch = 8
    # Qwen/Qwen2.5-VL-3B-Instruct's config.json and preprocessor_config.json
    published = {
        "Qwen/Qwen2.5-VL-3B-Instruct": {
            "text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
                         hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                             "mrope_section": [16, 24, 24]}),
            "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", tokens_per_second=2),
            "top": dict(tie_word_embeddings=True),
            "processor": dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136,
                              max_pixels=12845056, image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]),
        },
    }  # fmt: skip

    # ---- tiny preset ----------------------------------------------------------------------------
    def check_tiny_image_size(self, image_size: int) -> None:
        step = 2 * self.tiny_patch
        if image_size < step or image_size % step:
            raise BackboneError(
                f"data.image_size = {image_size} does not suit {self.preset}: use a multiple of {step} "
                f"({self.tiny_patch}x{self.tiny_patch} patches merged 2x2), e.g. {2 * step} or {4 * step}"
            )

    @staticmethod
    def mrope_section(head_dim: int) -> list[int]:
        half = head_dim // 2  # mrope sections (temporal, height, width) must sum to head_dim / 2
        return [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]

    def token_ids(self, tok) -> dict:
        return dict(
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        )

    def tiny_processor(self, image_size: int):
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor(
            patch_size=self.tiny_patch,
            merge_size=2,
            temporal_patch_size=2,
            min_pixels=(image_size // 2) ** 2,
            max_pixels=image_size * image_size,
        )

    def tiny_vision(self, text: dict, **extra) -> dict:
        """The shared tiny tower size in this family's key names (depth, num_heads), merging 2x2 patches."""
        v = tiny_vision(patch_size=self.tiny_patch, spatial_merge_size=2, temporal_patch_size=2,
                        out_hidden_size=text["hidden_size"], **extra)  # fmt: skip
        v["depth"], v["num_heads"] = v.pop("num_hidden_layers"), v.pop("num_attention_heads")
        return v

    def build_tiny_model(self, tok, text: dict, image_size: int):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        _, head_dim = tiny_heads(text["hidden_size"])
        text["rope_parameters"] = {
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": self.mrope_section(head_dim)
        }  # fmt: skip
        cfg = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=self.tiny_vision(text, window_size=4 * self.tiny_patch, fullatt_block_indexes=[1]),
            **self.token_ids(tok),
            tie_word_embeddings=False,
        )
        # 64x64 with 8x8 patches merged 2x2 -> 16 visual tokens per image
        return Qwen2_5_VLForConditionalGeneration(cfg), self.tiny_processor(image_size)

    def cut_vision(self, vision: dict, layers: int | None) -> dict:
        """The vision tower cut to ``layers`` blocks (at least 2), keeping the published full-attention blocks
        that fall inside and at least one (the last) besides the window-attention ones."""
        depth = self.cut(vision["depth"], layers, least=2)
        full = [i for i in vision["fullatt_block_indexes"] if i < depth] or [depth - 1]
        return dict(vision, depth=depth, fullatt_block_indexes=full)

    def build_published(self, name: str, tok, layers: int | None):
        from transformers import (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2VLImageProcessorPil,
        )

        spec = self.published[name]
        text = dict(spec["text"], **self.special_ids(tok))
        text["num_hidden_layers"] = self.cut(text["num_hidden_layers"], layers)
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=self.cut_vision(spec["vision"], layers),
                               **self.token_ids(tok), **spec["top"])  # fmt: skip
        return Qwen2_5_VLForConditionalGeneration(cfg), Qwen2VLImageProcessorPil(**spec["processor"])

    # ---- pixels ---------------------------------------------------------------------------------
    def process_images(self, bundle, images: Sequence):
        images = square_images(images, bundle.image_size)
        out = bundle.image_processor(images=list(images), return_tensors="pt")
        grid = out["image_grid_thw"]
        merge = bundle.image_processor.merge_size
        per_image = [int(g.prod()) // (merge * merge) for g in grid]
        return out["pixel_values"], grid, per_image

    def pixel_inputs(self, prompts) -> dict:
        import torch

        out = super().pixel_inputs(prompts)
        if out:
            out["image_grid_thw"] = torch.cat([p.image_grid_thw for p in prompts if p.n_images], dim=0)
        return out

    def pixel_arrays(self, bundle, prompt) -> list[torch.Tensor]:
        """Un-patchify each image's (h*w, C*T*p*p) rows back to (C, h*p, w*p) (first frame)."""
        proc = bundle.image_processor
        pixels = prompt.pixel_values.float().cpu()
        p, m, t = proc.patch_size, proc.merge_size, proc.temporal_patch_size
        arrays, start = [], 0
        for gt, gh, gw in prompt.image_grid_thw.tolist():
            rows = pixels[start : start + gt * gh * gw]
            start += gt * gh * gw
            x = rows.reshape(gt, gh // m, gw // m, m, m, -1, t, p, p)[0, ..., 0, :, :]  # first frame
            # (gh/m, gw/m, mh, mw, C, ph, pw) -> (C, gh/m, mh, ph, gw/m, mw, pw) -> (C, gh*p, gw*p)
            arrays.append(x.permute(4, 0, 2, 5, 1, 3, 6).reshape(-1, gh * p, gw * p))
        return arrays

    def cap_pixels(self, processor, max_pixels: int) -> bool:
        """The processor resizes by pixel count (its size's longest_edge is a pixel count): larger images
        are scaled down keeping their aspect ratio."""
        size = getattr(processor, "size", None)
        if not hasattr(processor, "merge_size") or size is None:
            return False
        cap = int(max_pixels)
        if isinstance(size, dict):
            processor.size = {**size, "longest_edge": cap, "shortest_edge": min(size.get("shortest_edge") or cap, cap)}
        else:  # transformers' SizeDict
            size.longest_edge = cap
            size.shortest_edge = min(size.shortest_edge or cap, cap)
        return True

    # ---- model inputs ---------------------------------------------------------------------------
    def extra_inputs(self, bundle, input_ids: torch.Tensor) -> dict:
        return {"mm_token_type_ids": (input_ids == bundle.image_token_id).long()}

    def prompt_positions(self, bundle, inner, input_ids, prompt_mask, lengths, image_grid_thw=None):
        """(3, P, L) M-RoPE ids of the prompts from the model's own ``get_rope_index``; raises ValueError
        when an image token appears outside the prompts (its pixels could not be placed)."""
        if bool(((input_ids == bundle.image_token_id) & (prompt_mask == 0)).any()):
            raise ValueError(
                "a completion contains the image token; shared-prefix scoring cannot place its pixels"
            )
        positions, deltas = inner.model.get_rope_index(
            input_ids,
            mm_token_type_ids=(input_ids == bundle.image_token_id).long() * prompt_mask,
            image_grid_thw=image_grid_thw,
            attention_mask=prompt_mask,
        )
        return positions, lengths + deltas.reshape(-1).to(lengths.device)

    def encode_images(self, inner, pixel_inputs: dict) -> dict:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = inner.get_image_features(pixel_inputs["pixel_values"], pixel_inputs["image_grid_thw"], return_dict=True)
        return {"image": BaseModelOutputWithPooling(pooler_output=out.pooler_output)}
