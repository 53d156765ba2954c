"""What every backbone adapter provides, with the defaults most families share.

An adapter is one class per model family (a subclass of :class:`Backbone` in its own module of
``hanorec.backbones``). It owns everything that differs between families: the tiny offline preset,
which checkpoint configs it recognises, the chat-text marker of an image and the tokens that marker
becomes, image preprocessing and its pixel cap, the vision modules LoRA leaves alone and FSDP wraps
on their own, the vision features computed once and reused, the position ids of shared-prefix rows
and the per-image vectors HaRS reads. ``hanorec.models.ModelBundle`` looks its adapter up by family
and delegates; scoring, hardness, sharding and training only ever talk to the bundle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hanorec.errors import UserError

if TYPE_CHECKING:
    import torch
    from PIL import Image




class ModelError(UserError, ValueError):
    """A model name, folder, family or input a backbone cannot use (one clear sentence)."""


BackboneError = ModelError


class Backbone:
    # ---- identity -------------------------------------------------------------------------------
    family: str = ""  # the registry key, saved in hanorec_model.json
    label: str = ""  # human name, for listings
    model_types: tuple[str, ...] = ()  # checkpoint config.model_type values this adapter loads
    preset: str | None = None  # tiny offline preset name
    order: int = 100  # listing order (the paper's family first)
    checkpoints: tuple[str, ...] = ()  # real checkpoint ids this adapter is meant for (examples)
    gpu_config: str | None = None  # the configs/ preset for a GPU with a real checkpoint
    # ---- text -----------------------------------------------------------------------------------
    chat_marker: str = "<image>"  # the text of one image inside the chat text
    image_token: str = "<image>"  # the token repeated once per visual token
    split_token: str | None = None  # the token of the chat marker that image_ids replaces (image_token if None)
    tiny_tokens: tuple[str, ...] = ("<image>",)  # special tokens the tiny tokenizer adds
    tiny_chat_template: str | None = None  # the tiny tokenizer's chat template (None: the common one)
    # ---- modules --------------------------------------------------------------------------------
    language_model: str = "language_model"  # the module (last name) that holds the language model
    vision_modules: tuple[str, ...] = ()  # modules (last names) that turn pixels into LM vectors
    mrope: bool = False  # 3-D (temporal, height, width) rotary positions

    # ---- published architectures (model.init=random) -------------------------------------------
    # checkpoint id -> its published config numbers (config.json and preprocessor_config.json, as facts):
    # {"text": text config keys, "vision": vision config keys, "top": top-level keys, "processor": image
    # processor keys}; built with random weights by build_published, depth cut by model.layers
    published: dict = {}
    zero_centred_norms: bool = False  # RMSNorm scales by (1 + w): a fresh norm has w = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.family:
            from hanorec.backbones import register

            register(cls())

    # ---- tiny preset ----------------------------------------------------------------------------
    def check_tiny_image_size(self, image_size: int) -> None:
        """Raise BackboneError when the tiny preset cannot take images of this square size."""

    def build_tiny_model(self, tok, text: dict, image_size: int):
        """(model, image processor) of the tiny preset: ``text`` holds the language model's config
        keys (vocabulary from ``tok``), to be put in the family's own text config."""
        raise NotImplementedError

    def build_published(self, name: str, tok, layers: int | None):
        """(model, image processor) of checkpoint ``name``'s published architecture with random weights:
        every width, head count, vocabulary size and image setting as published, the depth cut to ``layers``
        (keeping at least one block of each kind); token ids from ``tok``."""
        raise BackboneError(f"model.init = 'random' is not available for {self.label} checkpoints")

    @staticmethod
    def cut(depth: int, layers: int | None, least: int = 1) -> int:
        """The depth kept of a stack of ``depth`` blocks: ``layers`` (at least ``least``, at most ``depth``)."""
        return depth if layers is None else max(least, min(int(layers), depth))

    @staticmethod
    def special_ids(tok) -> dict:
        return dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)

    # ---- chat text and image tokens -------------------------------------------------------------
    def chat_content(self, content: str):
        """The user message content handed to the chat template (a string; a family whose template
        reads a list of parts overrides this)."""
        return content

    @property
    def split(self) -> str:
        """The token of the chat text that :meth:`image_ids` replaces, once per image."""
        return self.split_token or self.image_token

    def image_ids(self, bundle, n: int) -> list[int]:
        """The token ids that replace one split token of the chat text, for an image of n visual tokens."""
        return [bundle.image_token_id] * n

    # ---- pixels ---------------------------------------------------------------------------------
    def process_images(self, bundle, images: Sequence[Image.Image]):
        """(pixel_values, image_grid_thw or None, visual tokens per image) of a prompt's images."""
        raise NotImplementedError

    def pixel_inputs(self, prompts) -> dict:
        """The pixel tensors of several prompts for one forward (in prompt order)."""
        import torch

        with_images = [p for p in prompts if p.n_images]
        if not with_images:
            return {}
        return {"pixel_values": torch.cat([p.pixel_values for p in with_images], dim=0)}

    def pixel_arrays(self, bundle, prompt) -> list[torch.Tensor]:
        """Each image of a prompt as the (C, H, W) normalised tensor the vision tower reads."""
        return list(prompt.pixel_values.float().cpu())

    def cap_pixels(self, processor, max_pixels: int) -> bool:
        """Cap the pixels per image of a checkpoint's processor; False where the processor resizes every
        image to one fixed size (nothing to cap)."""
        return False

    # ---- model inputs ---------------------------------------------------------------------------
    def extra_inputs(self, bundle, input_ids: torch.Tensor) -> dict:
        """Inputs besides ids, mask and pixels that a plain (naive) batch needs, e.g. token type ids."""
        return {}

    def prompt_positions(self, bundle, inner, input_ids, prompt_mask, lengths, image_grid_thw=None):
        """Position ids of the prompt tokens of packed rows, and the position after each prompt (see
        :meth:`hanorec.models.ModelBundle.prompt_positions`). 1-D RoPE: 0, 1, 2, ... on the prompt."""
        import torch

        positions = (torch.cumsum(prompt_mask, dim=1) - 1).clamp(min=0) * prompt_mask
        return positions, lengths.clone()

    def packed_mask(self, bundle, allowed: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor):
        """The boolean (P, 1, L, L) attention of packed rows as the model must get it: the tensor itself, or
        a dict of one mask per attention-layer type. ``allowed`` is causal within each completion and the
        prompt; a family whose naive forward attends otherwise (e.g. bidirectionally within an image, or
        within a sliding window) changes it here, so both paths see the same attention."""
        return allowed

    # ---- vision features ------------------------------------------------------------------------
    def encode_images(self, inner, pixel_inputs: dict) -> dict:
        """``mm_encoder_outputs`` for the forward of ``inner`` (the model's base, e.g. LlavaModel): its own
        ``get_image_features`` exactly as its forward calls it, keeping only what the forward reads."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = inner.get_image_features(**pixel_inputs, return_dict=True)
        return {"image": BaseModelOutputWithPooling(pooler_output=out.pooler_output)}

    def image_features(self, bundle, images: Sequence[Image.Image]) -> torch.Tensor:
        """One vector per image: the mean over its visual tokens of the vision output after the projector
        (what the language model reads). (n, D) float."""
        inner = bundle.base_model()
        weight = bundle.model.get_input_embeddings().weight
        pixels = bundle.pixel_inputs([bundle.encode_prompt("<image>" * len(images), images)])
        pixels = {k: (v.to(weight.device, weight.dtype) if k == "pixel_values" else v.to(weight.device))
                  for k, v in pixels.items()}  # fmt: skip
        out = inner.get_image_features(**pixels)
        feats = out.pooler_output if getattr(out, "pooler_output", None) is not None else out
        return self.per_image_means(feats, len(images))

    def per_image_means(self, feats, n_images: int) -> torch.Tensor:
        import torch

        if isinstance(feats, (list, tuple)):  # one (tokens_i, D) tensor per image
            return torch.stack([f.float().mean(0) for f in feats])
        return feats.float().mean(1) if feats.dim() == 3 else feats.float()  # (n, tokens, D)

    # ---- checkpoints ----------------------------------------------------------------------------
    def load_image_processor(self, name: str, trust_remote_code: bool = False):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)

    def describe(self) -> dict:
        return {
            "family": self.family,
            "label": self.label,
            "preset": self.preset,
            "model_types": list(self.model_types),
            "checkpoints": list(self.checkpoints),
            "gpu_config": self.gpu_config,
            "random_init": sorted(self.published),
            "position_ids": "M-RoPE (3-D)" if self.mrope else "1-D RoPE",
        }


def tiny_heads(hidden_size: int) -> tuple[int, int]:
    """(attention heads, head dim) of a tiny language model."""
    heads = max(2, hidden_size // 32)
    return heads, hidden_size // heads


def tiny_vision(**extra) -> dict:
    """The vision tower size every tiny preset shares (2 layers, width 64, 4 heads), in the key names of
    CLIP / SigLIP-style vision configs, plus the family's own keys."""
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, **extra)


def square_images(images: Sequence[Image.Image], size: int | None) -> list[Image.Image]:
    """Images resized to a fixed square first (tiny presets); unchanged where size is None."""
    if size:
        return [im.convert("RGB").resize((size, size)) for im in images]
    return list(images)
