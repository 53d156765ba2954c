"""The DPO lesson (configs/lab.yaml) measured: does preference optimisation visibly work in 60 steps?

From the shipped teaching SFT model (assets/demo_runs/teach-hit3, scripts/make_demo_runs.py), for each seed
and each of DPO, HaNo-DPO and SimPO, one preference run of the lesson preset, then prints:

- held-out pair accuracy (eval/pair_accuracy on the preset's fixed validation pairs) at step 0 and at the end;
- the held-out chosen and rejected log-probs' change from step 0 (eval/logps/*: chosen should rise against
  rejected), and the last step's kl/reference where the method has a reference;
- the training wall time (pairs, hardness and the steps; the goal is 30 s on 2 cores) and the steps;
- the catalogue HR@3 of the run and of the SFT model on every demo test user, their paired difference with a
  95% user-bootstrap interval (hanorec.stats.paired_bootstrap) and the detectable difference (80% power),
  per seed and pooled over the seeds; and the same for the ranking protocol's HR@3.

Goals (issue 28): pair accuracy from about 0.5 to at least 0.8; chosen rising against rejected; the HR@3
difference detected, or said not to be.

    nice -n 5 .venv/bin/python benchmarks/bench_lesson.py                    # 3 seeds x 3 methods
    nice -n 5 .venv/bin/python benchmarks/bench_lesson.py --seeds 0 --catalogue_items 100 --threads 1

Cost: each run is about 2 CPU minutes of training and held-out evaluation; the catalogue evaluation of 240 users
costs about as much again at 281 items (the full demo catalogue), a third of it at --catalogue_items 100. Each
run's line, its own paired difference and its pair-accuracy curve print as soon as it ends, so a run cut short
still reports the seeds and methods it finished.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, header

from hanorec import logkeys as K
from hanorec.config import load_config
from hanorec.stats import paired_bootstrap

LAB = ROOT / "configs" / "lab.yaml"
LABELS = {"dpo": "DPO", "hano_dpo": "HaNo-DPO", "simpo": "SimPO"}
GOAL_ACC = 0.8


def method_overrides(method: str) -> dict:
    """The paper's variant fields (DPO: no noise; HaNo-DPO: HaRS and NoDO) or the method alone."""
    from hanorec.methods import variant_of, variants

    label = LABELS[method]
    return dict(variant_of(label)) if label in variants() else {"method": method, "noise_target": "none"}


def per_example(ev, protocol: str) -> dict:
    if ev.per_example_protocol == protocol:
        return ev.per_example
    return ev.ranking_per_example if protocol == "ranking" else {}


def evaluate_model(cfg, bundle, data, method: str):
    from hanorec.pipeline import run_eval

    ev = run_eval(cfg, bundle, data, method=method, baselines=[])
    rows = {r["protocol"]: r for r in ev.rows if r.get("method") == method}
    return rows, {p: per_example(ev, p)[method] for p in cfg.eval.protocols}


def sft_reference(cfg_path: Path, seed: int, protocols, catalogue_items=None):
    """The teaching SFT model evaluated like the runs. The catalogue's candidates (every unseen item) do not
    depend on the seed, the ranking protocol's do: with it, the SFT model is evaluated once per seed."""
    from hanorec.pipeline import prepare_data, prepare_model
    from hanorec.runs import sft_dir_of
    from hanorec.train.checkpoint import latest_checkpoint
    from hanorec.train.preference import merge_sft_adapter

    over = {"protocols": list(protocols), "catalogue_items": catalogue_items}
    cfg = load_config(cfg_path, overrides={"seed": seed, "eval": over})
    data = prepare_data(cfg)
    sft_dir = sft_dir_of(cfg, cfg.output_dir)
    bundle = prepare_model(cfg, data.dataset, sft_dir)
    merge_sft_adapter(bundle, cfg.lora, latest_checkpoint(sft_dir) / "adapter", seed=cfg.seed)
    bundle.model.eval()
    return evaluate_model(cfg, bundle, data, "SFT")


def lesson_run(cfg_path: Path, method: str, seed: int, out: Path, protocols, catalogue_items=None) -> dict:
    from hanorec.pipeline import prepare_data, run_preference

    evaluation = {"protocols": list(protocols), "catalogue_items": catalogue_items}
    over = {"seed": seed, "output_dir": str(out), "pref": method_overrides(method), "eval": evaluation}
    cfg = load_config(cfg_path, overrides=over)
    t0, c0 = time.time(), time.process_time()
    data = prepare_data(cfg)
    bundle, train = run_preference(cfg, data, name=method, resume=False)
    wall, cpu = time.time() - t0, time.process_time() - c0
    rows = [json.loads(x) for x in (out / method / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in rows if K.EVAL_PAIR_ACCURACY in r]
    steps = [r for r in rows if "loss" in r]
    bundle.model.eval()
    results, values = evaluate_model(cfg, bundle, data, method)
    first, last = evals[0], evals[-1]
    return {
        "method": method, "seed": seed, "wall_s": wall, "cpu_s": cpu, "steps": train.global_step,
        "train_s": train.wall_s,
        "acc_start": first[K.EVAL_PAIR_ACCURACY], "acc_end": last[K.EVAL_PAIR_ACCURACY],
        "acc_curve": [(r["step"], r[K.EVAL_PAIR_ACCURACY]) for r in evals],
        "d_logp_chosen": last[K.EVAL_LOGP_CHOSEN] - first[K.EVAL_LOGP_CHOSEN],
        "d_logp_rejected": last[K.EVAL_LOGP_REJECTED] - first[K.EVAL_LOGP_REJECTED],
        "eval_kl_end": last[K.EVAL_KL_REFERENCE], "kl_end": steps[-1].get(K.KL_REFERENCE),
        "HR@3": {p: results[p]["HR@3"] for p in protocols}, "values": values,
    }  # fmt: skip


def difference(runs: list[dict], sft: dict, protocol: str) -> str:
    """Runs minus SFT, paired by user and pooled over the runs' seeds (a user's seeds resampled together)."""
    a = np.concatenate([r["values"][protocol]["HR@3"] for r in runs])
    b = np.concatenate([sft[r["seed"] if r["seed"] in sft else None][protocol]["HR@3"] for r in runs])
    users = [u for r in runs for u in r["values"][protocol]["user"]]
    d = paired_bootstrap(a, b, users, n_boot=2000, seed=0)
    verdict = "detected" if d.excludes_zero else f"not detected: no difference larger than +-{d.detectable:.3f}"
    return f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] (detectable {d.detectable:.3f}; {verdict})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=LAB)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(LABELS), choices=list(LABELS))
    ap.add_argument("--protocols", nargs="+", default=["catalogue"], choices=["catalogue", "ranking"],
                    help="HR@3 against SFT under these (ranking: the SFT model is evaluated once per seed)")  # fmt: skip
    ap.add_argument("--catalogue_items", type=int, default=None,
                    help="rank each user's true item against this many sampled unseen items (seeded per user; "
                    "default: every unseen item, 281 on the demo)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: the preset's threads)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    torch.set_num_threads(args.threads or cfg.threads or 2)
    header("the DPO lesson (configs/lab.yaml) from the teaching SFT model", args)
    p, protocols = cfg.pref, args.protocols
    print(f"preset: {p.max_steps} steps, batch {p.batch_size}, lr {p.lr:g}, beta {p.beta:g}, {p.max_pairs} pairs, "
          f"{p.eval_pairs} held-out pairs every {p.eval_every} steps, from {p.sft_run}")  # fmt: skip
    sft_values, sft_rows = {}, {}
    for seed in args.seeds if "ranking" in protocols else [None]:
        sft_rows[seed], sft_values[seed] = sft_reference(args.config, seed or 0, protocols, args.catalogue_items)
    s0 = next(iter(sft_rows.values()))
    n = len(next(iter(sft_values.values()))[protocols[0]]["HR@3"])
    print("SFT (teaching model): " + ", ".join(f"{q} HR@3 {s0[q]['HR@3']:.3f}" for q in protocols) + f" on {n} test users")
    runs: list[dict] = []
    print(f"\n{'method':<9}{'seed':>5}{'pair acc start':>16}{'end':>6}{'d logp chosen':>15}{'rejected':>10}"
          f"{'KL end':>8}{'wall s':>8}{'CPU s':>7}" + "".join(f"{q + ' HR@3':>16}" for q in protocols))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hanorec-lesson-") as tmp:
        for seed in args.seeds:  # seed by seed, so a cut-short run still has every method
            for method in args.methods:
                r = lesson_run(args.config, method, seed, Path(tmp) / f"{method}-{seed}", protocols, args.catalogue_items)
                runs.append(r)
                print(f"{LABELS[method]:<9}{seed:>5}{r['acc_start']:>16.3f}{r['acc_end']:>6.3f}"
                      f"{r['d_logp_chosen']:>+15.2f}{r['d_logp_rejected']:>+10.2f}{r['eval_kl_end']:>8.3f}"
                      f"{r['wall_s']:>8.1f}{r['cpu_s']:>7.1f}" + "".join(f"{r['HR@3'][q]:>16.3f}" for q in protocols),
                      flush=True)  # fmt: skip
                for q in protocols:  # this run alone against SFT (the pooled figure follows at the end)
                    print(f"{'':14}{q} HR@3 minus SFT, this seed: {difference([r], sft_values, q)}", flush=True)
                print(f"{'':14}held-out pair accuracy by step: "
                      + ", ".join(f"{st}: {a:.3f}" for st, a in r["acc_curve"]), flush=True)  # fmt: skip
    print("\nPer method over the seeds (mean [min, max]); HR@3 difference against SFT pooled over the seeds, "
          "paired by user, 95% bootstrap interval:")  # fmt: skip
    summary = {}
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method]
        ends = [r["acc_end"] for r in mine]
        rise = [r["d_logp_chosen"] - r["d_logp_rejected"] for r in mine]
        walls, cpus = [r["wall_s"] for r in mine], [r["cpu_s"] for r in mine]
        diffs = {q: difference(mine, sft_values, q) for q in protocols}
        goals = {
            "pair accuracy >= 0.8": min(ends) >= GOAL_ACC,
            "chosen rises against rejected": min(rise) > 0,
            "60 steps": all(r["steps"] <= 60 for r in mine),
            "30 s wall": max(walls) <= 30,
        }
        summary[method] = {"pair_acc_end": ends, "logp_rise": rise, "wall_s": walls, "cpu_s": cpus, **diffs,
                           "goals": goals}  # fmt: skip
        print(f"  {LABELS[method]}: pair accuracy {np.mean([r['acc_start'] for r in mine]):.3f} -> {np.mean(ends):.3f} "
              f"[{min(ends):.3f}, {max(ends):.3f}]; chosen minus rejected log-prob change {np.mean(rise):+.2f} "
              f"[{min(rise):+.2f}, {max(rise):+.2f}]; wall {np.mean(walls):.1f} s [{min(walls):.1f}, {max(walls):.1f}], "
              f"CPU {np.mean(cpus):.1f} s")  # fmt: skip
        for q in protocols:
            print(f"    {q} HR@3 minus SFT: {diffs[q]}")
        unmet = [g for g, ok in goals.items() if not ok]
        print(f"    goals: {'all met' if not unmet else 'NOT met: ' + ', '.join(unmet)}")
    if args.json:
        for r in runs:
            r.pop("values")
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
