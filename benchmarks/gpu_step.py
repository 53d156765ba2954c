"""Preference step on one GPU at full size (issue 10 item 6): shared prefix against naive, peak memory, MFU.

The model has Qwen2.5-VL-3B-Instruct's dimensions, written out below from its published config (36 layers,
hidden 2048, 16 heads / 2 KV heads, MLP 11008, vocabulary 151936; 32-block vision tower of width 1280,
patch 14, 2x2 merge), built from config with random weights directly on the GPU in bf16: nothing is
downloaded. Prompts are synthetic with the shape of a hit3 prompt: ``--images`` images of ``--image-size``
pixels (448: 256 visual tokens each) plus ``--text-tokens`` text tokens; completions of
``--completion-tokens`` tokens (a 3-title answer). Random token ids: the cost does not depend on them.

One step = what the preference trainer runs (hanorec.train.preference.make_pref_loss): reference
log-probs with the adapter disabled (no grad), the policy's log-probs under NoDO LoRA noise, the loss
(HaNo-DPO at K = 1, the K-negative S-DPO form at K > 1), backward, AdamW on the LoRA (r 8, alpha 32) of
the language model, with the trainer's own NoDO handling (one draw per micro-batch; the noise context stays
open until backward has run). Shared prefix packs the batch once and runs the frozen vision tower once
per step, its features reused by the reference and the policy forward (hanorec.scoring.pack_shared_prefix);
naive runs it for every row of both forwards, as TRL does. ``--checkpointing`` turns on gradient
checkpointing (the recomputed forward sees the same noise draw). Without it, naive scoring at K = 7 needs
an estimated 65 GB at batch 2.
Per K and scoring mode: median step time over ``--repeats`` after ``--warmup``, pairs per second, peak
GPU memory (torch.cuda.max_memory_allocated), and model FLOPs utilisation:

    MFU = model FLOPs of the step / step time / the GPU's peak dense bf16 FLOP/s
    model FLOPs = language model: 3 x forward (reference forward, policy forward, policy backward through
                  the frozen weights; checkpoint recomputation not counted) + vision tower (frozen, no
                  backward): 1 x forward on each prompt's images (shared prefix), 2 x forward on every
                  row's copy of them (naive)
    forward     = 2 x (matmul parameters) x tokens + causal attention 2 x layers x width x length^2 per row,
                  the LM head only on the positions each mode computes.

Both modes' losses on the first batch (noise off) are printed side by side and must agree to bf16
rounding.

    python benchmarks/gpu_step.py                  # one GPU (80 GB), a few minutes
    python benchmarks/gpu_step.py --tiny           # scaled-down dimensions, runs on a CPU (smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hanorec.config import LoraConfig, load_config  # noqa: E402
from hanorec.models import EncodedPrompt, ModelBundle, add_lora  # noqa: E402
from hanorec.noise import LoRANoise  # noqa: E402
from hanorec.train.preference import make_pref_loss  # noqa: E402

# Qwen2.5-VL-3B-Instruct (config.json of the published checkpoint); --tiny uses a 4096-token vocabulary
FULL_IDS = {"pad": 151643, "eos": 151645, "vision_start": 151652, "vision_end": 151653, "image": 151655, "video": 151656}
TINY_IDS = {"pad": 4000, "eos": 4001, "vision_start": 4002, "vision_end": 4003, "image": 4004, "video": 4005}
FULL_TEXT = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    tie_word_embeddings=True,
)
FULL_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_chans=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    out_hidden_size=2048,
    hidden_act="silu",
)
TINY_TEXT = dict(
    FULL_TEXT,
    vocab_size=4096,
    bos_token_id=4000,
    eos_token_id=4001,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
)
TINY_VISION = dict(FULL_VISION, depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, fullatt_block_indexes=[1])

# dense bf16 peak of known GPUs (FLOP/s); --peak-tflops for others
PEAK_BF16 = {"H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


class _Tok:
    """The few tokenizer facts scoring needs (ids only: prompts here are already token ids)."""

    def __init__(self, ids: dict):
        self.ids, self.eos_token_id, self.pad_token_id = ids, ids["eos"], ids["pad"]

    def convert_tokens_to_ids(self, token: str) -> int:
        return {"<|image_pad|>": self.ids["image"]}[token]


def build(tiny: bool, device, dtype, checkpointing: bool):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = TINY_IDS if tiny else FULL_IDS
    cfg = Qwen2_5_VLConfig(
        text_config=TINY_TEXT if tiny else FULL_TEXT,
        vision_config=TINY_VISION if tiny else FULL_VISION,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    cfg.get_text_config()._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    bundle = ModelBundle(model, _Tok(ids), None, "qwen2_5_vl", "qwen2.5-vl-3b-dims" if not tiny else "tiny")
    add_lora(bundle, LoraConfig(dropout=0.0))
    print(f"built {'tiny' if tiny else 'Qwen2.5-VL-3B'}-dimension model from config in {time.perf_counter() - t0:.1f}s: "
          f"{sum(p.numel() for p in bundle.model.parameters()) / 1e9:.3f} B parameters, "
          f"{sum(p.numel() for p in bundle.model.parameters() if p.requires_grad) / 1e6:.2f} M trainable", flush=True)
    return bundle


def synthetic_batch(args, vcfg, ids: dict, vocab: int, k: int, g: torch.Generator):
    """B prompts (images + text) with 1 + K completions each, as token ids and pixel tensors."""
    lo, hi = min(1000, vocab // 8), min(150000, ids["pad"])
    patch, merge, tp = vcfg["patch_size"], vcfg["spatial_merge_size"], vcfg["temporal_patch_size"]
    side = args.image_size // patch
    per_image = side * side // (merge * merge)
    prompts, completions = [], []
    for _ in range(args.batch):
        row: list[int] = []
        text = torch.randint(lo, hi, (args.text_tokens,), generator=g).tolist()
        chunk = len(text) // (args.images + 1)
        for i in range(args.images):
            row += text[i * chunk : (i + 1) * chunk] + [ids["vision_start"]] + [ids["image"]] * per_image + [ids["vision_end"]]
        row += text[args.images * chunk :]
        pixels = torch.randn(args.images * side * side, 3 * tp * patch * patch, generator=g)
        grid = torch.tensor([[1, side, side]] * args.images)
        prompts.append(EncodedPrompt(row, pixels, grid, args.images))
        completions.append(
            [torch.randint(lo, hi, (args.completion_tokens,), generator=g).tolist() + [ids["eos"]] for _ in range(1 + k)]
        )
    return prompts, completions, per_image


def pref_cfg(k: int, mode: str, noise: bool):
    return load_config(
        overrides={
            "pref": {
                "method": "hano_dpo" if k == 1 else "sdpo",
                "k_negatives": k,
                "scoring": mode,
                "noise_target": "lora" if noise else "none",
                "noise_sigma": 0.05,
            }
        }
    )


def count_params(model):
    """Matmul parameters: language model (without the LM head), LM head, vision tower."""
    lm = head = vis = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lora_" not in name:
            n = mod.weight.numel()
            if "lm_head" in name:
                head += n
            elif "visual" in name:
                vis += n
            elif "language_model" in name:
                lm += n
        elif isinstance(mod, (torch.nn.Conv3d, torch.nn.Conv2d)) and "visual" in name:
            vis += mod.weight.numel()
    return lm, head, vis


def step_flops(mode: str, prompts, completions, params, text_cfg) -> float:
    """Model FLOPs of one step in `mode` (see the module doc)."""
    lm, head, vis = params
    layers, width = text_cfg["num_hidden_layers"], text_cfg["hidden_size"]
    rows = []  # (row length, LM-head positions)
    for p, cs in zip(prompts, completions):
        n = len(p.input_ids)
        if mode == "naive":
            rows += [(n + len(c), n + len(c)) for c in cs]
        else:
            length = n + sum(len(c) - 1 for c in cs)
            rows.append((length, 1 + sum(len(c) - 1 for c in cs)))
    tokens = sum(r[0] for r in rows)
    fwd_lm = 2 * lm * tokens + 2 * head * sum(r[1] for r in rows) + sum(2 * layers * width * r[0] ** 2 for r in rows)
    if mode == "naive":  # every row's copy of the images, in the reference and in the policy forward
        vis_flops = 2 * 2 * vis * sum(p.pixel_values.shape[0] * len(cs) for p, cs in zip(prompts, completions))
    else:  # once per step, the features shared by both forwards
        vis_flops = 2 * vis * sum(p.pixel_values.shape[0] for p in prompts)
    return 3 * fwd_lm + vis_flops


def fmt(r: dict | None) -> str:
    if r is None:
        return "out of memory"
    out = f"{r['s']:.3f}s/step, {r['pairs_per_s']:.1f} pairs/s, "
    if r["peak_gib"] is not None:
        out += f"peak {r['peak_gib']:.1f} GiB, "
    out += f"{r['tflops']:.1f} TFLOP/s"
    return out + (f", MFU {100 * r['mfu']:.0f}%" if r["mfu"] else "")


def peak_flops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key in name:
            return PEAK_BF16[key]
    return None


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="scaled-down dimensions (CPU smoke test of this script)")
    ap.add_argument("--ks", default="1,3,7")
    ap.add_argument("--batch", type=int, default=2, help="prompts per step")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=448, help="pixels per side (448: 256 visual tokens)")
    ap.add_argument("--text-tokens", type=int, default=200)
    ap.add_argument("--completion-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the language model")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (--tiny; 1: steadier on a shared CPU)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.image_size = min(args.image_size, 56)
        args.text_tokens = min(args.text_tokens, 40)
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        print("gpu_step.py needs a CUDA GPU for the full-size model; use --tiny for a CPU smoke test", file=sys.stderr)
        raise SystemExit(2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type != "cuda":
        torch.set_num_threads(args.threads)  # two threads spin-wait badly on two shared cores
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"dtype {dtype}; arguments {vars(args)}", flush=True)
    bundle = build(args.tiny, device, dtype, args.checkpointing)
    model = bundle.model
    model.train()
    text_cfg = TINY_TEXT if args.tiny else FULL_TEXT
    vcfg = TINY_VISION if args.tiny else FULL_VISION
    params = count_params(model)
    peak = peak_flops(args, device)
    acc = SimpleNamespace(device=device, gather=lambda t: t)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    noise = LoRANoise(model, 0.05)
    with torch.no_grad():  # a trained-looking adapter, so the policy differs from the reference
        g = torch.Generator().manual_seed(args.seed + 1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = []
    for k in [int(x) for x in args.ks.split(",")]:
        g = torch.Generator().manual_seed(args.seed + k)
        ids = TINY_IDS if args.tiny else FULL_IDS
        prompts, completions, per_image = synthetic_batch(args, vcfg, ids, text_cfg["vocab_size"], k, g)
        batch = {"prompts": prompts, "completions": completions, "lambda": torch.ones(args.batch), "ref": None}
        with torch.no_grad():
            losses = {m: make_pref_loss(pref_cfg(k, m, False), bundle, acc, None)(model, batch)[0].item() for m in ("naive", "shared_prefix")}
        row = {"K": k, "prompt_tokens": len(prompts[0].input_ids), "loss": losses}
        for mode in ("naive", "shared_prefix"):
            # the trainer's step: its loss function opens NoDO and closes it when backward has run
            loss_fn = make_pref_loss(pref_cfg(k, mode, True), bundle, acc, noise)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            try:
                for i in range(args.warmup + args.repeats):
                    sync()
                    t0 = time.perf_counter()
                    loss, _ = loss_fn(model, batch)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    sync()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t0)
            except torch.OutOfMemoryError:
                print(f"K={k} {mode}: out of GPU memory", flush=True)
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                row[mode] = None
                continue
            t = statistics.median(times)
            flops = step_flops(mode, prompts, completions, params, text_cfg)
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            row[mode] = {"s": t, "loss": losses[mode], "pairs_per_s": args.batch * k / t, "peak_gib": mem, "tflops": flops / t / 1e12,
                         "mfu": flops / t / peak if peak else None}
        n, s = row.get("naive"), row.get("shared_prefix")
        ratio = f"x{n['s'] / s['s']:.2f}" if n and s else "n/a"
        print(f"K={k} (batch {args.batch}, prompt {row['prompt_tokens']} tokens with {args.images}x{per_image} visual): "
              f"naive {fmt(n)} | shared_prefix {fmt(s)} | speed-up {ratio} | loss naive {losses['naive']:.4f} "
              f"shared {losses['shared_prefix']:.4f}", flush=True)
        results.append(row)
    print(f"total wall time {time.perf_counter() - t_start:.0f}s")
    return results


if __name__ == "__main__":
    main()
