"""The one training loop (SFT and preference training share it).

accelerate handles device placement, mixed precision, gradient accumulation and multi-GPU, so
`accelerate launch -m hanorec sft ...` works with the same entry point. The data order is a seeded
permutation per epoch, so a resumed run skips exactly the micro-batches already consumed and, with the
restored optimizer, scheduler and RNG state, reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from hanorec.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    global_step: int
    total_steps: int
    stopped_early: bool
    last_checkpoint: Path | None
    history: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


class _Items(torch.utils.data.Dataset):
    def __init__(self, items, order):
        self.items, self.order = items, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        return self.items[self.order[i]]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def resolve_mixed_precision(value: str) -> str:
    if value == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return value


def cosine_with_warmup(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_loop(
    *,
    model: torch.nn.Module,
    items: Sequence,
    collate: Callable[[list], dict],
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    train_cfg,
    seed: int,
    output_dir: str | Path,
    config_yaml: str,
    accelerator=None,
    resume: bool = True,
    on_log: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    stage: str = "sft",
) -> TrainResult:
    """Train `model` on `items`; loss_fn(model, batch) returns (scalar loss, metrics of floats).

    train_cfg has: epochs, max_steps, lr, batch_size, grad_accum, warmup_ratio, weight_decay,
    max_grad_norm, log_every, save_every, keep_checkpoints, progress_bar.
    on_log receives every logged metrics dict (the app streams these); should_stop() is polled after every
    optimizer step and ends the run with a checkpoint.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    output_dir = Path(output_dir)
    if accelerator is None:
        accelerator = Accelerator(
            gradient_accumulation_steps=train_cfg.grad_accum,
            mixed_precision=resolve_mixed_precision(train_cfg.mixed_precision),
            log_with=train_cfg.log_with,
            project_dir=str(output_dir),
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate sees one process: every process would train "
            "alone into the same folder. On CPU launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu ..."
        )
    set_seed(seed)
    if train_cfg.log_with:
        accelerator.init_trackers(stage)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (was LoRA added?)")
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    micro_per_epoch = math.ceil(len(items) / (train_cfg.batch_size * accelerator.num_processes))
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / train_cfg.grad_accum))
    total_steps = train_cfg.max_steps or max(1, math.ceil(steps_per_epoch * train_cfg.epochs))
    scheduler = cosine_with_warmup(optimizer, int(train_cfg.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    state = {"global_step": 0, "epoch": 0, "micro_in_epoch": 0, "stage": stage}
    ckpt = latest_checkpoint(output_dir) if resume else None
    if ckpt is not None:
        state.update(
            load_checkpoint(
                ckpt, model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler
            )
        )
        accelerator.print(f"resumed from {ckpt} at step {state['global_step']}")
    log_path = output_dir / "metrics.jsonl"
    output_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    last_ckpt = ckpt
    bar = None
    if train_cfg.progress_bar and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state["global_step"], desc=stage, dynamic_ncols=True)

    def checkpoint() -> Path | None:
        nonlocal last_ckpt
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            last_ckpt = save_checkpoint(
                output_dir,
                model=accelerator.unwrap_model(model),
                optimizer=optimizer,
                scheduler=scheduler,
                state=state,
                config_yaml=config_yaml,
                keep=train_cfg.keep_checkpoints,
            )
        return last_ckpt

    start = time.time()
    running: dict[str, list[float]] = {}
    stopped = False
    model.train()
    while state["global_step"] < total_steps and not stopped:
        order = epoch_order(len(items), seed, state["epoch"])
        # The loader's own generator: creating its iterator must not draw from the global torch RNG, or a
        # resumed run (which creates it mid-epoch) would see different dropout masks than an uninterrupted one.
        loader = DataLoader(
            _Items(items, order),
            batch_size=train_cfg.batch_size,
            shuffle=False,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(seed * 1000 + state["epoch"]),
        )
        loader = accelerator.prepare(loader)
        if state["micro_in_epoch"]:
            loader = accelerator.skip_first_batches(loader, state["micro_in_epoch"])
        for batch in loader:
            with accelerator.accumulate(model):
                loss, metrics = loss_fn(model, batch)
                if not torch.isfinite(loss.detach()).all():
                    where = (
                        f"the last good checkpoint is {last_ckpt}"
                        if last_ckpt
                        else "no checkpoint was written yet"
                    )
                    raise TrainingDiverged(
                        f"{stage} loss became {loss.item()} at step {state['global_step'] + 1} (epoch {state['epoch']}); "
                        f"training stopped and {where}. Lower the learning rate or check the data."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and train_cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state["micro_in_epoch"] += 1
            for k, v in {"loss": loss.detach().float().item(), **metrics}.items():
                running.setdefault(k, []).append(float(v))
            if not accelerator.sync_gradients:
                continue
            state["global_step"] += 1
            if bar is not None:
                bar.update(1)
            step = state["global_step"]
            if step % train_cfg.log_every == 0 or step == total_steps:
                record = {k: sum(v) / len(v) for k, v in running.items()}
                record = {
                    "step": step,
                    "epoch": state["epoch"] + state["micro_in_epoch"] / max(1, micro_per_epoch),
                    "lr": scheduler.get_last_lr()[0],
                    **record,
                    "elapsed_s": time.time() - start,
                }
                running = {}
                history.append(record)
                if accelerator.is_main_process:
                    with log_path.open("a") as fh:
                        fh.write(json.dumps({"stage": stage, **record}) + "\n")
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}")
                if train_cfg.log_with:
                    accelerator.log(record, step=step)
                if on_log is not None:
                    on_log(record)
            if train_cfg.save_every and step % train_cfg.save_every == 0:
                checkpoint()
            if should_stop is not None and should_stop():
                stopped = True
            if step >= total_steps or stopped:
                break
        else:
            state["epoch"] += 1
            state["micro_in_epoch"] = 0
            if not train_cfg.save_every:
                checkpoint()
            continue
        break
    if stopped or state["global_step"] >= total_steps:
        if last_ckpt is None or int(last_ckpt.name.split("-")[1]) != state["global_step"]:
            checkpoint()
    if bar is not None:
        bar.close()
    if train_cfg.log_with:
        accelerator.end_training()
    return TrainResult(state["global_step"], total_steps, stopped, last_ckpt, history, time.time() - start)
