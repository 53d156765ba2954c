"""HaRS responsiveness across processes, under `accelerate launch` with 2 CPU processes (gloo).

eta is computed over the micro-batch gathered from every process (method.md section 7), so both
processes must get eta = responsiveness(concat(h_0, h_1)), which differs from what either would get
from its own h alone.

Launch: accelerate 1.15's `--cpu` flag goes through its single-process launcher (one process whatever
--num_processes says), so the workers are started with `--multi_gpu --num_processes 2` (torchrun)
and ACCELERATE_USE_CPU=true with no visible GPU, which gives a MULTI_CPU state on the gloo backend.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from hanorec import losses as L

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
sys.path.insert(0, str(HERE))
from distributed_worker import BETA0, LOCAL_H  # noqa: E402

N_PROC = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: Path, mode: str, *extra: str, timeout: float) -> list[dict]:
    """Run `distributed_worker.py MODE OUT_DIR [extra]` in N_PROC processes; records ordered by rank."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        ACCELERATE_USE_CPU="true",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(N_PROC), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        str(WORKER), mode, str(out_dir), *extra,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"accelerate launch failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    files = sorted(out_dir.glob("rank*.json"))
    assert len(files) == N_PROC, f"expected {N_PROC} rank files, got {files}\n{proc.stderr[-2000:]}"
    return sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])


def test_eta_is_computed_over_the_gathered_batch(tmp_path):
    records = launch(tmp_path, "eta", timeout=180)
    h_all = torch.tensor([x for rank in range(N_PROC) for x in LOCAL_H[rank]])  # (N_PROC * B,)
    expected = L.responsiveness(h_all, BETA0)
    for r in records:
        assert r["world_size"] == N_PROC
        assert r["backend"] == "gloo"
        assert r["h"] == LOCAL_H[r["rank"]]
        assert_close(torch.tensor(r["gathered_h"]), h_all)
        assert_close(torch.tensor(r["eta"]), expected)
        local = L.responsiveness(torch.tensor(LOCAL_H[r["rank"]]), BETA0)
        assert_close(torch.tensor(r["local_eta"]), local)
        assert abs(r["eta"] - r["local_eta"]) > 1e-2, "the gathered eta must differ from the local one"
        # beta_n = beta0 * eta * lambda_n with lambda = 1
        assert_close(torch.tensor(r["beta"]), torch.full((3,), BETA0) * expected)
    assert records[0]["eta"] == records[1]["eta"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "scoring",
    ["naive", "shared_prefix"],
)
def test_train_preference_two_processes(tmp_path, scoring):
    """One HaNo-DPO step split over 2 processes: the main process alone logs, the step sees one
    micro-batch per process (epoch 1.0 for 6 pairs at batch 3), and DDP keeps the weights identical."""
    records = launch(tmp_path, "train", scoring, timeout=480)
    assert [r["world_size"] for r in records] == [N_PROC] * N_PROC
    assert all(r["global_step"] == 1 for r in records)
    assert records[0]["checksum"] == pytest.approx(records[1]["checksum"], abs=1e-9)
    assert records[0]["abs_checksum"] == pytest.approx(records[1]["abs_checksum"], abs=1e-9)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1, "only the main process writes metrics"
    rec = json.loads(lines[0])
    assert rec["epoch"] == pytest.approx(1.0)
    assert rec["hardness/eta"] != pytest.approx(1.0, abs=1e-6)
