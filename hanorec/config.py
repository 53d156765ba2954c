"""Configuration: dataclasses with a help text per field, YAML presets and --key=value overrides.

One `RunConfig` drives every command. Sections mirror the pipeline:
data -> task -> model (+ lora) -> sft -> pref -> eval. A YAML preset sets any subset of fields;
command-line overrides use dotted keys (`--sft.lr=3e-4`, `--data.path=...`). Unknown keys and bad
values are reported in one sentence naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hanorec.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key or value a user wrote is wrong (one clear sentence)."""


def _f(default: Any, help: str, choices: tuple | None = None, **kw):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _check_choices(obj) -> None:
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices is not None and value not in choices:
            raise ConfigError(f"{f.name} = {value!r} is not one of {list(choices)}")


def _positive(obj, *names: str, allow_zero: bool = False) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is None:
            continue
        if v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(f"{n} = {v!r} must be {'>= 0' if allow_zero else '> 0'}")


# Upper bounds far above any sensible run, so that a typo (1e9 epochs, K = 10^6, a seed of 2^64) is refused
# before anything is queued instead of failing (or running for ever) later. Whole numbers without an entry
# here are capped at INT_MAX.
INT_MAX = 2**31 - 1
LIMITS = {
    "seed": 2**32 - 1,  # numpy's seeds are 32-bit
    "threads": 1024,
    "epochs": 10_000,
    "max_steps": 10**8,
    "lr": 10.0,
    "beta": 1_000.0,
    "noise_sigma": 100.0,
    "sft_weight": 1_000.0,
    "weight_decay": 100.0,
    "max_grad_norm": 1e6,
    "save_every_minutes": 1e6,
    "k_negatives": 1_000,
    "hardness_k": 100_000,
    "n_negatives": 100_000,
    "batch_size": 1 << 16,
    "grad_accum": 1 << 16,
    "sample_temperature": 100.0,
    "hars_temperature": 100.0,
}


def _check_numbers(obj) -> None:
    """Every number of a section is finite and in range (one sentence naming the field and value).

    NaN passes every comparison, so the sign checks alone would let it through; bools are not numbers here."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{f.name} = {v!r} is not a finite number")
        top = LIMITS.get(f.name, INT_MAX if isinstance(v, int) else None)
        if top is not None and abs(v) > top:
            limit = f"{top:,}" if isinstance(top, int) else f"{top:g}"
            raise ConfigError(f"{f.name} = {v!r} is out of range (its magnitude may be at most {limit})")


@dataclass
class DataConfig:
    path: str = _f(
        "assets/demo",
        "Dataset folder: HaNoRec layout (pairs.tsv, titles.csv, images/) or MovieLens (ratings.csv, movies.csv).",
    )
    format: str = _f("auto", "Dataset format.", choices=("auto", "hanorec", "movielens"))
    domain: str = _f(
        "movies",
        "Prompt domain, a preset of the template's item noun and verb (movies: watched movies; music: listened "
        "to artists). Any other domain: --task.item_noun and --task.item_verb.",
        choices=("movies", "micro-videos", "tv", "products", "music"),
    )
    image_dir: str | None = _f(None, "Image folder when it is not <path>/images.")
    on_error: str = _f(
        "raise",
        "Bad rows: 'raise' stops at the first, 'report' skips and lists them in the load summary.",
        choices=("raise", "report"),
    )
    max_users: int | None = _f(
        None, "Keep a deterministic subset of this many users (the same for every seed; quick runs, CI)."
    )
    split_policy: str = _f(
        "leave_one_out",
        "leave_one_out: last window test, the one before validation, earlier windows train (ours); "
        "last_window_by_user: one window per user, its last n_history + n_target items, users split seeded "
        "80/10/10 into train/val/test; mirrors what is known of the authors' pre-split files, whose split "
        "procedure is unpublished (by_user: the older name of the same policy); files: the authors' own "
        "train.tsv, val.tsv and test.tsv in data.path, read as given: one window per row from its last "
        "n_history + n_target items (rows shorter are skipped and counted), file order kept, a user may be in "
        "several files, negatives avoid the row's own items.",
        choices=("leave_one_out", "last_window_by_user", "by_user", "files"),
    )
    untitled: str = _f(
        "raise",
        "An id in pairs.tsv or a split file that the titles file lacks: raise (a bad row, see on_error) or "
        "unknown (kept and shown as [unknown N], as the authors' loader shows it).",
        choices=("raise", "unknown"),
    )
    prompts: str = _f(
        "ours",
        "ours: candidates drawn by our seeded generator; authors (split_policy files): the authors' drawn SFT "
        "files beside the split files ({split}-mllm_sft_{1,3}.json or {split}_sft_{1,3}[.json]), when present, "
        "give each row's candidates, hit1 label and order, and their prompt and answer text.",
        choices=("ours", "authors"),
    )
    min_interactions: int = _f(6, "Users with fewer interactions are dropped (the authors' code skips rows under 6).")
    max_items_per_user: int | None = _f(
        None, "Use only each user's last N items (the authors' code keeps a row's last 6)."
    )
    max_train_windows_per_user: int | None = _f(
        4, "Keep at most this many (latest) training windows per user; None keeps all."
    )
    image_size: int = _f(
        64,
        "Tiny presets: images are resized to this square size before the processor (keeps tiny runs cheap). "
        "Real checkpoints use their processor's own resizing instead (see model.max_pixels).",
    )

    def __post_init__(self):
        _check_numbers(self)
        _check_choices(self)
        _positive(
            self,
            "max_users",
            "min_interactions",
            "max_items_per_user",
            "max_train_windows_per_user",
            "image_size",
        )


@dataclass
class TaskConfig:
    name: str = _f(
        "hit3",
        "Task: hit3 (3 of 7 candidates), hit1 (yes/no), next1 (1 of 20).",
        choices=("hit3", "hit1", "next1"),
    )
    n_negatives: int | None = _f(
        None, "Random unseen negatives among the candidates (default: 4 for hit3 and hit1, 19 for next1)."
    )
    max_train_examples: int | None = _f(
        None,
        "Cap on training examples (deterministic prefix after shuffling; split_policy files: the first rows of "
        "train.tsv, before shuffling, as LLaMA-Factory's max_samples).",
    )
    max_eval_examples: int | None = _f(None, "Cap on validation/test examples.")
    hit1_target_image: bool = _f(
        False,
        "hit1: also show the target item's image (beyond the authors' prompt, which shows only the 5 history "
        "images; off by default to follow them).",
    )
    images: str = _f(
        "auto",
        "Images in prompts: auto = when any item of the dataset has an image (a text-only dataset gets no image "
        "tokens and no placeholders; a mixed one a grey placeholder per missing image), always = a placeholder "
        "even for a text-only dataset, never = text only.",
        choices=("auto", "always", "never"),
    )
    template_set: str = _f(
        "ours",
        "Prompt wording: ours (one paragraph per prompt, in the domain's words) or authors (the authors' prompt "
        "files and loader verbatim: hit3 starts with their instruction and lists items one per line as "
        "<image> \"title\"; hit1 has no instruction and speaks of movies; next1 keeps ours).",
        choices=("ours", "authors"),
    )
    hit3_outer_quotes: bool = _f(
        False,
        "hit3: wrap the answer's three quoted lines in one more pair of quotes, as the authors' SFT targets and "
        "chosen answers (their rejected answers have none, so DPO can tell chosen from rejected by format alone).",
    )
    negatives: str = _f(
        "titled",
        "Where negative candidates come from: titled (items that have a title, ours) or id_range (the authors': "
        "every integer id from 1 to task.max_item_id, an id without a title shown as [unknown id], no image).",
        choices=("titled", "id_range"),
    )
    max_item_id: int | None = _f(
        None,
        "negatives=id_range: the largest id drawn (the authors: 19379 MicroLens, 17700 Netflix, 3953 MovieLens); "
        "None: the largest integer id in the titles file.",
    )
    item_noun: str | None = _f(None, "The prompt's item noun, singular (e.g. artist); default: data.domain's.")
    item_nouns: str | None = _f(None, "Its plural (default: item_noun + s).")
    item_verb: str | None = _f(
        None, "What the user did, past tense (e.g. 'listened to'); default: data.domain's."
    )
    item_verb_present: str | None = _f(
        None, "Its present tense (e.g. 'listen to'; default: the past without -ed for a regular verb)."
    )

    def __post_init__(self):
        _check_numbers(self)
        _check_choices(self)
        _positive(self, "n_negatives", "max_train_examples", "max_eval_examples", "max_item_id")
        if self.item_noun or self.item_verb or self.item_nouns or self.item_verb_present:
            self.words()  # a verb with no derivable present is reported now, not after loading data

    def words(self, domain: str = "movies") -> dict:
        """The template words: data.domain's preset with item_noun / item_verb (if set) in place."""
        from hanorec.tasks import TaskError, wording

        try:
            return wording(
                domain, noun=self.item_noun, nouns=self.item_nouns, verb=self.item_verb,
                verb_present=self.item_verb_present,
            )  # fmt: skip
        except TaskError as e:
            raise ConfigError(str(e)) from None


@dataclass
class ModelConfig:
    name: str = _f(
        "tiny-qwen2.5-vl",
        "A tiny offline preset (one per family: `python -m hanorec models` lists them), a Hugging Face model id "
        "(already in the local cache) or a local folder.",
    )
    dtype: str = _f(
        "auto",
        "Weights dtype: auto = bf16 on GPU, fp32 on CPU.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    trust_remote_code: bool = _f(False, "Allow a checkpoint's own code to run (off unless you trust it).")
    init: str = _f(
        "pretrained",
        "pretrained: load the checkpoint's weights (from the local cache or a folder); random: build the "
        "architecture of a known checkpoint id (`python -m hanorec models` lists them) from its published config "
        "numbers with random weights and a tokenizer trained on the dataset's text, nothing downloaded (real "
        "widths on any machine, e.g. to check memory and the code path; depth cut by model.layers).",
        choices=("pretrained", "random"),
    )
    layers: int | None = _f(
        None,
        "model.init=random: decoder layers (and vision blocks) to keep, at least one of each kind of block "
        "(window and full attention, sliding and global, ...); null: the published depth.",
    )
    tiny_hidden_size: int = _f(128, "Tiny presets: language model hidden size.")
    tiny_layers: int = _f(2, "Tiny presets: language model layers.")
    tiny_vocab_size: int = _f(600, "Tiny presets: size of the BPE vocabulary trained on the dataset's text.")
    max_length: int = _f(
        1024, "Longest prompt + completion in tokens; longer examples are reported and skipped."
    )
    attn_implementation: str | None = _f(
        None, "Attention kernel for real checkpoints (e.g. sdpa, flash_attention_2)."
    )
    max_pixels: int | None = _f(
        262144,
        "Real checkpoints: their image processor picks each image's resolution, capped at this many pixels "
        "(families whose processor resizes by pixel count; 262,144 = the authors' cap for preference training) in "
        "every stage whose own cap (sft.max_pixels, pref.max_pixels, eval.max_pixels) is None. Tiny presets use "
        "data.image_size.",
    )

    def __post_init__(self):
        _check_numbers(self)
        _check_choices(self)
        _positive(self, "tiny_hidden_size", "tiny_layers", "tiny_vocab_size", "max_length", "max_pixels")
        _positive(self, "layers")


@dataclass
class LoraConfig:
    r: int = _f(8, "LoRA rank (reference 8).")
    alpha: int = _f(32, "LoRA alpha (reference 32).")
    dropout: float = _f(0.05, "LoRA dropout (reference 0.05).")
    target_modules: list = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layer names adapted, in the language model only (never the vision tower).",
    )
    modules_to_save: list = _f(
        [], "Language-model modules trained in full beside LoRA (tiny random models: embed_tokens, lm_head)."
    )

    def __post_init__(self):
        _check_numbers(self)
        _positive(self, "r", "alpha")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout = {self.dropout!r} must be in [0, 1)")


@dataclass
class OptimConfig:
    """Training hyperparameters shared by both stages."""

    epochs: float = _f(5, "Training epochs (reference 5).")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs).")
    lr: float = _f(1e-4, "Peak learning rate (reference 1e-4).")
    batch_size: int = _f(2, "Examples per device per micro-batch (reference 2).")
    grad_accum: int = _f(8, "Gradient accumulation steps (reference 8).")
    warmup_ratio: float = _f(0.0, "Fraction of steps with linear warm-up before the cosine decay.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    mixed_precision: str = _f(
        "auto", "auto = bf16 on GPU, none on CPU.", choices=("auto", "no", "bf16", "fp16")
    )
    log_every: int = _f(5, "Log metrics every N optimizer steps.")
    save_every: int = _f(0, "Checkpoint every N optimizer steps (0: only at the end of each epoch).")
    save_every_minutes: float = _f(
        5.0,
        "Also checkpoint when this many minutes have passed since the last checkpoint, so a run killed outright "
        "loses at most about this much work (0: off). When checkpoints happen never changes the result.",
    )
    keep_checkpoints: int = _f(2, "Keep the newest N step checkpoints.")
    log_with: str | None = _f(
        None,
        "Extra tracker through accelerate (tensorboard, wandb) when installed; metrics.jsonl is always written.",
    )
    progress_bar: bool = _f(True, "Show a progress bar.")
    gradient_checkpointing: bool = _f(
        False,
        "Recompute the language model's activations during backward instead of keeping them (less memory, "
        "one more forward pass of the policy per step); NoDO noise is replayed, so gradients match a run without it.",
    )

    def __post_init__(self):
        _check_numbers(self)
        _check_choices(self)
        _positive(
            self, "epochs", "lr", "batch_size", "grad_accum", "log_every", "max_steps", "keep_checkpoints"
        )
        _positive(self, "save_every", "save_every_minutes", "weight_decay", "max_grad_norm", allow_zero=True)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio = {self.warmup_ratio!r} must be in [0, 1)")


@dataclass
class SFTConfig(OptimConfig):
    """Stage 1 (method.md section 5): reference LoRA r=8, alpha=32, lr 1e-4, 5 epochs, batch 2 x 8."""

    val_every_epoch: bool = _f(
        False,
        "Score the validation split (ranking protocol) after every epoch and at the end; logged as "
        "val/<metric> in metrics.jsonl. Always on when patience is set.",
    )
    patience: int | None = _f(
        None,
        "Early stopping: end SFT when val_metric has not improved for this many validations; the stage's "
        "adapter is then the best validation's, not the last step's (None: train every epoch, keep the last).",
    )
    val_metric: str = _f(
        "auto",
        "Validation metric (auto: AUC for hit1, HR@3 for hit3 and next1).",
        choices=("auto", "HR@1", "HR@3", "NDCG@3", "AUC", "Accuracy"),
    )
    max_val_examples: int | None = _f(
        200, "Score at most this many validation examples per validation (a deterministic prefix; None: all)."
    )
    max_pixels: int | None = _f(
        None,
        "Real checkpoints: the pixel cap per image in SFT (None: model.max_pixels; 0: the image processor's own "
        "default; the authors: 589,824, LLaMA-Factory's default, as their SFT script sets none).",
    )

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "patience", "max_val_examples")
        _positive(self, "max_pixels", allow_zero=True)

    @property
    def validates(self) -> bool:
        return self.val_every_epoch or self.patience is not None


@dataclass
class PrefConfig(OptimConfig):
    """Stage 2 (method.md sections 6-9): a registered preference method (hanorec.methods) on top of the
    merged SFT adapter."""

    batch_size: int = _f(4, "Examples per device per micro-batch (reference 4).")
    method: str = _f(
        "hano_dpo", "Preference loss: a registered method's name (`python -m hanorec methods` lists them)."
    )
    beta: float = _f(0.1, "beta of the method (HaNo-DPO: beta0; IPO: its regularisation tau).")
    label_smoothing: float = _f(0.0, "Label smoothing eps of the sigmoid loss (DPO, HaNo-DPO).")
    options: dict = _f(
        {},
        "The method's own knobs (--pref.options.NAME=VALUE); unset ones take the method's defaults:",
    )
    plugins: list = _f(
        [],
        "Operator code that registers more preference methods (hanorec.methods.register): .py files, folders of "
        "them, or module names. Imported only by the process that trains (the CLI's run, sft, pref and compare; "
        "`--plugins DIR` adds a folder); reading or listing a run's config imports nothing. The app sets it to "
        "its operator's --plugins folder and never takes it from a form.",
    )
    hars: bool = _f(
        False,
        "HaRS on a base loss other than HaNo-DPO (beyond the paper): its beta becomes beta0 * eta * lambda_n, "
        "with pref.hardness and pref.responsiveness choosing the parts.",
    )
    k_negatives: int = _f(1, "Rejected completions per example (S-DPO uses K > 1; DPO and HaNo-DPO use 1).")
    negative_sampling: str = _f(
        "random",
        "How rejected items are drawn from the prompt's negatives: random (reference) or embedding (closest to the positives in item-embedding space).",
        choices=("random", "embedding"),
    )
    hardness: bool = _f(True, "HaRS: per-pair hardness weight lambda (HaNo-DPO, or pref.hars=true).")
    responsiveness: bool = _f(
        True, "HaRS: online responsiveness eta over the gathered micro-batch (HaNo-DPO, or pref.hars=true)."
    )
    hardness_k: int = _f(10, "Neighbours in an item's hardness profile (K).")
    hars_temperature: float = _f(
        1.0,
        "HaRS: profile temperature T of p_i = softmax(s_i / T) when lambda is computed for training; 1 is the "
        "paper's, anything else is beyond it (a lower T sharpens the profiles and widens lambda's spread).",
    )
    noise_target: str = _f(
        "lora",
        "NoDO: where Gaussian noise goes during training forwards of the policy.",
        choices=("lora", "logits", "none"),
    )
    noise_sigma: float = _f(0.05, "NoDO noise standard deviation (0.05 MicroLens, 0.1 Netflix/MovieLens).")
    noise_draw: str = _f(
        "micro_batch",
        "NoDO (lora target): one noise draw per forward of the whole micro-batch, shared by every chosen and "
        "rejected row in it (the authors' code), or one draw per example, shared by its own chosen and "
        "rejected rows (this project's earlier behaviour).",
        choices=("micro_batch", "example"),
    )
    noise_scale: str = _f(
        "absolute",
        "NoDO (lora target): absolute = eps ~ N(0, sigma^2) on every LoRA factor (the paper's); relative = an "
        "extension beyond the paper: each lora_A / lora_B factor's eps has std sigma x RMS(that factor), measured "
        "when the step draws, so sigma is a noise-to-signal ratio that carries across model widths (a factor "
        "still at 0, like a fresh adapter's B, gets no noise).",
        choices=("absolute", "relative"),
    )
    disable_dropout: bool = _f(
        True,
        "Switch every dropout module of the policy off for stage 2 (LoRA's lora_dropout included; restored "
        "afterwards), as TRL's and LLaMA-Factory's DPO trainers do by default and so the authors' run: the policy's "
        "log-probs then differ from the reference's only by the adapter (and NoDO's noise), so DPO, the "
        "'w/o NoDO' ablation and eta see no dropout noise. false keeps lora.dropout active in stage 2.",
    )
    nodo_backward: str = _f(
        "noisy",
        "NoDO (lora target), what the backward pass sees: noisy (ours) differentiates the noisy forward itself, "
        "so gradients flow through (B + eps_B)(A + eps_A); clean (the authors' run: LLaMA-Factory's reentrant "
        "gradient checkpointing recomputes each decoder layer after the noise hooks are gone) back-propagates "
        "each layer as if it had no noise, at the noisy forward's layer inputs; it turns on reentrant gradient "
        "checkpointing for stage 2. At B = 0, A gets a gradient through eps_B under noisy and none under clean.",
        choices=("noisy", "clean"),
    )
    pair_seed: int | None = _f(
        None,
        "Seed of the preference-pair construction (which negatives become rejected answers); None: the run's "
        "seed. The authors build pairs with 2025 and train with the Trainer's default seed 42.",
    )
    max_pixels: int | None = _f(
        None,
        "Real checkpoints: the pixel cap per image in preference training (None: model.max_pixels; 0: the image "
        "processor's own default; the authors: 262,144, their DPO configs' image_max_pixels).",
    )
    hars_inputs: str = _f(
        "sft",
        "What HaRS embeds items with: sft (ours: the SFT model, images at pref.max_pixels, any image file) or "
        "authors (their encoder: the base model without the SFT adapter, the image processor's own default "
        "pixel cap, only <item>.jpg files; other items get no image part).",
        choices=("sft", "authors"),
    )
    sft_weight: float = _f(0.0, "gamma: weight of an SFT (mean-token NLL of the chosen answer) term.")
    precompute_ref: bool = _f(False, "Score the reference once before training instead of on every step.")
    scoring: str = _f(
        "shared_prefix",
        "How chosen and rejected are scored: shared_prefix (prompt encoded once) or naive (prompt repeated, like TRL).",
        choices=("shared_prefix", "naive"),
    )
    max_pairs: int | None = _f(
        None, "Use at most this many training examples as preference pairs (deterministic prefix)."
    )
    sft_run: str | None = _f(
        None, "Run folder whose SFT adapter is merged before stage 2 (default: this run's output_dir)."
    )
    eval_pairs: int = _f(
        0,
        "Held-out pair accuracy (eval/pair_accuracy in metrics.jsonl): this many fixed pairs from the validation "
        "examples, scored at step 0, every pref.eval_every steps and at the end (0: off).",
    )
    eval_every: int = _f(10, "Optimizer steps between two held-out pair evaluations (pref.eval_pairs).")

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "beta", "k_negatives", "hardness_k", "max_pairs", "hars_temperature", "eval_every")
        _positive(self, "noise_sigma", "sft_weight", "max_pixels", "eval_pairs", allow_zero=True)
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing = {self.label_smoothing!r} must be in [0, 0.5)")
        from hanorec import methods

        if not isinstance(self.plugins, list) or not all(isinstance(x, str) for x in self.plugins):
            raise ConfigError(f"plugins = {self.plugins!r} must be a list of paths or module names")
        if self.plugins and not methods.is_registered(self.method):
            # a plug-in's method: reading a config imports nothing, so its checks wait for the process that
            # trains (hanorec.methods.activate, called by the CLI's training commands)
            if not isinstance(self.options, dict):
                raise ConfigError(f"options = {self.options!r} must be a mapping of knob names to values")
        else:
            try:  # the method's own checks, and its knobs with their defaults filled in
                self.options = methods.validate(self)
            except methods.MethodError as e:  # its sentence names pref.<key>; _build adds the section's prefix
                raise ConfigError(str(e).removeprefix("pref.")) from None
        if self.nodo_backward == "clean" and self.noise_target == "logits":
            raise ConfigError(
                "pref.nodo_backward = 'clean' recomputes the LoRA layers without their noise and needs "
                "pref.noise_target = 'lora'; logit noise sits outside the recomputed layers"
            )
        if self.noise_scale == "relative" and self.noise_target == "logits":
            raise ConfigError(
                "pref.noise_scale = 'relative' scales sigma by each LoRA factor's RMS and needs "
                "pref.noise_target = 'lora'; logit noise has no factor to measure"
            )


@dataclass
class EvalConfig:
    protocols: list = _f(
        ["ranking"],
        "Evaluation protocols: ranking (title likelihood, ours), catalogue (the true item ranked by title "
        "likelihood against every unseen item, or eval.catalogue_items of them; hit3/next1; ours), generative (greedy decoding, lenient matching, "
        "ours) and/or paper (the authors': seeded sampling, exact titles, hit1 AUC over Yes/No answers only, "
        "the first eval.paper_max_examples examples).",
    )
    split: str = _f("test", "Which split to evaluate.", choices=("val", "test"))
    batch_size: int = _f(8, "Sequences scored per forward.")
    max_new_tokens: int = _f(64, "Generative protocol: longest answer decoded.")
    baselines: list = _f(["random", "popularity"], "Baselines on the same candidates.")
    sample_temperature: float = _f(0.95, "Paper protocol: sampling temperature (the authors' 0.95).")
    sample_top_p: float = _f(0.7, "Paper protocol: nucleus sampling top-p (the authors' 0.7).")
    sample_top_k: int = _f(50, "Paper protocol: top-k (50, LLaMA-Factory's default, which the authors' run kept).")
    max_pixels: int | None = _f(
        None,
        "Real checkpoints: the pixel cap per image when evaluating (None: model.max_pixels; 0: the image "
        "processor's own default; the authors: 589,824, LLaMA-Factory's default, as their inference script "
        "sets none).",
    )
    paper_max_examples: int | None = _f(
        3000,
        "Paper protocol: score only the first N evaluated examples, in order (the authors cap the test set at "
        "3,000); null scores all. The other protocols and the baselines score every example.",
    )

    catalogue_items: int | None = _f(
        None,
        "Catalogue protocol: rank the true item against a seeded sample of this many items the user never "
        "interacted with (the same for every method of a run); null ranks against all of them.",
    )
    catalogue_chunk: int = _f(256, "Catalogue protocol: titles scored per forward (bounds memory).")
    image_ablation: bool = _f(
        False,
        "The modality meter: evaluate every model again with its history images blanked (a flat grey of the "
        "same size: the token count unchanged) and report, per protocol, the metrics and the per-user paired "
        "drop against the same model with its images (interval and detectable difference). Doubles evaluation.",
    )

    def sampling(self) -> dict:
        """The paper protocol's keyword arguments for sampled decoding (no repetition penalty, as the authors)."""
        return {
            "temperature": self.sample_temperature,
            "top_p": self.sample_top_p,
            "top_k": self.sample_top_k,
            "repetition_penalty": 1.0,
        }

    def __post_init__(self):
        _check_numbers(self)
        _check_choices(self)
        for p in self.protocols:
            if p not in ("ranking", "catalogue", "generative", "paper"):
                raise ConfigError(
                    f"protocols contains {p!r}; use some of 'ranking', 'catalogue', 'generative' and 'paper'"
                )
        _positive(self, "catalogue_items", "catalogue_chunk")
        _positive(self, "sample_temperature", "sample_top_k", "paper_max_examples")
        _positive(self, "max_pixels", allow_zero=True)
        if not 0 < self.sample_top_p <= 1:
            raise ConfigError(f"sample_top_p = {self.sample_top_p!r} must be in (0, 1]")
        for b in self.baselines:
            if b not in ("random", "popularity"):
                raise ConfigError(f"baselines contains {b!r}; use 'random' and/or 'popularity'")
        _positive(self, "batch_size", "max_new_tokens")


@dataclass
class RunConfig:
    seed: int = _f(0, "Seed for splits, candidate sampling, model init and training order.")
    output_dir: str = _f("runs/demo", "Where the run writes checkpoints, logs and metrics.")
    threads: int | None = _f(
        1,
        "torch CPU threads (the command line sets it). 1: the tiny presets run as fast as with 2 on a free "
        "machine and several times faster when other work shares the cores; null: torch's default (all cores, "
        "for large models on CPU). Reruns are bit-identical for the same threads, machine and torch build.",
    )
    compare_seeds: list = _f(
        [0, 1, 2],
        "The seeds `compare` trains when --seeds is not given (the paper presets: 42, the seed of the authors' "
        "runs).",
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Dataset."})
    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "Task and prompts."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Backbone."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapter."})
    sft: SFTConfig = field(default_factory=SFTConfig, metadata={"help": "Stage 1: supervised fine-tuning."})
    pref: PrefConfig = field(default_factory=PrefConfig, metadata={"help": "Stage 2: preference training."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation."})

    def __post_init__(self):
        _check_numbers(self)
        _positive(self, "threads")
        if not 0 <= self.seed <= LIMITS["seed"]:
            raise ConfigError(f"seed = {self.seed!r} must be in [0, {LIMITS['seed']}]")
        if not self.compare_seeds or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= LIMITS["seed"] for x in self.compare_seeds
        ):
            raise ConfigError(
                f"compare_seeds = {self.compare_seeds!r} must be a non-empty list of seeds in [0, {LIMITS['seed']}]"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("true", "1", "yes", "on"):
                return True
            if s in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if tp is dict or origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip() else {}
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if tp is list or origin is list:
            if isinstance(value, str):
                parsed = (
                    yaml.safe_load(value)
                    if value.strip().startswith("[")
                    else [v for v in value.split(",") if v]
                )
                value = parsed
            if not isinstance(value, list):
                raise ValueError
            return list(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{key} = {value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(
                f"unknown configuration key {full!r} = {value!r} (known in this section: {known})"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a section of keys, got {value!r}")
            kwargs[key] = _build(tp, value, prefix=f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, tp)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None


def parse_overrides(args: list[str]) -> dict:
    """`--a.b=1 --c=x` -> {"a": {"b": "1"}, "c": "x"}; values stay strings until typed by the dataclass."""
    out: dict = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --section.key=value")
        key, value = arg[2:].split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None, cls=RunConfig):
    """Defaults <- YAML preset (if any) <- overrides. Raises ConfigError with the key and value at fault."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, not {type(loaded).__name__}")
        values = loaded
    layers = [values]
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        layers.append(over)
        values = _merge(values, over)
    cfg = _build(cls, values)
    if cls is RunConfig:
        noise = _method_noise(cfg.pref.method, layers)
        if noise is not None and noise != cfg.pref.noise_target:
            cfg = _build(cls, _merge(values, {"pref": {"noise_target": noise}}))
    return cfg


def _method_noise(method: str, layers: list[dict]) -> str | None:
    """The NoDO setting a method named without one gets: a layer (the preset file, then the overrides) that
    names pref.method and sets no pref.noise_target, with no later layer setting it, trains the method's own
    row (e.g. DPO: no noise), so `pref --config paper.yaml --pref.method=dpo` is the DPO baseline, not DPO
    with the preset's NoDO; --pref.noise_target=lora beside it asks for the noise."""
    from hanorec import methods

    named = [i for i, layer in enumerate(layers) if "method" in (layer.get("pref") or {})]
    if not named:
        return None
    if any("noise_target" in (layer.get("pref") or {}) for layer in layers[named[-1]:]):
        return None
    if not methods.is_registered(method):
        # a plug-in's method: reading a config imports nothing, so its row is known only in the process that
        # trains (hanorec.methods.activate); the layers' own noise setting stands
        return None
    return methods.get(method).variant.get("noise_target")


def describe(cls=RunConfig, prefix: str = "") -> str:
    """Every key with its default and help text (for `python -m hanorec config --help`).

    Given a config instance instead of a class, every key shows that instance's value (a preset's values
    with its overrides: `config --config preset.yaml --help`)."""
    lines = []
    obj = None if isinstance(cls, type) else cls
    cls = type(cls) if obj is not None else cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"[{prefix}{f.name}] {f.metadata.get('help', '')}")
            lines.append(describe(getattr(obj, f.name) if obj is not None else tp, prefix=f"{prefix}{f.name}."))
            continue
        if obj is not None:
            default = getattr(obj, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        extra = f" (one of {', '.join(map(str, choices))})" if choices else ""
        lines.append(f"  --{prefix}{f.name}={default!r}: {f.metadata.get('help', '')}{extra}")
        if f.name == "options" and cls is PrefConfig:  # every registered method's own knobs
            from hanorec import methods

            lines.append(methods.describe_knobs())
    return "\n".join(lines)
