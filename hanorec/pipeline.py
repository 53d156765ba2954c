"""The documented pipeline: data -> examples -> model (+ LoRA) -> SFT -> evaluation.

The CLI, the app and the notebooks call these functions; they hold no method logic of their own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
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


def prepare_data(
    cfg: RunConfig,
    *,
    for_training: bool = True,
    on_log: Callable | None = None,
    should_stop: Callable | None = None,
) -> PreparedData:
    """Load and validate the dataset, split it, and build the task's examples (all seeded).

    Raises DataError when a split the run needs is empty (the train split when for_training, and the
    evaluated one); on_log gets one "data" event per phase and should_stop is polled between them.
    """
    from hanorec.data import require_windows
    from hanorec.progress import Progress

    progress = Progress("data", 5, on_log=on_log, should_stop=should_stop)
    progress.check()
    d = cfg.data
    ds = load_dataset(d.path, format=d.format, domain=d.domain, image_dir=d.image_dir, on_error=d.on_error)
    progress.tick(phase="load")
    if d.max_users:
        ds = ds.subset_users(d.max_users, seed=0)
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
    require_windows(splits, ds, train=for_training, eval_split=cfg.eval.split)
    progress.tick(phase="split")
    t = cfg.task
    words = t.words(d.domain)

    def examples(windows, offset, shuffle, cap, phase):
        out = build_examples(
            t.name,
            windows,
            ds,
            seed=cfg.seed + offset,
            n_negatives=t.n_negatives,
            domain=words,
            max_examples=cap,
            shuffle=shuffle,
        )
        progress.tick(phase=phase)
        return out

    return PreparedData(
        ds,
        splits,
        examples(splits.train, 0, True, t.max_train_examples, "train examples"),
        examples(splits.val, 1000, False, t.max_eval_examples, "val examples"),
        examples(splits.test, 2000, False, t.max_eval_examples, "test examples"),
        dict(train_popularity(splits.train)),
    )


def prepare_model(cfg: RunConfig, ds: RecDataset, output_dir: str | Path | None = None) -> ModelBundle:
    """The base model: a tiny preset is built once per run folder (and reloaded from there on resume)."""
    saved = Path(output_dir) / BASE_MODEL_DIR if output_dir else None
    if saved is not None and (saved / "config.json").is_file():
        bundle = load_model(saved, dtype=cfg.model.dtype)
    else:
        texts = corpus_text(ds, cfg.task.words(cfg.data.domain))
        bundle = get_model(cfg.model, texts, seed=cfg.seed, image_size=cfg.data.image_size)
        if saved is not None and cfg.model.name.startswith("tiny-"):
            # written under a temporary name, then renamed: a kill mid-write leaves no half model behind
            import shutil

            tmp = saved.with_name(f".tmp-{saved.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            bundle.save(tmp)
            shutil.rmtree(saved, ignore_errors=True)
            tmp.rename(saved)
    bundle.image_size = bundle.image_size or cfg.data.image_size
    return bundle


def load_trained(
    cfg: RunConfig, ds: RecDataset, run_dir: str | Path, checkpoint: str | Path | None = None
) -> ModelBundle:
    """The base model of a run with its newest (or the given) SFT adapter loaded."""
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if ckpt is None or not ckpt.is_dir():
        raise FileNotFoundError(f"no checkpoint found at {ckpt or Path(run_dir) / 'checkpoints'}")
    bundle = prepare_model(cfg, ds, run_dir)
    add_lora(bundle, cfg.lora, seed=cfg.seed)
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
    add_lora(bundle, cfg.lora, seed=cfg.seed)
    result = train_sft(
        cfg, bundle, data.dataset, data.train, out, resume=resume, on_log=on_log, should_stop=should_stop
    )
    return bundle, result


def run_eval(
    cfg: RunConfig,
    bundle: ModelBundle | None,
    data: PreparedData,
    method: str = "SFT",
    baselines=None,
    *,
    on_log: Callable | None = None,
    should_stop: Callable | None = None,
) -> EvalResult:
    examples = data.test if cfg.eval.split == "test" else data.val
    import inspect

    # the hooks go to evaluate() where it takes them (batched evaluation with progress adds them)
    takes = inspect.signature(evaluate).parameters
    hooks = {k: v for k, v in (("on_log", on_log), ("should_stop", should_stop)) if v is not None and k in takes}
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
        **hooks,
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
    data = prepare_data(cfg, on_log=on_log, should_stop=should_stop)
    print_fn(str(data.dataset.summary))
    print_fn(data.splits.describe())
    print_fn(
        f"{cfg.task.name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test examples"
    )
    bundle, train = run_sft(cfg, data, on_log=on_log, should_stop=should_stop)
    if train.stopped_early:
        print_fn(
            f"stopped at step {train.global_step}/{train.total_steps} ({train.last_checkpoint}); "
            "run the same command again to resume"
        )
        return {
            "stopped_early": True,
            "train_steps": train.global_step,
            "checkpoint": str(train.last_checkpoint),
        }
    ev = run_eval(cfg, bundle, data, on_log=on_log, should_stop=should_stop)
    if getattr(ev, "stopped", False):
        print_fn("stopped during evaluation; run the same command again to evaluate the trained model")
        return {"stopped_early": True, "train_steps": train.global_step, "checkpoint": str(train.last_checkpoint)}
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
        "skipped_examples": train.skipped_examples,
        "wall_s": time.time() - start,
    }
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print_fn(f"results written to {out / 'results.json'} ({result['wall_s']:.0f} s)")
    return result


# ------------------------------------------------------------------------------------------------
# Stage 2 and the method comparison
# ------------------------------------------------------------------------------------------------
PREF_VARIANTS = {
    "DPO": {"method": "dpo", "noise_target": "none"},
    "S-DPO": {"method": "sdpo", "k_negatives": 3, "noise_target": "none"},
    "HaNo-DPO": {"method": "hano_dpo"},
    "HaNo-DPO w/o HaRS": {"method": "hano_dpo", "hardness": False, "responsiveness": False},
    "HaNo-DPO w/o NoDO": {"method": "hano_dpo", "noise_target": "none"},
}


def build_preference_items(
    cfg: RunConfig,
    bundle: ModelBundle,
    data: PreparedData,
    cache_dir: Path,
    *,
    on_log: Callable | None = None,
    should_stop: Callable | None = None,
) -> list:
    """Pairs (with seeded or embedding-guided negatives) and their HaRS lambdas from the SFT model."""
    from hanorec.hardness import item_embeddings, pair_hardness
    from hanorec.pairs import build_pairs
    from hanorec.train.preference import PrefItem

    p = cfg.pref
    emb = None
    if p.negative_sampling == "embedding":
        ids, e = item_embeddings(bundle, data.dataset)
        emb = dict(zip(ids, e))
    pairs = build_pairs(
        data.train[: p.max_pairs],
        data.dataset,
        seed=cfg.seed,
        k_negatives=p.k_negatives,
        sampling=p.negative_sampling,
        item_embeddings=emb,
    )
    if p.method == "hano_dpo" and p.hardness:
        lam = pair_hardness(
            bundle,
            data.dataset,
            pairs,
            k=p.hardness_k,
            cache_dir=cache_dir,
            model_key=bundle.meta.get("sft_checkpoint", bundle.name),
            on_log=on_log,
            should_stop=should_stop,
        )["lambda"].tolist()
    else:
        lam = [1.0] * len(pairs)
    return [PrefItem(pair, float(x)) for pair, x in zip(pairs, lam)]


def run_preference(
    cfg: RunConfig,
    data: PreparedData | None = None,
    *,
    name: str | None = None,
    on_log: Callable | None = None,
    should_stop: Callable | None = None,
    resume: bool = True,
):
    """Stage 2 from the run's SFT checkpoint. Returns (bundle, TrainResult)."""
    from hanorec.train.preference import merge_sft_adapter, train_preference

    data = data or prepare_data(cfg)
    sft_dir = Path(cfg.pref.sft_run or cfg.output_dir) / "sft"
    ckpt = latest_checkpoint(sft_dir)
    if ckpt is None:
        raise FileNotFoundError(
            f"stage 2 needs an SFT checkpoint under {sft_dir / 'checkpoints'}; run `sft` first"
        )
    bundle = prepare_model(cfg, data.dataset, sft_dir)
    merge_sft_adapter(bundle, cfg.lora, ckpt / "adapter", seed=cfg.seed)
    import hashlib

    # the hardness cache is keyed by the SFT weights themselves, not by a path that a new run may reuse
    digest = hashlib.sha256((ckpt / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
    bundle.meta["sft_checkpoint"] = f"{bundle.name}@sft-{digest}"
    out = Path(cfg.output_dir) / (name or cfg.pref.method)
    items = build_preference_items(
        cfg, bundle, data, Path(cfg.output_dir) / "hardness_cache", on_log=on_log, should_stop=should_stop
    )
    result = train_preference(
        cfg, bundle, data.dataset, items, out, resume=resume, on_log=on_log, should_stop=should_stop
    )
    return bundle, result


def _with(cfg: RunConfig, **sections) -> RunConfig:
    """A copy of cfg with some fields of some sections replaced (validated again)."""
    from hanorec.config import load_config

    values = cfg.to_dict()
    for section, fields_ in sections.items():
        if isinstance(fields_, dict):
            values[section] = {**values[section], **fields_}
        else:
            values[section] = fields_
    return load_config(overrides=values)


def run_comparison(
    cfg: RunConfig,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    tasks: Sequence[str] = ("hit3", "hit1"),
    variants: Sequence[str] = tuple(PREF_VARIANTS),
    print_fn: Callable = print,
    readme: str | Path | None = None,
    command: str = "",
) -> dict:
    """SFT, then every preference variant from the same SFT model, per task and seed; mean and std table.

    With `readme`, the table (with the command, the machine and the wall time) replaces the README section
    marked `<!-- comparison:<output folder name> -->` (appended at the end when the markers are missing).
    """
    from hanorec.metrics import mean_std

    start = time.time()
    root = Path(cfg.output_dir)
    rows: list[dict] = []
    for task in tasks:
        for seed in seeds:
            run_dir = root / task / f"seed{seed}"
            c = _with(cfg, seed=seed, output_dir=str(run_dir), task={"name": task})
            data = prepare_data(c)
            print_fn(f"== {task} seed {seed}: {len(data.train)} train / {len(data.test)} test examples")
            bundle, _ = run_sft(c, data)
            ev = run_eval(c, bundle, data, method="SFT", baselines=cfg.eval.baselines)
            rows += [{"task": task, "seed": seed, **r} for r in ev.rows]
            del bundle
            for v in variants:
                over = dict(PREF_VARIANTS[v])
                if task == "hit1" and over.get("k_negatives", 1) > 1:
                    over["k_negatives"] = 1  # hit1 has a single rejected answer: S-DPO reduces to DPO
                cv = _with(c, pref={**over, "sft_run": str(run_dir)})
                slug = v.lower().replace(" ", "_").replace("/", "")
                bundle, _ = run_preference(cv, data, name=slug)
                ev = run_eval(cv, bundle, data, method=v, baselines=[])
                rows += [{"task": task, "seed": seed, **r} for r in ev.rows]
                print_fn(format_results(task, ev.rows))
                del bundle
    summary = summarize(rows, mean_std)
    result = {
        "rows": rows,
        "summary": summary,
        "seeds": list(seeds),
        "tasks": list(tasks),
        "dataset": cfg.data.path,
        "model": cfg.model.name,
        "wall_s": time.time() - start,
        "command": command,
        "machine": machine_description(),
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "comparison.json").write_text(json.dumps(result, indent=2))
    table = comparison_table(summary, len(seeds))
    (root / "comparison.md").write_text(table + "\n")
    print_fn(table)
    print_fn(f"wall time {result['wall_s'] / 60:.1f} min; written to {root / 'comparison.md'}")
    if readme is not None:
        update_readme_section(readme, root.name, comparison_report(result))
        print_fn(f"README section comparison:{root.name} updated in {readme}")
    return result


def machine_description() -> str:
    import os
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)"
    )


def comparison_report(result: dict) -> str:
    """The README block of one comparison: command, machine, wall time, then the mean ± std table."""
    table = comparison_table(result["summary"], len(result["seeds"]))
    return (
        f"`{result.get('command') or 'python -m hanorec compare ...'}`\n\n"
        f"Machine: {result.get('machine', 'not recorded')}; wall time {result['wall_s'] / 60:.1f} min; "
        f"dataset `{result['dataset']}`, model `{result['model']}`, seeds {result['seeds']}.\n\n{table}"
    )


def update_readme_section(readme: str | Path, key: str, body: str) -> None:
    """Replace the text between `<!-- comparison:key -->` and `<!-- /comparison:key -->` (or append it)."""
    import fcntl

    path = Path(readme)
    with open(path.with_name(path.name + ".lock"), "w") as lock:  # two comparisons may finish together
        fcntl.flock(lock, fcntl.LOCK_EX)
        _replace_section(path, key, body)
    path.with_name(path.name + ".lock").unlink(missing_ok=True)


def _replace_section(path: Path, key: str, body: str) -> None:
    text = path.read_text() if path.exists() else ""
    start, end = f"<!-- comparison:{key} -->", f"<!-- /comparison:{key} -->"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


METHOD_ORDER = ["random", "popularity", "SFT", *PREF_VARIANTS]


def summarize(rows: list[dict], mean_std) -> list[dict]:
    """Mean and std over seeds of hit3 HR@3 / NDCG@3 and hit1 AUC, per method (ranking protocol)."""
    out = []
    for method in METHOD_ORDER:
        entry: dict = {"method": method}
        for task, metric in (("hit3", "HR@3"), ("hit3", "NDCG@3"), ("hit1", "AUC")):
            vals = [
                r[metric]
                for r in rows
                if r["task"] == task and r["method"] == method and r["protocol"] == "ranking" and metric in r
            ]
            if vals:
                entry[f"{task} {metric}"] = mean_std(vals)
        if len(entry) > 1:
            out.append(entry)
    return out


def comparison_table(summary: list[dict], n_seeds: int) -> str:
    cols = ["hit3 HR@3", "hit3 NDCG@3", "hit1 AUC"]
    present = [c for c in cols if any(c in e for e in summary)]
    lines = ["| method | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
    for e in summary:
        cells = [f"{e[c][0]:.4f} ± {e[c][1]:.4f}" if c in e else "-" for c in present]
        lines.append(f"| {e['method']} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nmean ± sample std over {n_seeds} seeds; ranking protocol (title likelihood), test split."
    )
    return "\n".join(lines)
