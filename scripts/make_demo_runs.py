"""The trained demo runs the app shows first, tiny adapters rebuilt byte for byte: SFT, DPO and HaNo-DPO on hit3,
and the teaching SFT model the lesson preset (configs/lab.yaml) starts from.

    .venv/bin/python scripts/make_demo_runs.py            # rebuild assets/demo_runs/ (about 6 CPU minutes)
    .venv/bin/python scripts/make_demo_runs.py --check    # rebuild into a temporary folder, compare every file's
                                                          # SHA-256 with the shipped ones (exit 1 on a difference)
    .venv/bin/python scripts/make_demo_runs.py --check --runs teach-hit3   # one run only

Two run folders, both trained from the bundled demo data (assets/demo) with the tiny Qwen2.5-VL preset:

- assets/demo_runs/demo-hit3/: SFT (200 steps on at most 2 windows per user), then DPO and HaNo-DPO, each from
  that SFT model, each evaluated on the first 60 test prompts (the ranking protocol).
- assets/demo_runs/teach-hit3/: the teaching SFT model (SFT only, every training window, longer; see TEACH
  and scripts/learnability.py for why), evaluated on all 240 test users under the ranking and the catalogue
  protocols with the random and popularity baselines.

Only what loading and listing a stage needs ships: the newest checkpoint's adapter, configuration
and trainer state, the tiny base model, the metrics logs and the results. Everything that would differ from
one build to the next is taken out: wall-clock times, absolute paths (configurations name the demo data and
the run by paths relative to the repository; the SFT source a preference stage names is relative to its
run), optimizer, scheduler and RNG states (a shipped run is read-only, never resumed). Training is
deterministic on CPU with one torch thread, so a rebuild gives the same bytes on the same torch build and
the same CPU kernel set (torch's CPU capability, e.g. AVX2 or AVX512: other kernels round differently).
build.json beside the run records both. ``--check`` demands identical bytes when they match the machine it
runs on; on another kernel set it compares within stated tolerances instead (the same files and results
within 0.02, the same non-numeric content, logged numbers within 1e-3 relative, adapter weights within 1e-3),
and says which comparison it made.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

OUT = ROOT / "assets" / "demo_runs"
RUN = "demo-hit3"
TEACH = "teach-hit3"  # the teaching SFT model (configs/lab.yaml's pref.sft_run)
STAGES = ("sft", "dpo", "hano_dpo")
VARIANTS = ("DPO", "HaNo-DPO")  # the paper's names; their folders are STAGES[1:]
KEEP_IN_CHECKPOINT = ("adapter", "config.yaml", "trainer_state.json")
KEEP_IN_ADAPTER = ("adapter_model.safetensors", "adapter_config.json")
BUILD_FILE = "build.json"  # beside the run: the torch build and CPU kernel set it was made with
TOL_WEIGHT, TOL_LOGGED, TOL_RESULT = 1e-3, 1e-3, 0.02  # --check on another kernel set (measured: 3e-4, 1e-5, 0)
TEACH_STEPS, TEACH_LR = 800, 3e-3  # the teaching SFT model's schedule (scripts/learnability.py measured it)
TIME_KEYS = ("elapsed_s", "wall_s", "time_s", "updated", "started", "ended")
DEMO_REL, RUN_REL = "assets/demo", f"assets/demo_runs/{RUN}"

OVERRIDES = {
    "seed": 0,
    "threads": 1,
    "data": {"path": str(ROOT / DEMO_REL)},
    "task": {"name": "hit3", "max_eval_examples": 60},
    "model": {"name": "tiny-qwen2.5-vl", "tiny_hidden_size": 128, "tiny_layers": 2},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "modules_to_save": ["embed_tokens", "lm_head"]},
    "sft": {"max_steps": 200, "lr": 2e-3, "batch_size": 8, "grad_accum": 1, "warmup_ratio": 0.05, "log_every": 5,
            "save_every": 0, "save_every_minutes": 0, "keep_checkpoints": 1, "progress_bar": False},
    "pref": {"max_steps": 30, "lr": 1e-3, "batch_size": 4, "grad_accum": 1, "log_every": 1, "save_every": 0,
             "save_every_minutes": 0, "keep_checkpoints": 1, "progress_bar": False, "max_pairs": 120,
             "noise_sigma": 0.05},
    "eval": {"protocols": ["ranking"], "batch_size": 14, "baselines": ["random", "popularity"]},
}  # fmt: skip
# The teaching SFT model: what scripts/learnability.py found the tiny model needs to learn the demo world
# (every training window, not 2 per user, and several times the steps); evaluated on every test user.
TEACH_OVERRIDES = {
    **OVERRIDES,
    "data": {"path": str(ROOT / DEMO_REL), "max_train_windows_per_user": None},
    "task": {"name": "hit3", "max_eval_examples": None},
    "sft": {**OVERRIDES["sft"], "max_steps": TEACH_STEPS, "lr": TEACH_LR, "log_every": 10},
    "pref": {},
    "eval": {"protocols": ["ranking", "catalogue"], "batch_size": 14, "baselines": ["random", "popularity"]},
}
# run name -> (overrides, stages, preference variants trained from its SFT)
RUNS = {RUN: (OVERRIDES, STAGES, VARIANTS), TEACH: (TEACH_OVERRIDES, ("sft",), ())}


def build(dest: Path, names=tuple(RUNS)) -> Path:
    """Train each named run's stages into a scratch folder, then write the cleaned run to dest/<name>; dest."""
    import torch

    from hanorec.config import load_config
    from hanorec.methods import variant_of
    from hanorec.pipeline import _with, run_pipeline, run_preference_pipeline

    torch.set_num_threads(1)
    quiet = lambda *a, **k: None  # noqa: E731
    for name in names:
        overrides, stages, variants = RUNS[name]
        with tempfile.TemporaryDirectory(prefix="hanorec-demo-runs-") as tmp:
            scratch = Path(tmp) / name
            cfg = load_config(overrides={**overrides, "output_dir": str(scratch)})
            run_pipeline(cfg, print_fn=quiet)
            for label in variants:  # each variant's own fields (DPO: no noise; HaNo-DPO: HaRS and NoDO)
                run_preference_pipeline(_with(cfg, pref=dict(variant_of(label))), print_fn=quiet)
            target = dest / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            _clean_copy(scratch, target, cfg, stages)
    return dest


def _clean_copy(src: Path, dst: Path, cfg, stages=STAGES) -> None:
    from hanorec import runs
    from hanorec.config import load_config

    def config_text(path: Path) -> str:
        c = load_config(path)
        c.data.path, c.output_dir, c.pref.sft_run = DEMO_REL, f"assets/demo_runs/{dst.name}", None
        return c.to_yaml()

    (dst / runs.CONFIG_FILE).write_text(config_text(_saved_config(src, cfg)))
    _write_json(dst / runs.STATUS_FILE, {"status": "finished", "read_only": True,
                                          "message": "a demo run shipped with the repository (read-only)"})  # fmt: skip
    _write_json(dst / runs.RESULTS_FILE, _clean(json.loads((src / runs.RESULTS_FILE).read_text()), src))
    for stage in stages:
        s_src, s_dst = src / stage, dst / stage
        ckpt = runs.latest_checkpoint(s_src)
        c_dst = s_dst / "checkpoints" / ckpt.name
        c_dst.mkdir(parents=True)
        for name in KEEP_IN_CHECKPOINT:
            p = ckpt / name
            if name == "adapter":  # the weights, and peft's config without the build machine's base model path
                (c_dst / name).mkdir()
                shutil.copy2(p / KEEP_IN_ADAPTER[0], c_dst / name / KEEP_IN_ADAPTER[0])
                adapter = json.loads((p / KEEP_IN_ADAPTER[1]).read_text())
                adapter["base_model_name_or_path"] = None
                _write_json(c_dst / name / KEEP_IN_ADAPTER[1], adapter)
            elif name == "config.yaml":
                (c_dst / name).write_text(config_text(p))
            else:
                _write_json(c_dst / name, _clean(json.loads(p.read_text()), src))
        rows = [json.loads(x) for x in (s_src / runs.METRICS_FILE).read_text().splitlines() if x.strip()]
        (s_dst / runs.METRICS_FILE).write_text("".join(json.dumps(_clean(r, src)) + "\n" for r in rows))
        if stage == runs.SFT_STAGE:
            shutil.copytree(s_src / runs.BASE_MODEL_DIR, s_dst / runs.BASE_MODEL_DIR)
        else:
            _write_json(s_dst / runs.RESULTS_FILE, _clean(json.loads((s_src / runs.RESULTS_FILE).read_text()), src))
            info = json.loads((s_src / runs.SFT_SOURCE_FILE).read_text())
            rel = Path(info["checkpoint"]).relative_to(src)
            _write_json(s_dst / runs.SFT_SOURCE_FILE, {"checkpoint": str(rel), "digest": info["digest"]})
    for p in dst.rglob("*"):  # no absolute path of the build machine anywhere
        if p.is_file() and p.suffix in (".json", ".yaml", ".jsonl", ".txt"):
            assert str(src.parent) not in p.read_text(), p


def _saved_config(src: Path, cfg) -> Path:
    path = src / "config.yaml"
    if not path.is_file():
        cfg.save(path)
    return path


def _clean(value, src: Path):
    """Drop wall-clock fields; paths inside the scratch run become relative to it."""
    if isinstance(value, dict):
        return {k: _clean(v, src) for k, v in value.items() if k not in TIME_KEYS}
    if isinstance(value, list):
        return [_clean(v, src) for v in value]
    if isinstance(value, str) and value.startswith(str(src)):
        return str(Path(value).relative_to(src))
    if isinstance(value, str) and value == str(ROOT / DEMO_REL):
        return DEMO_REL
    return value


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def build_info() -> dict:
    """The torch build and CPU kernel set of this machine (what bit identity depends on)."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _close(a, b, rel: float) -> bool:
    """Equal structure; numbers within rel (relative, with rel as the absolute floor); sft_source's digest
    (a hash of the weights) is skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(k == "digest" or _close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= rel * max(1.0, abs(a), abs(b))
    return a == b


def _within_tolerance(old: Path, new: Path, name: str) -> bool:
    a, b = old / name, new / name
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file

        x, y = load_file(a), load_file(b)
        return x.keys() == y.keys() and all(
            x[k].shape == y[k].shape and float((x[k] - y[k]).abs().max()) <= TOL_WEIGHT for k in x
        )
    if name.endswith(".jsonl"):
        rows = [[json.loads(r) for r in p.read_text().splitlines() if r.strip()] for p in (a, b)]
        return _close(rows[0], rows[1], TOL_LOGGED)
    if name.endswith(".json"):
        tol = TOL_RESULT if Path(name).name == "results.json" else TOL_LOGGED
        return _close(json.loads(a.read_text()), json.loads(b.read_text()), tol)
    return False  # any other file must be identical


def run_digests(root: Path, names) -> dict[str, str]:
    """:func:`digests` of each named run folder under root, keyed <run>/<relative path>."""
    return {f"{name}/{k}": v for name in names for k, v in digests(root / name).items()}


def check(shipped: Path = OUT, names=tuple(RUNS)) -> tuple[list[str], str]:
    """Rebuild the named runs into a temporary folder; the files that differ from (or are missing in) the
    shipped runs, and which comparison was made (bytes on the shipped build's kernel set, tolerances on
    another)."""
    recorded = json.loads((shipped / BUILD_FILE).read_text()) if (shipped / BUILD_FILE).is_file() else {}
    here = build_info()
    with tempfile.TemporaryDirectory(prefix="hanorec-demo-check-") as tmp:
        new_root = build(Path(tmp), names)
        new = run_digests(new_root, names)
        old = run_digests(shipped, names)
        bad = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if recorded == here:
            return bad, f"bytes (built and checked with torch {here['torch']}, {here['cpu_capability']} kernels)"
        how = (f"tolerances (built with {recorded or 'an unrecorded build'}, checked with torch {here['torch']}, "
               f"{here['cpu_capability']} kernels: other kernels round differently)")  # fmt: skip
        missing = sorted(k for k in set(old) ^ set(new))
        return missing + [k for k in bad if k in old and k in new
                          and not _within_tolerance(shipped, new_root, k)], how  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT, help="folder that receives demo-hit3/ (default assets/demo_runs)")
    p.add_argument("--check", action="store_true", help="rebuild in a temporary folder and compare with --out")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs (default: all)")
    args = p.parse_args()
    if args.check:
        bad, how = check(args.out, tuple(args.runs))
        same = "identical: every file's SHA-256 matches" if how.startswith("bytes") else "equal within tolerance"
        print(f"compared by {how}")
        print(same if not bad else "differ: " + ", ".join(bad))
        return 1 if bad else 0
    build(args.out, tuple(args.runs))
    _write_json(args.out / BUILD_FILE, build_info())
    for name in args.runs:
        target = args.out / name
        total = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        print(f"wrote {target} ({total:,} bytes, {total / 1e6:.2f} MB)")
    for name, digest in run_digests(args.out, args.runs).items():
        print(f"{digest[:16]}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
