"""Shared parts of the benchmarks: timing (median after warm-up), machine and load description, demo data.

Every benchmark prints ratios measured in one process on one machine; both sides of a ratio are timed
alternately (round-robin over repeats) so that load from other processes hits both alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere: import this checkout's hanorec
    sys.path.insert(0, str(ROOT))

DEMO = ROOT / "assets" / "demo"


def load_average() -> str:
    try:
        a, b, c = os.getloadavg()
        return f"{a:.2f} {b:.2f} {c:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"
    except OSError:
        return "unavailable"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> str:
    import transformers

    out = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for name in ("peft", "accelerate", "trl"):
        try:
            out.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return ", ".join(out)


def machine() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {cpu_name()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch thread(s)"
    )


def header(title: str, args=None) -> None:
    print(f"== {title}")
    print(f"machine: {machine()}")
    print(f"versions: {versions()}")
    print(f"load average: {load_average()}")
    if args is not None:
        print(f"arguments: {vars(args)}")


def round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Time each fn `repeats` times, alternating between them, after `warmup` untimed calls each.

    Returns name -> {"median": s, "times": [...], "out": last output}.
    """
    res = {k: {"times": [], "out": None} for k in fns}
    for _ in range(warmup):
        for k, fn in fns.items():
            res[k]["out"] = fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            res[k]["out"] = fn()
            res[k]["times"].append(time.perf_counter() - t0)
    for r in res.values():
        r["median"] = statistics.median(r["times"])
    return res


def spread(times: list[float]) -> str:
    return f"min {min(times):.3f} / max {max(times):.3f}"


def demo_examples(task: str, n: int, seed: int = 0, split: str = "test", n_negatives: int | None = None):
    from hanorec.data import load_dataset, make_splits
    from hanorec.tasks import TASK_SHAPES, build_examples

    ds = load_dataset(DEMO)
    shape = TASK_SHAPES[task]
    splits = make_splits(ds, n_history=shape["n_history"], n_target=shape["n_target"], seed=seed)
    windows = splits.test if split == "test" else splits.train
    return ds, build_examples(task, windows, ds, seed=seed, max_examples=n, n_negatives=n_negatives)


def tiny_bundle(preset: str, ds, hidden: int = 128, seed: int = 0):
    from hanorec.models import build_tiny
    from hanorec.tasks import corpus_text

    b = build_tiny(preset, corpus_text(ds), hidden_size=hidden, seed=seed)
    b.model.float()
    return b


def check_equal(name: str, a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-4) -> float:
    """Assert the two sides computed the same numbers; returns the max abs difference."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        raise AssertionError(f"{name}: the two sides differ (max |diff| {diff:.2e})")
    return diff
