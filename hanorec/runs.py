"""Runs on disk: the layout of a run folder, its status, metrics and results, and any stage's model.

The run folder is the single source of truth; the app, the notebooks and the CLI read it back with these
functions and keep no state of their own:

    <run>/
        config.yaml          the resolved RunConfig (written by the job manager; optional for CLI runs)
        status.json          queued | running | finished | stopped | failed, with the writing process's pid
        job.json, job.log    a background job's commands and their output (hanorec.jobs)
        results.json         the evaluation of `run` (SFT) or `pref` (the preference stage)
        sft/                 stage 1: base_model/ (tiny presets), checkpoints/step-NNNNNN/, metrics.jsonl
        <stage>/             each preference stage (dpo, sdpo, hano_dpo, or a comparison variant's slug):
                             checkpoints/, metrics.jsonl, sft_source.json (which SFT checkpoint was merged)
        hardness_cache/      HaRS lambdas keyed by the SFT weights

A preference stage's model is the base model + the merged SFT adapter + the stage's own LoRA
(method.md section 6), rebuilt here exactly as training built it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hanorec.errors import UserError

BASE_MODEL_DIR = "base_model"
SFT_STAGE = "sft"
CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
SFT_SOURCE_FILE = "sft_source.json"
NOT_STAGES = {BASE_MODEL_DIR, "hardness_cache", "checkpoints"}
STATUSES = ("queued", "running", "finished", "stopped", "failed")


class RunError(UserError, FileNotFoundError):
    """A run folder, stage or checkpoint a user named is missing (one clear sentence)."""


def latest_checkpoint(stage_path: str | Path) -> Path | None:
    """The newest complete checkpoint of a stage folder (imported lazily: reading a run needs no torch)."""
    from hanorec.train.checkpoint import latest_checkpoint as latest

    return latest(stage_path)


def stage_slug(variant: str) -> str:
    """The folder name of a preference variant: 'HaNo-DPO w/o HaRS' -> 'hano-dpo_wo_hars'."""
    return variant.lower().replace(" ", "_").replace("/", "")


def real_dir(path: Path) -> bool:
    """A folder that is not a symbolic link: listings and jobs never follow links out of the runs folder."""
    return not path.is_symlink() and path.is_dir()


def _real_file(path: Path) -> bool:
    return not path.is_symlink() and path.is_file()


def stage_dir(run_dir: str | Path, stage: str = SFT_STAGE) -> Path:
    return Path(run_dir) / stage


def stages(run_dir: str | Path) -> list[str]:
    """Stages present in a run: 'sft' first, then every preference stage folder (with a checkpoint or a log)."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [
        p.name
        for p in run.iterdir()
        if real_dir(p)
        and p.name not in NOT_STAGES
        and not p.name.startswith(".")
        and ((p / "checkpoints").is_dir() or (p / METRICS_FILE).is_file())
    ]
    return sorted(found, key=lambda s: (s != SFT_STAGE, s))


# ------------------------------------------------------------------------------------------------
# config, metrics, results
# ------------------------------------------------------------------------------------------------
def read_config(run_dir: str | Path, stage: str | None = None):
    """The RunConfig of a run (its config.yaml) or of a stage (its newest checkpoint's config.yaml)."""
    from hanorec.config import load_config

    run = Path(run_dir)
    candidates = []
    if stage is not None:
        ckpt = latest_checkpoint(run / stage)
        if ckpt is not None:
            candidates.append(ckpt / CONFIG_FILE)
    candidates.append(run / CONFIG_FILE)
    for s in stages(run):
        ckpt = latest_checkpoint(run / s)
        if ckpt is not None:
            candidates.append(ckpt / CONFIG_FILE)
    for path in candidates:
        if path.is_file():
            return load_config(path)
    return None


def read_metrics(run_dir: str | Path, stage: str | None = None) -> list[dict]:
    """The logged metric rows of one stage, or of every stage in order (each row carries its 'stage')."""
    run = Path(run_dir)
    names = [stage] if stage is not None else stages(run)
    rows: list[dict] = []
    for s in names:
        path = run / s / METRICS_FILE
        if not _real_file(path):
            continue
        for line in path.read_text(errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            if not isinstance(row, dict):
                continue
            row.setdefault("stage", s)
            row["stage_dir"] = s
            rows.append(row)
    return rows


def read_results(run_dir: str | Path, stage: str | None = None) -> dict | None:
    """results.json of the run (`run` writes it after SFT) or of a stage (`pref` writes it in the stage folder)."""
    path = Path(run_dir) / (stage or "") / RESULTS_FILE
    if stage == SFT_STAGE and not path.is_file():
        path = Path(run_dir) / RESULTS_FILE
    if not _real_file(path):
        return None
    try:
        out = json.loads(path.read_text())
    except (ValueError, OSError):  # truncated, not UTF-8
        return None
    return out if isinstance(out, dict) else None


def write_results(run_dir: str | Path, result: dict) -> Path:
    path = Path(run_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, result)
    return path


# ------------------------------------------------------------------------------------------------
# status
# ------------------------------------------------------------------------------------------------
def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)  # atomic: a reader never sees half a file


def pid_alive(pid: int | None) -> bool:
    """True while a process with this pid exists and is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _status_json(run: Path) -> dict:
    """The run's status.json as written, or {} when it is missing or unreadable (a write cut short)."""
    path = run / STATUS_FILE
    if path.is_symlink():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, truncated, not UTF-8
        return {}
    return info if isinstance(info, dict) else {}


def read_status(run_dir: str | Path) -> dict:
    """status.json with 'status' made true: a 'running' run whose processes are gone reads as 'failed'.

    Runs without a status.json (older CLI runs) read as 'finished' when they hold results or a checkpoint.
    """
    run = Path(run_dir)
    info = _status_json(run)
    if not info:
        done = (run / RESULTS_FILE).is_file() or any(latest_checkpoint(run / s) for s in stages(run))
        return {"status": "finished" if done else "failed", "message": "" if done else "no status recorded"}
    if info.get("status") != "queued" and pid_alive(info.get("runner_pid")):
        # a background job between two commands (hanorec.jobs): its runner is alive, so it is running
        return dict(info, status="running")
    if info.get("status") == "running" and not (
        pid_alive(info.get("pid")) or pid_alive(info.get("runner_pid"))
    ):
        info = dict(info, status="failed")
        info.setdefault("message", "")
        info["message"] = info["message"] or (
            f"the process (pid {info.get('pid')}) ended without recording how; see job.log in {run}"
        )
    return info


def write_status(run_dir: str | Path, status: str, **fields) -> dict:
    """Update status.json (fields not given are kept), atomically."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    path = run / STATUS_FILE
    info = _status_json(run)
    info.update(fields, status=status, updated=time.time())
    if status in ("running", "queued") and "message" not in fields:
        info.pop("message", None)
    _write_json(path, info)
    return info


@contextmanager
def track_status(run_dir: str | Path, command: str, should_stop: Callable[[], bool] | None = None):
    """Record a CLI command's life in <run>/status.json: running (with pid) -> finished, stopped or failed.

    A stop request (should_stop() true at the end, or KeyboardInterrupt) reads as 'stopped'; an exception as
    'failed' with its own sentence. A run that fails before writing anything but its status (a missing
    dataset, a bad model name) leaves no folder behind.
    """
    run = Path(run_dir)
    created = not run.exists()
    write_status(run, "running", command=command, pid=os.getpid(), started=time.time())
    from hanorec.progress import StopRequested

    try:
        yield
    except KeyboardInterrupt:
        write_status(run, "stopped", command=command, message="interrupted", ended=time.time())
        raise
    except StopRequested as e:  # a stop during data preparation, hardness or evaluation
        write_status(run, "stopped", command=command, message=f"stopped during {e.stage}", ended=time.time())
        raise
    except BaseException as e:
        if created and [p.name for p in run.iterdir()] == [STATUS_FILE]:
            shutil.rmtree(run, ignore_errors=True)
        else:
            write_status(run, "failed", command=command, message=str(e) or type(e).__name__, ended=time.time())
        raise
    stopped = should_stop is not None and should_stop()
    write_status(
        run_dir,
        "stopped" if stopped else "finished",
        command=command,
        message="stopped on request; run the same command again to resume" if stopped else "",
        ended=time.time(),
    )


def _stage_pref(run: Path, stage: str) -> dict | None:
    """The pref section a stage trained with (its newest checkpoint's config.yaml), None when unreadable."""
    import yaml

    ckpt = latest_checkpoint(run / stage)
    try:
        return (yaml.safe_load((ckpt / CONFIG_FILE).read_text()) or {}).get("pref") if ckpt else None
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def stage_label(config: dict | None, stage: str, run_dir: str | Path | None = None) -> str:
    """A stage's name in the paper's words: 'SFT', or the preference variant its config trained
    ('HaNo-DPO w/o NoDO'), or the method with its add-ons (hanorec.methods.label_of). With run_dir, the
    stage is named from its own newest checkpoint's config when it has one."""
    if stage == SFT_STAGE:
        return "SFT"
    from hanorec import methods

    own = _stage_pref(Path(run_dir), stage) if run_dir is not None else None
    if own and own.get("method") is not None:  # what the stage itself trained with
        return methods.label_of(own)
    for name in methods.variants():  # a comparison's folder (hanorec.pipeline.run_comparison)
        if stage_slug(name) == stage:
            return name
    pref = (config or {}).get("pref") or {}
    if pref.get("method") != stage:  # no config names this method: the folder is a method's name
        return methods.get(stage).label if stage in methods.names() else stage
    return methods.label_of(pref)


# ------------------------------------------------------------------------------------------------
# listing
# ------------------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    name: str
    path: Path
    config: dict | None
    stages: list[str]
    status: str
    message: str = ""
    metrics: list[dict] = field(default_factory=list)
    results: dict | None = None  # <run>/results.json (the `run` command: SFT + evaluation)
    stage_results: dict = field(default_factory=dict)  # stage -> its results.json (preference stages)
    status_info: dict = field(default_factory=dict)

    def label(self, stage: str) -> str:
        """The stage's name (stage_label), read from the stage's own checkpoint when the run's config names
        another method."""
        return stage_label(self.config, stage, self.path)

    @property
    def updated(self) -> float:
        return float(self.status_info.get("updated") or _mtime(self.path))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def is_run(path: Path) -> bool:
    return real_dir(path) and (
        (path / STATUS_FILE).is_file() or (path / CONFIG_FILE).is_file() or bool(stages(path))
    )


def run_info(run_dir: str | Path, *, with_metrics: bool = True) -> RunInfo:
    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"run folder {run} does not exist")
    try:
        cfg = read_config(run)
    except Exception:  # a hand-edited config.yaml must not hide the run from the list
        cfg = None
    st = read_status(run)
    return RunInfo(
        name=run.name,
        path=run,
        config=cfg.to_dict() if cfg is not None else None,
        stages=stages(run),
        status=st.get("status", "failed"),
        message=st.get("message", ""),
        metrics=read_metrics(run) if with_metrics else [],
        results=read_results(run),
        stage_results={s: r for s in stages(run) if s != SFT_STAGE and (r := read_results(run, s))},
        status_info=st,
    )


def list_runs(root: str | Path, *, with_metrics: bool = True) -> list[RunInfo]:
    """Every run folder directly under root (newest first); runs of a comparison (<task>/seed<N>) too."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: list[Path] = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not real_dir(p):  # a symbolic link is never followed
            continue
        if is_run(p):
            found.append(p)
        else:  # a comparison: <root>/<name>/<task>/seed<N>
            found += [q for q in sorted(p.glob("*/seed*")) if real_dir(q.parent) and is_run(q)]
    infos = [run_info(p, with_metrics=with_metrics) for p in found]
    for info in infos:
        info.name = str(info.path.relative_to(root))
    return sorted(infos, key=lambda i: -i.updated)


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def base_model(cfg, sft_dir: str | Path | None = None, texts=None):
    """The run's base model: a tiny preset is built once (into <sft_dir>/base_model) and reloaded from there.

    Without a saved copy a tiny preset is built from `texts` (the dataset's text trains its tokenizer);
    any other backbone is loaded by its Hugging Face id or folder.
    """
    from hanorec.models import builds_locally, get_model, load_model

    saved = Path(sft_dir) / BASE_MODEL_DIR if sft_dir else None
    if saved is not None and (saved / "config.json").is_file():
        bundle = load_model(saved, dtype=cfg.model.dtype)
        if bundle.meta.get("init") == "random":  # a random-init real architecture: the name it was built as
            bundle.name = bundle.meta.get("published", bundle.name)
    else:
        if texts is None and builds_locally(cfg.model):
            raise RunError(
                f"the base model of this run (built from the dataset's text) is missing ({saved}); it is written "
                "when SFT starts"
            )
        bundle = get_model(cfg.model, texts, seed=cfg.seed, image_size=cfg.data.image_size)
        if saved is not None and builds_locally(cfg.model):
            # written under a temporary name, then renamed: a kill mid-write leaves no half model behind
            tmp = saved.with_name(f".tmp-{saved.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            bundle.save(tmp)
            shutil.rmtree(saved, ignore_errors=True)
            tmp.rename(saved)
    if bundle.image_size is None and cfg.model.name.startswith("tiny-"):
        bundle.image_size = cfg.data.image_size  # real checkpoints keep their processor's own resizing
    return bundle


def adapter_digest(checkpoint: str | Path) -> str:
    """A short hash of a checkpoint's adapter weights (identifies an SFT model independently of paths)."""
    path = Path(checkpoint) / "adapter" / "adapter_model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def sft_dir_of(cfg, run_dir: str | Path) -> Path:
    """Where a preference stage's SFT model lives: pref.sft_run's sft/ folder, or this run's."""
    return Path(cfg.pref.sft_run or run_dir) / SFT_STAGE


def sft_run_of(run_dir: str | Path, stage: str) -> Path:
    """The run folder whose sft/ holds the SFT model a stage was trained on, the model HaRS embedded the items
    with: for a preference stage, the run of the SFT checkpoint its sft_source.json records (a stage trained
    from another run's SFT, the Train tab's option), else its config's pref.sft_run, else the run itself."""
    run = Path(run_dir)
    if stage == SFT_STAGE:
        return run
    src = run / stage / SFT_SOURCE_FILE
    if _real_file(src):
        try:
            recorded = Path(str(json.loads(src.read_text())["checkpoint"]))
        except (OSError, ValueError, KeyError, TypeError):  # damaged: the config says the same
            recorded = None
        if recorded is not None:
            recorded = recorded if recorded.is_absolute() else run / recorded
            # <sft run>/sft/checkpoints/step-N
            if recorded.is_dir() and recorded.parent.name == "checkpoints" and recorded.parents[1].name == SFT_STAGE:
                return recorded.parents[2]
    try:
        cfg = read_config(run, stage)
    except Exception:  # a hand-edited config: the run's own SFT
        cfg = None
    sft_run = getattr(getattr(cfg, "pref", None), "sft_run", None)
    return Path(sft_run) if sft_run else run


def dataset_of(run_dir: str | Path) -> Path | None:
    """The dataset folder a run was trained on (its config's data.path, resolved; a relative path, as a shipped
    run writes it, from the working folder or else the repository), None when the run has no readable config."""
    try:
        cfg = read_config(run_dir)
    except Exception:  # a hand-edited config.yaml
        return None
    if cfg is None:
        return None
    path = Path(cfg.data.path).expanduser()
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parents[1] / path
    return path.resolve()


def check_sft_dataset(sft_run: str | Path, dataset: str | Path | None) -> None:
    """RunError in one sentence when a finished run's SFT model was trained on another dataset than the one
    chosen (its tokenizer, items and users are that dataset's): no silent swap of either."""
    if not dataset:
        return
    trained = dataset_of(sft_run)
    chosen = Path(dataset).expanduser().resolve()
    if trained is not None and trained != chosen:
        raise RunError(
            f"The SFT run {Path(sft_run).name} was trained on {trained.name}, not on the chosen dataset "
            f"{chosen.name}: choose that dataset, or an SFT source trained on {chosen.name}, or train SFT here."
        )


def record_sft_source(stage_path: str | Path, sft_checkpoint: Path) -> None:
    """Remember which SFT checkpoint a preference stage was trained on (loading rebuilds that model)."""
    stage_path = Path(stage_path)
    stage_path.mkdir(parents=True, exist_ok=True)
    _write_json(
        stage_path / SFT_SOURCE_FILE,
        {"checkpoint": str(Path(sft_checkpoint).resolve()), "digest": adapter_digest(sft_checkpoint)},
    )


def _sft_checkpoint_for(stage_path: Path, sft_dir: Path) -> Path:
    src = stage_path / SFT_SOURCE_FILE
    if src.is_file():
        info = json.loads(src.read_text())
        recorded = Path(info["checkpoint"])
        if not recorded.is_absolute():  # a shipped run records it relative to the run folder
            recorded = stage_path.parent / recorded
        if recorded.is_dir():
            return recorded
        # the run folder moved: find the SFT checkpoint with the same weights
        for ckpt in sorted((sft_dir / "checkpoints").glob("step-*"), reverse=True):
            if (ckpt / "adapter").is_dir() and adapter_digest(ckpt) == info["digest"]:
                return ckpt
        raise RunError(
            f"the SFT checkpoint {recorded.name} that stage {stage_path.name} was trained on is gone from {sft_dir}"
        )
    ckpt = latest_checkpoint(sft_dir)
    if ckpt is None:
        raise RunError(f"no SFT checkpoint found at {sft_dir / 'checkpoints'}")
    return ckpt


def load_stage(run_dir: str | Path, stage: str = SFT_STAGE, checkpoint: str | Path | None = None):
    """Any stage's model ready for scoring (eval mode), from its newest checkpoint or the one given.

    'sft': base model + the SFT LoRA. A preference stage: base model + merged SFT adapter + the stage's LoRA,
    built the way hanorec.pipeline.run_preference built it for training. bundle.meta['checkpoint'] names the
    checkpoint scored.
    """
    from hanorec.models import add_lora
    from hanorec.train.checkpoint import load_adapter_weights, read_adapter_weights
    from hanorec.train.preference import merge_sft_adapter

    run = Path(run_dir)
    where = run / stage
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(where)
    if ckpt is None or not ckpt.is_dir():
        present = stages(run)
        hint = f" (stages present: {', '.join(present)})" if present else ""
        raise RunError(f"no checkpoint found at {ckpt or where / 'checkpoints'}{hint}")
    weights = read_adapter_weights(ckpt / "adapter")  # a damaged checkpoint is named before any model is built
    cfg = read_config(run, stage) if not (ckpt / CONFIG_FILE).is_file() else _load_cfg(ckpt / CONFIG_FILE)
    if cfg is None:
        raise RunError(f"no configuration found for {where} (checkpoints hold config.yaml)")
    if stage == SFT_STAGE:
        bundle = base_model(cfg, where)
        add_lora(bundle, cfg.lora, seed=cfg.seed)
        load_adapter_weights(bundle.model, ckpt / "adapter", weights=weights)
    else:
        sft_dir = sft_dir_of(cfg, run)
        sft_ckpt = _sft_checkpoint_for(where, sft_dir)
        bundle = base_model(cfg, sft_dir)
        merge_sft_adapter(bundle, cfg.lora, sft_ckpt / "adapter", seed=cfg.seed)
        load_adapter_weights(bundle.model, ckpt / "adapter", weights=weights)
        bundle.meta["sft_checkpoint_path"] = str(sft_ckpt)
    bundle.model.eval()
    bundle.meta.update(stage=stage, checkpoint=str(ckpt), run=str(run))
    return bundle


def _load_cfg(path: Path):
    from hanorec.config import load_config

    return load_config(path)
