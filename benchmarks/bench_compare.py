"""A small comparison timed with the old path and the new one, side by side in one process on one machine.

Old: every preference variant of a seed computes its own reference log-probs on every step
(``run_comparison(share_reference=False)``, what the comparison did before). New: the variants of a seed share
them (hanorec.train.refcache): the first variant computes each micro-batch's reference, the others read it
back bit for bit and skip that forward. Both sides start from the same SFT model (trained once, up front, as
``--from-sft`` does), so what differs is the preference stages; each side's evaluations are timed too.

Prints, per side: the median wall time over ``--repeats`` (sides alternated, round robin, so load from
other processes hits both alike), the median time of each part (the SFT evaluation, each variant's training
and evaluation), and the ratio; checks that both sides gave the same rows and per-example values. Then an
estimate for the README's demo comparison (``configs/compare-tiny.yaml``, 3 seeds, every method, 92.8 min
measured on 2026-12-02): the measured saving per preference step of a variant that reads shared values,
times the steps of the README run's variants that would read them. With ``--profile``, a cProfile of one
variant's part (training and evaluation) on the new path: where the time goes.

    .venv/bin/python benchmarks/bench_compare.py                 # about 10 min on the 2-core CPU
    .venv/bin/python benchmarks/bench_compare.py --repeats 1 --profile
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, header, load_average


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=40, help="demo users (train and test)")
    ap.add_argument("--sft-steps", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=48, help="pref.max_pairs: steps per variant = pairs / 4")
    ap.add_argument("--variants", default="DPO,HaNo-DPO,HaNo-DPO w/o NoDO,cDPO")
    ap.add_argument("--catalogue-items", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="cProfile one variant's part on the new path")
    return ap.parse_args(argv)


def small_config(args, out: Path):
    from hanorec.config import load_config

    return load_config(
        ROOT / "configs" / "compare-tiny.yaml",
        {
            "output_dir": str(out),
            "data": {"path": str(ROOT / "assets" / "demo"), "max_users": args.users},
            "task": {"max_eval_examples": args.users},
            "sft": {"max_steps": args.sft_steps, "epochs": 1},
            "pref": {"max_pairs": args.pairs},
            "eval": {"catalogue_items": args.catalogue_items},
        },
    )


def timed_comparison(args, sft_run: Path, out: Path, share: bool) -> dict:
    """One comparison from the prepared SFT run; returns its wall time, each part's time and its result."""
    from hanorec.pipeline import run_comparison

    shutil.rmtree(out, ignore_errors=True)
    marks: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    result = run_comparison(
        small_config(args, out), seeds=(0,), tasks=("hit3",), variants=args.variants.split(","),
        sft_run=sft_run, print_fn=lambda *a: None, share_reference=share,
        on_progress=lambda p: marks.append((p["current"], time.perf_counter())),
    )  # fmt: skip
    end = time.perf_counter()
    parts = {}
    for (label, start), (_, stop) in zip(marks, [*marks[1:], ("end", end)]):
        parts[label.split(": ", 1)[1]] = stop - start
    return {"wall": end - t0, "parts": parts, "result": result}


def readme_estimate(saving_per_step: float) -> str:
    """The README demo comparison's time with shared reference log-probs, from its measured 92.8 min: the
    variants of a seed that would read another's values, times its steps per variant, times the saving."""
    from hanorec import methods
    from hanorec.config import load_config

    cfg = load_config(ROOT / "configs" / "compare-tiny.yaml")
    steps = cfg.pref.max_pairs // cfg.pref.batch_size  # one epoch over max_pairs pairs, drop_last
    groups: dict[tuple, int] = {}
    for v in methods.variants():
        over = methods.variant_of(v)
        m = methods.get(over.get("method", "dpo"))
        if not m.needs_reference:
            continue
        key = (over.get("k_negatives", 1), m.needs_imageless)
        groups[key] = groups.get(key, 0) + 1
    readers = sum(n - 1 for n in groups.values())  # the first variant of each pair set computes, the rest read
    saved_min = 3 * readers * steps * saving_per_step / 60
    return (
        f"README demo comparison (compare-tiny.yaml, 3 seeds, {len(methods.variants())} variants, {steps} steps "
        f"each): {sum(groups.values())} variants use a reference, in {len(groups)} pair sets, so {readers} per seed "
        f"would read shared values; at {saving_per_step * 1000:.1f} ms saved per step that is {saved_min:.1f} min of "
        f"its 92.8 min (measured 2026-12-02 under load): about {92.8 - saved_min:.1f} min, "
        f"{92.8 / max(92.8 - saved_min, 1e-9):.2f}x (an estimate, not a rerun: the per-step saving measured here "
        "on the same model and batch size, with fewer users)."
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    header("bench_compare: a comparison with per-variant reference log-probs (old) and shared ones (new)", args)
    from hanorec.pipeline import run_sft

    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    try:
        sft_run = work / "sft-run"
        cfg = small_config(args, sft_run)
        t0 = time.perf_counter()
        run_sft(cfg)
        print(f"SFT trained once for both sides: {time.perf_counter() - t0:.1f} s ({args.sft_steps} steps)")
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for k in range(args.repeats):
            for side in ("old", "new"):
                runs[side].append(timed_comparison(args, sft_run, work / f"{side}{k}", share=side == "new"))
                print(f"  repeat {k + 1} {side}: {runs[side][-1]['wall']:.1f} s (load {load_average()})", flush=True)
        a, b = runs["old"][-1]["result"], runs["new"][-1]["result"]
        same = a["per_example"] == b["per_example"] and a["rows"] == b["rows"]
        print(f"both sides gave the same rows and per-example values: {same}")
        med = {s: statistics.median(r["wall"] for r in runs[s]) for s in runs}
        print(f"\nwhole comparison (from the SFT model, {len(args.variants.split(','))} variants, 1 seed), median of "
              f"{args.repeats}: old {med['old']:.1f} s, new {med['new']:.1f} s, ratio {med['old'] / med['new']:.2f}x")  # fmt: skip
        print("per part (median s): part | old | new")
        labels = list(runs["old"][0]["parts"])
        part_med = {s: {p: statistics.median(r["parts"][p] for r in runs[s]) for p in labels} for s in runs}
        for p in labels:
            print(f"  {p:>22} | {part_med['old'][p]:7.1f} | {part_med['new'][p]:7.1f}")
        steps = args.pairs // 4
        readers = labels[2:]  # after the SFT evaluation and the first variant (which computes the values)
        saving = statistics.mean(part_med["old"][p] - part_med["new"][p] for p in readers) / steps if readers else 0.0
        print(f"\nsaving per preference step of a variant that reads shared values: {saving * 1000:.1f} ms "
              f"(mean over {len(readers)} variants of (old - new) / {steps} steps; it includes the evaluation's noise)")  # fmt: skip
        print(readme_estimate(saving))
        if args.profile:
            profile_part(args, sft_run, work)
        print(f"load average at the end: {load_average()}")
        return 0 if same else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def profile_part(args, sft_run: Path, work: Path) -> None:
    """cProfile of the new path's second variant (training on shared values, then its evaluation)."""
    import cProfile
    import io
    import pstats

    from hanorec.pipeline import prepare_data, run_eval, run_preference
    from hanorec.train.refcache import ReferenceCache

    variants = args.variants.split(",")
    out = work / "profile"
    from hanorec import methods
    from hanorec.pipeline import _with
    from hanorec.runs import stage_slug

    cfg = small_config(args, out)
    data = prepare_data(cfg)
    cache = ReferenceCache(out / "reference_logps")
    first = _with(cfg, pref={**methods.variant_of(variants[0]), "sft_run": str(sft_run)})
    run_preference(first, data, name=stage_slug(variants[0]), reference_cache=cache)
    second = _with(cfg, pref={**methods.variant_of(variants[1]), "sft_run": str(sft_run)})
    prof = cProfile.Profile()
    prof.enable()
    bundle, _ = run_preference(second, data, name=stage_slug(variants[1]), reference_cache=cache)
    run_eval(second, bundle, data, method=variants[1], baselines=[])
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(r"hanorec|torch/nn/modules/module.py:.*_call_impl", 28)
    lines = [ln for ln in text.getvalue().splitlines() if ln.strip()]
    print(f"\ncProfile of {variants[1]}'s part on the new path (training on shared reference values, then its "
          f"evaluation; cache hits {cache.hits}, misses {cache.misses}), by cumulative time:")  # fmt: skip
    print("\n".join(lines[:60]))


if __name__ == "__main__":
    sys.exit(main())
