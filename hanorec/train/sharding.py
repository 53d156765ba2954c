"""Sharded training (FSDP, DeepSpeed ZeRO-3) for the one training loop: sharding on CPU, and the
collective gathers a checkpoint needs.

FSDP on CPU. torch 2.13's FSDP2 (`torch.distributed.fsdp.fully_shard`) and FSDP1 both train on CPU over
gloo, but accelerate 1.15 switches to DistributedType.FSDP only for accelerator devices: in
`AcceleratorState.__init__` (accelerate/state.py:986-1013) the `ACCELERATE_USE_FSDP` check sits inside
`elif self.distributed_type in [MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON]`, and CPU processes are
MULTI_CPU (state.py:800-806), so a launch with configs/accelerate/fsdp.yaml on CPU would silently run
plain DDP. When the launch asked for FSDP (ACCELERATE_USE_FSDP=true) and accelerate runs MULTI_CPU,
the loop therefore shards the model itself with FSDP2, as the config says (one unit per transformer
block, the classes the model's `_no_split_modules` names, then the root), and leaves the model out of
`accelerator.prepare` (which would wrap it in DDP). On GPUs accelerate does the sharding and this module
only gathers.

Checkpoints. Under FSDP and ZeRO-3 each process holds a shard of every parameter, so the adapter and the
optimizer state are gathered with collective calls that EVERY process must make; only the main process
then writes. `gather_for_checkpoint` returns what the main process saves (None elsewhere):

- FSDP2 (ours on CPU, or accelerate's): each adapter parameter's `DTensor.full_tensor()` (only the
  adapter is gathered, never the frozen base model), and the optimizer state as a full state dict
  (`get_optimizer_state_dict(full_state_dict=True, cpu_offload=True)`, keyed by parameter name), so a
  resume restores it exactly with `set_optimizer_state_dict`.
- FSDP1 and DeepSpeed ZeRO-3 (accelerate's): `accelerator.get_state_dict(model)` (FULL_STATE_DICT with
  rank0_only and offload_to_cpu; ZeRO-3's consolidated 16-bit weights), of which peft keeps the adapter.
  Their optimizer state stays per process and is not saved: a resume restores weights, scheduler, RNG
  and data position, with a fresh optimizer state (said when it happens). Not checked here (no GPU).
- DDP and one process: nothing to gather; `save_pretrained` reads the weights directly.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from hanorec.backbones import vision_module_names

ADAPTER_MARKERS = ("lora_", "modules_to_save")


def cpu_fsdp_requested(accelerator) -> bool:
    """The launch asked for FSDP (ACCELERATE_USE_FSDP=true), but accelerate runs CPU processes as
    MULTI_CPU and would ignore it (see the module docstring)."""
    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() == "true"
    return asked and accelerator.distributed_type == DistributedType.MULTI_CPU


def _block_classes(model) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


# Called outside the root's forward: hanorec.scoring.encode_images runs the frozen vision part once per
# preference step through get_image_features, so each must be a unit of its own that unshards itself.
# (Every family's adapter names its vision modules.)
VISION_MODULES = vision_module_names()


def _vision_units(part: torch.nn.Module) -> list[torch.nn.Module]:
    """The units that shard a vision part: the part itself, or, for a transformers model (a vision tower
    or transformer), its children that hold parameters, and the members of its module lists (e.g. extra
    mergers). FSDP2 swaps a unit's class, and transformers looks a model's output recording up by its
    class, so a swapped vision model returns no hidden states."""
    from transformers import PreTrainedModel

    if not isinstance(part, PreTrainedModel):
        return [part]
    units = []
    for c in part.children():
        members = list(c.children()) if isinstance(c, (torch.nn.ModuleList, torch.nn.ModuleDict)) else [c]
        units += [m for m in members if any(True for _ in m.parameters())]
    return units


def shard_model(model: torch.nn.Module) -> int:
    """FSDP2 in place: one `fully_shard` unit per transformer block (the classes `_no_split_modules` names,
    as accelerate's TRANSFORMER_BASED_WRAP), one per vision part (VISION_MODULES), then the root. Returns
    the number of block units. Call before building the optimizer: the parameters become new (sharded)
    DTensor parameters."""
    from torch.distributed.fsdp import fully_shard

    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() not in ("false", "0", "no")
    classes = _block_classes(model)
    vision = {
        name: module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in VISION_MODULES
    }
    vision = {n: m for n, m in vision.items() if not any(n.startswith(v + ".") for v in vision)}  # outermost
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard)
    for part in vision.values():
        for unit in _vision_units(part):
            if not is_fsdp2(unit):  # a block already
                fully_shard(unit, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    # FSDP2 picks its root at the first forward; a vision part called first would claim it, so settle it now
    # (torch 2.13's FSDPModule keeps this step private)
    model._get_fsdp_state()._lazy_init()
    return len(blocks)


def is_fsdp2(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _is_adapter(name: str, param: torch.nn.Parameter) -> bool:
    return param.requires_grad or any(m in name for m in ADAPTER_MARKERS)


def _accelerate_shards(accelerator) -> bool:
    """accelerate's own FSDP1 or DeepSpeed ZeRO-3 (FSDP2 is handled through the DTensors)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return not getattr(accelerator, "is_fsdp2", False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.deepspeed_config["zero_optimization"]["stage"] == 3
    return False


def gather_for_checkpoint(accelerator, model, optimizer) -> tuple[dict | None, dict | None]:
    """(model state dict, optimizer state dict) for the main process to save, gathered from every process.

    Call on EVERY process (the gathers are collective). None means "read it directly as usual": the model's
    own weights (DDP, one process) or `optimizer.state_dict()`. Non-main processes get (None, None) back."""
    from torch.distributed.tensor import DTensor

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = {}
        for name, param in model.named_parameters():
            if not _is_adapter(name, param):
                continue
            full = param.full_tensor() if isinstance(param, DTensor) else param  # collective
            if accelerator.is_main_process:
                state[name] = full.detach().cpu().clone()
        optim = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )  # collective; full on rank 0, empty elsewhere
        return (state, optim) if accelerator.is_main_process else (None, None)
    if _accelerate_shards(accelerator):
        state = accelerator.get_state_dict(model)  # collective
        if not accelerator.is_main_process:
            return None, None
        return {k: v for k, v in state.items() if any(m in k for m in ADAPTER_MARKERS)}, {}
    return None, None


@contextmanager
def loads_full_tensors(model):
    """Inside the block, `model.load_state_dict(full_state_dict)` fills FSDP2's sharded parameters from
    full tensors (what peft's set_peft_model_state_dict calls when a checkpoint is loaded): each process
    keeps its own shard of the full tensor it read, so nothing is sent between processes."""
    if not is_fsdp2(model):
        yield
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    def load(state_dict, strict=True, assign=False):
        current = model.state_dict()  # FSDP2: sharded DTensors, no communication
        local = {}
        for key, value in state_dict.items():
            cur = current.get(key)
            if isinstance(cur, DTensor) and not isinstance(value, DTensor):
                value = distribute_tensor(
                    value.to(cur.dtype), cur.device_mesh, cur.placements, src_data_rank=None
                )  # fmt: skip
            local[key] = value
        return type(model).load_state_dict(model, local, strict=strict)

    model.load_state_dict = load
    try:
        yield
    finally:
        del model.load_state_dict


def load_optimizer_state(model, optimizer, state: dict) -> bool:
    """Restore a saved optimizer state; False (nothing restored) for an empty one (a sharded run whose
    optimizer state could not be gathered, see the module docstring)."""
    if not state:
        return False
    if is_fsdp2(model):
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))  # collective
    else:
        optimizer.load_state_dict(state)
    return True
