"""Can the tiny model learn hit1 here at all? (issue 8: hit1 AUC sits at chance for every method.)

Trains SFT on hit1 with validation AUC after every epoch until it stops rising (sft.patience), then prints:
the data's class balance (Yes/No targets per split), the popularity of items (the demo's is nearly flat by
construction), the test AUC of SFT against the popularity and random baselines on the same examples, and,
when titles.csv carries the demo's ground-truth `genre` column, a genre oracle's AUC (the share of the 5
history items whose genre is the target's; analysis only, never shown to the model): what a model that
read the genre from titles perfectly could reach.

    .venv/bin/python scripts/hit1_check.py                       # demo data, compare-tiny preset, seed 0
    .venv/bin/python scripts/hit1_check.py --seed=1 --epochs=20 --patience=3 --sft.lr=1e-3

Extra --section.key=value arguments override the preset. The run resumes when started again with the same
arguments (its folder: --output_dir). Writes <output_dir>/hit1_check.json with every number printed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hanorec import metrics as M  # noqa: E402
from hanorec.config import ConfigError, load_config  # noqa: E402
from hanorec.eval import evaluate  # noqa: E402
from hanorec.report import machine_description  # noqa: E402


def class_balance(examples) -> dict:
    yes = sum(bool(e.label) for e in examples)
    return {"n": len(examples), "yes": yes, "no": len(examples) - yes, "yes_fraction": yes / max(1, len(examples))}


def genre_oracle_auc(ds, examples) -> float | None:
    """AUC of 'share of history items with the target's genre' (None without a genre column)."""
    if not all("genre" in ds.items[i].attributes for i in list(ds.items)[:5]):
        return None
    genre = {i: it.attributes.get("genre") for i, it in ds.items.items()}
    share = np.array([np.mean([genre[h] == genre[e.candidates[0]] for h in e.history]) for e in examples])
    return M.auc(share, np.array([bool(e.label) for e in examples]))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/compare-tiny.yaml")
    ap.add_argument("--output_dir", default="runs/hit1-check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=float, default=12, help="most SFT epochs (patience usually ends it before)")
    ap.add_argument("--patience", type=int, default=2, help="validations without a better AUC before stopping")
    ap.add_argument("--max_val_examples", type=int, default=240)
    ap.add_argument(
        "--train_windows", default="2",
        help="latest training windows per user (data.max_train_windows_per_user; 2 on the demo = 480 examples, "
        "a few minutes per epoch on a CPU; 'null' = all)",
    )  # fmt: skip
    args, extra = ap.parse_known_args(argv)
    command = "python scripts/hit1_check.py " + " ".join(shlex.quote(a) for a in argv)
    overrides = [
        "--task.name=hit1", f"--output_dir={args.output_dir}", f"--seed={args.seed}", f"--sft.epochs={args.epochs}",
        f"--sft.patience={args.patience}", "--sft.val_every_epoch=true",
        f"--sft.max_val_examples={args.max_val_examples}", "--sft.progress_bar=false",
        f"--data.max_train_windows_per_user={args.train_windows}", *extra,
    ]  # fmt: skip
    try:
        cfg = load_config(ROOT / args.config if not Path(args.config).is_file() else args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    from hanorec import pipeline

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.time()
    data = pipeline.prepare_data(cfg)
    out: dict = {"command": command, "seed": cfg.seed, "machine": machine_description(), "dataset": cfg.data.path}
    out["balance"] = {s: class_balance(getattr(data, s)) for s in ("train", "val", "test")}
    for s, b in out["balance"].items():
        print(f"{s}: {b['n']} hit1 examples, {b['yes']} Yes / {b['no']} No (Yes fraction {b['yes_fraction']:.3f})")
    counts = np.array([data.popularity.get(i, 0) for i in data.dataset.items])
    out["popularity_counts"] = {"min": int(counts.min()), "max": int(counts.max()), "mean": float(counts.mean()),
                                "cv": float(counts.std() / max(counts.mean(), 1e-9))}  # fmt: skip
    print("training interactions per item: min {min}, max {max}, mean {mean:.1f}, coefficient of variation {cv:.2f}"
          .format(**out["popularity_counts"]))  # fmt: skip
    for split in ("val", "test"):
        base = evaluate(None, data.dataset, getattr(data, split), popularity=data.popularity, seed=cfg.seed)
        for r in base.rows:
            out.setdefault("baselines", {}).setdefault(split, {})[r["method"]] = r["AUC"]
        oracle = genre_oracle_auc(data.dataset, getattr(data, split))
        if oracle is not None:
            out.setdefault("genre_oracle_auc", {})[split] = oracle
        print(f"{split}: AUC random {out['baselines'][split]['random']:.4f}, popularity "
              f"{out['baselines'][split]['popularity']:.4f}"
              + (f", genre oracle (ground truth, never in prompts) {oracle:.4f}" if oracle is not None else ""))  # fmt: skip

    bundle, train = pipeline.run_sft(cfg, data)
    if train.stopped_early:
        print("stopped; run the same command again to resume")
        return 1
    out["validation"] = [{"epoch": v["epoch"], "step": v["step"], "AUC": v["value"],
                          "Accuracy": v["metrics"].get("Accuracy")} for v in train.validation]  # fmt: skip
    print("validation curve (epoch, step, AUC, Accuracy):")
    for v in out["validation"]:
        print(f"  {v['epoch']:>5g} {v['step']:>6d} {v['AUC']:.4f} {v['Accuracy']:.4f}")
    print(train.summary("sft"))
    out["best"], out["early_stopped"], out["kept"] = train.best, train.early_stopped, train.kept
    ev = pipeline.run_eval(cfg, bundle, data, baselines=[])
    out["test"] = {r["method"]: {"AUC": r["AUC"], "Accuracy": r["Accuracy"], "n": r["n"]} for r in ev.rows}
    t = out["test"]["SFT"]
    print(f"test ({t['n']} examples): SFT AUC {t['AUC']:.4f} (accuracy {t['Accuracy']:.4f}); random "
          f"{out['baselines']['test']['random']:.4f}; popularity {out['baselines']['test']['popularity']:.4f}"
          + (f"; genre oracle {out['genre_oracle_auc']['test']:.4f}" if "genre_oracle_auc" in out else ""))  # fmt: skip
    out["wall_s"] = time.time() - start
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / "hit1_check.json").write_text(json.dumps(out, indent=2))
    print(f"seed {cfg.seed}; {out['machine']}; {out['wall_s']:.0f} s; command: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
