"""Naive vs shared-prefix scoring speed on the demo data, with the tiny presets.

Ranking: the 7 hit3 options of N test examples through ``score_options`` (what evaluation runs),
once per mode. Training (``--train``): forward + backward of the chosen answer and K rejected
answers of B examples with LoRA (what a preference step runs on the policy). Each timing is the
median of ``--repeats`` runs after one warm-up; results of the two modes are also compared.

    python benchmarks/bench_scoring.py [--examples 20] [--repeats 3] [--train] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from functools import partial

import torch

from hanorec.config import LoraConfig
from hanorec.data import load_dataset, make_splits
from hanorec.models import add_lora, build_tiny
from hanorec.scoring import multi_completion_logps, score_options
from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text, format_titles, render


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def machine() -> str:
    return (
        f"{platform.platform()} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} CPUs | torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="assets/demo")
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8, help="score_options batch_size (both modes)")
    ap.add_argument("--hidden", type=int, default=128, help="tiny preset hidden size (the preset default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    ap.add_argument("--train", action="store_true", help="also time forward+backward of chosen + K rejected")
    ap.add_argument("--train-examples", type=int, default=4)
    ap.add_argument("--negatives", type=int, default=3, help="rejected answers per example (--train)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ds = load_dataset(args.data)
    shape = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=shape["n_history"], n_target=shape["n_target"], seed=args.seed)
    examples = build_examples("hit3", splits.test, ds, seed=args.seed, max_examples=args.examples)
    print(f"machine: {machine()}")
    print(
        f"seed {args.seed}; {len(examples)} hit3 test examples x 7 options; median of {args.repeats} "
        f"after 1 warm-up; hidden {args.hidden}, fp32, score_options batch_size {args.batch_size}"
    )
    for preset in ("tiny-qwen2.5-vl", "tiny-llava"):
        bundle = build_tiny(preset, corpus_text(ds), hidden_size=args.hidden, seed=args.seed)
        bundle.model.float().eval()
        prompts = [bundle.encode_prompt(r.text, r.images) for r in (render(e, ds) for e in examples)]
        options = [e.options for e in examples]
        plen = sum(len(p.input_ids) for p in prompts) / len(prompts)
        olen = sum(len(bundle.encode_completion(o, eos=False)) for e in examples for o in e.options)
        olen /= 7 * len(examples)
        res = {
            mode: timed(
                partial(score_options, bundle, prompts, options, batch_size=args.batch_size, mode=mode),
                args.repeats,
            )
            for mode in ("naive", "shared_prefix")
        }
        diff = max((a - b).abs().max().item() for a, b in zip(res["naive"][1], res["shared_prefix"][1]))
        t_naive, t_shared = res["naive"][0], res["shared_prefix"][0]
        print(
            f"{preset:16s} ranking: prompt {plen:.0f} tok, option {olen:.1f} tok | naive {t_naive:.3f}s  "
            f"shared_prefix {t_shared:.3f}s  speed-up x{t_naive / t_shared:.2f}  max |diff| {diff:.1e}"
        )
        if args.train:
            train_step(bundle, ds, examples[: args.train_examples], args)


def train_step(bundle, ds, examples, args) -> None:
    """Forward + backward of chosen + K rejected answers per example, both modes, LoRA policy."""
    add_lora(bundle, LoraConfig(dropout=0.0))
    bundle.model.train()
    prompts, comps = [], []
    for e in examples:
        r = render(e, ds)
        prompts.append(bundle.encode_prompt(r.text, r.images))
        negs = [t for t in e.options if t not in {f'"{ds.items[i].title}"' for i in e.targets}]
        rejected = [format_titles([t.strip('"') for t in negs[k : k + 3]]) for k in range(args.negatives)]
        comps.append([bundle.encode_completion(a) for a in [e.answer, *rejected]])

    def step(mode):
        bundle.model.zero_grad(set_to_none=True)
        sums, _ = multi_completion_logps(bundle.model, bundle, prompts, comps, mode=mode)
        torch.cat(sums).sum().backward()
        return torch.cat(sums).detach()

    t = {m: timed(lambda m=m: step(m), args.repeats) for m in ("naive", "shared_prefix")}
    diff = (t["naive"][1] - t["shared_prefix"][1]).abs().max().item()
    clen = sum(len(c) for cs in comps for c in cs) / sum(len(cs) for cs in comps)
    print(
        f"{bundle.name:16s} training: {len(examples)} examples x (1 chosen + {args.negatives} rejected), "
        f"completion {clen:.1f} tok | naive {t['naive'][0]:.3f}s  shared_prefix {t['shared_prefix'][0]:.3f}s  "
        f"speed-up x{t['naive'][0] / t['shared_prefix'][0]:.2f}  max |diff| {diff:.1e}"
    )


if __name__ == "__main__":
    main()
