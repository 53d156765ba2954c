"""The documented pipeline: data -> examples -> model (+ LoRA) -> SFT -> evaluation.

The CLI, the app and the notebooks call these functions; they hold no method logic of their own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hanorec.config import RunConfig
from hanorec.data import RecDataset, Splits, load_dataset, make_splits
from hanorec.eval import EvalResult, evaluate, format_results, train_popularity
from hanorec.models import ModelBundle, add_lora, get_model, load_model
from hanorec.tasks import TASK_SHAPES, Example, build_examples, corpus_text
from hanorec.train.checkpoint import latest_checkpoint, load_adapter_weights

BASE_MODEL_DIR = "base_model"


@dataclass
class PreparedData:
    dataset: RecDataset
    splits: Splits
    train: list[Example]
    val: list[Example]
    test: list[Example]
    popularity: dict


def prepare_data(cfg: RunConfig) -> PreparedData:
    """Load and validate the dataset, split it, and build the task's examples (all seeded)."""
    d = cfg.data
    ds = load_dataset(d.path, format=d.format, domain=d.domain, image_dir=d.image_dir, on_error=d.on_error)
    if d.max_users:
        ds = ds.subset_users(d.max_users, seed=cfg.seed)
    shape = TASK_SHAPES[cfg.task.name]
    splits = make_splits(
        ds,
        n_history=shape["n_history"],
        n_target=shape["n_target"],
        policy=d.split_policy,
        min_interactions=d.min_interactions,
        max_items_per_user=d.max_items_per_user,
        max_train_windows_per_user=d.max_train_windows_per_user,
        seed=cfg.seed,
    )
    t = cfg.task

    def examples(windows, offset, shuffle, cap):
        return build_examples(
            t.name,
            windows,
            ds,
            seed=cfg.seed + offset,
            n_negatives=t.n_negatives,
            domain=d.domain,
            max_examples=cap,
            shuffle=shuffle,
        )

    return PreparedData(
        ds,
        splits,
        examples(splits.train, 0, True, t.max_train_examples),
        examples(splits.val, 1000, False, t.max_eval_examples),
        examples(splits.test, 2000, False, t.max_eval_examples),
        dict(train_popularity(splits.train)),
    )


def prepare_model(cfg: RunConfig, ds: RecDataset, output_dir: str | Path | None = None) -> ModelBundle:
    """The base model: a tiny preset is built once per run folder (and reloaded from there on resume)."""
    saved = Path(output_dir) / BASE_MODEL_DIR if output_dir else None
    if saved is not None and (saved / "config.json").is_file():
        bundle = load_model(saved, dtype=cfg.model.dtype)
    else:
        bundle = get_model(cfg.model, corpus_text(ds), seed=cfg.seed)
        if saved is not None and cfg.model.name.startswith("tiny-"):
            bundle.save(saved)
    bundle.image_size = bundle.image_size or cfg.data.image_size
    return bundle


def load_trained(
    cfg: RunConfig, ds: RecDataset, run_dir: str | Path, checkpoint: str | Path | None = None
) -> ModelBundle:
    """The base model of a run with its newest (or the given) SFT adapter loaded."""
    bundle = prepare_model(cfg, ds, run_dir)
    add_lora(bundle, cfg.lora)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint found under {Path(run_dir) / 'checkpoints'}")
    load_adapter_weights(bundle.model, ckpt / "adapter" if (ckpt / "adapter").is_dir() else ckpt)
    return bundle


def run_sft(
    cfg: RunConfig,
    data: PreparedData | None = None,
    *,
    on_log: Callable | None = None,
    should_stop: Callable | None = None,
    resume: bool = True,
):
    """Stage 1 on the prepared data. Returns (bundle, TrainResult)."""
    from hanorec.train.sft import train_sft

    data = data or prepare_data(cfg)
    out = Path(cfg.output_dir) / "sft"
    bundle = prepare_model(cfg, data.dataset, out)
    add_lora(bundle, cfg.lora)
    result = train_sft(
        cfg, bundle, data.dataset, data.train, out, resume=resume, on_log=on_log, should_stop=should_stop
    )
    return bundle, result


def run_eval(
    cfg: RunConfig, bundle: ModelBundle | None, data: PreparedData, method: str = "SFT", baselines=None
) -> EvalResult:
    examples = data.test if cfg.eval.split == "test" else data.val
    return evaluate(
        bundle,
        data.dataset,
        examples,
        protocols=cfg.eval.protocols,
        baselines=cfg.eval.baselines if baselines is None else baselines,
        popularity=data.popularity,
        seed=cfg.seed,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        method=method,
    )


def run_pipeline(
    cfg: RunConfig,
    *,
    on_log: Callable | None = None,
    should_stop: Callable | None = None,
    print_fn: Callable = print,
) -> dict:
    """Data, SFT and evaluation; writes results.json and returns it."""
    start = time.time()
    data = prepare_data(cfg)
    print_fn(str(data.dataset.summary))
    print_fn(data.splits.describe())
    print_fn(
        f"{cfg.task.name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test examples"
    )
    bundle, train = run_sft(cfg, data, on_log=on_log, should_stop=should_stop)
    if train.stopped_early:
        print_fn(f"stopped at step {train.global_step}/{train.total_steps}; resume with the same command")
    ev = run_eval(cfg, bundle, data)
    table = format_results(cfg.task.name, ev.rows)
    print_fn(table)
    result = {
        "task": cfg.task.name,
        "dataset": str(cfg.data.path),
        "model": cfg.model.name,
        "seed": cfg.seed,
        "split": cfg.eval.split,
        "rows": ev.rows,
        "train_steps": train.global_step,
        "wall_s": time.time() - start,
    }
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print_fn(f"results written to {out / 'results.json'} ({result['wall_s']:.0f} s)")
    return result
