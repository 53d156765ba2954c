"""Why HaRS' lambda stays within a fraction of a percent of 1 on the tiny model (issue 8).

lambda_n = sigmoid(D_n) / sigmoid(mean D), D_n = || p_w - p_l ||_2, p_i = softmax(s_i / T) over item i's
top-K cosine similarities s_i sorted descending (method.md section 7; the paper's T = 1, K = 10). This
script measures, on the preference pairs stage 2 would train on (hit3, demo data, the comparison's 480
pairs), the distribution of the neighbour similarities s, the profiles p, the distances D and lambda for:

  model     the item embeddings e_i of an SFT model (its title-token embeddings fused with its vision
            tower's image features), from --run or from a short SFT run this script trains;
  oracle    test-only embeddings with a clearly structured geometry made from the demo's ground-truth
            labels (never used in training): text part = one-hot genre, image part = one-hot colour,
            each plus Gaussian noise whose norm is about --oracle_noise times the signal's (64
            dimensions), fused like the model's (noise 0: four by four exact clusters);
  bound     the most lambda can move under the formula at all: D between a flat profile and the
            sharpest one cosines in [-1, 1] allow, at the measured mean D.

and, labelled beyond the paper, the same with a profile temperature T < 1. It prints the numbers and
writes <output_dir>/hars_inertness.json.

    .venv/bin/python scripts/hars_inertness.py                            # trains 1 SFT epoch first
    .venv/bin/python scripts/hars_inertness.py --run runs/compare-tiny/hit3/seed0   # an existing run
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hanorec.hardness import (  # noqa: E402
    ItemIndex,
    fuse_embeddings,
    hardness_lambda,
)
from hanorec.report import machine_description  # noqa: E402


def stats(x) -> dict:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    q = np.quantile(x, [0.0, 0.05, 0.5, 0.95, 1.0])
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(q[0]), "p5": float(q[1]),
            "median": float(q[2]), "p95": float(q[3]), "max": float(q[4])}  # fmt: skip


def fmt(s: dict, digits: int = 4) -> str:
    return (f"mean {s['mean']:.{digits}f} sd {s['std']:.{digits}f} [min {s['min']:.{digits}f}, p5 {s['p5']:.{digits}f}, "
            f"median {s['median']:.{digits}f}, p95 {s['p95']:.{digits}f}, max {s['max']:.{digits}f}]")  # fmt: skip


def measure(index: ItemIndex, pairs, k: int, temperature: float) -> dict:
    """s, p, D and lambda of `pairs` under one item index; plus the formula's terms."""
    sims = index.neighbours(k)[0]
    p = index.profiles(k, temperature)
    d = index.sample_distances(pairs, k=k, temperature=temperature)
    lam = hardness_lambda(d)
    mean_d = float(d.mean())
    sig = float(torch.sigmoid(torch.tensor(mean_d)))
    return {
        "K": k,
        "T": temperature,
        "s_top1": stats(sims[:, 0]),
        "s_topK": stats(sims[:, -1]),
        "s_spread": stats(sims[:, 0] - sims[:, -1]),  # top-1 minus top-K similarity per item
        "p_max": stats(p.max(1).values),  # the largest profile probability (flat profile: 1/K)
        "D": stats(d),
        "lambda": stats(lam),
        "max_abs_lambda_minus_1": float((lam - 1).abs().max()),
        "sigmoid_mean_D": sig,
        # first order: lambda - 1 ~= (1 - sigmoid(mean D)) * (D - mean D); the slope is about 0.5 at D ~ 0
        "slope_dlambda_dD": 1 - sig,
    }


def bound(k: int, temperature: float, mean_d: float) -> dict:
    """The largest D the formula allows (cosines in [-1, 1]) and the lambda range that gives at mean D."""
    profiles = [torch.softmax(torch.tensor([1.0] * j + [-1.0] * (k - j)) / temperature, 0) for j in range(k + 1)]
    d_max = max(float(torch.linalg.vector_norm(a - b)) for a in profiles for b in profiles)
    lo, hi = hardness_lambda(torch.tensor([0.0, d_max]), mean_distance=mean_d).tolist()
    return {"D_max": d_max, "lambda_at_D0": lo, "lambda_at_D_max": hi}


def oracle_index(ds, noise: float, seed: int, dim: int = 64) -> ItemIndex:
    """Embeddings from the demo's ground-truth genre (text part) and colour (image part)."""
    ids = sorted(ds.items)
    genres = sorted({ds.items[i].attributes["genre"] for i in ids})
    colours = sorted({ds.items[i].attributes["color"] for i in ids})
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(len(ids), dim)
    image = torch.zeros(len(ids), dim)
    for r, i in enumerate(ids):
        text[r, genres.index(ds.items[i].attributes["genre"])] = 1.0
        image[r, len(genres) + colours.index(ds.items[i].attributes["color"])] = 1.0
    std = noise / dim**0.5  # noise norm ~ noise x the one-hot's norm (1)
    text += std * torch.randn(text.shape, generator=g)
    image += std * torch.randn(image.shape, generator=g)
    return ItemIndex(ids, fuse_embeddings(text, image), {i: ds.items[i].title for i in ids})


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/compare-tiny.yaml")
    ap.add_argument("--run", default=None, help="a run folder whose sft/ stage to measure (default: train one)")
    ap.add_argument("--output_dir", default="runs/hars-inertness")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft_steps", type=int, default=None, help="SFT optimizer steps when training (default: the preset's epochs)")
    ap.add_argument("--oracle_noise", default="0,0.3,1,2", help="noise-to-signal norm of the oracle embeddings, comma-separated")
    ap.add_argument("--temperatures", default="0.1,0.05", help="profile temperatures beyond the paper, comma-separated")
    args, extra = ap.parse_known_args(argv)
    command = "python scripts/hars_inertness.py " + " ".join(shlex.quote(a) for a in argv)

    from hanorec import pipeline
    from hanorec.config import ConfigError, load_config
    from hanorec.pairs import build_pairs
    from hanorec.runs import load_stage

    run = Path(args.run) if args.run else Path(args.output_dir)
    overrides = ["--task.name=hit3", f"--output_dir={run}", f"--seed={args.seed}", "--sft.progress_bar=false", *extra]
    if args.sft_steps:
        overrides.append(f"--sft.max_steps={args.sft_steps}")
    try:
        cfg = load_config(ROOT / args.config if not Path(args.config).is_file() else args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.time()
    data = pipeline.prepare_data(cfg)
    if args.run is None:
        bundle, _ = pipeline.run_sft(cfg, data)
    else:
        bundle = load_stage(run, "sft")
    bundle.model.eval()
    pairs = build_pairs(list(data.train)[: cfg.pref.max_pairs], data.dataset, seed=cfg.seed, k_negatives=1)
    k = cfg.pref.hardness_k
    out: dict = {"command": command, "seed": cfg.seed, "machine": machine_description(), "run": str(run),
                 "n_pairs": len(pairs), "n_items": len(data.dataset.items), "K": k}  # fmt: skip
    print(f"{len(pairs)} hit3 preference pairs (3 aligned item pairs each) over {len(data.dataset.items)} items; K = {k}")

    with torch.no_grad():
        model_index = ItemIndex.from_model(bundle, data.dataset)
    indexes = {"model": model_index}
    has_labels = all({"genre", "color"} <= set(it.attributes) for it in data.dataset.items.values())
    if has_labels:
        for noise in [float(x) for x in args.oracle_noise.split(",") if x]:
            indexes[f"oracle(noise={noise:g})"] = oracle_index(data.dataset, noise, args.seed)
    else:
        print("the dataset has no genre and color columns: the oracle embeddings are skipped")
    temps = [1.0] + [float(t) for t in args.temperatures.split(",") if t]
    out["results"] = {}
    for name, index in indexes.items():
        for t in temps:
            m = measure(index, pairs, k, t)
            m["bound"] = bound(k, t, m["D"]["mean"])
            label = f"{name}, T={t:g}" + ("" if t == 1.0 else " (beyond the paper)")
            out["results"][label] = m
            print(f"\n== {label}")
            print(f"  top-1 cosine s_1:   {fmt(m['s_top1'])}")
            print(f"  top-K cosine s_K:   {fmt(m['s_topK'])}")
            print(f"  s_1 - s_K:          {fmt(m['s_spread'])}")
            print(f"  max p_i (flat 1/K = {1 / k:.4f}): {fmt(m['p_max'])}")
            print(f"  D_n:                {fmt(m['D'], 5)}")
            print(f"  lambda_n:           {fmt(m['lambda'], 5)}; max |lambda - 1| = {m['max_abs_lambda_minus_1']:.5f}")
            print(f"  sigmoid(mean D) = {m['sigmoid_mean_D']:.5f}; d lambda / d D = {m['slope_dlambda_dD']:.4f}; "
                  f"formula bound: D <= {m['bound']['D_max']:.4f}, lambda in [{m['bound']['lambda_at_D0']:.4f}, "
                  f"{m['bound']['lambda_at_D_max']:.4f}]")  # fmt: skip
    out["wall_s"] = time.time() - start
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "hars_inertness.json").write_text(json.dumps(out, indent=2))
    print(f"\nseed {cfg.seed}; {out['machine']}; {out['wall_s']:.0f} s; command: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
