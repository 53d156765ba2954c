"""Models: one loading path for every backbone, tiny offline presets, LoRA on the language model only.

Every model-family difference lives in that family's adapter (``hanorec.backbones``: how an `<image>`
placeholder becomes image tokens, which pixel tensors go with them, chat formatting, positions, the
vision modules); :class:`ModelBundle` looks its adapter up by family and delegates, so tasks, scoring,
hardness and training never branch on family.

- Tiny presets (one per family, ``python -m hanorec models`` lists them) are built from transformers
  config classes with random init and a BPE tokenizer trained locally on the dataset's text: no network.
- Any Hugging Face model id or local folder loads through `AutoModelForImageTextToText`, its tokenizer
  and its image processor (not the full processor, which needs torchvision for some families).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from hanorec.backbones import (
    Backbone,
    ModelError,
    all_backbones,
    backbone,
    families,
    for_model_type,
    for_preset,
    language_model_names,
    tiny_presets,
    vision_module_names,
)

META_FILE = "hanorec_model.json"
TINY_PRESETS = tiny_presets()
FAMILIES = families()
MROPE_FAMILIES = tuple(a.family for a in all_backbones() if a.mrope)  # 3-D (temporal, height, width) rotary positions
# The text the chat template sees for one image, per family, and the image token inside it that is
# expanded to the image's visual tokens (each adapter's chat_marker and image_token).
IMAGE_MARKERS = {a.family: (a.chat_marker, a.image_token) for a in all_backbones()}
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class EncodedPrompt:
    """A prompt turned into token ids plus the pixel tensors its image tokens stand for."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # the family's pixel tensor: patch rows of all images, or (n_images, 3, H, W)
    image_grid_thw: torch.Tensor | None = None  # patch-grid families: (n_images, 3)
    n_images: int = 0


@dataclass
class ModelView:
    """An example exactly as the model sees it (from :meth:`ModelBundle.model_view`).

    chat_text: the text after the model's chat template, one image marker per image;
    text: the decoded input ids, i.e. chat_text with every image token expanded to the number of
        visual tokens its image produces (what the tokenizer and the language model see);
    input_ids / n_tokens: the prompt's token ids and their count (image tokens included);
    image_tokens: visual tokens per image; images: the images at the resolution the model's own
        image processing gives them (a resized patch grid, or a fixed-size crop), rebuilt
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
    """A lock for one model: ``with lock:`` is exclusive and re-entrant (for calls that change the model's state:
    train / eval mode, a disabled adapter); ``with lock.shared():`` lets several threads in at once, for forwards
    that change no state (scoring a model that is already in eval mode, noise at inference, whose hooks act on
    their own thread only). An exclusive caller waits until the shared ones leave, and new shared callers wait
    while an exclusive one is waiting, so neither side starves. A thread holding the lock exclusively may also
    take it shared; the reverse raises RuntimeError (it could deadlock). A deep copy (a copied model) gets a
    fresh lock; a shallow copy shares the model, so it shares the lock."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None  # the thread holding the lock exclusively
        self._depth = 0
        self._readers: dict[int, int] = {}  # thread -> how many times it holds the lock shared
        self._waiting = 0  # exclusive callers waiting

    def __enter__(self):
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            if me in self._readers:
                raise RuntimeError("a thread holding a model lock shared cannot take it exclusively")
            self._waiting += 1
            try:
                while self._owner is not None or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._owner, self._depth = me, 1
        return True

    def __exit__(self, *exc):
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()
        return False

    @contextmanager
    def shared(self):
        me = threading.get_ident()
        with self._cond:
            if self._owner != me and me not in self._readers:
                while self._owner is not None or self._waiting:
                    self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield self
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                    self._cond.notify_all()

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return ModelLock()

    def __reduce__(self):
        return (ModelLock, ())


@dataclass
class ModelBundle:
    """A model with everything needed to feed it: tokenizer, image processor, family rules (its adapter)."""

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

    @property
    def adapter(self) -> Backbone:
        """The family's backbone adapter (``hanorec.backbones``)."""
        return backbone(self.family)

    # ---- token ids ---------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.adapter.image_token)

    @property
    def image_token(self) -> str:
        """The token repeated once per visual token of an image."""
        return self.adapter.image_token

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return self.eos_token_id if pid is None else pid

    def chat_text(self, text: str) -> str:
        """The user turn in the model's chat format, ending where the answer starts."""
        marker = self.adapter.chat_marker
        content = text.replace("<image>", marker) if marker != "<image>" else text
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": self.adapter.chat_content(content)}],
                add_generation_prompt=True,
                tokenize=False,
            )
        return f"USER: {content} ASSISTANT:"

    def image_ids(self, n: int) -> list[int]:
        """The token ids one image of n visual tokens takes in the prompt."""
        return self.adapter.image_ids(self, n)

    def encode_prompt(self, text: str, images: Sequence[Image.Image]) -> EncodedPrompt:
        """Chat-format the text, expand every image placeholder to its visual tokens, process pixels."""
        n_placeholders = text.count("<image>")
        if n_placeholders != len(images):
            raise ValueError(
                f"the prompt has {n_placeholders} <image> placeholders but {len(images)} images were given"
            )
        chat = self.chat_text(text)
        pieces = chat.split(self.adapter.split)
        pixel_values, grid, per_image = self._process_images(images)
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
            if k < len(pieces) - 1:
                ids += self.image_ids(per_image[k])
        return EncodedPrompt(ids, pixel_values, grid, len(images))

    def model_view(self, text: str, images: Sequence[Image.Image]) -> ModelView:
        """What the model sees for a prompt: chat-templated text, the same text with image tokens
        expanded (the decode of :meth:`encode_prompt`'s ids), token counts and the processed images."""
        enc = self.encode_prompt(text, images)
        per_image = self._process_images(images)[2] if images else []
        return ModelView(
            chat_text=self.chat_text(text),
            text=self.tokenizer.decode(enc.input_ids, skip_special_tokens=False),
            input_ids=list(enc.input_ids),
            image_token=self.adapter.image_token,
            image_tokens=list(per_image),
            images=self.processed_images(enc),
        )

    def view_example(self, example, ds) -> ModelView:
        """:meth:`model_view` of a task example (``example.prompt`` and the images of ``example.image_items``)."""
        images = [ds.load_image(i, size=self.image_size) for i in example.image_items]
        return self.model_view(example.prompt, images)

    def processed_images(self, prompt: EncodedPrompt) -> list[Image.Image]:
        """The prompt's images rebuilt from the pixel values the model receives (normalisation undone);
        the adapter turns its pixel tensors back into one (C, H, W) array per image."""
        if not prompt.n_images:
            return []
        proc = self.image_processor
        mean = torch.tensor(proc.image_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(proc.image_std, dtype=torch.float32).view(-1, 1, 1)
        out = []
        for x in self.adapter.pixel_arrays(self, prompt):
            x = (x * std + mean) * 255.0  # undo normalise and rescale
            x = x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            out.append(Image.fromarray(x, "RGB"))
        return out

    def encode_completion(self, text: str, eos: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + [self.eos_token_id] if eos else ids

    def _process_images(self, images: Sequence[Image.Image]):
        """(pixel_values, image_grid_thw or None, visual tokens per image)."""
        if not images:
            return None, None, []
        return self.adapter.process_images(self, images)

    def text_token_count(self, text: str) -> int:
        """Tokens of the chat-formatted prompt outside its images (images count via image_token_count)."""
        pieces = self.chat_text(text).split(self.adapter.split)
        return sum(len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in pieces if p)

    def image_token_count(self, image: Image.Image) -> int:
        """How many prompt tokens one image takes (its visual tokens and any tokens around them)."""
        return len(self.image_ids(self._process_images([image])[2][0]))

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
        batch.update(self.adapter.extra_inputs(self, input_ids))
        return batch

    def pixel_inputs(self, prompts: Sequence[EncodedPrompt]) -> dict:
        return self.adapter.pixel_inputs(prompts)

    # ---- positions and attention for shared-prefix scoring -------------------------------------
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
        for 1-D RoPE families, (3, P, L) for M-RoPE families (from the model's own ``get_rope_index``),
        correct on the prompt tokens (0 elsewhere); next_pos (P,) is the position the token right
        after prompt i gets in a plain prompt+completion sequence. M-RoPE: raises ValueError when an
        image token appears outside the prompts (its pixels could not be placed).
        """
        return self.adapter.prompt_positions(self, inner, input_ids, prompt_mask, lengths, image_grid_thw)

    def packed_mask(self, allowed: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor):
        """The packed rows' boolean attention as this family's forward must get it (see the adapter)."""
        return self.adapter.packed_mask(self, allowed, input_ids, positions)

    def encode_images(self, inner: torch.nn.Module, pixel_inputs: dict) -> dict:
        """``mm_encoder_outputs`` of ``pixel_inputs`` for the forward of ``inner`` (the model's base module
        that calls ``get_image_features``), computed exactly as that forward would."""
        return self.adapter.encode_images(inner, pixel_inputs)

    # ---- parts used by hardness (item embeddings) ---------------------------------------------
    def base_model(self) -> torch.nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """One vector per image: the mean over its visual tokens of the vision tower's output after the
        merger / projector, i.e. the vectors the language model reads (method.md section 7). (n, D)."""
        if not images:
            raise ValueError("image_features needs at least one image")
        return self.adapter.image_features(self, images)

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
FAMILY_TOKENS = {a.family: list(a.tiny_tokens) for a in all_backbones()}


def train_tokenizer(texts: Sequence[str], vocab_size: int, family: str):
    """A byte-level BPE tokenizer trained on the dataset's own text, in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    adapter = backbone(family)
    specials = SPECIAL_TOKENS + list(adapter.tiny_tokens)
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
    fast.chat_template = adapter.tiny_chat_template or TINY_CHAT_TEMPLATE
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
    adapter = for_preset(preset)
    adapter.check_tiny_image_size(image_size)
    tok = train_tokenizer(texts, vocab_size, adapter.family)
    heads = max(2, hidden_size // 32)
    text = dict(
        vocab_size=len(tok),
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
    model, proc = adapter.build_tiny_model(tok, text, image_size)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return ModelBundle(
        model, tok, proc, adapter.family, preset, image_size=image_size, meta={"preset": preset, "seed": seed}
    )


# ------------------------------------------------------------------------------------------------
# Published architectures with random weights (model.init=random)
# ------------------------------------------------------------------------------------------------
RANDOM_INIT_VOCAB = 4000  # the locally trained tokenizer's target size; the model keeps the published vocabulary


def published_ids() -> dict[str, str]:
    """Checkpoint id -> family, for every id whose architecture model.init=random can build."""
    return {name: a.family for a in all_backbones() for name in a.published}


def build_random(
    name: str,
    texts: Sequence[str],
    *,
    layers: int | None = None,
    dtype: str = "auto",
    seed: int = 0,
    max_pixels: int | None = None,
    attn_implementation: str | None = None,
) -> ModelBundle:
    """Checkpoint ``name``'s published architecture with random weights, nothing downloaded: every width, head
    count, vocabulary size and image-processor setting as published (its family adapter holds the numbers), the
    depth cut to ``layers`` (at least one block of each kind), a BPE tokenizer trained on ``texts`` (its tokens
    are a subset of the model's published vocabulary). Deterministic for a seed."""
    ids = published_ids()
    if name not in ids:
        raise ModelError(
            f"model.init = 'random' builds a known checkpoint's architecture; {name!r} is not one of {sorted(ids)}"
        )
    adapter = backbone(ids[name])
    tok = train_tokenizer(texts, RANDOM_INIT_VOCAB, adapter.family)
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    want = default_dtype(dtype)
    torch.set_default_dtype(want)  # built in the run's dtype: no full fp32 copy first
    try:
        with no_init_weights():  # transformers' own init of half a billion weights takes ~30 s on 2 cores
            model, proc = adapter.build_published(name, tok, layers)
    finally:
        torch.set_default_dtype(previous)
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    random_init(model, seed, zero_centred_norms=adapter.zero_centred_norms)
    model.tie_weights()  # a published tied head shares the embedding (the construction above skipped it)
    model = model.to(want)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    if max_pixels:
        cap_image_pixels(proc, max_pixels)
    meta = {"init": "random", "published": name, "layers": layers, "seed": seed}
    return ModelBundle(model, tok, proc, adapter.family, name, meta=meta)


RANDOM_BLOCK = 1 << 22  # values drawn per large weight; the rest repeat them (same memory and compute)


def random_init(model: torch.nn.Module, seed: int, std: float = 0.02, zero_centred_norms: bool = False) -> None:
    """Weights as a freshly initialised model has them, drawn from one generator seeded with ``seed``: matrices
    (linear, embedding, convolution, projection) N(0, std), biases 0, norm scales at their identity (1, or 0 for
    a family whose norms scale by (1 + w): its adapter's zero_centred_norms). A weight larger than RANDOM_BLOCK values draws that many and repeats them
    (the published vocabulary's embedding would otherwise take seconds to draw; memory and compute are those
    of the full weight)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            zero_centred = zero_centred_norms and "Norm" in type(module).__name__
            for pname, p in module.named_parameters(recurse=False):
                if p.ndim <= 1:
                    if pname == "bias" or zero_centred:
                        p.zero_()
                    elif "Norm" in type(module).__name__ or "norm" in module_name:
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, std, generator=g)
                    continue
                flat = p.view(-1)
                n = min(flat.numel(), RANDOM_BLOCK)
                block = torch.empty(n, dtype=p.dtype).normal_(0.0, std, generator=g)
                for start in range(0, flat.numel(), n):
                    flat[start : start + n] = block[: min(n, flat.numel() - start)]


def builds_locally(model_cfg) -> bool:
    """The model is built from the dataset's text (a tiny preset, or model.init=random), not loaded."""
    return model_cfg.name in TINY_PRESETS or getattr(model_cfg, "init", "pretrained") == "random"


# ------------------------------------------------------------------------------------------------
# Loading by id or folder
# ------------------------------------------------------------------------------------------------
def family_of(model_type: str) -> str:
    """The family whose adapter loads checkpoints of this config.model_type."""
    return for_model_type(model_type).family


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
    choose the resolution, capped at ``max_pixels`` per image where the processor takes a cap (families
    that resize by pixel count; the authors cap preference training at 262,144 pixels). Nothing is
    downloaded: an id must already be in the local Hugging Face cache."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

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
    adapter = for_model_type(cfg.model_type)
    kwargs = {"dtype": default_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    proc = adapter.load_image_processor(name, trust_remote_code=trust_remote_code)
    size = image_size if image_size is not None else meta.get("image_size")
    if size is None and max_pixels:
        cap_image_pixels(proc, max_pixels)  # keeps the processor's own settings, for set_max_pixels(bundle, 0)
    return ModelBundle(model, tok, proc, adapter.family, meta.get("name", name), image_size=size, meta=meta)


def cap_image_pixels(processor, max_pixels: int) -> bool:
    """Cap the pixels per image of a processor that resizes by pixel count (its family's adapter says
    how): larger images are scaled down keeping their aspect ratio. Returns False (processor unchanged)
    for fixed-size processors, which resize every image to one size."""
    if _default_state(processor) is None:  # the processor's own settings, for set_max_pixels(0)
        state = copy.deepcopy(vars(processor))
        key = id(processor)
        _DEFAULT_STATES[key] = (weakref.ref(processor), state)
        weakref.finalize(processor, _DEFAULT_STATES.pop, key, None)
    return any(a.cap_pixels(processor, max_pixels) for a in all_backbones())


# a processor's own settings before the first cap, kept outside the processor (an attribute of its own would
# be written into preprocessor_config.json by save_pretrained)
_DEFAULT_STATES: dict[int, tuple] = {}


def _default_state(processor) -> dict | None:
    ref, state = _DEFAULT_STATES.get(id(processor), (None, None))
    return state if ref is not None and ref() is processor else None


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


def set_max_pixels(bundle: ModelBundle, max_pixels: int | None) -> bool:
    """Set the pixel cap per image for the next stage (sft.max_pixels, pref.max_pixels, eval.max_pixels):
    None leaves it as it is, 0 restores the image processor's own default, N caps at N pixels. A tiny preset
    (fixed square images) or a processor without a pixel cap is left unchanged (returns False)."""
    proc = bundle.image_processor
    if max_pixels is None or bundle.image_size is not None:
        return False
    if max_pixels:
        return cap_image_pixels(proc, max_pixels)
    default = _default_state(proc)
    if default is None:  # never capped: already the processor's own default
        return True
    for key, value in copy.deepcopy(default).items():
        setattr(proc, key, value)
    return True


def check_model_name(name: str, init: str = "pretrained") -> None:
    """Raise ModelError before any data is loaded when `name` is neither a tiny preset, a local folder,
    nor a model id in the local Hugging Face cache (with init "random": a checkpoint id whose published
    architecture an adapter holds); the message lists the presets and the closest name."""
    import difflib

    check_model_form(name)
    if init == "random" and name not in TINY_PRESETS:
        if name not in published_ids():
            raise ModelError(f"model.init = 'random' builds one of {sorted(published_ids())}, not {name!r}")
        return
    if name in TINY_PRESETS or Path(name).exists():
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an id huggingface_hub cannot even parse is not in the cache
        cached = False
    if cached:
        return
    scores = sorted(((difflib.SequenceMatcher(None, name, p).ratio(), p) for p in TINY_PRESETS), reverse=True)
    close = [p for r, p in scores if r >= 0.5 and r >= scores[0][0] - 0.1]  # the best, and any nearly as close
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ModelError(
        f"model.name = {name!r} is not a built-in preset ({', '.join(TINY_PRESETS)}), not a local folder, "
        f"and not in the local Hugging Face cache (nothing is downloaded at run time){hint}"
    )


def get_model(cfg, texts: Sequence[str] | None = None, seed: int = 0, image_size: int | None = None) -> ModelBundle:
    """From a ModelConfig: build a tiny preset (needs the dataset's text) or load by id / folder.

    image_size (tiny presets): the square size images are resized to before the processor (default 64).
    """
    if getattr(cfg, "init", "pretrained") == "random" and cfg.name not in TINY_PRESETS:
        if texts is None:
            raise ModelError(f"model.init = 'random' ({cfg.name}) needs the dataset's text to train its tokenizer")
        return build_random(cfg.name, texts, layers=cfg.layers, dtype=cfg.dtype, seed=seed, max_pixels=cfg.max_pixels,
                            attn_implementation=cfg.attn_implementation)  # fmt: skip
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


def list_models() -> list[dict]:
    """One row per family: its adapter's description (tiny preset, checkpoint types, GPU config)."""
    return [a.describe() for a in all_backbones()]


def format_models() -> str:
    """The families as text (``python -m hanorec models``)."""
    lines = [f"{len(FAMILIES)} backbone families (tiny presets build offline; checkpoints load by id from the "
             "local Hugging Face cache or from a folder, never downloaded):", ""]  # fmt: skip
    for row in list_models():
        lines += [
            f"{row['label']}  (family {row['family']})",
            f"  tiny preset      {row['preset']}",
            f"  checkpoint types {', '.join(row['model_types'])}",
            f"  e.g.             {', '.join(row['checkpoints'])}",
            f"  GPU preset       {row['gpu_config']}",
            f"  random init      {', '.join(row['random_init']) or '-'} (--model.init=random --model.layers=N)",
            f"  positions        {row['position_ids']}",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------
# LoRA on the language model only
# ------------------------------------------------------------------------------------------------
LANGUAGE_MODEL_PATTERN = (
    r"(?:.*\.)?(?:" + "|".join(re.escape(n) for n in language_model_names()) + r")\.(?:.*\.)?({names})"
)


def lora_target_regex(target_modules: Sequence[str]) -> str:
    """A regex peft matches against full module names: the named linears inside the language model only
    (the module each family's adapter names as its language model)."""
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


_VISION_PARAM = re.compile(r"(^|\.)(" + "|".join(re.escape(n) for n in vision_module_names()) + r")\.")


def vision_parameter_names(model: torch.nn.Module) -> list[str]:
    """Parameters of the vision modules (every family's adapter names them): never trained."""
    return [n for n, _ in model.named_parameters() if _VISION_PARAM.search(n)]
