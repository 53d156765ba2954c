"""The ready accelerate configs (configs/accelerate/*.yaml) load through accelerate's own config loader and
launch-argument validation, and the FSDP one drives a real 2-process preference run on CPU.

FSDP on CPU with this stack (accelerate 1.15, torch 2.13): `AcceleratorState` switches to
DistributedType.FSDP only when the distributed type is a multi-accelerator one (MULTI_GPU, MULTI_NPU,
MULTI_XPU, ...). Under ACCELERATE_USE_CPU=true it is MULTI_CPU, so ACCELERATE_USE_FSDP=true (set by the
config) is ignored and the model is wrapped in DDP over gloo instead. The slow test asserts exactly that,
so the day accelerate shards on CPU the test fails and says to tighten it into a real FSDP check.
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


@pytest.mark.slow
def test_preference_steps_under_the_fsdp_config_on_two_cpu_processes(tmp_path):
    """3 HaNo-DPO steps launched with configs/accelerate/fsdp.yaml on 2 CPU processes (gloo): training runs,
    both ranks end on identical weights, only the main process logs, eta comes from the gathered batch;
    and accelerate runs it as MULTI_CPU (DDP), not FSDP (see the module docstring)."""
    steps = 3
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(_free_port()), str(WORKER), "train", str(tmp_path), "naive", str(steps),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=480, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = sorted((json.loads(f.read_text()) for f in tmp_path.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
    assert all(r["global_step"] == steps for r in records)
    assert records[0]["checksum"] == pytest.approx(records[1]["checksum"], abs=1e-9)
    assert records[0]["abs_checksum"] == pytest.approx(records[1]["abs_checksum"], abs=1e-9)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, steps + 1))
    assert all(r["hardness/eta"] != pytest.approx(1.0, abs=1e-6) for r in lines)
    # The documented limit: the config asked for FSDP, accelerate 1.15 runs CPU processes as MULTI_CPU.
    for r in records:
        assert r["use_fsdp_env"] == "true"
        assert r["distributed_type"] == "DistributedType.MULTI_CPU", (
            "accelerate now applies FSDP on CPU: replace this assertion with a check of sharded parameters"
        )
