"""Every CPU figure of BENCHMARKS.md in one command (about 10 minutes on 2 cores).

    python benchmarks/run_all.py [--quick] [--out benchmarks/last_run.txt]

Runs, each in its own process, one after the other: bench_train.py --memory --profile (items 1, 4),
bench_trl.py --profile (item 2), bench_eval.py (item 3), bench_quickstart.py (item 5; its app part is
skipped with a message while app/main.py is absent) and gpu_step.py --tiny (the CPU smoke test of item
6's GPU script). Prints the load average before and after (other processes on the machine slow both
sides of every ratio alike, but widen the spread), and writes the whole output to --out as well.
--quick: fewer repeats, for checking that everything runs (its figures are not the documented ones).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import ROOT, header, load_average  # noqa: E402

FULL = [
    ("bench_train.py", ["--memory", "--profile", "--presets", "tiny-qwen2.5-vl,tiny-llava"]),
    ("bench_trl.py", ["--profile"]),
    ("bench_eval.py", []),
    ("bench_quickstart.py", []),
    ("gpu_step.py", ["--tiny", "--ks", "1,3"]),
]
QUICK = [
    ("bench_train.py", ["--memory", "--repeats", "1", "--epoch-repeats", "1", "--ks", "1,3", "--presets", "tiny-qwen2.5-vl"]),
    ("bench_trl.py", ["--rounds", "1", "--steps", "4", "--warmup", "1"]),
    ("bench_eval.py", ["--repeats", "1", "--examples", "8", "--presets", "tiny-llava"]),
    ("bench_quickstart.py", ["--repeats", "1", "--no-job"]),
    ("gpu_step.py", ["--tiny", "--ks", "1", "--repeats", "1", "--warmup", "0"]),
]
NOISE = ("USDT:", "requires torchvision", "FutureWarning", "warnings.warn(", "examples/s]", "CPUAllocator.cpp")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "last_run.txt"))
    args = ap.parse_args(argv)
    lines: list[str] = []

    def emit(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    header("run_all: every CPU benchmark")
    emit(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load average at start: {load_average()}")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    t_all = time.perf_counter()
    failed = []
    for script, extra in QUICK if args.quick else FULL:
        cmd = [sys.executable, str(HERE / script), *extra]
        emit(f"\n$ python benchmarks/{script} {' '.join(extra)}")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            line = line.rstrip("\n")
            if not any(n in line for n in NOISE) and not line.startswith("{'"):
                emit(line)
        proc.wait()
        emit(f"[{script}: exit {proc.returncode}, {time.perf_counter() - t0:.0f}s; load average {load_average()}]")
        if proc.returncode:
            failed.append(script)
    emit(f"\nall done in {(time.perf_counter() - t_all) / 60:.1f} min; load average at end: {load_average()}")
    if failed:
        emit(f"FAILED: {', '.join(failed)}")
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
