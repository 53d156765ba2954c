"""The documented pipeline: data -> examples -> model (+ LoRA) -> SFT -> preference stage -> evaluation.

Orchestration only: the CLI, the app (through hanorec.jobs) and the notebooks call these functions. The run
folder's layout is hanorec.runs, pairs and lambdas are built beside preference training
(hanorec.train.preference), and the comparison's table and README section are hanorec.report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hanorec import logkeys as K
from hanorec.config import RunConfig
from hanorec.data import RecDataset, Splits, load_dataset, make_splits
from hanorec.eval import EvalResult, evaluate, format_results, train_popularity
from hanorec.models import ModelBundle, add_lora, set_max_pixels
from hanorec.report import (
    EXTRA_PAIRED,
    IMAGE_ABLATION,
    comparison_report,
    comparison_table,
    comparison_tables,
    format_difference,
    image_ablation_section,
    machine_description,
    paired_differences,
    paired_table,
    summarize,
    update_readme_section,
)
from hanorec.runs import (
    BASE_MODEL_DIR,
    adapter_digest,
    base_model,
    load_stage,
    record_sft_source,
    sft_dir_of,
    stage_slug,
    write_results,
)
from hanorec.tasks import TASK_SHAPES, Example, build_examples, corpus_text, no_cyclic_gc
from hanorec.train.checkpoint import latest_checkpoint
from hanorec.train.preference import build_preference_items
from hanorec.train.refcache import FOLDER as REFERENCE_FOLDER
from hanorec.train.refcache import ReferenceCache

# re-exported: the run layout lives in hanorec.runs, stage-2 variants in hanorec.methods, and the
# comparison's text and README section in hanorec.report
__all__ = [
    "BASE_MODEL_DIR",
    "build_preference_items",
    "comparison_report",
    "comparison_table",
    "machine_description",
    "paired_differences",
    "paired_table",
    "summarize",
    "update_readme_section",
]


@dataclass
class PreparedData:
    dataset: RecDataset
    splits: Splits
    train: Sequence[Example]  # hanorec.tasks.ExampleList: formatted when read
    val: Sequence[Example]
    test: Sequence[Example]
    _popularity: dict | Callable[[], dict]  # training popularity, or the function counting it on first use

    @property
    def popularity(self) -> dict:
        """Interaction counts over the training windows (hanorec.eval.train_popularity), counted once."""
        if callable(self._popularity):
            self._popularity = self._popularity()
        return self._popularity


def prepare_data(
    cfg: RunConfig,
    *,
    for_training: bool = True,
    on_log: Callable | None = None,
    should_stop: Callable | None = None,
    defer: bool = False,
    freeze: bool = False,
) -> PreparedData:
    """Load and validate the dataset, split it, and build the task's examples (all seeded).

    Raises DataError when a split the run needs is empty (the train split when for_training, and the
    evaluated one); on_log gets one "data" event per phase and should_stop is polled between them.
    Examples are formatted when read (hanorec.tasks.ExampleList); defer=True also leaves each split's
    candidate draws until that split is first used (an unshuffled split draws only up to the example read)
    and the training popularity until it is first read (the app's views: the same examples and counts,
    made on demand). freeze: see hanorec.tasks.no_cyclic_gc (a long-lived process that keeps the data).
    """
    with no_cyclic_gc(freeze=freeze):
        return _prepare_data(cfg, for_training, on_log, should_stop, defer)


def _prepare_data(cfg: RunConfig, for_training: bool, on_log, should_stop, defer: bool) -> PreparedData:
    from hanorec.data import require_windows
    from hanorec.progress import Progress

    progress = Progress("data", 5, on_log=on_log, should_stop=should_stop)
    progress.check()
    d = cfg.data
    ds = load_dataset(
        d.path, format=d.format, domain=d.domain, image_dir=d.image_dir, on_error=d.on_error,
        split_files=d.split_policy == "files", untitled=d.untitled,
    )  # fmt: skip
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
        lazy=defer,  # deferred: the train and val windows are cut when first read
    )
    require_windows(splits, ds, train=for_training, eval_split=cfg.eval.split)
    progress.tick(phase="split")
    t = cfg.task
    words = t.words(d.domain)

    drawn = authors_drawn(cfg, ds, splits)

    def examples(windows, offset, shuffle, cap, phase, split):
        # a teaching scenario's false negatives reach the training examples only (hanorec.data.SCENARIOS)
        planted = ds.scenario.get("false_negatives", 0.0) if phase == "train examples" else 0.0
        out = build_examples(
            t.name,
            windows,
            ds,
            seed=cfg.seed + offset,
            n_negatives=t.n_negatives,
            domain=words,
            max_examples=cap,
            shuffle=shuffle,
            hit1_target_image=t.hit1_target_image,
            false_negatives=planted,
            images=t.images,
            lazy=True,  # prompts are formatted when read: memory stays bounded on large datasets
            defer=defer,
            template_set=t.template_set,
            outer_quotes=t.hit3_outer_quotes,
            negatives=t.negatives,
            max_item_id=t.max_item_id,
            drawn=drawn.get(split),
        )
        progress.tick(phase=phase)
        return out

    # deferred: the lazy splits' train and val windows are read when their examples are first drawn
    train_windows, train_cap = (lambda: splits.train) if defer else splits.train, t.max_train_examples
    val_windows = (lambda: splits.val) if defer else splits.val
    if splits.policy == "files" and train_cap is not None:
        # the first rows of train.tsv, before shuffling, as LLaMA-Factory's max_samples keeps a file's first rows
        train_windows, train_cap = splits.train[:train_cap], None
        if "train" in drawn:
            drawn["train"] = drawn["train"][: len(train_windows)]
    return PreparedData(
        ds,
        splits,
        examples(train_windows, 0, True, train_cap, "train examples", "train"),
        examples(val_windows, 1000, False, t.max_eval_examples, "val examples", "val"),
        examples(splits.test, 2000, False, t.max_eval_examples, "test examples", "test"),
        (lambda: dict(train_popularity(splits.train))) if defer else dict(train_popularity(splits.train)),
    )


def authors_drawn(cfg: RunConfig, ds: RecDataset, splits: Splits) -> dict:
    """data.prompts = authors: split name -> the draws read from the authors' drawn SFT file of that split
    (hanorec.authors_files), for each split whose file is in data.path; {} otherwise."""
    from hanorec.authors_files import authors_draws, find_sft_file
    from hanorec.config import ConfigError

    if cfg.data.prompts != "authors":
        return {}
    if cfg.data.split_policy != "files":
        raise ConfigError("data.prompts = 'authors' reads the authors' drawn SFT files, which belong to their "
                          "train.tsv / val.tsv / test.tsv rows: use it with --data.split_policy=files")  # fmt: skip
    if cfg.task.template_set != "authors" or (cfg.task.name == "hit3" and not cfg.task.hit3_outer_quotes):
        raise ConfigError("data.prompts = 'authors' keeps the authors' prompt and answer text: use it with "
                          "--task.template_set=authors and --task.hit3_outer_quotes=true")  # fmt: skip
    out = {}
    for split in ("train", "val", "test"):
        path = find_sft_file(cfg.data.path, split, cfg.task.name)
        if path is not None:
            out[split] = authors_draws(cfg.task.name, getattr(splits, split), ds, path)
    return out


def stage_max_pixels(cfg: RunConfig, stage_cap: int | None) -> int:
    """A stage's pixel cap per image: its own (sft/pref/eval.max_pixels) if set, else model.max_pixels; 0 (also
    for model.max_pixels None) = the image processor's own default."""
    return int(stage_cap if stage_cap is not None else (cfg.model.max_pixels or 0))


def jpg_images_only(ds: RecDataset) -> RecDataset:
    """The dataset with only ``.jpg`` images kept (the others as missing), as the authors' HaRS encoder reads
    ``<item>.jpg`` alone."""
    from dataclasses import replace

    items = {
        i: it if it.image_path is None or it.image_path.suffix == ".jpg" else replace(it, image_path=None)
        for i, it in ds.items.items()
    }
    return replace(ds, items=items)


def prepare_model(cfg: RunConfig, ds: RecDataset, output_dir: str | Path | None = None) -> ModelBundle:
    """The base model: a tiny preset is built once per run folder (and reloaded from there on resume)."""
    return base_model(cfg, output_dir, corpus_text(ds, cfg.task.words(cfg.data.domain), cfg.task.template_set))


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
    set_max_pixels(bundle, stage_max_pixels(cfg, cfg.sft.max_pixels))
    add_lora(bundle, cfg.lora, seed=cfg.seed)
    result = train_sft(
        cfg, bundle, data.dataset, data.train, out, resume=resume, on_log=on_log, should_stop=should_stop,
        val_examples=data.val,
    )  # fmt: skip
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
    blank_images: bool = False,
) -> EvalResult:
    """cfg.eval's evaluation of ``bundle`` on the prepared data (``blank_images``: the modality meter's second
    pass, every history image blanked; hanorec.eval.evaluate)."""
    examples = data.test if cfg.eval.split == "test" else data.val
    if bundle is not None:
        set_max_pixels(bundle, stage_max_pixels(cfg, cfg.eval.max_pixels))
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
        on_log=on_log,
        should_stop=should_stop,
        sampling=cfg.eval.sampling(),
        paper_max_examples=cfg.eval.paper_max_examples,
        catalogue_items=cfg.eval.catalogue_items,
        catalogue_chunk=cfg.eval.catalogue_chunk,
        blank_images=blank_images,
    )


def meter_protocols(cfg: RunConfig) -> list[str]:
    """The protocols whose paired drop the modality meter keeps: the comparison's paired one first."""
    main = "catalogue" if "catalogue" in cfg.eval.protocols else "ranking"
    return list(dict.fromkeys([main, *(p for p in EXTRA_PAIRED if p in cfg.eval.protocols)]))


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
    result = _evaluate_trained(cfg, bundle, train, data, "SFT", "", start, on_log, should_stop, print_fn)
    if result.get("stopped_early"):
        return result
    result["skipped_examples"] = train.skipped_examples
    if train.validation:  # per-epoch validation: the curve, the best, and which adapter the stage kept
        result["sft_validation"] = {
            "history": train.validation, "best": train.best, "early_stopped": train.early_stopped,
            "kept": train.kept, "summary": train.summary("sft"),
        }  # fmt: skip
    result["wall_s"] = time.time() - start
    path = write_results(cfg.output_dir, result)
    print_fn(f"results written to {path} ({result['wall_s']:.0f} s)")
    return result


# ------------------------------------------------------------------------------------------------
# Stage 2 and the method comparison
# ------------------------------------------------------------------------------------------------
def run_preference(
    cfg: RunConfig,
    data: PreparedData | None = None,
    *,
    name: str | None = None,
    on_log: Callable | None = None,
    should_stop: Callable | None = None,
    resume: bool = True,
    train_should_stop: Callable | None = None,
    reference_cache=None,
):
    """Stage 2 from the run's SFT checkpoint. Returns (bundle, TrainResult).

    reference_cache: a hanorec.train.refcache.ReferenceCache shared by the stages of one comparison seed.

    train_should_stop (default should_stop) is polled by the training loop only, after every optimizer step,
    not while the pairs and their hardness are prepared: hanorec.spaces' per-call budgets count steps."""
    from hanorec.train.preference import merge_sft_adapter, train_preference

    data = data or prepare_data(cfg)
    sft_dir = sft_dir_of(cfg, cfg.output_dir)
    ckpt = latest_checkpoint(sft_dir)
    if ckpt is None:
        raise FileNotFoundError(
            f"stage 2 needs an SFT checkpoint under {sft_dir / 'checkpoints'}; run `sft` first"
        )
    bundle = prepare_model(cfg, data.dataset, sft_dir)
    cache_dir = Path(cfg.output_dir) / "hardness_cache"
    items = None
    if cfg.pref.hars_inputs == "authors":
        # their HaRS encoder (method.md section 10): the base model before the SFT adapter is merged, the image
        # processor's own pixel cap, and only <item>.jpg files
        set_max_pixels(bundle, 0)
        bundle.meta["sft_checkpoint"] = f"{bundle.name}@base-authors-hars-inputs"
        items = build_preference_items(
            cfg, bundle, jpg_images_only(data.dataset), data.train, cache_dir, on_log=on_log, should_stop=should_stop
        )
    merge_sft_adapter(bundle, cfg.lora, ckpt / "adapter", seed=cfg.seed)
    set_max_pixels(bundle, stage_max_pixels(cfg, cfg.pref.max_pixels))
    # the hardness cache is keyed by the SFT weights themselves, not by a path that a new run may reuse
    bundle.meta["sft_checkpoint"] = f"{bundle.name}@sft-{adapter_digest(ckpt)}"
    out = Path(cfg.output_dir) / (name or cfg.pref.method)
    record_sft_source(out, ckpt)
    if items is None:
        items = build_preference_items(
            cfg, bundle, data.dataset, data.train, cache_dir, on_log=on_log, should_stop=should_stop,
        )  # fmt: skip
    result = train_preference(
        cfg, bundle, data.dataset, items, out, resume=resume, on_log=on_log,
        should_stop=should_stop if train_should_stop is None else train_should_stop,
        reference_cache=reference_cache,
        eval_items=held_out_items(cfg, data),
    )  # fmt: skip
    return bundle, result


def held_out_items(cfg: RunConfig, data: PreparedData) -> list:
    """pref.eval_pairs fixed pairs from the first validation examples (seeded by the run's seed, with one
    rejected completion each as the training pairs have), for eval/pair_accuracy; [] when off or without a
    validation split."""
    from hanorec.pairs import build_pairs
    from hanorec.train.preference import PrefItem

    n = cfg.pref.eval_pairs
    if not n or not len(data.val):
        return []
    examples = [data.val[k] for k in range(min(n, len(data.val)))]
    seed = cfg.seed if cfg.pref.pair_seed is None else cfg.pref.pair_seed
    pairs = build_pairs(examples, data.dataset, seed=seed + 1, k_negatives=cfg.pref.k_negatives)
    return [PrefItem(pair) for pair in pairs]


def _evaluate_trained(cfg, bundle, train, data, method, prefix, start, on_log, should_stop, print_fn) -> dict:
    """After a training stage: say how it ended, evaluate it, print the table; the result's common fields
    (or {"stopped_early": True, ...} when training or evaluation was stopped: rerun to resume)."""
    stopped = {"stopped_early": True, "train_steps": train.global_step, "checkpoint": str(train.last_checkpoint)}
    if train.stopped_early:
        print_fn(
            f"{prefix}stopped at step {train.global_step}/{train.total_steps} ({train.last_checkpoint}); "
            "run the same command again to resume"
        )
        return stopped
    if prefix:
        print_fn(f"{prefix}finished at step {train.global_step}/{train.total_steps}")
    ev = run_eval(cfg, bundle, data, method=method, on_log=on_log, should_stop=should_stop)
    if ev.stopped:
        print_fn("stopped during evaluation; run the same command again to evaluate the trained model")
        return stopped
    print_fn(format_results(cfg.task.name, ev.rows, split=cfg.eval.split, split_policy=cfg.data.split_policy))
    meter = {}
    if cfg.eval.image_ablation:  # the modality meter: the same evaluation with the history images blanked
        dark = run_eval(cfg, bundle, data, method=method, on_log=on_log, should_stop=should_stop, blank_images=True)
        if dark.stopped:
            print_fn("stopped during the evaluation with the images blanked; run the same command again")
            return stopped
        meter = {IMAGE_ABLATION: {
            **image_ablation_section(per_example_entries(cfg.task.name, cfg.seed, ev),
                                     per_example_entries(cfg.task.name, cfg.seed, dark), meter_protocols(cfg)),
            "rows": dark.rows,
        }}  # fmt: skip
        print_fn("with the history images blanked:")
        print_fn(format_results(cfg.task.name, dark.rows, split=cfg.eval.split, split_policy=cfg.data.split_policy))
    return {
        **meter,
        "task": cfg.task.name,
        "dataset": str(cfg.data.path),
        "model": cfg.model.name,
        "seed": cfg.seed,
        "split": cfg.eval.split,
        "split_policy": cfg.data.split_policy,
        "protocols": list(cfg.eval.protocols),
        "rows": ev.rows,
        "train_steps": train.global_step,
        "wall_s": time.time() - start,
    }


def run_preference_pipeline(
    cfg: RunConfig,
    *,
    name: str | None = None,
    on_log: Callable | None = None,
    should_stop: Callable | None = None,
    print_fn: Callable = print,
) -> dict:
    """Data, stage 2 from the run's SFT checkpoint, then evaluation; writes <run>/<stage>/results.json."""
    start = time.time()
    data = prepare_data(cfg, on_log=on_log, should_stop=should_stop)
    bundle, train = run_preference(cfg, data, name=name, on_log=on_log, should_stop=should_stop)
    stage = name or cfg.pref.method
    result = _evaluate_trained(cfg, bundle, train, data, stage, f"{stage} ", start, on_log, should_stop, print_fn)
    if result.get("stopped_early"):
        return result
    result.update(stage=stage, checkpoint=str(train.last_checkpoint))
    path = write_results(Path(cfg.output_dir) / stage, result)
    print_fn(f"results written to {path} ({result['wall_s']:.0f} s)")
    return result


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


def per_example_entries(task: str, seed: int, ev: EvalResult) -> list[dict]:
    """One evaluation's per-example values, one entry per (method, protocol): the catalogue protocol's and the
    ranking protocol's, and the paper protocol's, each when it ran, as comparison.json and sweep.json keep them (the input of
    hanorec.report.paired_differences)."""
    return [
        {"task": task, "seed": seed, "method": m, "protocol": ev.per_example_protocol, "values": v}
        for m, v in ev.per_example.items()
    ] + [
        {"task": task, "seed": seed, "method": m, "protocol": "ranking", "values": v}
        for m, v in ev.ranking_per_example.items()
    ] + [
        {"task": task, "seed": seed, "method": m, "protocol": "paper", "values": v}
        for m, v in ev.paper_per_example.items()
    ]


def run_comparison(
    cfg: RunConfig,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    tasks: Sequence[str] = ("hit3", "hit1"),
    variants: Sequence[str] | None = None,
    print_fn: Callable = print,
    readme: str | Path | None = None,
    command: str = "",
    sft_run: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[dict], None] | None = None,
    share_reference: bool = True,
) -> dict:
    """SFT, then each preference variant (default: the paper's, hanorec.methods.paper_variants; any row of
    hanorec.methods.variants) from the same SFT model, per task and seed; mean and std table, and each
    method's paired difference against SFT and DPO with a bootstrap interval over test users and the
    difference it detects with 80% power.

    sft_run: a
    finished run folder whose SFT model every seed starts from (no SFT is trained; its task must be the
    only task). comparison.json keeps the per-example values of every (task, seed, method) under
    ``per_example`` (hanorec.eval.per_example_values; the catalogue protocol's when the run evaluates it),
    so the intervals can be recomputed from it.

    Stop and resume: should_stop() is passed to every training and evaluation; when it stops one, the
    result is ``{"stopped_early": True, ...}`` and nothing is written; running the same comparison again
    resumes each stage from its newest checkpoint (a finished stage is only evaluated again).
    on_progress receives ``{"part", "parts", "current", "stage_dir"}`` as each (task, seed, method) starts.

    share_reference: the variants of a (task, seed) share their reference log-probs
    (hanorec.train.refcache, kept under <task>/seed<N>/reference_logps/): each micro-batch's reference is
    computed by the first variant that trains on it and reused bit for bit by the others.

    With `readme`, the table (with the command, the machine and the wall time) replaces the README section
    marked `<!-- comparison:<output folder name> -->` (appended at the end when the markers are missing).
    """
    from hanorec import methods
    from hanorec.config import ConfigError
    from hanorec.metrics import mean_std

    variants = list(methods.paper_variants() if variants is None else variants)
    overrides = {v: methods.variant_of(v) for v in variants}  # an unknown label fails before any training
    if sft_run is not None:
        from hanorec.runs import read_config

        sft_task = read_config(Path(sft_run)).task.name
        if latest_checkpoint(Path(sft_run) / "sft") is None:
            raise FileNotFoundError(f"run {sft_run} has no SFT checkpoint to compare from")
        if list(tasks) != [sft_task]:
            raise ConfigError(f"the SFT run {sft_run} was trained on {sft_task}; compare task {sft_task} only")
    start = time.time()
    root = Path(cfg.output_dir)
    rows: list[dict] = []
    per_example: list[dict] = []
    parts, part = len(tasks) * len(seeds) * (1 + len(variants)), 0

    def begin(label: str, stage_dir: Path) -> None:
        nonlocal part
        part += 1
        if on_progress is not None:
            on_progress({"part": part, "parts": parts, "current": label, "stage_dir": str(stage_dir.relative_to(root))})

    def stopped(where: str) -> dict:
        print_fn(f"stopped during {where}; run the same comparison again to resume")
        return {"stopped_early": True, "stopped_at": where, "part": part, "parts": parts}

    blanked_rows: list[dict] = []
    blanked: list[dict] = []

    def blank_pass(c, bundle, data, method, baselines, task, seed) -> bool:
        """The modality meter's pass (eval.image_ablation): the same evaluation with the history images
        blanked; False when it was stopped."""
        if not cfg.eval.image_ablation:
            return True
        dark = run_eval(c, bundle, data, method=method, baselines=baselines, should_stop=should_stop, blank_images=True)
        if dark.stopped:
            return False
        blanked_rows.extend({"task": task, "seed": seed, **r} for r in dark.rows)
        blanked.extend(per_example_entries(task, seed, dark))
        return True

    for task in tasks:
        for seed in seeds:
            run_dir = root / task / f"seed{seed}"
            c = _with(cfg, seed=seed, output_dir=str(run_dir), task={"name": task})
            data = prepare_data(c, should_stop=should_stop)
            print_fn(f"== {task} seed {seed}: {len(data.train)} train / {len(data.test)} test examples")
            begin(f"{task} seed {seed}: SFT", run_dir / "sft")
            if sft_run is not None:
                bundle, source = load_stage(Path(sft_run), "sft"), Path(sft_run)
            else:
                bundle, train = run_sft(c, data, should_stop=should_stop)
                if train.stopped_early:
                    return stopped(f"{task} seed {seed} SFT")
                source = run_dir
            ev = run_eval(c, bundle, data, method="SFT", baselines=cfg.eval.baselines, should_stop=should_stop)
            if ev.stopped:
                return stopped(f"{task} seed {seed} SFT evaluation")
            rows += [{"task": task, "seed": seed, **r} for r in ev.rows]
            per_example += per_example_entries(task, seed, ev)
            if not blank_pass(c, bundle, data, "SFT", cfg.eval.baselines, task, seed):
                return stopped(f"{task} seed {seed} SFT evaluation with the images blanked")
            del bundle
            ref_cache = ReferenceCache(run_dir / REFERENCE_FOLDER) if share_reference else None
            for v in variants:
                over = dict(overrides[v])
                if task == "hit1" and over.get("k_negatives", 1) > 1:
                    over["k_negatives"] = 1  # hit1 has a single rejected answer: S-DPO reduces to DPO
                cv = _with(c, pref={**over, "sft_run": str(source)})
                begin(f"{task} seed {seed}: {v}", run_dir / stage_slug(v))
                bundle, train = run_preference(
                    cv, data, name=stage_slug(v), should_stop=should_stop, reference_cache=ref_cache
                )
                if train.stopped_early:
                    return stopped(f"{task} seed {seed} {v}")
                ev = run_eval(cv, bundle, data, method=v, baselines=[], should_stop=should_stop)
                if ev.stopped:
                    return stopped(f"{task} seed {seed} {v} evaluation")
                rows += [{"task": task, "seed": seed, **r} for r in ev.rows]
                per_example += per_example_entries(task, seed, ev)
                if not blank_pass(cv, bundle, data, v, [], task, seed):
                    return stopped(f"{task} seed {seed} {v} evaluation with the images blanked")
                print_fn(format_results(task, ev.rows, split=cfg.eval.split, split_policy=cfg.data.split_policy))
                del bundle
    # both tables read the catalogue protocol when the run has it (hit1: the ranking protocol), else ranking;
    # the ranking protocol's paired table beside the catalogue's, and the authors' protocol's, when they ran
    protocol = next(p for p in ("catalogue", "ranking", *cfg.eval.protocols) if p in cfg.eval.protocols)
    paired_protocol = "catalogue" if "catalogue" in cfg.eval.protocols else "ranking"
    summary = summarize(rows, mean_std, protocol)
    paired = paired_differences(per_example, protocol=paired_protocol)
    extra = {
        f"paired_{p}": paired_differences(per_example, protocol=p)
        for p in EXTRA_PAIRED
        if p in cfg.eval.protocols and p != paired_protocol
    }
    result = {
        "rows": rows,
        "summary": summary,
        "paired": paired,
        **extra,
        "protocol": protocol,
        "paired_protocol": paired_protocol,
        "split": cfg.eval.split,
        "split_policy": cfg.data.split_policy,
        "seeds": list(seeds),
        "tasks": list(tasks),
        "dataset": cfg.data.path,
        "model": cfg.model.name,
        "wall_s": time.time() - start,
        "command": command,
        "machine": machine_description(),
        "per_example": per_example,
    }
    if cfg.eval.image_ablation:
        meter = image_ablation_section(per_example, blanked, meter_protocols(cfg))
        result[IMAGE_ABLATION] = {**meter, "rows": blanked_rows}
    root.mkdir(parents=True, exist_ok=True)
    (root / "comparison.json").write_text(json.dumps(result, indent=2))
    table = comparison_tables(result)
    (root / "comparison.md").write_text(table + "\n")
    print_fn(table)
    print_fn(f"wall time {result['wall_s'] / 60:.1f} min; written to {root / 'comparison.md'}")
    if readme is not None:
        update_readme_section(readme, root.name, comparison_report(result))
        print_fn(f"README section comparison:{root.name} updated in {readme}")
    return result


def run_sweep(
    cfg: RunConfig,
    settings: dict[str, dict],
    *,
    reference: str,
    sft_root: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    task: str = "hit3",
    base_variant: str = "HaNo-DPO",
    print_fn: Callable = print,
    readme: str | Path | None = None,
    command: str = "",
) -> dict:
    """Stage 2 under several settings of the `pref` section, each from the same SFT model per seed, and each
    setting against `reference` as a paired difference over test users (pooled over seeds).

    ``settings`` maps a label to `pref` overrides applied on top of ``base_variant``'s (e.g.
    ``{"sigma=0": {"noise_sigma": 0.0}, "sigma=0.05": {"noise_sigma": 0.05}}``). The SFT model of seed s is
    read from ``<sft_root>/<task>/seed<s>`` (the layout `compare` writes), so a sweep costs no SFT; the
    data are prepared from ``cfg`` with that seed, exactly as the comparison prepared them. Each run goes to
    ``<cfg.output_dir>/<task>/seed<s>/<label slug>``. Besides the test metrics, each row keeps the last
    logged training diagnostics (reward accuracy, chosen log-prob under the noisy policy, mean lambda and
    beta), which say what the setting did to training. With `readme`, the table replaces the README section
    marked ``<!-- comparison:<output folder name> -->``.
    """
    from hanorec import methods
    from hanorec.metrics import mean_std

    if reference not in settings:
        raise ValueError(f"the reference setting {reference!r} is not among the settings {list(settings)}")
    start = time.time()
    root = Path(cfg.output_dir)
    rows: list[dict] = []
    per_example: list[dict] = []
    for seed in seeds:
        sft_run = Path(sft_root) / task / f"seed{seed}"
        c = _with(cfg, seed=seed, output_dir=str(root / task / f"seed{seed}"), task={"name": task})
        data = prepare_data(c)
        for label, over in settings.items():
            cv = _with(c, pref={**methods.variant_of(base_variant), **over, "sft_run": str(sft_run)})
            name = stage_slug(label).replace("=", "-")
            bundle, _ = run_preference(cv, data, name=name)
            ev = run_eval(cv, bundle, data, method=label, baselines=[])
            del bundle
            logged = [json.loads(line) for line in (root / task / f"seed{seed}" / name / "metrics.jsonl").open()]
            last = next((r for r in reversed(logged) if "loss" in r), {})  # a training step's row, not eval/
            diag = {k: last[k] for k in (*K.SWEEP_DIAGNOSTICS, K.BETA_MEAN) if k in last}
            rows += [{"task": task, "seed": seed, "setting": label, **r, **diag} for r in ev.rows]
            per_example += per_example_entries(task, seed, ev)
            print_fn(f"seed {seed} {label}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in {**ev.rows[0], **diag}.items() if isinstance(v, float)))
    metrics = ("HR@3", "NDCG@3") if task != "hit1" else ("AUC",)
    summary = []
    for label in settings:
        mine = [r for r in rows if r["setting"] == label and r.get("protocol", "ranking") == "ranking"]
        entry = {"setting": label}
        for k in (*metrics, *K.SWEEP_DIAGNOSTICS):
            vals = [r[k] for r in mine if k in r]
            if vals:
                entry[k] = mean_std(vals)
        summary.append(entry)
    paired = [p for p in paired_differences(per_example, references=(reference,)) if p["method"] in settings]
    result = {
        "rows": rows, "summary": summary, "paired": paired, "reference": reference, "protocol": "ranking",
        "split": cfg.eval.split, "split_policy": cfg.data.split_policy, "seeds": list(seeds), "task": task,
        "dataset": cfg.data.path, "model": cfg.model.name, "sft_root": str(sft_root), "settings": settings,
        "wall_s": time.time() - start, "command": command, "machine": machine_description(),
        "per_example": per_example,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps(result, indent=2))
    text = sweep_table(result)
    (root / "sweep.md").write_text(text + "\n")
    print_fn(text)
    if readme is not None:
        update_readme_section(
            readme,
            root.name,
            f"`{command or 'python scripts/sigma_sweep.py'}`\n\nMachine: {result['machine']}; wall time "
            f"{result['wall_s'] / 60:.1f} min; dataset `{result['dataset']}`, model `{result['model']}`, "
            f"seeds {result['seeds']}, SFT models from `{sft_root}`.\n\n{text}",
        )
    return result


def sweep_table(result: dict) -> str:
    """Markdown of a sweep: per setting the mean ± std over seeds and the paired difference against the
    reference setting [95% bootstrap interval over test users, seeds pooled]."""
    task = result["task"]
    metrics = ("HR@3", "NDCG@3") if task != "hit1" else ("AUC",)
    diag = K.SWEEP_DIAGNOSTICS
    paired = {p["method"]: p for p in result["paired"]}
    head = [*(f"{task} {m}" for m in metrics), *(f"{m} vs {result['reference']}" for m in metrics),
            "reward acc. (last step)", "chosen log-prob (last step)", "mean lambda"]
    lines = ["| setting | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for e in result["summary"]:
        cells = [f"{e[m][0]:.4f} ± {e[m][1]:.4f}" if m in e else "-" for m in metrics]
        for m in metrics:
            d = paired.get(e["setting"], {}).get(f"{task} {m}")
            cells.append("-" if d is None else format_difference(d))
        cells += [f"{e[k][0]:.3f}" if k in e else "-" for k in diag]
        lines.append(f"| {e['setting']} | " + " | ".join(cells) + " |")
    n_users = next((d["n_users"] for p in result["paired"] for k, d in p.items() if isinstance(d, dict)), None)
    lines.append(
        f"\nmean ± sample std over {len(result['seeds'])} seeds; paired difference: setting minus "
        f"{result['reference']}, mean per-user difference [95% percentile bootstrap interval over "
        f"{n_users} test users, pooled over seeds; * excludes 0; ±x = difference detectable with 80% power]. "
        f"{result.get('protocol', 'ranking').capitalize()} protocol (title likelihood), "
        f"{result['split']} split, split policy {result['split_policy']}; diagnostics are means over seeds of "
        "the last logged training step."
    )
    return "\n".join(lines)
