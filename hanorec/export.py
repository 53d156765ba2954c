"""Models and preference pairs a user can take away from a run (README "Taking a model away").

A preference stage is trained as a LoRA on top of the base model *with the SFT adapter merged into it*
(method.md section 6); that merged model exists only in memory during training. The stage's adapter alone,
loaded onto the base model with ``PeftModel.from_pretrained``, is therefore a model without its SFT. An
export writes everything needed:

    <out>/                  the base weights with the SFT adapter merged (or everything merged: --merge),
                            tokenizer (with its chat template), image processor, processor where this install
                            can build the family's, hanorec_model.json, README.md (model card)
    <out>/adapter/          the stage's own LoRA as a PEFT adapter (not with --merge)

    model = AutoModelForImageTextToText.from_pretrained(out)
    model = PeftModel.from_pretrained(model, f"{out}/adapter")

For the ``sft`` stage the folder holds the base weights and the SFT adapter (or both merged).

Preference pairs go out as JSONL in TRL's conversational preference format (prompt, chosen, rejected, and
images when the prompts show images), with the item ids of every aligned (positive, negative) pair and
HaRS' lambda, so another trainer (TRL's DPOTrainer, LLaMA-Factory after its own conversion) can train on
exactly the pairs a stage trained on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

from hanorec.errors import UserError

ADAPTER_DIR = "adapter"
CARD_FILE = "README.md"


class ExportError(UserError, ValueError):
    """What cannot be exported, in one sentence."""


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
def _check_out(out: Path, run: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"the export folder {out} already exists and is not empty; choose a new --out")
    try:
        out.resolve().relative_to(run.resolve())
    except ValueError:
        return
    raise ExportError(f"the export folder {out} is inside the run folder {run}; choose a folder outside it")


def _check_stage(run: Path, stage: str) -> None:
    from hanorec.runs import read_status, stages

    if not run.is_dir():
        raise ExportError(f"the run folder {run} does not exist")
    present = stages(run)
    if stage not in present:
        hint = f"; its stages are {', '.join(present)}" if present else "; it has no trained stage yet"
        raise ExportError(f"run {run} has no stage {stage!r}{hint}")
    status = read_status(run)
    if status.get("status") in ("running", "queued"):
        raise ExportError(f"run {run} is still {status['status']}; export a stage once its run has finished")


def save_processor(bundle, out: Path) -> str | None:
    """Tokenizer (chat template included) and image processor, plus the family's processor when this install
    can build it; returns the processor's class name, or None with the reason written nowhere (the card says)."""
    bundle.tokenizer.save_pretrained(out)
    bundle.image_processor.save_pretrained(out)
    template = getattr(bundle.tokenizer, "chat_template", None)
    if template and not (out / "chat_template.jinja").is_file():
        (out / "chat_template.jinja").write_text(template)
    try:
        proc = _family_processor(bundle, template)
        proc.save_pretrained(out)
        return type(proc).__name__
    except Exception:  # noqa: BLE001 - some processors need packages this install lacks (e.g. torchvision)
        return None


def _family_processor(bundle, template):
    """The processor class transformers' AutoProcessor maps the model type to, built from the bundle's
    tokenizer and image processor; its other arguments (patch size, feature strategy, ...) are read from the
    model's config where it has them."""
    import inspect

    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    cfg = bundle.base_model().config
    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[cfg.model_type])
    params = inspect.signature(cls.__init__).parameters
    kwargs = {"image_processor": bundle.image_processor, "tokenizer": bundle.tokenizer, "chat_template": template}
    for name in params:
        if name in kwargs or name in ("self", "args", "kwargs"):
            continue
        for source in (cfg, getattr(cfg, "vision_config", None)):
            if source is not None and getattr(source, name, None) is not None:
                kwargs[name] = getattr(source, name)
                break
    return cls(**{k: v for k, v in kwargs.items() if k in params})


def export_stage(
    run_dir: str | Path,
    stage: str,
    out_dir: str | Path,
    *,
    merge: bool = False,
    checkpoint: str | Path | None = None,
    command: str | None = None,
) -> Path:
    """Write a self-contained model of one stage of a run (see the module docstring); returns out_dir."""
    import torch

    from hanorec.models import META_FILE
    from hanorec.runs import SFT_STAGE, load_stage, read_config

    run, out = Path(run_dir), Path(out_dir)
    _check_stage(run, stage)
    _check_out(out, run)
    bundle = load_stage(run, stage, checkpoint)
    cfg = read_config(run, stage)
    model = bundle.model
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with torch.no_grad():
            if merge:
                base = model.merge_and_unload()
            else:
                model.save_pretrained(tmp / ADAPTER_DIR)
                _point_adapter_at_parent(tmp / ADAPTER_DIR)
                base = model.unload()
        base.save_pretrained(tmp)
        processor = save_processor(bundle, tmp)
        meta = {
            **{k: v for k, v in bundle.meta.items() if isinstance(v, (str, int, float, bool))},
            "family": bundle.family,
            "image_size": bundle.image_size,
            "name": bundle.name,
            "exported_stage": stage,
            "merged": merge,
            "contains": "base + SFT" + ("" if stage == SFT_STAGE else f" + {stage}")
            if merge
            else ("base" if stage == SFT_STAGE else "base + SFT (merged)"),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        (tmp / CARD_FILE).write_text(model_card(run, stage, cfg, merge=merge, processor=processor, command=command,
                                                checkpoint=bundle.meta.get("checkpoint")))  # fmt: skip
        if out.exists():
            out.rmdir()
        tmp.rename(out)  # a kill mid-write leaves no half export under the chosen name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _point_adapter_at_parent(adapter: Path) -> None:
    """The adapter's base is the folder above it (the exported weights), not the path training used."""
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = ".."
    path.write_text(json.dumps(cfg, indent=2))


def load_export(out_dir: str | Path, *, dtype: str = "float32"):
    """The exported model as a hanorec ModelBundle, loaded with plain transformers + peft (what a user does)."""
    from peft import PeftModel

    from hanorec.models import load_model

    out = Path(out_dir)
    bundle = load_model(out, dtype=dtype)
    if (out / ADAPTER_DIR / "adapter_config.json").is_file():
        bundle.model = PeftModel.from_pretrained(bundle.model, out / ADAPTER_DIR)
    bundle.model.eval()
    return bundle


# ------------------------------------------------------------------------------------------------
# the model card
# ------------------------------------------------------------------------------------------------
def chance_level(task: str, metric: str, candidates: int) -> float | None:
    """A random ranking's expected value of a metric (ranking protocol, one true item ranked among
    `candidates`); 0.5 for hit1's AUC and Accuracy."""
    if task == "hit1":
        return 0.5 if metric in ("AUC", "Accuracy") else None
    c = max(1, int(candidates))
    if metric.startswith("HR@"):
        return min(1.0, int(metric[3:]) / c)
    if metric.startswith("NDCG@"):
        k = int(metric[5:])
        return sum(1.0 / math.log2(r + 2) for r in range(min(k, c))) / c
    return None


def _fmt(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "NaN" if math.isnan(f) else f"{f:.4f}"


def model_card(run: Path, stage: str, cfg, *, merge: bool, processor: str | None, command: str | None,
               checkpoint: str | None = None) -> str:  # fmt: skip
    """README.md of an exported model: what it is, what it was trained on and how, its metrics beside
    chance, and how to load it."""
    from hanorec.runs import SFT_STAGE, read_results, stage_label

    cfg_dict = cfg.to_dict() if cfg is not None else {}
    label = stage_label(cfg_dict, stage)
    results = read_results(run, stage) or {}
    d, t, m = cfg_dict.get("data", {}), cfg_dict.get("task", {}), cfg_dict.get("model", {})
    train = cfg_dict.get("sft" if stage == SFT_STAGE else "pref", {})
    lines = [
        f"# {label} ({t.get('name', '?')}) exported from HaNoRec Studio",
        "",
        f"A {m.get('name', '?')} model trained for sequential recommendation with {label} "
        "(HaNoRec Studio; method in docs/method.md).",
        "",
        "## What is in this folder",
        "",
    ]
    if merge:
        lines.append(f"All adapters merged into the weights ({'SFT' if stage == SFT_STAGE else 'SFT and ' + label}).")
    elif stage == SFT_STAGE:
        lines.append("The base weights, and the SFT LoRA in `adapter/` (PEFT).")
    else:
        lines.append(f"The base weights with the SFT adapter merged, and the {label} LoRA in `adapter/` (PEFT). "
                     f"{label} was trained on top of the merged SFT model, so its adapter on the plain base "
                     "model would be a model without its SFT.")  # fmt: skip
    lines += [
        "Tokenizer (with its chat template) and image processor are included"
        + (f", and the {processor}." if processor else "; this install could not build the family's processor, "
           "so load the tokenizer and image processor separately."),  # fmt: skip
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoTokenizer, AutoImageProcessor",
        *(["from peft import PeftModel"] if not merge else []),
        "",
        'model = AutoModelForImageTextToText.from_pretrained("PATH")',
        *(['model = PeftModel.from_pretrained(model, "PATH/adapter")'] if not merge else []),
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
        "## Training",
        "",
        f"- method: {label}" + (f" (pref.method = {cfg_dict.get('pref', {}).get('method')})" if stage != SFT_STAGE else ""),
        f"- data: {d.get('path', '?')} (format {d.get('format', '?')}, domain {d.get('domain', '?')}"
        + (f", {d.get('max_users')} users" if d.get("max_users") else "") + ")",
        f"- split: {d.get('split_policy', '?')}; task {t.get('name', '?')}; prompts with images: {t.get('images', 'auto')}",
        f"- seed: {cfg_dict.get('seed', '?')}",
        "- hyperparameters: " + ", ".join(
            f"{k}={train[k]}" for k in ("epochs", "max_steps", "lr", "batch_size", "grad_accum", "beta", "noise_sigma",
                                        "noise_target", "hardness", "k_negatives") if k in train  # fmt: skip
        ),
        f"- LoRA: r={cfg_dict.get('lora', {}).get('r')}, alpha={cfg_dict.get('lora', {}).get('alpha')}",
        f"- checkpoint: {checkpoint or '?'}",
        "",
        "## Evaluation",
        "",
    ]
    rows = results.get("rows") or []
    if rows:
        task = results.get("task", t.get("name", "hit3"))
        metrics = [k for k in rows[0] if k not in ("method", "protocol", "n", "candidates") and not k.startswith("_")]
        metrics = [k for k in metrics if isinstance(rows[0].get(k), (int, float))]
        cand = rows[0].get("candidates", 0)
        lines += [
            f"Split {results.get('split', '?')} ({results.get('split_policy', d.get('split_policy', '?'))}), "
            f"protocol(s) {', '.join(results.get('protocols', []))}, {cand} candidates per prompt, "
            f"n = {rows[0].get('n', '?')} examples. Metrics are fractions in [0, 1].",
            "",
            "| method | protocol | " + " | ".join(metrics) + " |",
            "|---|---|" + "---|" * len(metrics),
        ]
        for r in rows:
            lines.append(f"| {r.get('method', '?')} | {r.get('protocol', '')} | "
                         + " | ".join(_fmt(r.get(k)) for k in metrics) + " |")  # fmt: skip
        chance = [chance_level(task, k, cand) for k in metrics]
        lines.append("| chance | | " + " | ".join("" if c is None else _fmt(c) for c in chance) + " |")
    else:
        lines.append("No evaluation was recorded for this stage (results.json is missing).")
    lines += [
        "",
        "## How it was made",
        "",
        "```",
        *_made_by(run, stage, checkpoint),
        "```",
        "",
        f"Exported with `{command or f'python -m hanorec export --run {run} --stage {stage} --out PATH'}`.",
        "",
    ]
    return "\n".join(lines)


def _made_by(run: Path, stage: str, checkpoint: str | None) -> list[str]:
    """The CLI commands that trained the stage: a job's job.json, else the recorded command and config."""
    from hanorec.runs import SFT_STAGE, _status_json

    try:
        job = json.loads((run / "job.json").read_text())
        if job.get("commands"):
            return [f"python -m hanorec {c}" if not str(c).startswith("python") else str(c) for c in job["commands"]]
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    config = Path(checkpoint) / "config.yaml" if checkpoint else run / "config.yaml"
    first = "run" if stage == SFT_STAGE else "pref"
    recorded = _status_json(run).get("command")
    return [f"python -m hanorec {recorded if recorded in ('run', 'sft', 'pref') else first} --config {config}"]


# ------------------------------------------------------------------------------------------------
# preference pairs
# ------------------------------------------------------------------------------------------------
PLACEHOLDER_IMAGE = "placeholder.png"


def pair_record(item, ds, image_path) -> dict:
    """One pair in TRL's conversational preference format, with item ids and lambda.

    image_path(item_id) -> the path written for an item's image. A prompt with images has a content list
    of {"type": "image"} and {"type": "text"} parts in prompt order and an "images" list; a text-only
    prompt is a plain string and has no "images"."""
    from hanorec.tasks import IMAGE_PLACEHOLDER

    pair = item.pair
    ex = pair.example
    pieces = ex.prompt.split(IMAGE_PLACEHOLDER)
    if ex.image_items:
        content: list[dict] = []
        for k, piece in enumerate(pieces):
            if k:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
    else:
        content = ex.prompt
    record = {
        "prompt": [{"role": "user", "content": content}],
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected[0]}],
    }
    if ex.image_items:
        record["images"] = [image_path(i) for i in ex.image_items]
    record.update(
        rejected_all=list(pair.rejected),
        user=ex.user,
        task=ex.task,
        positive_item_ids=list(pair.positive_item_ids),
        negative_item_ids=list(pair.negative_item_ids),
        image_item_ids=list(ex.image_items),
        **{"lambda": float(item.hardness_lambda)},
    )
    return record


def write_pairs_jsonl(items: Sequence, ds, out_file: str | Path) -> Path:
    """Write preference items (hanorec.train.preference.PrefItem) as JSONL; a missing image is written as
    one grey placeholder PNG beside the file (the image the model was shown)."""
    out = Path(out_file)
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give a file name such as {out / 'pairs.jsonl'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    placeholder = out.with_name(f"{out.stem}_{PLACEHOLDER_IMAGE}")

    def image_path(item_id: str) -> str:
        path = ds.items[item_id].image_path
        if path is not None:
            return str(Path(path).resolve())
        if not placeholder.is_file():
            ds.load_image(item_id).save(placeholder)
        return str(placeholder.resolve())

    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(pair_record(it, ds, image_path), ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out


def export_pairs(run_dir: str | Path, stage: str, out_file: str | Path) -> tuple[Path, int]:
    """The pairs a preference stage of a run trained on (same config, seed and lambdas) as JSONL."""
    from hanorec.pipeline import prepare_data
    from hanorec.runs import SFT_STAGE, base_model, latest_checkpoint, read_config, sft_dir_of
    from hanorec.train.preference import build_preference_items

    run = Path(run_dir)
    _check_stage(run, stage)
    if stage == SFT_STAGE:
        raise ExportError("the sft stage trains on examples, not preference pairs; name a preference stage")
    cfg = read_config(run, stage)
    if cfg is None:
        raise ExportError(f"stage {stage} of run {run} has no configuration to rebuild its pairs from")
    data = prepare_data(cfg)
    bundle = None
    p = cfg.pref
    if (p.method == "hano_dpo" and p.hardness) or p.negative_sampling == "embedding":
        from hanorec.runs import _sft_checkpoint_for, adapter_digest
        from hanorec.train.preference import merge_sft_adapter

        sft_dir = sft_dir_of(cfg, run)
        ckpt = _sft_checkpoint_for(run / stage, sft_dir) if latest_checkpoint(sft_dir) else None
        if ckpt is None:
            raise ExportError(f"the SFT model this stage's lambdas come from is missing from {sft_dir}")
        bundle = base_model(cfg, sft_dir)
        merge_sft_adapter(bundle, cfg.lora, ckpt / "adapter", seed=cfg.seed)
        bundle.meta["sft_checkpoint"] = f"{bundle.name}@sft-{adapter_digest(ckpt)}"
    items = build_preference_items(cfg, bundle, data.dataset, data.train, run / "hardness_cache")
    return write_pairs_jsonl(items, data.dataset, out_file), len(items)


# ------------------------------------------------------------------------------------------------
# for the app: tables as CSV files, exports as zip files
# ------------------------------------------------------------------------------------------------
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _safe_cell(v):
    """A text cell a spreadsheet would run as a formula gets a leading quote; numbers are kept as they are."""
    if isinstance(v, str) and v.startswith(_FORMULA_START):
        try:
            float(v)
            return v
        except ValueError:
            return "'" + v
    return v


def write_table_csv(table, folder: str | Path, name: str) -> Path:
    """A table (pandas DataFrame, or a list of dicts / rows) as CSV in folder, named after `name`
    (letters, digits, - and _ kept); NaN written as NaN. Returns the file's path."""
    import re

    import pandas as pd

    df = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
    df = df.map(_safe_cell) if hasattr(df, "map") else df.applymap(_safe_cell)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", str(name)).strip("-")[:60] or "table"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.csv"
    df.to_csv(path, index=False, na_rep="NaN")
    return path


ZIP_LIMIT_BYTES = 1 << 30  # larger exports are offered as their folder only


EXPORTS_DIR = ".exports"  # under an app's runs folder: a hidden name no run can take (run names start alnum)
MAX_EXPORTS = 6  # export folders an app keeps (each is a model copy); the oldest are removed first
_EXPORT_LOCK = threading.Lock()


def exports_dir(runs_dir: str | Path) -> Path:
    """Where an app's exports go: <runs>/.exports, which a run named `exports` cannot capture."""
    return Path(runs_dir) / EXPORTS_DIR


def export_for_download(run_dir: str | Path, stage: str, exports_root: str | Path, *, merge: bool = False,
                        command: str | None = None, max_exports: int = MAX_EXPORTS) -> tuple[Path, Path | None]:  # fmt: skip
    """Export a stage into a folder under exports_root and zip it when it is under ZIP_LIMIT_BYTES; (the
    folder, the zip or None).

    One export per (run, stage, its newest checkpoint, merge): asking again returns the same folder and zip
    without writing anything. Exports run one at a time (a lock across threads and processes), so two asks
    in the same second never collide, and at most ``max_exports`` folders are kept (the oldest go)."""
    import fcntl

    from hanorec.runs import latest_checkpoint

    run = Path(run_dir)
    root = Path(exports_root)
    _check_stage(run, stage)
    ckpt = latest_checkpoint(run / stage)
    stem = f"{run.name}-{stage}-{ckpt.name if ckpt is not None else 'final'}{'-merged' if merge else ''}"
    out, done = root / stem, root / f".{stem}.done"
    root.mkdir(parents=True, exist_ok=True)
    with _EXPORT_LOCK, open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file() and out.is_dir():  # the same stage and checkpoint: reused
            archive = Path(f"{out}.zip")
            os.utime(out)  # the newest again, for pruning
            return out, archive if archive.is_file() else None
        shutil.rmtree(out, ignore_errors=True)  # half an export (a crash mid-way) is made again
        Path(f"{out}.zip").unlink(missing_ok=True)
        export_stage(run, stage, out, merge=merge, command=command)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        archive = None
        if size <= ZIP_LIMIT_BYTES:
            archive = Path(shutil.make_archive(str(out), "zip", root_dir=out.parent, base_dir=out.name))
        done.write_text(stem)
        _prune_exports(root, max_exports)
    return out, archive


def _prune_exports(root: Path, keep: int) -> None:
    """Remove the oldest export folders (with their zip and marker) beyond ``keep``."""
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime)  # fmt: skip
    for old in folders[: max(0, len(folders) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
        Path(f"{old}.zip").unlink(missing_ok=True)
        (root / f".{old.name}.done").unlink(missing_ok=True)
