"""`python -m hanorec estimate --config FILE`: peak GPU memory per device and time per epoch of a preset's two
training stages, with gradient checkpointing on and off.

Memory is measured, then extrapolated in depth. The preset's architecture is built at real width with random
weights (model.init=random) at a few cut depths (2 and 4 decoder layers by default). For each depth, one
micro-batch of each stage runs through the code training uses: SFT's forward with its loss, and stage 2's
policy forward through shared-prefix scoring. The micro-batch has the preset's batch size, its image caps and
a real prompt. The bytes of every tensor autograd keeps for the backward pass are counted, parameters
excluded: that is the activation memory at real sequence lengths. Activation memory is linear in depth (every
decoder layer keeps the same tensors), so two depths give the per-layer cost and the fixed part, and the full
depth follows. The rest is counted:

- weights: the full-depth model's parameters (built on the meta device, no memory), at the preset's dtype;
- LoRA: its parameters, gradients and AdamW's two moments, in float32 (16 bytes per parameter);
- gradient checkpointing: each layer keeps only its input (tokens x hidden size x 2 bytes, computed), and one
  layer's activations (measured) live again while it is recomputed;
- one row of each micro-batch is measured; a batch of B rows keeps B times as much (rows of one length);
- SFT's head: the trunk is measured at the real length and the model's loss over every position is counted,
  not run (a 2,600-token row at the full vocabulary would pass this machine's memory budget): cross-entropy
  keeps the float32 log-softmax (4 bytes per logit) for backward, and the bf16 logits with their float32 copy
  (6 bytes per logit) are transient; stage 2's scoring computes logits at the answer positions only and is
  measured whole;
- the transient copy (SFT: the logits above; stage 2: its largest kept tensor) once more; stage 2 adds the
  reference pass (no gradient): one layer's activations and that copy again.

Time comes from FLOPs per optimizer step at an assumed model FLOPs utilisation (MFU) and the GPU's dense bf16
peak: forward = 2 x parameters x tokens (the language model's layers and head, the vision tower once per image)
plus attention's 2 x layers x tokens^2 x width; SFT = forward + backward (about one more forward: the frozen base
needs gradients for its inputs only); stage 2 = policy forward + backward + the reference forward;
checkpointing adds one more forward of the policy.

Not measured here: the GPU allocator's fragmentation and workspace (cuBLAS, attention kernels), CUDA context
(~0.5-1 GiB) and the optimizer's temporary buffers; the text-token counts come from a tokenizer trained locally,
not the checkpoint's own (image-token counts are exact: the processor's own). Every poster is assumed larger than
the stage's cap (the worst case).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

GIB = 1024**3
GPUS = {"h100": (989.0, 80.0, "NVIDIA H100 SXM (989 dense bf16 TFLOPS, 80 GB)"),
        "h200": (989.0, 141.0, "NVIDIA H200 (989 dense bf16 TFLOPS, 141 GB)"),
        "a100": (312.0, 80.0, "NVIDIA A100 80 GB (312 dense bf16 TFLOPS)"),
        "l40s": (362.0, 48.0, "NVIDIA L40S (362 dense bf16 TFLOPS, 48 GB)"),
        "a10g": (125.0, 24.0, "NVIDIA A10G (125 dense bf16 TFLOPS, 24 GB)")}  # fmt: skip
POSTER = (1200, 1800)  # every poster larger than any stage's cap: the worst case


@contextmanager
def count_saved(exclude: set[int]):
    """Bytes of the distinct tensors autograd keeps for backward inside the block (storages in ``exclude``,
    the parameters', not counted): ``with count_saved(params) as seen: ...; sum(seen.values())``."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage of its own (e.g. nested)
            return t
        if ptr not in exclude:
            seen[ptr] = max(seen.get(ptr, 0), size)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def parameter_storages(model) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


@dataclass
class Probe:
    """What one cut-depth model measured for one stage's micro-batch."""

    layers: int
    saved: int  # bytes kept for backward by one row of the micro-batch
    largest: int  # the largest single kept tensor (bytes)
    lora_params: int
    tokens: int  # tokens of one row (prompt and completions as the forward sees them)
    image_tokens: int  # of which visual tokens


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points (two points: the line through them)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    return my - slope * mx, slope


def extrapolate(points: dict[int, float], depth: int) -> float:
    """The value at ``depth`` of the line through ``{layers: value}`` (activation memory is linear in depth)."""
    a, b = linear_fit(list(points), list(points.values()))
    return a + b * depth


def _example(cfg):
    """One training example of the preset's task, its prompt and answers: the preset's data when its folder
    exists, else the bundled demo in the preset's prompt style (titles of a real length)."""
    from pathlib import Path

    from hanorec.config import load_config
    from hanorec.pipeline import prepare_data

    over = cfg.to_dict()
    if not Path(cfg.data.path).is_dir():
        from hanorec.data import load_dataset, write_split_files

        folder = Path.home() / ".cache" / "hanorec" / "estimate-demo"
        if not (folder / "train.tsv").is_file():
            write_split_files(load_dataset(Path(__file__).resolve().parents[1] / "assets" / "demo"), folder,
                              name="Movielens")  # fmt: skip
        over["data"] = {**over["data"], "path": str(folder), "prompts": "ours", "untitled": "raise"}
        if over["data"]["split_policy"] != "files":
            over["data"]["split_policy"] = "files"
        over["task"] = {**over["task"], "max_item_id": None}
    c = load_config(overrides=over)
    data = prepare_data(c)
    return data.train[0], data


def _n_train(cfg) -> int | None:
    from pathlib import Path

    if not Path(cfg.data.path).is_dir():
        return None
    from hanorec.pipeline import prepare_data

    return len(prepare_data(cfg).train)


def measure(cfg, layers: int, example, corpus: Sequence[str], stages=("sft", "pref")) -> dict[str, Probe]:
    """Build the preset's architecture with ``layers`` decoder layers (real width, random weights in bf16, LoRA
    as the preset) and measure one row of each stage's micro-batch: SFT's prompt and answer through the
    model's loss, stage 2's prompt with its chosen and rejected answers through shared-prefix scoring."""
    import gc

    from hanorec.models import add_lora, build_random, set_max_pixels
    from hanorec.pipeline import stage_max_pixels
    from hanorec.scoring import shared_prefix_logps

    gc.collect()  # a model measured before is held in reference cycles (peft): free it before building this one
    bundle = build_random(cfg.model.name, corpus, layers=layers, dtype="bfloat16", seed=0,
                          attn_implementation=cfg.model.attn_implementation or "sdpa")  # fmt: skip
    add_lora(bundle, cfg.lora, seed=0)
    model = bundle.model
    model.train()
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = parameter_storages(model)
    images = [Image.new("RGB", POSTER, (90, 60, 30)) for _ in example.image_items]
    text = example.prompt
    out = {}
    for stage, stage_cfg in [(st, c) for st, c in (("sft", cfg.sft), ("pref", cfg.pref)) if st in stages]:
        if stage == "pref" and cfg.pref.disable_dropout:  # as stage 2 trains (hanorec.train.preference)
            from hanorec.train.preference import disable_dropout

            disable_dropout(model)
        set_max_pixels(bundle, stage_max_pixels(cfg, stage_cfg.max_pixels))
        prompt = bundle.encode_prompt(text, images)
        n_img = len(prompt.input_ids) - bundle.text_token_count(text)
        vocab = model.get_output_embeddings().weight.shape[0]
        head = transient = 0
        if stage == "sft":
            batch = bundle.collate([prompt], [bundle.encode_completion(example.answer)])
            batch = {k: (v.to(torch.bfloat16) if k == "pixel_values" else v) for k, v in batch.items()}
            tokens = int(batch["input_ids"].numel())
            labels = batch.pop("labels")
            with count_saved(params) as seen:  # the trunk at the real length; the head's logits counted below
                loss = model(**batch, use_cache=False, logits_to_keep=1).logits.float().sum()
            del labels
            # the model's loss over every position: cross-entropy keeps the float32 log-softmax (4 bytes per
            # logit) for backward; the bf16 logits and their float32 copy (6 bytes) are transient
            head, transient = 4 * tokens * vocab, 6 * tokens * vocab
        else:
            k = max(1, cfg.pref.k_negatives)
            comps = [[bundle.encode_completion(o) for o in example.options[: 1 + k]]]
            tokens = len(prompt.input_ids) + sum(len(c) for c in comps[0])
            with count_saved(params) as seen:
                logps, _ = shared_prefix_logps(model, bundle, [prompt], comps, dtype=torch.bfloat16)
                loss = sum(x.sum() for x in logps)
        del loss
        largest = max(transient, max(seen.values(), default=0))
        out[stage] = Probe(layers, sum(seen.values()) + head, largest, lora, tokens, n_img)
    return out


def full_size(cfg) -> dict:
    """Parameters of the full-depth model (meta device: no memory) by part, and its depth and widths."""
    from hanorec.backbones import backbone
    from hanorec.models import published_ids, train_tokenizer

    family = published_ids()[cfg.model.name]
    adapter = backbone(family)
    tok = train_tokenizer(["estimate"], 300, family)
    with torch.device("meta"):
        model, _ = adapter.build_published(cfg.model.name, tok, None)
    names = adapter.vision_modules
    vision = sum(p.numel() for n, p in model.named_parameters() if any(f".{v}." in f".{n}" for v in names))
    total = sum(p.numel() for p in model.parameters())
    text = model.config.get_text_config()
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == model.get_input_embeddings().weight.data_ptr() if head.device.type != "meta" else (
        bool(getattr(text, "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings", False)))
    merge = getattr(model.config.vision_config, "spatial_merge_size", None)
    per_token = merge * merge if merge else 1  # patches the tower runs per visual token (approximate for pooling)
    return {"total": total, "vision": vision, "embed": embed, "head": head.numel(), "tied": tied,
            "patches_per_token": per_token,
            "layers": text.num_hidden_layers, "hidden": text.hidden_size, "vocab": text.vocab_size,
            "attn_width": getattr(text, "head_dim", None) and text.head_dim * text.num_attention_heads
            or text.hidden_size}  # fmt: skip


def estimate(
    cfg,
    *,
    layers: Sequence[int] = (2, 4),
    mfu: float = 0.3,
    gpu: str = "h100",
    n_gpus: int = 1,
    print_fn: Callable = print,
) -> dict:
    """Measure at the cut depths, extrapolate to the full depth; returns the figures (and prints a table)."""
    from hanorec.models import published_ids
    from hanorec.tasks import corpus_text

    if cfg.model.name not in published_ids():
        from hanorec.config import ConfigError

        raise ConfigError(f"estimate builds a known architecture; model.name = {cfg.model.name!r} is not one of "
                          f"{sorted(published_ids())}")  # fmt: skip
    peak_tflops, mem_gb, gpu_label = GPUS[gpu]
    start = time.time()
    example, data = _example(cfg)
    corpus = corpus_text(data.dataset, cfg.task.words(cfg.data.domain), cfg.task.template_set)
    probes = {n: measure(cfg, n, example, corpus) for n in layers}
    size = full_size(cfg)
    depth = size["layers"]
    dtype_bytes = 2 if cfg.model.dtype in ("bfloat16", "float16", "auto") else 4
    weights = size["total"] * dtype_bytes
    lora_full = extrapolate({n: probes[n]["sft"].lora_params for n in layers}, depth)
    lora_state = lora_full * 16
    result = {"model": cfg.model.name, "gpu": gpu_label, "mfu": mfu, "n_gpus": n_gpus, "layers_measured": list(layers),
              "full_depth": depth, "params": size["total"], "lora_params": int(lora_full), "stages": {}}  # fmt: skip
    n_train = _n_train(cfg)
    for stage, stage_cfg in (("sft", cfg.sft), ("pref", cfg.pref)):
        rows = stage_cfg.batch_size
        points = {n: probes[n][stage].saved for n in layers}
        fixed, per_layer = linear_fit(list(points), list(points.values()))
        probe = probes[layers[0]][stage]
        # checkpointing keeps each layer's input (tokens x hidden, bf16) and recomputes one layer at a time
        kept_input = probe.tokens * size["hidden"] * 2
        act_plain = rows * (fixed + per_layer * depth)
        act_ckpt = rows * (fixed + kept_input * depth + per_layer)
        largest = rows * max(probes[n][stage].largest for n in layers)  # a loss's transient float32 copy
        reference = rows * per_layer + largest if stage == "pref" else 0  # the no-gradient reference pass
        mem = {
            "plain": weights + lora_state + act_plain + largest + reference,
            "checkpointing": weights + lora_state + act_ckpt + largest + reference,
        }
        # FLOPs of one micro-batch's forward at full depth
        lm_params = size["total"] - size["vision"] - size["embed"] - (0 if size["tied"] else size["head"])
        seq = probe.tokens
        tokens = seq * rows
        fwd = 2 * lm_params * tokens + 2 * size["vocab"] * size["hidden"] * tokens
        fwd += 2 * depth * seq * seq * size["attn_width"] * rows
        vision = 2 * size["vision"] * probe.image_tokens * rows * size["patches_per_token"]
        passes = {"plain": 2 if stage == "sft" else 3, "checkpointing": 3 if stage == "sft" else 4}
        step = {k: (fwd * v + vision) * stage_cfg.grad_accum for k, v in passes.items()}
        per_example = {k: v / (rows * stage_cfg.grad_accum) for k, v in step.items()}
        rate = mfu * peak_tflops * 1e12 * n_gpus
        row = {
            "activations_per_layer_gib": rows * per_layer / GIB,
            "tokens_per_row": seq,
            "image_tokens_per_row": probe.image_tokens,
            "rows": rows,
            "memory_gib": {k: v / GIB for k, v in mem.items()},
            "weights_gib": weights / GIB,
            "lora_state_gib": lora_state / GIB,
            "activations_gib": {"plain": act_plain / GIB, "checkpointing": act_ckpt / GIB},
            "measured_row_gib": {n: points[n] / GIB for n in layers},
            "seconds_per_1000_examples": {k: 1000 * v / rate for k, v in per_example.items()},
            "epochs": stage_cfg.epochs,
        }
        if n_train:
            row["seconds_per_epoch"] = {k: n_train * v / rate for k, v in per_example.items()}
            row["train_examples"] = n_train
        result["stages"][stage] = row
    result["wall_s"] = time.time() - start
    print_fn(format_estimate(result))
    return result


def format_estimate(r: dict) -> str:
    lines = [
        f"{r['model']}: {r['params'] / 1e9:.2f} B parameters, {r['full_depth']} decoder layers; LoRA "
        f"{r['lora_params'] / 1e6:.1f} M; measured at {r['layers_measured']} layers, real width, on this machine's "
        f"CPU; {r['gpu']}, {r['n_gpus']} GPU(s), MFU {r['mfu']:.0%} assumed",
        "",
        "| stage | tokens / row (image) | activations / layer | peak memory / GPU, plain | with checkpointing | "
        "time / 1,000 examples, plain | with checkpointing |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for stage, s in r["stages"].items():
        m, t = s["memory_gib"], s["seconds_per_1000_examples"]
        lines.append(
            f"| {stage} | {s['tokens_per_row']:.0f} ({s['image_tokens_per_row']:.0f}) | "
            f"{s['activations_per_layer_gib']:.2f} GiB | {m['plain']:.1f} GiB | {m['checkpointing']:.1f} GiB | "
            f"{_duration(t['plain'])} | {_duration(t['checkpointing'])} |"
        )
    lines.append("")
    w = r["stages"]["sft"]
    lines.append(f"weights {w['weights_gib']:.1f} GiB, LoRA with gradients and AdamW state {w['lora_state_gib']:.2f} GiB; "
                 "add the CUDA context and allocator overhead (about 1-3 GiB).")  # fmt: skip
    for stage, s in r["stages"].items():
        if "seconds_per_epoch" in s:
            lines.append(f"{stage}: {s['train_examples']:,} training examples: an epoch takes "
                         f"{_duration(s['seconds_per_epoch']['plain'])} ({_duration(s['seconds_per_epoch']['checkpointing'])} "
                         f"with checkpointing), x {s['epochs']} epochs")  # fmt: skip
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _measure_sft(args) -> int:
    import torch as _torch

    cfg, n, example, corpus, threads = args
    _torch.set_num_threads(threads)
    return measure(cfg, n, example, corpus, stages=("sft",))["sft"].saved


def check_extrapolation(cfg, corpus, example, layers=(2, 4), target: int = 6) -> tuple[float, float]:
    """(predicted, measured) activation bytes of one SFT row at ``target`` layers from ``layers``; each depth is
    measured in a process of its own, so no model outlives its measurement."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    saved = {}
    for n in (*layers, target):
        with ctx.Pool(1) as pool:
            saved[n] = pool.map(_measure_sft, [(cfg, n, example, corpus, torch.get_num_threads())])[0]
    return extrapolate({n: saved[n] for n in layers}, target), float(saved[target])


__all__ = ["GPUS", "count_saved", "estimate", "extrapolate", "format_estimate", "linear_fit", "math"]
