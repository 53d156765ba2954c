"""Checkpoints: the trainable weights (PEFT adapter in safetensors), the resolved config, and the
optimizer, scheduler and RNG state, so an interrupted run continues as if it had never stopped.

Layout of one checkpoint folder (written to a temporary name, then renamed, so a kill mid-write never
leaves a half checkpoint that looks complete):

    checkpoints/step-000040/
        adapter/                 adapter_model.safetensors + adapter_config.json (peft save_pretrained)
        optimizer.pt scheduler.pt rng.pt
        rng_processes.pt         every process's RNG state (runs on several processes only)
        trainer_state.json       global step, epoch, micro-batches consumed in that epoch, metrics
        config.yaml              the resolved RunConfig
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from hanorec.errors import UserError

STATE_FILE = "trainer_state.json"
PAUSE_ENV = "HANOREC_TEST_CHECKPOINT_PAUSE_S"  # seconds to pause mid-write (tests/test_reliability.py)


class CheckpointError(UserError, ValueError):
    """A checkpoint folder that cannot be used with this model or is damaged (one clear sentence)."""


def rng_state() -> dict:
    """Every RNG's state as tensors, ints and strings only, so it loads with torch.load(weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()
    ]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    output_dir: str | Path,
    *,
    model,
    optimizer,
    scheduler,
    state: dict,
    config_yaml: str,
    keep: int = 2,
    extra: dict | None = None,
    model_state_dict: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write a complete checkpoint atomically and prune the older ones (keeps `keep` newest).

    Main process only. Under FSDP / ZeRO-3 the weights and optimizer state are sharded: pass what
    `hanorec.train.sharding.gather_for_checkpoint` gathered on every process as `model_state_dict` (full
    tensors, of which peft keeps the adapter) and `optimizer_state`; None reads them from `model` and
    `optimizer` directly (one process, DDP)."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['global_step']:06d}"
    tmp = root / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if model_state_dict is None:
        model.save_pretrained(tmp / "adapter")
    else:
        model.save_pretrained(tmp / "adapter", state_dict=model_state_dict)
    torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
    if os.environ.get(PAUSE_ENV):  # tests only: widen the mid-write window so a kill can land in it
        time.sleep(float(os.environ[PAUSE_ENV]))
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    for name, obj in (extra or {}).items():
        torch.save(obj, tmp / f"{name}.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(output_dir)[:-keep]:
        (old / STATE_FILE).unlink(missing_ok=True)  # first: a kill mid-delete must not leave a half folder that looks complete
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_adapter_weights(adapter_dir: str | Path) -> dict:
    """The tensors of a saved adapter, or one sentence saying why the folder is not a usable adapter."""
    from safetensors.torch import load_file

    file = Path(adapter_dir) / "adapter_model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{adapter_dir} holds no adapter_model.safetensors: it is not an adapter checkpoint")
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise CheckpointError(f"{file} cannot be read ({str(e).splitlines()[0]}); the checkpoint is damaged") from None


def load_adapter_weights(model, adapter_dir: Path, adapter_name: str = "default", weights: dict | None = None) -> None:
    """Load saved adapter weights (and modules_to_save) into an already wrapped PeftModel
    (`weights`: what read_adapter_weights already returned for adapter_dir)."""
    from peft import set_peft_model_state_dict

    weights = read_adapter_weights(adapter_dir) if weights is None else weights
    result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k or "modules_to_save" in k]
    if unexpected:
        raise CheckpointError(
            f"checkpoint {adapter_dir} holds weights this model does not have: {unexpected[:3]}"
        )


def load_checkpoint(path: Path, *, model, optimizer, scheduler, process_index: int = 0, num_processes: int = 1) -> dict:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint folder; returns its trainer state.

    Under several processes every process must call it, and each gets back its own RNG state (see
    process_rng_state)."""
    import warnings

    from hanorec.train.sharding import load_optimizer_state, loads_full_tensors

    path = Path(path)
    with loads_full_tensors(model):
        load_adapter_weights(model, path / "adapter")
    if not load_optimizer_state(model, optimizer, _load_tensors(path / "optimizer.pt")):
        warnings.warn(
            f"{path} holds no optimizer state (a sharded run whose optimizer state stays per process): "
            "training continues with a fresh optimizer state, so it will not match an uninterrupted run exactly",
            stacklevel=2,
        )
    scheduler.load_state_dict(_load_tensors(path / "scheduler.pt"))
    set_rng_state(process_rng_state(path, process_index, num_processes))
    return json.loads((path / STATE_FILE).read_text())


PROCESS_RNG = "rng_processes"  # extra=: every process's RNG state, in process order (a multi-process run)


def process_rng_state(path: Path, process_index: int = 0, num_processes: int = 1) -> dict:
    """This process's RNG state: its own from rng_processes.pt when the checkpoint was written by as many
    processes (their states differ: each draws dropout masks for its own batch's shapes), else the main
    process's (rng.pt)."""
    per_process = Path(path) / f"{PROCESS_RNG}.pt"
    if num_processes > 1 and per_process.is_file():
        states = _load_tensors(per_process)
        if len(states) == num_processes:
            return states[process_index]
    return _load_tensors(Path(path) / "rng.pt")


def _load_tensors(file: Path):
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary pickled code."""
    try:
        return torch.load(file, weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{file} cannot be loaded as plain tensors ({first}); the checkpoint is damaged or was not written "
            "by hanorec, and is not unpickled"
        ) from None
