"""Stage 1: supervised fine-tuning with the loss on the answer tokens only (method.md section 5)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hanorec.data import RecDataset
from hanorec.errors import UserError
from hanorec.models import ModelBundle
from hanorec.scoring import batch_logps
from hanorec.tasks import Example, render
from hanorec.train.loop import EmptyTrainingSet, TrainResult, Validation, train_loop


class ExampleTooLong(UserError, ValueError):
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


def example_lengths(bundle: ModelBundle, ds: RecDataset, examples: Sequence[Example]) -> list[int]:
    """Prompt + answer tokens of each example, as `make_sft_collate` would encode it, without processing
    every image: an image's token count is computed once per size (fixed-size presets) or once per item."""
    fixed: list[int] = []
    per_item: dict[str, int] = {}

    def image_tokens(item: str) -> int:
        if bundle.image_size and fixed:
            return fixed[0]
        if item not in per_item:
            img = ds.load_image(item, size=bundle.image_size)
            n = bundle.image_token_count(img)
            per_item[item] = n
            if bundle.image_size:
                fixed.append(n)
        return per_item[item]

    out = []
    for ex in examples:
        n = bundle.text_token_count(ex.prompt)
        n += sum(image_tokens(i) for i in ex.image_items)
        out.append(n + len(bundle.encode_completion(ex.answer)))
    return out


def drop_too_long(
    bundle: ModelBundle, ds: RecDataset, examples: Sequence[Example], max_length: int
) -> tuple[list[Example], int]:
    """(the examples that fit in max_length tokens, how many were skipped)."""
    lengths = example_lengths(bundle, ds, examples)
    kept = [ex for ex, n in zip(examples, lengths) if n <= max_length]
    skipped = len(examples) - len(kept)
    if examples and not kept:
        raise EmptyTrainingSet(
            f"every one of the {len(examples)} training examples is longer than model.max_length={max_length} "
            f"tokens (the shortest has {min(lengths)}); raise --model.max_length or use smaller images"
        )
    return kept, skipped


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean negative log-likelihood per answer token over the micro-batch."""
    dtype = next(p for p in model.parameters()).dtype
    sums, counts = batch_logps(model, batch, dtype=dtype)  # (N,), (N,)
    loss = -sums.sum() / counts.sum().clamp(min=1)
    return loss, {"answer_tokens": float(counts.sum())}


TASK_VAL_METRICS = {"hit1": ("AUC", "Accuracy"), "hit3": ("HR@3", "HR@1", "NDCG@3"), "next1": ("HR@3", "HR@1", "NDCG@3")}


def val_metric_name(cfg) -> str:
    """sft.val_metric resolved for the task (auto: AUC for hit1, HR@3 for hit3 and next1)."""
    from hanorec.config import ConfigError

    allowed = TASK_VAL_METRICS[cfg.task.name]
    name = allowed[0] if cfg.sft.val_metric == "auto" else cfg.sft.val_metric
    if name not in allowed:
        raise ConfigError(
            f"sft.val_metric = {name!r} is not a metric of task {cfg.task.name} (use one of {list(allowed)} or auto)"
        )
    return name


def sft_validation(cfg, bundle: ModelBundle, ds: RecDataset, val_examples: Sequence[Example]) -> Validation:
    """Per-epoch validation on (a prefix of) the validation split with the ranking protocol of hanorec.eval
    (the same batched scoring and metric code as the test table), for early stopping (sft.patience)."""
    from hanorec.eval import metrics_from_scores, rank_options

    metric = val_metric_name(cfg)
    examples = list(val_examples)[: cfg.sft.max_val_examples] if cfg.sft.max_val_examples else list(val_examples)
    if not examples:
        raise EmptyTrainingSet(
            "sft validation (sft.val_every_epoch or sft.patience) needs validation examples, and the "
            "validation split is empty; turn validation off or use more users"
        )
    if cfg.task.name == "hit1" and len({e.label for e in examples}) < 2:
        raise EmptyTrainingSet(
            f"the {len(examples)} hit1 validation examples all have the same answer, so AUC is undefined; "
            "raise sft.max_val_examples"
        )

    def evaluate(model) -> dict:
        scores = rank_options(bundle, ds, examples, batch_size=cfg.eval.batch_size)
        row = metrics_from_scores(examples, scores.numpy(), snap=True)
        return {k: row[k] for k in TASK_VAL_METRICS[cfg.task.name]} | {"n": len(examples)}

    return Validation(evaluate=evaluate, metric=metric, patience=cfg.sft.patience)


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
    val_examples: Sequence[Example] | None = None,
) -> TrainResult:
    """Train the LoRA-wrapped bundle.model on examples; checkpoints and metrics go to output_dir.

    Examples longer than model.max_length are skipped, counted in the result's `skipped_examples` and
    reported before training starts. With sft.val_every_epoch or sft.patience, val_examples are scored
    after every epoch and at the end (:func:`sft_validation`); with patience, training stops once the
    validation metric has not improved for that many validations and the stage keeps the best adapter."""

    items, skipped = drop_too_long(bundle, ds, list(examples), cfg.model.max_length)
    if skipped:
        print(f"sft: skipped {skipped} of {len(examples)} training examples longer than "
              f"model.max_length={cfg.model.max_length} tokens")  # fmt: skip
    collate = make_sft_collate(bundle, ds, cfg.model.max_length)
    validation = sft_validation(cfg, bundle, ds, val_examples or []) if cfg.sft.validates else None
    result = train_loop(
        model=bundle.model,
        items=items,
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
        validation=validation,
    )
    result.skipped_examples = skipped
    if result.validation and not result.stopped_early:
        print(result.summary("sft"))
    return result
