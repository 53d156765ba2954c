"""Why does the tiny model barely learn the demo world? Oracles beside SFT at several sizes, steps and rates.

Prints, on the demo test users (hit3, the evaluation's own candidates):

1. The demo oracles (hanorec.data: genre read from titles, colour read from image pixels, recency-weighted
   over the 3 history items), random and popularity, under the ranking protocol (the true most recent item
   among 7 candidates) and the catalogue protocol (against every item the user never saw). Oracle ties are
   broken at random (seeded), as the demo's own test does. "text+history colour" is what the prompt itself
   shows: the candidates are listed by title only (images are shown for the history alone), so a candidate's
   colour is not in the prompt; a model can use it only by remembering each item's colour from training.
2. How a title tokenizes under the tiny preset's tokenizer (tokens per title, whether a genre word is one
   token), and the oracles restricted to what the likelihood of a title can express.
3. SFT runs of the tiny preset: steps x hidden size x learning rate x image size, each scored on the first
   --n_test test prompts under both protocols, with its wall time.

    nice -n 5 .venv/bin/python scripts/learnability.py --teach               # the default grid (~25 loaded CPU min)
    nice -n 5 .venv/bin/python scripts/learnability.py --grid "200:128:2e-3:64" "800:256:3e-3:64"

A grid entry is steps:hidden:lr:image_size[:layers[:windows per user, 0 = all]]. Writes every number as JSON to --json as well.
--teach scores the shipped teaching SFT model (assets/demo_runs/teach-hit3) on every test user, with paired
intervals against random and popularity. The outputs quoted in BENCHMARKS.md section 10 are kept in
benchmarks/last_learnability.txt. What they showed (seed 0, 2-core CPU sandbox): the demo run's SFT (200 steps
over 2 windows per user) is undertrained; every window and 3x the steps lift the catalogue HR@3 from random
to above the text oracle's; twice the width lifts it further at 3x the time; the image oracle's signal is out
of reach because the prompt shows images for the history only, never for a candidate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

DEFAULT_GRID = (
    "200:128:2e-3:64",  # the demo run's SFT (demo-hit3): 200 steps on at most 2 windows per user (780 examples)
    "600:128:2e-3:64:2:0",  # 3x the steps on every window (2,113 examples)
    "600:128:6e-3:64:2:0",  # ... at 3x the learning rate
    "600:256:2e-3:64:2:0",  # ... at twice the width (about 3.5x the parameters)
)


def base_overrides(n_test: int, seed: int) -> dict:
    return {
        "seed": seed,
        "threads": 1,
        "data": {"path": str(ROOT / "assets" / "demo")},
        "task": {"name": "hit3", "max_eval_examples": n_test},
        "model": {"name": "tiny-qwen2.5-vl", "tiny_hidden_size": 128, "tiny_layers": 2},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "modules_to_save": ["embed_tokens", "lm_head"]},
        "sft": {"max_steps": 200, "lr": 2e-3, "batch_size": 8, "grad_accum": 1, "warmup_ratio": 0.05,
                "log_every": 50, "save_every": 0, "save_every_minutes": 0, "keep_checkpoints": 1,
                "progress_bar": False},
        "eval": {"protocols": ["ranking", "catalogue"], "batch_size": 14, "baselines": ["random", "popularity"]},
    }  # fmt: skip


def _jitter(scores, rng) -> np.ndarray:
    return np.asarray(scores, dtype=np.float64) + 1e-6 * np.array([rng.random() for _ in scores])


def oracle_table(n_test: int | None, seed: int) -> dict:
    """HR@3 (and HR@1) of each oracle and baseline under both protocols, on the test examples."""
    from hanorec import metrics as M
    from hanorec.config import load_config
    from hanorec.data import _image_color, demo_genre_from_title
    from hanorec.eval import catalogue_baseline, catalogue_candidates, train_popularity
    from hanorec.pipeline import prepare_data

    cfg = load_config(overrides=base_overrides(n_test, seed))
    data = prepare_data(cfg)
    ds, examples = data.dataset, list(data.test)
    pop = train_popularity(data.splits.train)
    genre = {i: demo_genre_from_title(it.title) for i, it in ds.items.items()}
    colour = {i: _image_color(it.image_path) for i, it in ds.items.items()}

    def score(history, cands, use_genre, use_colour):
        w_g, w_c = {}, {}
        for w, h in enumerate(history, start=1):
            w_g[genre[h]] = w_g.get(genre[h], 0.0) + w
            w_c[colour[h]] = w_c.get(colour[h], 0.0) + w
        return [use_genre * w_g.get(genre[c], 0.0) + use_colour * w_c.get(colour[c], 0.0) for c in cands]

    scorers = {"oracle both": (1, 1), "oracle text (genre)": (1, 0), "oracle image (colour)": (0, 1)}
    out: dict = {"n": len(examples), "ranking": {}, "catalogue": {}}
    cat_cands = [catalogue_candidates(e, ds, None, seed) for e in examples]
    for name, (g, c) in scorers.items():
        rng = random.Random(seed)
        s = np.stack([_jitter(score(e.history, e.candidates, g, c), rng) for e in examples])
        r = M.ranking_metrics(s, [e.correct_option for e in examples])
        out["ranking"][name] = {"HR@1": r["HR@1"], "HR@3": r["HR@3"]}
        ranks = [int(M.pessimistic_ranks(_jitter(score(e.history, cc, g, c), rng)[None], [0])[0])
                 for e, cc in zip(examples, cat_cands)]  # fmt: skip
        v = M.rank_values(ranks)
        out["catalogue"][name] = {"HR@1": float(np.mean(v["HR@1"])), "HR@3": float(np.mean(v["HR@3"]))}
    for name in ("random", "popularity"):
        from hanorec.eval import baseline_scores

        s = baseline_scores(name, examples, pop, seed)
        r = M.ranking_metrics(s, [e.correct_option for e in examples])
        out["ranking"][name] = {"HR@1": r["HR@1"], "HR@3": r["HR@3"]}
        cs = catalogue_baseline(name, cat_cands, pop, seed)
        ranks = [int(M.pessimistic_ranks(np.asarray(x, dtype=np.float64)[None], [0])[0]) for x in cs]
        v = M.rank_values(ranks)
        out["catalogue"][name] = {"HR@1": float(np.mean(v["HR@1"])), "HR@3": float(np.mean(v["HR@3"]))}
    out["catalogue_size"] = float(np.mean([len(c) for c in cat_cands]))
    return out


def tokenizer_facts(seed: int) -> dict:
    """Tokens per quoted title under the tiny preset's tokenizer, and whether genre words are single tokens."""
    from hanorec.config import load_config
    from hanorec.data import DEMO_GENRE_WORDS, load_dataset
    from hanorec.models import get_model
    from hanorec.tasks import corpus_text, quote

    cfg = load_config(overrides=base_overrides(10, seed))
    ds = load_dataset(cfg.data.path)
    bundle = get_model(cfg.model, corpus_text(ds, cfg.task.words("movies")), seed=seed, image_size=64)
    lengths = [len(bundle.encode_completion(quote(it.title), eos=False)) for it in ds.items.values()]
    words = [w for ws in DEMO_GENRE_WORDS.values() for w in ws]
    single = sum(len(bundle.tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
    example = next(iter(ds.items.values())).title
    pieces = bundle.tokenizer.convert_ids_to_tokens(
        bundle.tokenizer(quote(example), add_special_tokens=False)["input_ids"]
    )
    return {
        "vocab": len(bundle.tokenizer),
        "title_tokens_mean": float(np.mean(lengths)),
        "title_tokens_min": int(min(lengths)),
        "title_tokens_max": int(max(lengths)),
        "genre_words_single_token": f"{single}/{len(words)}",
        "example": f"{quote(example)} -> {pieces}",
        "parameters": int(sum(p.numel() for p in bundle.model.parameters())),
    }


def sft_point(spec: str, n_test: int, seed: int) -> dict:
    """Train SFT for one grid entry in a scratch folder; its ranking and catalogue HR@3 on the test prompts."""
    from hanorec.config import load_config
    from hanorec.pipeline import prepare_data, run_eval, run_sft

    parts = spec.split(":")
    steps, hidden, lr, size = int(parts[0]), int(parts[1]), float(parts[2]), int(parts[3])
    layers = int(parts[4]) if len(parts) > 4 else 2
    windows = int(parts[5]) if len(parts) > 5 else None  # training windows per user (0: every window)
    o = base_overrides(n_test, seed)
    o["model"].update(tiny_hidden_size=hidden, tiny_layers=layers)
    o["sft"].update(max_steps=steps, lr=lr)
    o["data"]["image_size"] = size
    if windows is not None:
        o["data"]["max_train_windows_per_user"] = windows or None
    with tempfile.TemporaryDirectory(prefix="hanorec-learnability-") as tmp:
        cfg = load_config(overrides={**o, "output_dir": tmp})
        data = prepare_data(cfg)
        t0 = time.time()
        bundle, train = run_sft(cfg, data, resume=False)
        t_train = time.time() - t0
        ev = run_eval(cfg, bundle, data, baselines=[])
    rows = {r["protocol"]: r for r in ev.rows if r.get("method") == "SFT"}
    return {
        "spec": spec, "windows": windows, "train_examples": len(data.train), "steps": steps, "hidden": hidden, "layers": layers, "lr": lr, "image_size": size,
        "train_s": round(t_train, 1), "final_loss": next((r["loss"] for r in reversed(train.history) if "loss" in r), None),
        "ranking_HR@3": rows["ranking"]["HR@3"], "ranking_HR@1": rows["ranking"]["HR@1"],
        "catalogue_HR@3": rows["catalogue"]["HR@3"], "catalogue_HR@1": rows["catalogue"]["HR@1"],
    }  # fmt: skip


def teach_report(run: Path, seed: int = 0) -> dict:
    """The shipped teaching SFT model on every test user: HR@3 under both protocols beside random and
    popularity, with paired user-bootstrap intervals of its difference from each (hanorec.stats)."""
    from hanorec.config import load_config
    from hanorec.pipeline import prepare_data, prepare_model, run_eval
    from hanorec.stats import paired_bootstrap
    from hanorec.train.checkpoint import latest_checkpoint
    from hanorec.train.preference import merge_sft_adapter

    cfg = load_config(run / "config.yaml")
    cfg.data.path = str(ROOT / cfg.data.path)
    data = prepare_data(cfg)
    bundle = prepare_model(cfg, data.dataset, run / "sft")
    merge_sft_adapter(bundle, cfg.lora, latest_checkpoint(run / "sft") / "adapter", seed=cfg.seed)
    bundle.model.eval()
    ev = run_eval(cfg, bundle, data, method="SFT", baselines=["random", "popularity"])
    out: dict = {}
    for protocol in ("ranking", "catalogue"):
        values = ev.per_example if ev.per_example_protocol == protocol else ev.ranking_per_example
        sft = values["SFT"]
        row = {"SFT": float(np.mean(sft["HR@3"]))}
        for base in ("random", "popularity"):
            d = paired_bootstrap(sft["HR@3"], values[base]["HR@3"], sft["user"], n_boot=2000, seed=seed)
            row[base] = float(np.mean(values[base]["HR@3"]))
            row[f"SFT - {base}"] = {"mean": d.mean, "low": d.low, "high": d.high, "detectable": d.detectable}
        out[protocol] = row
    out["n"] = len(data.test)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n_test", type=int, default=120, help="test prompts the SFT runs are scored on")
    ap.add_argument(
        "--grid", nargs="*", default=list(DEFAULT_GRID), help="steps:hidden:lr:image_size[:layers[:windows]]"
    )
    ap.add_argument("--skip_oracles", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write every number here")
    ap.add_argument("--teach", type=Path, nargs="?", const=ROOT / "assets" / "demo_runs" / "teach-hit3",
                    default=None, help="also score the shipped teaching SFT run (default folder: assets/demo_runs/teach-hit3)")  # fmt: skip
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out: dict = {"seed": args.seed, "n_test": args.n_test}
    if args.teach is not None:
        t = out["teach"] = teach_report(args.teach, args.seed)
        print(f"\nTeaching SFT model ({args.teach.name}), {t['n']} test users: HR@3 and paired differences "
              "(user bootstrap, 95%; detectable = 80% power)")  # fmt: skip
        for protocol in ("ranking", "catalogue"):
            r = t[protocol]
            print(
                f"  {protocol:<10} SFT {r['SFT']:.3f}  random {r['random']:.3f}  popularity {r['popularity']:.3f}"
            )
            for base in ("random", "popularity"):
                d = r[f"SFT - {base}"]
                print(f"    SFT - {base:<11}{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]  "
                      f"(detectable {d['detectable']:.3f})")  # fmt: skip
    if not args.skip_oracles:
        for n in (None, args.n_test):
            t = oracle_table(n, args.seed)
            out[f"oracles_n{t['n']}"] = t
            print(
                f"\nOracles and baselines, {t['n']} test prompts (catalogue: {t['catalogue_size']:.0f} items)"
            )
            print(f"  {'scorer':<24}{'ranking HR@1':>14}{'HR@3':>8}{'catalogue HR@1':>16}{'HR@3':>8}")
            for name in t["ranking"]:
                r, c = t["ranking"][name], t["catalogue"][name]
                print(f"  {name:<24}{r['HR@1']:>14.3f}{r['HR@3']:>8.3f}{c['HR@1']:>16.3f}{c['HR@3']:>8.3f}")
        out["tokenizer"] = tok = tokenizer_facts(args.seed)
        print("\nTokenizer:", json.dumps(tok))
    print(f"\nSFT on the first {args.n_test} test prompts (tiny-qwen2.5-vl, batch 8, seed {args.seed})")
    print(f"  {'steps':>5} {'hidden':>6} {'layers':>6} {'lr':>7} {'img':>4} {'train s':>8} "
          f"{'rank HR@1':>9} {'HR@3':>6} {'cat HR@1':>9} {'HR@3':>6}")  # fmt: skip
    out["sft"] = []
    for spec in args.grid:
        p = sft_point(spec, args.n_test, args.seed)
        out["sft"].append(p)
        print(f"  {p['steps']:>5} {p['hidden']:>6} {p['layers']:>6} {p['lr']:>7.0e} {p['image_size']:>4} "
              f"{p['train_s']:>8.1f} {p['ranking_HR@1']:>9.3f} {p['ranking_HR@3']:>6.3f} "
              f"{p['catalogue_HR@1']:>9.3f} {p['catalogue_HR@3']:>6.3f}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
