"""The ready accelerate configs (configs/accelerate/*.yaml) load through accelerate's own config loader and
launch-argument validation, and the FSDP one drives a real sharded 2-process preference run on CPU.

FSDP on CPU with this stack (accelerate 1.15, torch 2.13): torch's FSDP2 (`fully_shard`) trains on CPU
over gloo, but `AcceleratorState` switches to DistributedType.FSDP only when the distributed type is a
multi-accelerator one (accelerate/state.py:986-1013); CPU processes are MULTI_CPU, so the config's
ACCELERATE_USE_FSDP=true would be ignored and the model wrapped in DDP. The training loop then shards the
model itself with FSDP2 (hanorec/train/sharding.py). The slow test checks that the parameters really are
sharded, that the run matches a one-process run on the same global batch, that the checkpoint holds the
full adapter, and that a resumed sharded run ends on the same weights; it also asserts accelerate still
reports MULTI_CPU, so the day accelerate shards on CPU itself the test says so.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from hanorec.models import TINY_PRESETS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
WORKER = REPO / "tests" / "distributed_worker.py"
NAMES = ["ddp", "fsdp", "deepspeed_zero3"]


def validated_args(name: str):
    """What `accelerate launch --config_file configs/accelerate/NAME.yaml train.py` resolves to."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    return args


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_in_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # raises on any unknown top-level key
    assert isinstance(cfg, ClusterConfig)
    assert cfg.num_machines == 1 and cfg.machine_rank == 0 and cfg.num_processes >= 2
    # nested keys are launch arguments: a misspelt one would be silently dropped by accelerate
    dests = {a.dest for a in launch_command_parser()._actions}
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = set(raw.get(section, {})) - dests
        assert not unknown, f"{name}.yaml {section} has keys accelerate does not know: {sorted(unknown)}"
    args = validated_args(name)
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == {
        "ddp": (True, False, False),
        "fsdp": (False, True, False),
        "deepspeed_zero3": (False, False, True),
    }[name]
    assert args.num_processes == cfg.num_processes and args.mixed_precision == "bf16"


def test_fsdp_config_builds_accelerates_plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import StateDictType

    env = prepare_multi_gpu_env(validated_args("fsdp"))
    assert env["ACCELERATE_USE_FSDP"] == "true"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT  # checkpoints load on one GPU
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.reshard_after_forward is True and plugin.cpu_ram_efficient_loading is True


def test_deepspeed_config_is_zero3():
    args = validated_args("deepspeed_zero3")
    assert args.zero_stage == 3 and args.zero3_init_flag and args.zero3_save_16bit_model
    assert args.offload_optimizer_device == "none" and args.offload_param_device == "none"


def test_distributed_doc_names_every_config():
    doc = (REPO / "docs" / "distributed.md").read_text()
    for name in NAMES:
        assert f"configs/accelerate/{name}.yaml" in doc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {
        **os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip


def _records(out: Path, proc) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sorted((json.loads(f.read_text()) for f in out.glob("rank*.json")), key=lambda r: r["rank"])


def run_fsdp(out: Path, steps: int, *flags: str, dropout: float = 0.0, scoring: str = "naive") -> list[dict]:
    """WORKER's preference run launched with configs/accelerate/fsdp.yaml on 2 CPU processes (gloo)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(_free_port()), str(WORKER), "train", str(out), scoring, str(steps),
        f"--lora_dropout={dropout}", *flags,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    return _records(out, proc)


def run_single(out: Path, steps: int) -> dict:
    """The same run in one plain process on the same global batch (6 pairs per step)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(WORKER), "train", str(out), "naive", str(steps), "--lora_dropout=0", "--batch=6"]
    env = {k: v for k, v in _env().items() if k not in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    return _records(out, proc)[0]


def _adapter(run: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "run" / "checkpoints" / f"step-{step:06d}" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_preference_steps_sharded_with_fsdp_on_two_cpu_processes(tmp_path):
    """3 HaNo-DPO steps (NoDO on, eta gathered) launched with configs/accelerate/fsdp.yaml on 2 CPU processes:
    each process holds half of every LoRA factor; the run matches a one-process run on the same global batch
    (per-step loss averaged over the processes, eta, final weights, the saved adapter); the checkpoint holds
    the full adapter and optimizer state, written once; a run stopped after step 2 and resumed ends on the
    same weights bit for bit, also with LoRA dropout on (each process restores its own RNG state: their
    dropout masks differ)."""
    import torch
    from torch.testing import assert_close

    steps = 3
    single = run_single(tmp_path / "single", steps)
    records = run_fsdp(tmp_path / "fsdp", steps)
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
    for r in records:
        # accelerate still runs CPU processes as MULTI_CPU; the sharding is the loop's own (sharding.py)
        assert r["use_fsdp_env"] == "true" and r["distributed_type"] == "DistributedType.MULTI_CPU", (
            "accelerate now applies FSDP on CPU itself: drop the loop's own CPU sharding (hanorec/train/sharding.py)"
        )
        assert r["sharded"] and r["local_numel"] * 2 == r["numel"] == single["numel"]
        assert r["global_step"] == steps and r["steps_logged"] == [1, 2, 3]
    assert records[0]["checksum"] == records[1]["checksum"]
    # the same training as one process on the 6 pairs: each rank's loss is the mean over its 3 pairs
    mean_loss = [(a + b) / 2 for a, b in zip(records[0]["losses"], records[1]["losses"])]
    assert_close(torch.tensor(mean_loss), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    for r in records:  # eta from the gathered batch; later steps differ by rounding amplified through h
        assert_close(torch.tensor(r["etas"]), torch.tensor(single["etas"]), rtol=1e-3, atol=0)
    assert records[0]["abs_checksum"] == pytest.approx(single["abs_checksum"], rel=1e-6)
    assert records[0]["checksum"] == pytest.approx(single["checksum"], rel=1e-5)
    # the checkpoint holds the full adapter (gathered from both shards), equal to the one-process one
    ref, sharded = _adapter(tmp_path / "single", steps), _adapter(tmp_path / "fsdp", steps)
    assert sorted(ref) == sorted(sharded) and sum(v.numel() for v in sharded.values()) == single["numel"]
    for k in ref:
        assert_close(sharded[k], ref[k], rtol=1e-5, atol=1e-6)
    optim = torch.load(
        tmp_path / "fsdp" / "run" / "checkpoints" / f"step-{steps:06d}" / "optimizer.pt", weights_only=True
    )
    assert sum(s["exp_avg"].numel() for s in optim["state"].values()) == single["numel"]
    lines = (tmp_path / "fsdp" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3], "only the main process logs"
    # stopped after step 2 (checkpoint), resumed under FSDP: the same weights as the uninterrupted run, with
    # LoRA dropout on (the ranks' RNG streams differ, so each must get its own back)
    whole = run_fsdp(tmp_path / "dropout", steps, dropout=0.05)
    first = run_fsdp(tmp_path / "resumed", steps, "--stop_after=2", dropout=0.05)
    assert all(r["global_step"] == 2 for r in first)
    resumed = run_fsdp(tmp_path / "resumed", steps, "--resume", dropout=0.05)
    assert all(r["global_step"] == steps and r["steps_logged"] == [3] for r in resumed)
    again, uninterrupted = _adapter(tmp_path / "resumed", steps), _adapter(tmp_path / "dropout", steps)
    for k in uninterrupted:
        assert torch.equal(again[k], uninterrupted[k]), k
    assert [r["checksum"] for r in resumed] == [r["checksum"] for r in whole]
    assert resumed[0]["losses"] == whole[0]["losses"][-1:]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_fsdp_on_cpu_with_the_vision_tower_run_once(tmp_path, model):
    """Shared-prefix scoring runs the frozen vision tower once per step, outside the model's forward
    (hanorec.scoring.encode_images): under the loop's own FSDP2 the vision part is a unit of its own, so both
    families train sharded with it and save the full adapter."""
    records = run_fsdp(tmp_path, 2, f"--model={model}", scoring="shared_prefix")
    assert all(r["sharded"] and r["local_numel"] * 2 == r["numel"] and r["global_step"] == 2 for r in records)
    assert records[0]["checksum"] == records[1]["checksum"]
    saved = _adapter(tmp_path, 2)
    assert sum(v.numel() for v in saved.values()) == records[0]["numel"]



# The families beside the two above get one sharded run each (CI time); their stop-and-resume is checked
# in one process (tests/test_backbones.py), the sharded resume machinery being the same for every family.
NEWER_FAMILIES = [p for p in TINY_PRESETS if p not in ("tiny-llava", "tiny-qwen2.5-vl")]


@pytest.mark.slow
@pytest.mark.parametrize("model", NEWER_FAMILIES)
def test_fsdp_on_cpu_for_every_newer_family(tmp_path, model):
    """Under the loop's own FSDP2 on 2 CPU processes, with shared-prefix scoring (the vision part, a unit of
    its own, run once per step) and LoRA dropout on: each process holds half of every LoRA factor, both end
    on the same weights and the checkpoint holds the full adapter."""
    records = run_fsdp(tmp_path, 2, f"--model={model}", dropout=0.05, scoring="shared_prefix")
    assert all(r["sharded"] and r["local_numel"] * 2 == r["numel"] and r["global_step"] == 2 for r in records)
    assert records[0]["checksum"] == records[1]["checksum"]
    assert all(abs(x) < 100 for x in records[0]["losses"])  # finite, sane losses
    saved = _adapter(tmp_path, 2)
    assert sum(v.numel() for v in saved.values()) == records[0]["numel"]
