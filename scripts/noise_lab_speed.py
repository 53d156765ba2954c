"""Time the noise lab's scoring: clean candidate scores, then 100 draws over the 7 candidates of one
hit3 prompt under logit noise and under LoRA noise (tiny preset, bundled demo data, LoRA r=8 as in
the preference stage). The target the explorer must meet on 2 CPU cores: 100 draws under 5 s.

    python scripts/noise_lab_speed.py [--preset tiny-qwen2.5-vl] [--threads 1] [--draws 100]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from hanorec.config import LoraConfig
from hanorec.data import load_dataset, make_splits
from hanorec.models import TINY_PRESETS, add_lora, build_tiny
from hanorec.noise import NoiseSpec, noise_summary
from hanorec.scoring import score_options
from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text, render

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-qwen2.5-vl", choices=TINY_PRESETS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--draws-per-forward", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset(DEMO)
    bundle = add_lora(build_tiny(args.preset, corpus_text(ds), seed=0), LoraConfig())
    shape = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=shape["n_history"], n_target=shape["n_target"])
    example = build_examples("hit3", splits.test, ds, seed=0, max_examples=1)[0]
    shown = render(example, ds, image_size=bundle.image_size)
    prompt = bundle.encode_prompt(shown.text, shown.images)
    score_options(bundle, [prompt], [example.options])  # warm-up
    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads {args.threads}, "
        f"preset {args.preset}, {len(prompt.input_ids)} prompt tokens, {len(example.options)} candidates"
    )
    t = time.perf_counter()
    clean = score_options(bundle, [prompt], [example.options])[0]
    print(f"clean scores: {time.perf_counter() - t:.3f} s")
    for target in ("logits", "lora"):
        spec = NoiseSpec(
            target, args.sigma, draws=args.draws, seed=0, draws_per_forward=args.draws_per_forward
        )
        t = time.perf_counter()
        noisy = score_options(bundle, [prompt], [example.options], noise=spec)[0]
        took = time.perf_counter() - t
        s = noise_summary(clean, noisy)
        print(
            f"{target:6s} noise, sigma {args.sigma}, {args.draws} draws x {len(example.options)} candidates: "
            f"{took:.2f} s (top-1 change {s.top1_change_rate:.2f}, KL {s.kl_mean:.2e})"
        )


if __name__ == "__main__":
    main()
