"""Dataset preparation at scale: time and peak memory against the number of interactions, and the Data tab.

    python benchmarks/bench_data.py [--sizes 10000x5000,30000x15000,100000x50000] [--per-user 24] [--seed 0]

For each size USERSxITEMS it writes a synthetic folder in the hanorec layout (pairs.tsv, titles.csv, no
images: a text-only dataset) with about --per-user interactions per user (10 to 2 x per-user - 10 each,
items drawn from a Zipf-like popularity), then, in a fresh process per size, times
hanorec.pipeline.prepare_data with configs/tiny-cpu-movielens.yaml (hit3, 4 training windows per user:
load, split, draw every example's candidates), its wall time and the CPU time the process itself used (on a
shared machine the wall time includes waiting for the cores; the CPU time barely does), and reads that
process's peak resident memory. The slope is
the exponent b of time ~ interactions^b fitted over the sizes (1 = linear) and the seconds per million
interactions. Last, on the biggest folder, the Data tab's own handlers (app/tabs/data.py), each time in a
fresh process after the app is built as app/main.py builds it: the open in the page's two steps (users and
summary; the first user shown; then statistics and figures), first with no statistics kept, then in a second
process that finds them on disk under the runs folder; then opening again in that process, showing two
users (history, prompt, candidates) and scoring their candidates with the untrained model (built on first
use), and showing the last test user (typed: its draw needs every draw before it).
Folders are written under --work (default: a temporary folder) and reused when already there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

CONFIG = ROOT / "configs" / "tiny-cpu-movielens.yaml"
WORDS = ("Red", "Blue", "Night", "River", "Song", "Stone", "Winter", "Garden", "City", "Light", "Shadow", "Road",
         "Fire", "Dream", "Glass", "Moon", "Storm", "Field", "Heart", "Story")  # fmt: skip


def write_synthetic(out: Path, n_users: int, n_items: int, per_user: int = 24, seed: int = 0) -> Path:
    """A hanorec-layout folder: n_users sequences of distinct items, n_items titled items, no images."""
    out = Path(out)
    done = out / ".complete"
    if done.is_file() and done.read_text() == f"{n_users} {n_items} {per_user} {seed}":
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, max(11, 2 * per_user - 10) + 1, size=n_users)
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.8  # long tail
    weights /= weights.sum()
    draws = rng.choice(n_items, size=int(lengths.sum() * 1.2) + 100, p=weights)
    width = len(str(n_users))
    lines, pos = [], 0
    for u, n in enumerate(lengths):
        seq: list[int] = []
        seen: set[int] = set()
        while len(seq) < n:
            if pos >= len(draws):
                draws, pos = rng.choice(n_items, size=len(draws), p=weights), 0
            item = int(draws[pos])
            pos += 1
            if item not in seen:
                seen.add(item)
                seq.append(item)
        lines.append(f"u{u:0{width}d}\t{' '.join(str(i + 1) for i in seq)}\n")
    (out / "pairs.tsv").write_text("".join(lines), encoding="utf-8")
    w = np.asarray(WORDS)
    a, b = rng.integers(0, len(WORDS), n_items), rng.integers(0, len(WORDS), n_items)
    titles = [f"{w[x]} {w[y]} {k + 1}" for k, (x, y) in enumerate(zip(a, b))]
    (out / "titles.csv").write_text(
        "item,title\n" + "".join(f"{k + 1},{t}\n" for k, t in enumerate(titles)), encoding="utf-8"
    )
    done.write_text(f"{n_users} {n_items} {per_user} {seed}")
    return out


def prepare_once(folder: str) -> dict:
    """prepare_data on the folder with the tiny CPU config (run in its own process: peak memory is its own)."""
    from hanorec.config import load_config
    from hanorec.pipeline import prepare_data

    cfg = load_config(CONFIG, overrides={"data": {"path": folder}})
    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    data = prepare_data(cfg)
    seconds, cpu_seconds = time.perf_counter() - t0, cpu() - c0
    t1 = time.perf_counter()
    first = data.train[0], data.test[len(data.test) // 2]  # formatted on access
    access = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    return {
        "users": len(data.dataset.sequences),
        "items": len(data.dataset.items),
        "interactions": data.dataset.summary.n_interactions,
        "train": len(data.train),
        "test": len(data.test),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # what the process itself used: much less sensitive to other processes
        "peak_mib": peak,
        "access_ms": access * 1e3,
        "images": "text only" if not first[0].image_items else "with images",
    }


def data_tab(folder: str, runs: str) -> dict:
    """The Data tab on the folder in this fresh process, after the app is built as `python app/main.py` builds
    it before serving (its tabs import torch then): the page's open in its two steps (users and summary, then
    statistics and figures) with the first user shown between them, then the API's one-shot open again, then
    two users from the list shown and scored by the untrained model, and a user typed from the end of the list."""
    from app.main import build_app, make_context
    from app.tabs import data as tab

    out = {}
    t0 = time.perf_counter()
    ctx = make_context([str(Path(folder).parent)], runs, device="cpu", threads=1)
    build_app(ctx)
    out["startup_s"] = time.perf_counter() - t0
    out["torch_at_startup"] = "torch" in sys.modules
    t0 = time.perf_counter()
    steps = tab.open_dataset_steps(ctx, folder, "hit3")
    first = next(steps)
    out["listed_s"] = time.perf_counter() - t0  # summary and user list on the page
    tab.show_user_text(ctx, folder, "hit3", first[0]["value"])  # the page shows the first user now
    out["first_user_s"] = time.perf_counter() - t0
    for _ in steps:  # statistics and figures
        pass
    out["open_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    opened = tab.open_dataset(ctx, folder, "hit3")
    out["open_again_s"] = time.perf_counter() - t0
    users = opened[0]["choices"]
    users = [u[0] if isinstance(u, (tuple, list)) else u for u in users]
    for k, who in ((1, users[len(users) // 2]), (2, users[len(users) // 3])):
        t0 = time.perf_counter()
        tab.show_user_text(ctx, folder, "hit3", who)  # what the page shows first
        out[f"shown_s_{k}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tab.show_user(ctx, folder, "hit3", who, "base")  # then the candidates scored by the model
        out[f"scored_s_{k}"] = time.perf_counter() - t0
    last = ctx.prepared(folder, "hit3").test.users()[-1]
    t0 = time.perf_counter()
    tab.show_user_text(ctx, folder, "hit3", last)  # typed: every test user before it is drawn first
    out["last_user_s"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000x5000,30000x15000,100000x50000")
    ap.add_argument("--per-user", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="where the synthetic folders go (default: a temporary folder)")
    ap.add_argument("--no-app", action="store_true", help="skip the Data tab timing")
    ap.add_argument("--_prepare", help=argparse.SUPPRESS)
    ap.add_argument("--_tab", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._prepare:
        print(json.dumps(prepare_once(args._prepare)))
        return 0
    if args._tab:
        print(json.dumps(data_tab(*args._tab)))
        return 0
    from common import header, load_average

    header("bench_data: preparing datasets of growing size")
    print(f"load average at start: {load_average()}")
    work = Path(args.work or tempfile.mkdtemp(prefix="hanorec-bench-data-"))
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows = []
    for n_users, n_items in sizes:
        t0 = time.perf_counter()
        folder = write_synthetic(work / f"synthetic-{n_users}x{n_items}", n_users, n_items, args.per_user, args.seed)
        written = time.perf_counter() - t0
        proc = subprocess.run([sys.executable, __file__, "--_prepare", str(folder)], env=env, capture_output=True,
                              text=True, cwd=ROOT)  # fmt: skip
        if proc.returncode:
            print(proc.stderr[-3000:])
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{n_users:>7,} users x {n_items:>6,} items: {row['interactions']:>9,} interactions, "
              f"{row['train']:>7,} train / {row['test']:>7,} test examples ({row['images']}); "
              f"prepared in {row['seconds']:6.1f} s wall / {row['cpu_seconds']:5.1f} s CPU, peak memory {row['peak_mib']:5.0f} MiB "
              f"(folder written in {written:.0f} s; two examples formatted in {row['access_ms']:.1f} ms)")  # fmt: skip
    if len(rows) >= 2:
        x = np.log([r["interactions"] for r in rows])
        for what in ("seconds", "cpu_seconds"):
            slope = float(np.polyfit(x, np.log([r[what] for r in rows]), 1)[0])
            per_million = rows[-1][what] / rows[-1]["interactions"] * 1e6
            print(f"slope ({'wall' if what == 'seconds' else 'CPU'} time): time ~ interactions^{slope:.2f} "
                  f"(1 = linear); {per_million:.1f} s per million interactions at the biggest size")  # fmt: skip
        mem = np.polyfit([r["interactions"] / 1e6 for r in rows], [r["peak_mib"] for r in rows], 1)[0]
        print(f"memory grows {mem:.0f} MiB per million interactions (the loaded dataset itself included)")
    if not args.no_app:
        n_users, n_items = sizes[-1]
        folder, runs = work / f"synthetic-{n_users}x{n_items}", tempfile.mkdtemp(prefix="hanorec-bench-runs-")
        for when in ("first time (no statistics kept yet)", "in another fresh process (statistics on disk)"):
            proc = subprocess.run([sys.executable, __file__, "--_tab", str(folder), runs], env=env, capture_output=True,
                                  text=True, cwd=ROOT)  # fmt: skip
            if proc.returncode:
                print(proc.stderr[-3000:])
                return 1
            tab = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"Data tab on {n_users:,} x {n_items:,}, {when}, a fresh app process (built in {tab['startup_s']:.1f} s, "
                  f"torch {'imported' if tab['torch_at_startup'] else 'not imported'} at startup): users listed in "
                  f"{tab['listed_s']:.2f} s, first user shown {tab['first_user_s']:.2f} s after the open began, "
                  f"statistics and figures complete at {tab['open_s']:.2f} s; opened again {tab['open_again_s']:.2f} s")  # fmt: skip
        print(f"  users from the list shown (history, prompt, candidates) in {tab['shown_s_1']:.2f} s and {tab['shown_s_2']:.2f} s, "
              f"scored by the untrained model {tab['scored_s_1']:.1f} s later for the first (the model is built once "
              f"per dataset) and {tab['scored_s_2']:.2f} s for the next; the last test user, typed, shown in "
              f"{tab['last_user_s']:.2f} s (every test user's candidates before it drawn first)")  # fmt: skip
    print(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
