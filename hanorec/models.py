"""Models: one loading path for every backbone, tiny offline presets, LoRA on the language model only.

Every model-family difference lives here (how an `<image>` placeholder becomes image tokens, which
pixel tensors go with them, chat formatting), so tasks, scoring and training never branch on family.

- Tiny presets (`tiny-qwen2.5-vl`, `tiny-llava`) are built from transformers config classes with
  random init and a BPE tokenizer trained locally on the dataset's text: no network, ever.
- Any Hugging Face model id or local folder loads through `AutoModelForImageTextToText`, its tokenizer
  and its image processor (not the full processor, which needs torchvision for some families).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

TINY_PRESETS = ("tiny-qwen2.5-vl", "tiny-llava")
FAMILIES = ("qwen2_5_vl", "qwen2_vl", "llava")
MROPE_FAMILIES = ("qwen2_5_vl", "qwen2_vl")  # 3-D (temporal, height, width) rotary positions
META_FILE = "hanorec_model.json"

# The text the chat template sees for one image, per family; the single image token inside it is
# expanded to the number of visual tokens the image produces.
IMAGE_MARKERS = {
    "qwen2_5_vl": ("<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>"),
    "qwen2_vl": ("<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>"),
    "llava": ("<image>", "<image>"),
}
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ModelError(ValueError):
    """A model name, folder or family the user gave cannot be used (one clear sentence)."""


@dataclass
class EncodedPrompt:
    """A prompt turned into token ids plus the pixel tensors its image tokens stand for."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # qwen: (patches, dim) for all images; llava: (n_images, 3, H, W)
    image_grid_thw: torch.Tensor | None = None  # qwen: (n_images, 3)
    n_images: int = 0


@dataclass
class ModelView:
    """An example exactly as the model sees it (from :meth:`ModelBundle.model_view`).

    chat_text: the text after the model's chat template, one image marker per image;
    text: the decoded input ids, i.e. chat_text with every image token expanded to the number of
        visual tokens its image produces (what the tokenizer and the language model see);
    input_ids / n_tokens: the prompt's token ids and their count (image tokens included);
    image_tokens: visual tokens per image; images: the images at the resolution the model's own
        image processing gives them (Qwen: the resized patch grid; LLaVA: the CLIP crop), rebuilt
        from the pixel values the model receives; image_sizes: their (width, height).
    """

    chat_text: str
    text: str
    input_ids: list[int]
    image_token: str
    image_tokens: list[int]
    images: list[Image.Image]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_image_tokens(self) -> int:
        return sum(self.image_tokens)

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        return [im.size for im in self.images]

    def collapsed_text(self) -> str:
        """``text`` with each run of image tokens written once with its length, e.g. ``<|image_pad|>x16``."""
        tok = re.escape(self.image_token)
        return re.sub(
            f"(?:{tok})+",
            lambda m: f"{self.image_token}x{len(m.group(0)) // len(self.image_token)}",
            self.text,
        )


class ModelLock:
    """A re-entrant lock for one model. A deep copy (a copied model) gets a fresh lock; a shallow copy shares
    the model, so it shares the lock."""

    def __init__(self):
        self._lock = threading.RLock()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return ModelLock()

    def __reduce__(self):
        return (ModelLock, ())


@dataclass
class ModelBundle:
    """A model with everything needed to feed it: tokenizer, image processor, family rules."""

    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    family: str
    name: str
    image_size: int | None = None  # images are resized to this square first (tiny presets)
    meta: dict = field(default_factory=dict)
    # held by every call that runs the model with changed state (eval mode, noise hooks, a disabled
    # adapter), so concurrent callers (the app serves several sessions) never see each other's state
    lock: ModelLock = field(default_factory=lambda: ModelLock(), repr=False, compare=False)

    # ---- token ids ---------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_MARKERS[self.family][1])

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return self.eos_token_id if pid is None else pid

    def chat_text(self, text: str) -> str:
        """The user turn in the model's chat format, ending where the answer starts."""
        marker = IMAGE_MARKERS[self.family][0]
        content = text.replace("<image>", marker) if marker != "<image>" else text
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        return f"USER: {content} ASSISTANT:"

    def _image_tokens(self, n: int) -> list[int]:
        return [self.image_token_id] * n

    def encode_prompt(self, text: str, images: Sequence[Image.Image]) -> EncodedPrompt:
        """Chat-format the text, expand every image placeholder to its visual tokens, process pixels."""
        n_placeholders = text.count("<image>")
        if n_placeholders != len(images):
            raise ValueError(
                f"the prompt has {n_placeholders} <image> placeholders but {len(images)} images were given"
            )
        chat = self.chat_text(text)
        image_token = IMAGE_MARKERS[self.family][1]
        pieces = chat.split(image_token)
        pixel_values, grid, per_image = self._process_images(images)
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
            if k < len(pieces) - 1:
                ids += self._image_tokens(per_image[k])
        return EncodedPrompt(ids, pixel_values, grid, len(images))

    def model_view(self, text: str, images: Sequence[Image.Image]) -> ModelView:
        """What the model sees for a prompt: chat-templated text, the same text with image tokens
        expanded (the decode of :meth:`encode_prompt`'s ids), token counts and the processed images."""
        enc = self.encode_prompt(text, images)
        image_token = IMAGE_MARKERS[self.family][1]
        per_image = self._process_images(images)[2] if images else []
        return ModelView(
            chat_text=self.chat_text(text),
            text=self.tokenizer.decode(enc.input_ids, skip_special_tokens=False),
            input_ids=list(enc.input_ids),
            image_token=image_token,
            image_tokens=list(per_image),
            images=self.processed_images(enc),
        )

    def view_example(self, example, ds) -> ModelView:
        """:meth:`model_view` of a task example (``example.prompt`` and the images of ``example.image_items``)."""
        images = [ds.load_image(i, size=self.image_size) for i in example.image_items]
        return self.model_view(example.prompt, images)

    def processed_images(self, prompt: EncodedPrompt) -> list[Image.Image]:
        """The prompt's images rebuilt from the pixel values the model receives (normalisation undone):
        Qwen: un-patchify each image's (h*w, C*T*p*p) rows back to (C, h*p, w*p); LLaVA: (n, 3, H, W)."""
        if not prompt.n_images:
            return []
        proc = self.image_processor
        mean = torch.tensor(proc.image_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(proc.image_std, dtype=torch.float32).view(-1, 1, 1)
        pixels = prompt.pixel_values.float().cpu()
        if self.family in MROPE_FAMILIES:
            p, m, t = proc.patch_size, proc.merge_size, proc.temporal_patch_size
            arrays, start = [], 0
            for gt, gh, gw in prompt.image_grid_thw.tolist():
                rows = pixels[start : start + gt * gh * gw]
                start += gt * gh * gw
                x = rows.reshape(gt, gh // m, gw // m, m, m, -1, t, p, p)[0, ..., 0, :, :]  # first frame
                # (gh/m, gw/m, mh, mw, C, ph, pw) -> (C, gh/m, mh, ph, gw/m, mw, pw) -> (C, gh*p, gw*p)
                arrays.append(x.permute(4, 0, 2, 5, 1, 3, 6).reshape(-1, gh * p, gw * p))
        else:
            arrays = list(pixels)
        out = []
        for x in arrays:
            x = (x * std + mean) * 255.0  # undo normalise and rescale
            x = x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            out.append(Image.fromarray(x, "RGB"))
        return out

    def encode_completion(self, text: str, eos: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + [self.eos_token_id] if eos else ids

    def _process_images(self, images: Sequence[Image.Image]):
        if not images:
            return None, None, []
        if self.image_size:
            images = [im.convert("RGB").resize((self.image_size, self.image_size)) for im in images]
        out = self.image_processor(images=list(images), return_tensors="pt")
        if self.family in MROPE_FAMILIES:
            grid = out["image_grid_thw"]
            merge = self.image_processor.merge_size
            per_image = [int(g.prod()) // (merge * merge) for g in grid]
            return out["pixel_values"], grid, per_image
        # llava: every image gives the same number of patch tokens
        cfg = self.base_model().config
        vc = cfg.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        if getattr(cfg, "vision_feature_select_strategy", "default") == "full":
            n += 1
        return out["pixel_values"], None, [n] * len(images)

    # ---- batching ------------------------------------------------------------------------------
    def collate(self, prompts: Sequence[EncodedPrompt], completions: Sequence[list[int]]) -> dict:
        """Right-padded batch of prompt+completion sequences; labels are -100 outside the completion."""
        seqs = [p.input_ids + c for p, c in zip(prompts, completions)]
        width = max(len(s) for s in seqs)
        n = len(seqs)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            s = p.input_ids + c
            input_ids[i, : len(s)] = torch.tensor(s)
            attention[i, : len(s)] = 1
            labels[i, len(p.input_ids) : len(s)] = torch.tensor(c, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        batch.update(self.pixel_inputs(prompts))
        if self.family in MROPE_FAMILIES:
            batch["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        return batch

    def pixel_inputs(self, prompts: Sequence[EncodedPrompt]) -> dict:
        with_images = [p for p in prompts if p.n_images]
        if not with_images:
            return {}
        out = {"pixel_values": torch.cat([p.pixel_values for p in with_images], dim=0)}
        if self.family in MROPE_FAMILIES:
            out["image_grid_thw"] = torch.cat([p.image_grid_thw for p in with_images], dim=0)
        return out

    # ---- positions for shared-prefix scoring ---------------------------------------------------
    def prompt_positions(
        self,
        inner: torch.nn.Module,
        input_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        lengths: torch.Tensor,
        image_grid_thw: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids of the prompt tokens of packed rows, and the position after each prompt.

        inner: the base model (no peft / DDP wrapper); input_ids, prompt_mask (P, L), prompt_mask 1 on
        prompt tokens; lengths (P,) prompt lengths. Returns (positions, next_pos): positions (P, L)
        for 1-D RoPE families, (3, P, L) for Qwen mRoPE (from the model's own ``get_rope_index``),
        correct on the prompt tokens (0 elsewhere); next_pos (P,) is the position the token right
        after prompt i gets in a plain prompt+completion sequence. Qwen: raises ValueError when an
        image token appears outside the prompts (its pixels could not be placed).
        """
        if self.family in MROPE_FAMILIES:
            if bool(((input_ids == self.image_token_id) & (prompt_mask == 0)).any()):
                raise ValueError(
                    "a completion contains the image token; shared-prefix scoring cannot place its pixels"
                )
            positions, deltas = inner.model.get_rope_index(
                input_ids,
                mm_token_type_ids=(input_ids == self.image_token_id).long() * prompt_mask,
                image_grid_thw=image_grid_thw,
                attention_mask=prompt_mask,
            )
            return positions, lengths + deltas.reshape(-1).to(lengths.device)
        positions = (torch.cumsum(prompt_mask, dim=1) - 1).clamp(min=0) * prompt_mask
        return positions, lengths.clone()

    # ---- parts used by hardness (item embeddings) ---------------------------------------------
    def base_model(self) -> torch.nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """One vector per image: the mean over its visual tokens of the vision tower's output after the
        merger / projector, i.e. the vectors the language model reads (method.md section 7). (n, D)."""
        if not images:
            raise ValueError("image_features needs at least one image")
        inner = self.base_model()
        weight = self.model.get_input_embeddings().weight
        pixels = self.pixel_inputs([self.encode_prompt("<image>" * len(images), images)])
        kwargs = {}
        if "image_grid_thw" in pixels:
            kwargs["image_grid_thw"] = pixels["image_grid_thw"].to(weight.device)
        out = inner.get_image_features(pixels["pixel_values"].to(weight.device, weight.dtype), **kwargs)
        feats = out.pooler_output if getattr(out, "pooler_output", None) is not None else out
        if isinstance(feats, (list, tuple)):  # qwen: one (tokens_i, D) tensor per image
            return torch.stack([f.float().mean(0) for f in feats])
        return feats.float().mean(1) if feats.dim() == 3 else feats.float()  # llava: (n, tokens, D)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        meta = dict(self.meta, family=self.family, image_size=self.image_size, name=self.name)
        (path / META_FILE).write_text(json.dumps(meta, indent=2))


# ------------------------------------------------------------------------------------------------
# Tiny offline presets
# ------------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
FAMILY_TOKENS = {
    "qwen2_5_vl": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"],
    "llava": ["<image>"],
}


def train_tokenizer(texts: Sequence[str], vocab_size: int, family: str):
    """A byte-level BPE tokenizer trained on the dataset's own text, in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS + FAMILY_TOKENS[family]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=specials[4:],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny(
    preset: str,
    texts: Sequence[str],
    *,
    hidden_size: int = 128,
    layers: int = 2,
    vocab_size: int = 600,
    image_size: int = 64,
    seed: int = 0,
) -> ModelBundle:
    """A randomly initialised tiny multimodal LLM of the preset's architecture, deterministic for a seed."""
    if preset not in TINY_PRESETS:
        raise ModelError(f"unknown tiny preset {preset!r}; use one of {list(TINY_PRESETS)}")
    family = "qwen2_5_vl" if preset == "tiny-qwen2.5-vl" else "llava"
    if family == "qwen2_5_vl" and (image_size < 16 or image_size % 16):
        raise ModelError(
            f"data.image_size = {image_size} does not suit {preset}: use a multiple of 16 "
            "(8x8 patches merged 2x2), e.g. 32 or 64"
        )
    tok = train_tokenizer(texts, vocab_size, family)
    V = len(tok)
    heads = max(2, hidden_size // 32)
    head_dim = hidden_size // heads
    text = dict(
        vocab_size=V,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

        half = head_dim // 2  # mrope sections (temporal, height, width) must sum to head_dim / 2
        section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
        patch = 8
        cfg = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=dict(
                depth=2,
                hidden_size=64,
                intermediate_size=128,
                num_heads=4,
                patch_size=patch,
                spatial_merge_size=2,
                temporal_patch_size=2,
                out_hidden_size=hidden_size,
                window_size=4 * patch,
                fullatt_block_indexes=[1],
            ),
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )
        model = Qwen2_5_VLForConditionalGeneration(cfg)
        proc = Qwen2VLImageProcessor(
            patch_size=patch,
            merge_size=2,
            temporal_patch_size=2,
            min_pixels=(image_size // 2) ** 2,
            max_pixels=image_size * image_size,
        )
        # 64x64 with 8x8 patches merged 2x2 -> 16 visual tokens per image
    else:
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
                image_size=vision_size,
                patch_size=8,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                projection_dim=64,
            ).to_dict(),
            text_config=LlamaConfig(**text).to_dict(),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
        model = LlavaForConditionalGeneration(cfg)
        proc = CLIPImageProcessor(
            size={"shortest_edge": vision_size}, crop_size={"height": vision_size, "width": vision_size}
        )
        # 32x32 with 8x8 patches -> 16 visual tokens per image (CLS dropped)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return ModelBundle(
        model, tok, proc, family, preset, image_size=image_size, meta={"preset": preset, "seed": seed}
    )


# ------------------------------------------------------------------------------------------------
# Loading by id or folder
# ------------------------------------------------------------------------------------------------
def family_of(model_type: str) -> str:
    mapping = {"qwen2_5_vl": "qwen2_5_vl", "qwen2_vl": "qwen2_vl", "llava": "llava"}
    if model_type not in mapping:
        raise ModelError(
            f"model type {model_type!r} is not supported yet; supported families: {sorted(set(mapping))}"
        )
    return mapping[model_type]


def default_dtype(dtype: str = "auto") -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    image_size: int | None = None,
    attn_implementation: str | None = None,
    max_pixels: int | None = None,
) -> ModelBundle:
    """Load a saved tiny preset, a local checkpoint folder or a Hugging Face model id, the same way.

    A saved tiny preset keeps its fixed square image size; any other model lets its own image processor
    choose the resolution, capped at ``max_pixels`` per image where the processor takes a cap (Qwen2-VL
    family; the authors cap preference training at 262,144 pixels)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    name = str(name_or_path)
    if name in TINY_PRESETS:
        raise ModelError(
            f"{name!r} is a tiny preset: build it with build_tiny() (it needs the dataset's text)"
        )
    path = Path(name)
    meta = {}
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json")
        if (path / META_FILE).is_file():
            meta = json.loads((path / META_FILE).read_text())
    try:
        cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(
            f"cannot load model {name!r}: not a local folder and not in the local Hugging Face cache "
            f"(this machine may be offline): {str(e).splitlines()[0]}"
        ) from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ModelError(
            f"model {name!r} ships its own Python code, which runs only with --model.trust_remote_code=true "
            "(off by default: turn it on only for a checkpoint you trust)"
        ) from None
    family = family_of(cfg.model_type)
    kwargs = {"dtype": default_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    proc = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    size = image_size if image_size is not None else meta.get("image_size")
    if size is None and max_pixels:
        cap_image_pixels(proc, max_pixels)
    return ModelBundle(model, tok, proc, family, meta.get("name", name), image_size=size, meta=meta)


def cap_image_pixels(processor, max_pixels: int) -> bool:
    """Cap the pixels per image of a processor that resizes by pixel count (Qwen2-VL family: its size's
    longest_edge is a pixel count): larger images are scaled down keeping their aspect ratio. Returns False
    (processor unchanged) for fixed-size processors such as CLIP's, which resize every image to one size."""
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


HUB_ID = re.compile(r"(?!.*(--|\.\.))(?:[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/)?[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?")
MAX_MODEL_NAME = 256


def check_model_form(name: str) -> None:
    """ModelError when a backbone text cannot be a preset, a folder or a Hugging Face id ([owner/]name, each part
    at most 96 characters of letters, digits, '-', '_' and '.', no '--' or '..'), before any file is touched."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError("model.name is empty; name a tiny preset, a model folder or a Hugging Face id")
    if "\x00" in name:
        raise ModelError("model.name contains a NUL byte, which no model id or folder name can hold")
    if re.search(r"%[0-9A-Fa-f]{2}", name):
        raise ModelError(f"model.name = {name[:80]!r} looks URL-encoded; type the id or folder plainly")
    if len(name) > MAX_MODEL_NAME:
        raise ModelError(f"model.name is {len(name)} characters long; an id or folder name has at most {MAX_MODEL_NAME}")
    if ".." in Path(name).parts:
        raise ModelError(f"model.name = {name!r} contains '..'; name the folder directly")
    if name in TINY_PRESETS or name.startswith(("/", ".", "~")) or Path(name).exists():
        return
    if not HUB_ID.fullmatch(name):
        raise ModelError(
            f"model.name = {name!r} is not a tiny preset, an existing folder, or a Hugging Face id of the form "
            "owner/name (letters, digits, '-', '_', '.'; at most 96 characters each part)"
        )


def check_model_name(name: str) -> None:
    """Raise ModelError before any data is loaded when `name` is neither a tiny preset, a local folder,
    nor a model id in the local Hugging Face cache; the message lists the presets and the closest name."""
    import difflib

    check_model_form(name)
    if name in TINY_PRESETS or Path(name).exists():
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an id huggingface_hub cannot even parse is not in the cache
        cached = False
    if cached:
        return
    close = difflib.get_close_matches(name, TINY_PRESETS, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ModelError(
        f"model.name = {name!r} is not a built-in preset ({', '.join(TINY_PRESETS)}), not a local folder, "
        f"and not in the local Hugging Face cache (nothing is downloaded at run time){hint}"
    )


def get_model(cfg, texts: Sequence[str] | None = None, seed: int = 0, image_size: int | None = None) -> ModelBundle:
    """From a ModelConfig: build a tiny preset (needs the dataset's text) or load by id / folder.

    image_size (tiny presets): the square size images are resized to before the processor (default 64).
    """
    if cfg.name in TINY_PRESETS:
        if texts is None:
            raise ModelError(f"tiny preset {cfg.name!r} needs the dataset's text to train its tokenizer")
        return build_tiny(
            cfg.name,
            texts,
            hidden_size=cfg.tiny_hidden_size,
            layers=cfg.tiny_layers,
            vocab_size=cfg.tiny_vocab_size,
            image_size=image_size or 64,
            seed=seed,
        )
    return load_model(
        cfg.name,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        max_pixels=cfg.max_pixels,
    )


# ------------------------------------------------------------------------------------------------
# LoRA on the language model only
# ------------------------------------------------------------------------------------------------
LANGUAGE_MODEL_PATTERN = r"(?:.*\.)?language_model\.(?:.*\.)?({names})"


def lora_target_regex(target_modules: Sequence[str]) -> str:
    """A regex peft matches against full module names: the named linears inside the language model only."""
    names = "|".join(re.escape(n) for n in target_modules)
    return LANGUAGE_MODEL_PATTERN.format(names=names)


def add_lora(bundle: ModelBundle, lora_cfg, adapter_name: str = "default", seed: int = 0):
    """Wrap the model with a fresh LoRA adapter on the language model's linear layers (never the vision tower).

    The adapter's random init is drawn from its own generator seeded with `seed` (the global RNG is left as
    it was), so it does not depend on what ran before: a freshly built and a reloaded base model, or a
    stage-2 variant run after others in the same process, get the same adapter.
    """
    from peft import LoraConfig, get_peft_model

    pcfg = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_target_regex(lora_cfg.target_modules),
        modules_to_save=list(lora_cfg.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        bundle.model = get_peft_model(bundle.model, pcfg, adapter_name=adapter_name)
    return bundle


def vision_parameter_names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if re.search(r"(^|\.)(visual|vision_tower)\.", n)]
