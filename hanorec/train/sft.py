"""Stage 1: supervised fine-tuning with the loss on the answer tokens only (method.md section 5)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hanorec.data import RecDataset
from hanorec.models import ModelBundle
from hanorec.scoring import batch_logps
from hanorec.tasks import Example, render
from hanorec.train.loop import TrainResult, train_loop


class ExampleTooLong(ValueError):
    pass


def make_sft_collate(bundle: ModelBundle, ds: RecDataset, max_length: int, image_size: int | None = None):
    """Examples -> a batch: prompt (chat format, image tokens) + answer + EOS; labels only on the answer."""

    def collate(examples: list[Example]) -> dict:
        prompts, completions = [], []
        for ex in examples:
            r = render(ex, ds, image_size=image_size)
            p = bundle.encode_prompt(r.text, r.images)
            c = bundle.encode_completion(ex.answer)
            if len(p.input_ids) + len(c) > max_length:
                raise ExampleTooLong(
                    f"the {ex.task} example of user {ex.user} is {len(p.input_ids) + len(c)} tokens, over "
                    f"model.max_length={max_length}; raise it or use smaller images"
                )
            prompts.append(p)
            completions.append(c)
        return bundle.collate(prompts, completions)

    return collate


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean negative log-likelihood per answer token over the micro-batch."""
    dtype = next(p for p in model.parameters()).dtype
    sums, counts = batch_logps(model, batch, dtype=dtype)  # (N,), (N,)
    loss = -sums.sum() / counts.sum().clamp(min=1)
    return loss, {"answer_tokens": float(counts.sum())}


def train_sft(
    cfg,
    bundle: ModelBundle,
    ds: RecDataset,
    examples: Sequence[Example],
    output_dir: str | Path,
    *,
    resume: bool = True,
    on_log: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    accelerator=None,
) -> TrainResult:
    """Train the LoRA-wrapped bundle.model on examples; checkpoints and metrics go to output_dir."""

    collate = make_sft_collate(bundle, ds, cfg.model.max_length)
    return train_loop(
        model=bundle.model,
        items=list(examples),
        collate=collate,
        loss_fn=sft_loss,
        train_cfg=cfg.sft,
        seed=cfg.seed,
        output_dir=output_dir,
        config_yaml=cfg.to_yaml(),
        resume=resume,
        on_log=on_log,
        should_stop=should_stop,
        stage="sft",
        accelerator=accelerator,
    )
