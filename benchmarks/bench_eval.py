"""Candidate ranking in evaluation (issue 10 item 3).

1. The prompt encoded once (shared prefix: one packed row per prompt holding all its candidates) against
   once per candidate (naive), for 7 and 20 candidates (hit3 with 4 and 17 negatives), through
   ``hanorec.eval.rank_options`` (what ``evaluate`` runs), ``--batch`` prompts per forward in both modes.
   Candidates scored per second; the scores of both modes are checked equal.
2. Evaluation before and after batching: one example per forward (what ``evaluate`` did before) against
   ``--batch`` examples per forward, shared prefix in both; the two metric tables are printed and checked
   identical.

    python benchmarks/bench_eval.py [--examples 16] [--repeats 3] [--batch 8] [--threads 1]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from common import check_equal, demo_examples, header, round_robin, spread, tiny_bundle

from hanorec.eval import format_results, metrics_from_scores, rank_options


def one_at_a_time(bundle, ds, examples):
    """The loop evaluate ran before batching: one prompt (all its options) per forward."""
    return torch.cat([rank_options(bundle, ds, [e], batch_size=1) for e in examples])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="prompts per forward (eval.batch_size default)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--presets", default="tiny-qwen2.5-vl,tiny-llava")
    ap.add_argument("--candidates", default="7,20")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    header("candidate ranking: prompt encoded once vs once per candidate; batched evaluation", args)
    out = []
    for preset in args.presets.split(","):
        bundle = None
        for n_cand in [int(c) for c in args.candidates.split(",")]:
            ds, examples = demo_examples("hit3", args.examples, seed=args.seed, n_negatives=n_cand - 3)
            if bundle is None:
                bundle = tiny_bundle(preset, ds, hidden=args.hidden, seed=args.seed)
                bundle.model.eval()
            fns = {
                m: partial(rank_options, bundle, ds, examples, batch_size=args.batch, mode=m)
                for m in ("naive", "shared_prefix")
            }
            if n_cand == 7:
                fns["one_at_a_time"] = partial(one_at_a_time, bundle, ds, examples)
            res = round_robin(fns, args.repeats)
            diff = check_equal(f"{preset} {n_cand} candidates scores", res["naive"]["out"], res["shared_prefix"]["out"])
            t_n, t_s = res["naive"]["median"], res["shared_prefix"]["median"]
            n = len(examples) * n_cand
            row = {"preset": preset, "candidates": n_cand, "naive_s": t_n, "shared_s": t_s, "ratio": t_n / t_s}
            print(
                f"{preset:16s} {n_cand:2d} candidates x {len(examples)} prompts: naive {t_n:.3f}s "
                f"({spread(res['naive']['times'])}), shared_prefix {t_s:.3f}s ({spread(res['shared_prefix']['times'])}); "
                f"{n / t_n:.0f} vs {n / t_s:.0f} candidates/s: x{t_n / t_s:.2f}; max |score diff| {diff:.1e}",
                flush=True,
            )
            if "one_at_a_time" in res:
                t_1 = res["one_at_a_time"]["median"]
                before = metrics_from_scores(examples, res["one_at_a_time"]["out"].numpy(), snap=True)
                after = metrics_from_scores(examples, res["shared_prefix"]["out"].numpy(), snap=True)
                tb = format_results("hit3", [{"method": "one example per forward", "protocol": "ranking", **before}])
                ta = format_results("hit3", [{"method": f"{args.batch} per forward", "protocol": "ranking", **after}])
                same = before == after
                print(
                    f"{preset:16s} evaluation one example per forward {t_1:.3f}s vs {args.batch} per forward "
                    f"{t_s:.3f}s: x{t_1 / t_s:.2f}; metric tables identical: {same}"
                )
                print("  before: " + tb.replace("\n", "\n          "))
                print("  after:  " + ta.replace("\n", "\n          "))
                if not same:
                    raise AssertionError("batched evaluation changed the metrics")
                row["batched_ratio"] = t_1 / t_s
            out.append(row)
    return out


if __name__ == "__main__":
    main()
