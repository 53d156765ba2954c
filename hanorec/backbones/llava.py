"""LLaVA (1.5 style): a CLIP vision tower, an MLP projector and a Llama language model.

Every image is resized and centre-cropped to the tower's fixed size and gives the same number of patch
tokens; positions are plain 1-D.
"""

from __future__ import annotations

from collections.abc import Sequence

from hanorec.backbones.base import Backbone, square_images, tiny_vision


class Llava(Backbone):
    family = "llava"
    label = "LLaVA-1.5"
    model_types = ("llava",)
    preset = "tiny-llava"
    order = 10
    checkpoints = ("llava-hf/llava-1.5-7b-hf",)
    gpu_config = "configs/gpu-llava-1.5-7b.yaml"
    chat_marker = "<image>"
    image_token = "<image>"
    tiny_tokens = ("<image>",)
    vision_modules = ("vision_tower", "multi_modal_projector")

    def build_tiny_model(self, tok, text: dict, image_size: int):
        from transformers import (
            CLIPImageProcessor,
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
        )

        vision_size = 32
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(
                **tiny_vision(image_size=vision_size, patch_size=8, projection_dim=64)
            ).to_dict(),
            text_config=LlamaConfig(**text).to_dict(),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
        proc = CLIPImageProcessor(
            size={"shortest_edge": vision_size}, crop_size={"height": vision_size, "width": vision_size}
        )
        # 32x32 with 8x8 patches -> 16 visual tokens per image (CLS dropped)
        return LlavaForConditionalGeneration(cfg), proc

    def process_images(self, bundle, images: Sequence):
        images = square_images(images, bundle.image_size)
        out = bundle.image_processor(images=list(images), return_tensors="pt")
        # every image gives the same number of patch tokens
        cfg = bundle.base_model().config
        vc = cfg.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        if getattr(cfg, "vision_feature_select_strategy", "default") == "full":
            n += 1
        return out["pixel_values"], None, [n] * len(images)
