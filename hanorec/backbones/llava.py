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
    # llava-hf/llava-1.5-7b-hf's config.json (Vicuna-7B, CLIP ViT-L/14 at 336) and preprocessor_config.json
    published = {
        "llava-hf/llava-1.5-7b-hf": {
            "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
            "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
            "top": dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                        projector_hidden_act="gelu", tie_word_embeddings=False),
            "processor": dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                              image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]),
        },
    }  # fmt: skip

    def build_published(self, name: str, tok, layers: int | None):
        from transformers import (
            CLIPImageProcessor,
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
        )

        spec = self.published[name]
        text = dict(spec["text"], **self.special_ids(tok))
        text["num_hidden_layers"] = self.cut(text["num_hidden_layers"], layers)
        # features come from the second-to-last tower layer: keep at least 2
        vision = dict(spec["vision"], num_hidden_layers=self.cut(spec["vision"]["num_hidden_layers"], layers, 2))
        cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision).to_dict(), text_config=LlamaConfig(**text).to_dict(),
                          image_token_id=tok.convert_tokens_to_ids("<image>"), **spec["top"])  # fmt: skip
        return LlavaForConditionalGeneration(cfg), CLIPImageProcessor(**spec["processor"])

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
