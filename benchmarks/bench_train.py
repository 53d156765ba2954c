"""Preference training step: shared-prefix against naive scoring (issue 10 items 1 and 4).

Item 1, throughput: one optimizer step of the preference trainer's own loss function
(hanorec.train.preference.make_pref_loss): reference log-probs (adapter disabled, no grad), the policy's
log-probs under NoDO LoRA noise, the loss, backward, AdamW on the LoRA parameters. K = 1 is HaNo-DPO
(HaRS lambda, eta, NoDO); K > 1 rejected answers use the K-negative loss (S-DPO) with the same NoDO noise,
since HaNo-DPO's configuration takes one rejected answer. "naive" repeats the prompt, images included, for
every completion (as TRL's and the authors' trainers do); "shared_prefix" encodes it once, and runs the
frozen vision tower once per step for both the reference and the policy forward. Pairs per
second = B x K / step time. Batch encoding (image processing, tokenization; identical in both modes) is
timed separately and reported as well. Before timing, the loss of both modes on the same batch and
weights (noise off, LoRA perturbed so the policy differs from the reference) is checked equal.

Item 4, memory: peak memory (torch profiler memory timeline: parameters, gradients, optimizer state and
activations that the step touches) of the HaNo-DPO step against an SFT step on the same examples, and
the time per epoch saved by precomputing the reference log-probs (pref.precompute_ref).

    python benchmarks/bench_train.py [--repeats 5] [--ks 1,3,7] [--batch 4] [--memory] [--profile] [--threads 1]
                                     [--presets all]

--presets: comma-separated tiny presets, or "all" (default): one per backbone family, so the shared-prefix
speed-up is reported for each family (a summary line per family at the end).
"""

from __future__ import annotations

import argparse
import random
import time
from functools import partial
from types import SimpleNamespace

import torch
from common import check_equal, demo_examples, header, round_robin, spread, tiny_bundle

from hanorec.config import LoraConfig, load_config
from hanorec.models import TINY_PRESETS, add_lora
from hanorec.noise import LoRANoise
from hanorec.pairs import build_pairs
from hanorec.train.preference import PrefItem, make_pref_collate, make_pref_loss, precompute_reference
from hanorec.train.sft import make_sft_collate, sft_loss

N_NEGATIVES = 6  # hit3 negatives shown per prompt: C(6, 3) = 20 possible rejected answers, enough for K = 7


def pref_cfg(k: int, mode: str, noise: bool = True):
    method = "hano_dpo" if k == 1 else "sdpo"
    return load_config(
        overrides={
            "pref": {
                "method": method,
                "k_negatives": k,
                "scoring": mode,
                "noise_target": "lora" if noise else "none",
                "noise_sigma": 0.05,
            }
        }
    )


def setup(preset: str, k: int, args):
    ds, examples = demo_examples("hit3", args.batch * 4, seed=args.seed, split="train", n_negatives=N_NEGATIVES)
    bundle = tiny_bundle(preset, ds, hidden=args.hidden, seed=args.seed)
    add_lora(bundle, LoraConfig(dropout=0.0))
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():  # a trained-looking adapter: the policy differs from the reference
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    rng = random.Random(args.seed)
    pairs = build_pairs(examples, ds, seed=args.seed, k_negatives=k)
    items = [PrefItem(p, hardness_lambda=rng.uniform(0.95, 1.05)) for p in pairs]
    return ds, bundle, items


def accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t)


def make_step(bundle, cfg, batch, optimizer, noise):
    loss_fn = make_pref_loss(cfg, bundle, accelerator(), noise)
    model = bundle.model

    def step():
        loss, _ = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def throughput(preset: str, args) -> list[dict]:
    out = []
    for k in args.ks:
        ds, bundle, items = setup(preset, k, args)
        bundle.model.train()
        collate = make_pref_collate(bundle, ds)
        batch = collate(items[: args.batch])
        # equal losses: both modes, same weights and batch, noise off
        with torch.no_grad():
            losses = {
                m: make_pref_loss(pref_cfg(k, m, noise=False), bundle, accelerator(), None)(bundle.model, batch)[0]
                for m in ("naive", "shared_prefix")
            }
        diff = check_equal(f"{preset} K={k} loss", losses["naive"], losses["shared_prefix"])
        params = [p for p in bundle.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        noise = LoRANoise(bundle.model, 0.05)
        fns = {m: make_step(bundle, pref_cfg(k, m), batch, optimizer, noise) for m in ("naive", "shared_prefix")}
        fns["encode"] = partial(collate, items[: args.batch])
        res = round_robin(fns, args.repeats)
        t_n, t_s, t_e = (res[m]["median"] for m in ("naive", "shared_prefix", "encode"))
        pairs = args.batch * k
        row = {
            "preset": preset,
            "K": k,
            "naive_s": t_n,
            "shared_s": t_s,
            "encode_s": t_e,
            "ratio": t_n / t_s,
            "ratio_with_encode": (t_n + t_e) / (t_s + t_e),
            "pairs_per_s": (pairs / t_n, pairs / t_s),
            "loss_diff": diff,
        }
        out.append(row)
        print(
            f"{preset:16s} K={k}: naive {t_n:.3f}s ({spread(res['naive']['times'])}), "
            f"shared_prefix {t_s:.3f}s ({spread(res['shared_prefix']['times'])}); "
            f"{pairs / t_n:.1f} vs {pairs / t_s:.1f} pairs/s: x{t_n / t_s:.2f} "
            f"(x{row['ratio_with_encode']:.2f} with batch encoding {t_e:.3f}s); loss |diff| {diff:.1e}",
            flush=True,
        )
    return out


# ------------------------------------------------------------------------------------------------
# Item 4: memory and precomputed reference
# ------------------------------------------------------------------------------------------------
def peak_memory(fn) -> int:
    """Peak bytes of the tensors live during fn() (torch profiler memory timeline, CPU)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    timeline = MemoryProfileTimeline(prof._memory_profile())
    _, sizes = timeline._coalesce_timeline(torch.device("cpu"))
    return int(max(sum(s) for s in sizes))


def memory(preset: str, args) -> dict:
    ds, bundle, items = setup(preset, 1, args)
    bundle.model.train()
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    pref_batch = make_pref_collate(bundle, ds)(items[: args.batch])
    sft_batch = make_sft_collate(bundle, ds, max_length=4096)([it.pair.example for it in items[: args.batch]])
    noise = LoRANoise(bundle.model, 0.05)

    def sft_step():
        loss, _ = sft_loss(bundle.model, sft_batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {"sft": sft_step}
    for m in ("shared_prefix", "naive"):
        steps[m] = make_step(bundle, pref_cfg(1, m), pref_batch, optimizer, noise)
    for fn in steps.values():  # warm-up: optimizer state exists before measuring
        fn()
    peaks = {k: peak_memory(fn) for k, fn in steps.items()}
    mib = {k: v / 2**20 for k, v in peaks.items()}
    print(
        f"{preset:16s} peak memory, batch {args.batch}: SFT step {mib['sft']:.1f} MiB, HaNo-DPO step shared_prefix "
        f"{mib['shared_prefix']:.1f} MiB (x{peaks['shared_prefix'] / peaks['sft']:.2f}), naive "
        f"{mib['naive']:.1f} MiB (x{peaks['naive'] / peaks['sft']:.2f})",
        flush=True,
    )

    # precomputed reference: an epoch of n_pairs pairs with and without the reference forward per step
    n_pairs = len(items)
    batches = [items[i : i + args.batch] for i in range(0, n_pairs, args.batch)]
    collate = make_pref_collate(bundle, ds)
    cfg = pref_cfg(1, "shared_prefix")
    loss_fn = make_pref_loss(cfg, bundle, accelerator(), noise)

    def epoch(precomputed: list[PrefItem] | None):
        its = precomputed or items
        for b in range(len(batches)):
            batch = collate(its[b * args.batch : (b + 1) * args.batch])
            loss, _ = loss_fn(bundle.model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def precompute():
        out = precompute_reference(bundle, ds, items, "shared_prefix", batch_size=args.batch)
        bundle.model.train()
        return out

    pre_items = precompute()
    res = round_robin(
        {"online": lambda: epoch(None), "precomputed": lambda: epoch(pre_items), "precompute": precompute},
        args.epoch_repeats,
    )
    t_on, t_pre, t_once = (res[k]["median"] for k in ("online", "precomputed", "precompute"))
    print(
        f"{preset:16s} epoch of {n_pairs} pairs (batch {args.batch}, shared_prefix): reference scored every step "
        f"{t_on:.2f}s, precomputed {t_pre:.2f}s: saves {t_on - t_pre:.2f}s = {100 * (t_on - t_pre) / t_on:.0f}% "
        f"per epoch; the one-time precomputing pass costs {t_once:.2f}s",
        flush=True,
    )
    return {
        "preset": preset,
        "peak_mib": mib,
        "epoch_online_s": t_on,
        "epoch_precomputed_s": t_pre,
        "precompute_s": t_once,
    }


def profile(preset: str, k: int, args) -> None:
    """Where a step's time goes, both modes: torch.profiler over 3 steps after 2 warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    ds, bundle, items = setup(preset, k, args)
    bundle.model.train()
    batch = make_pref_collate(bundle, ds)(items[: args.batch])
    optimizer = torch.optim.AdamW([p for p in bundle.model.parameters() if p.requires_grad], lr=1e-5)
    noise = LoRANoise(bundle.model, 0.05)
    print(f"profile of 3 steps, {preset}, K={k} (torch.profiler, self CPU time):")
    for mode in ("naive", "shared_prefix"):
        step = make_step(bundle, pref_cfg(k, mode), batch, optimizer, noise)
        step(), step()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        wall = time.perf_counter() - t0
        ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        total = sum(e.self_cpu_time_total for e in ops) / 1e6

        mm = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / 1e6
        attn = sum(e.self_cpu_time_total for e in ops if "attention" in e.key) / 1e6
        conv = sum(e.self_cpu_time_total for e in ops if "convolution" in e.key) / 1e6
        print(
            f"  {mode:13s} {wall:.2f}s: matmuls {mm:.2f}s ({100 * mm / wall:.0f}%), attention {attn:.2f}s "
            f"({100 * attn / wall:.0f}%), patch convolution {conv:.2f}s, other torch ops {total - mm - attn - conv:.2f}s "
            f"({100 * (total - mm - attn - conv) / wall:.0f}%), outside torch ops (Python, hooks, optimizer "
            f"bookkeeping) {wall - total:.2f}s ({100 * (wall - total) / wall:.0f}%)",
            flush=True,
        )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epoch-repeats", type=int, default=3)
    ap.add_argument("--ks", default="1,3,7")
    ap.add_argument("--batch", type=int, default=4, help="examples per step (pref.batch_size default)")
    ap.add_argument("--hidden", type=int, default=128, help="tiny preset hidden size (the preset default)")
    ap.add_argument("--presets", default="all", help='comma-separated tiny presets, or "all" (one per family)')
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    ap.add_argument("--memory", action="store_true", help="also item 4: peak memory and precomputed reference")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also profile both modes at K=3 (first preset)")
    args = ap.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",")]
    if args.presets == "all":
        args.presets = ",".join(TINY_PRESETS)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    header("preference training step: shared prefix vs naive (hit3, 3 images per prompt, fp32)", args)
    out = {"throughput": [], "memory": []}
    for preset in args.presets.split(","):
        if not args.no_throughput:
            out["throughput"] += throughput(preset, args)
        if args.memory:
            out["memory"].append(memory(preset, args))
    if args.profile:
        profile(args.presets.split(",")[0], 3, args)
    if out["throughput"]:
        print("shared-prefix speed-up per family (naive step time / shared-prefix step time, same run):")
        for preset in args.presets.split(","):
            rows = [r for r in out["throughput"] if r["preset"] == preset]
            print(f"  {preset:16s} " + ", ".join(f"K={r['K']} x{r['ratio']:.2f}" for r in rows), flush=True)
    return out


if __name__ == "__main__":
    main()
