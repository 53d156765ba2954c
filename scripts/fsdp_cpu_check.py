"""The figures of docs/distributed.md's "FSDP on CPU" paragraph, rerun on this machine (about a minute on 2 CPU cores):

    .venv/bin/python scripts/fsdp_cpu_check.py

Runs tests/distributed_worker.py's preference run (tiny LLaVA, 6 demo pairs, HaNo-DPO with NoDO, LoRA
dropout 0, seed 0, 3 steps) four times and prints what tests/test_accelerate_configs.py asserts:

1. one plain process, 6 pairs per step (the reference);
2. `accelerate launch --config_file configs/accelerate/fsdp.yaml` on 2 CPU processes (gloo), 3 pairs each;
3. the same, stopped after step 2 (checkpoint), then
4. resumed from that checkpoint.

Per step: the reference's loss and the 2-process mean of the ranks' losses, eta on both, the learning rate;
then how much of the LoRA each process holds, the largest difference between the saved adapters
(2-process FSDP vs reference, resumed vs uninterrupted), and each run's wall time.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cpu_launch: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    if cpu_launch:
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def run(out: Path, *flags: str, fsdp: bool) -> tuple[list[dict], float]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    args = [str(WORKER), "train", str(out), "naive", "3", "--lora_dropout=0", *flags]
    if fsdp:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(_port()), *args]  # fmt: skip
    else:
        cmd = [sys.executable, *args, "--batch=6"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(fsdp), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:6])} ... failed:\n{proc.stderr[-3000:]}")
    recs = sorted((json.loads(f.read_text()) for f in out.glob("rank*.json")), key=lambda r: r["rank"])
    return recs, time.time() - start


def adapter(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "run" / "checkpoints" / "step-000003" / "adapter" / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def lrs(out: Path) -> list[float]:
    return [json.loads(x)["lr"] for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (single,), t1 = run(tmp / "single", fsdp=False)
        ranks, t2 = run(tmp / "fsdp", fsdp=True)
        _, t3 = run(tmp / "resumed", "--stop_after=2", fsdp=True)
        resumed, t4 = run(tmp / "resumed", "--resume", fsdp=True)
        print("step | loss, 1 process | mean loss, 2 FSDP processes | eta, 1 process | eta, 2 processes | lr (both)")
        lr1, lr2 = lrs(tmp / "single"), lrs(tmp / "fsdp")
        for s in range(3):
            mean = (ranks[0]["losses"][s] + ranks[1]["losses"][s]) / 2
            lr = f"{lr1[s]:.3g}" if lr1[s] == lr2[s] else f"{lr1[s]:.3g} vs {lr2[s]:.3g}"
            print(f"{s + 1} | {single['losses'][s]:.7f} | {mean:.7f} | {single['etas'][s]:.6f} | "
                  f"{ranks[0]['etas'][s]:.6f} | {lr}")  # fmt: skip
        print(f"LoRA values held per process: {ranks[0]['local_numel']} and {ranks[1]['local_numel']} of "
              f"{ranks[0]['numel']} (sharded: {ranks[0]['sharded'] and ranks[1]['sharded']}); accelerate reports "
              f"{ranks[0]['distributed_type']}")  # fmt: skip
        print(f"saved adapter, 2-process FSDP vs 1 process: max |difference| {max_diff(adapter(tmp / 'fsdp'), adapter(tmp / 'single')):.2e}")
        print(f"saved adapter, stopped at step 2 and resumed vs uninterrupted (both FSDP): max |difference| "
              f"{max_diff(adapter(tmp / 'resumed'), adapter(tmp / 'fsdp')):.2e}")  # fmt: skip
        print(f"wall time: 1 process {t1:.0f} s, 2 FSDP processes {t2:.0f} s, stopped run {t3:.0f} s + resumed {t4:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
