"""ZeroGPU support (hanorec.spaces): training as a sequence of short calls, each resuming from the newest
checkpoint, reaches the same weights and metrics log as one uninterrupted run; the `spaces` decorator is
used only on ZeroGPU, so local runs are unaffected."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_sft_overrides
from safetensors.torch import load_file

from hanorec import pipeline, spaces
from hanorec.config import load_config
from hanorec.train.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


def cfg_for(out: Path):
    return load_config(overrides=tiny_sft_overrides(out, STEPS, max_train_examples=48))


def adapter(out: Path) -> dict:
    return load_file(str(latest_checkpoint(out / "sft") / "adapter" / "adapter_model.safetensors"))


def metrics(out: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    cfg = cfg_for(out)
    data = pipeline.prepare_data(cfg)
    _, result = pipeline.run_sft(cfg, data)
    assert result.global_step == STEPS and not result.stopped_early
    return out, data


@pytest.mark.parametrize("per_call, calls", [(2, 3), (4, 2)])
def test_chunked_training_reaches_the_unchunked_weights(tmp_path, reference, per_call, calls):
    ref, data = reference
    cfg = cfg_for(tmp_path)
    seen = []
    chunked = spaces.train_in_chunks(
        lambda stop: pipeline.run_sft(cfg, data, should_stop=stop)[1],
        max_steps_per_call=per_call,
        on_chunk=lambda i, r: seen.append((i, r.global_step)),
    )
    assert chunked.calls == calls
    assert seen == [(i + 1, min(STEPS, (i + 1) * per_call)) for i in range(calls)]
    assert all(r.stopped_early for r in chunked.results[:-1])
    assert metrics(tmp_path) == metrics(ref)  # every step once, the same losses, bit for bit
    a, b = adapter(ref), adapter(tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_time_budget_ends_each_call_with_a_checkpoint(tmp_path, reference):
    _, data = reference
    cfg = cfg_for(tmp_path)
    with pytest.raises(RuntimeError, match=r"did not finish in 2 calls \(step 2/6\)"):
        spaces.train_in_chunks(
            lambda stop: pipeline.run_sft(cfg, data, should_stop=stop)[1], max_seconds_per_call=1e-9, max_calls=2
        )
    assert latest_checkpoint(tmp_path / "sft").name == "step-000002"


def test_budget_refuses_nonsense():
    with pytest.raises(ValueError, match="max_steps per call must be at least 1"):
        spaces.Budget(max_steps=0)
    with pytest.raises(ValueError, match="needs max_steps or max_seconds"):
        spaces.Budget()


class _Done:
    stopped_early, global_step, total_steps = False, 1, 1


def fake_spaces_package(root: Path, monkeypatch) -> None:
    """A stand-in for the ZeroGPU runtime's `spaces` package: spaces.GPU(duration) records (duration, the
    decorated function's name) for every call, then runs it."""
    pkg = root / "spaces"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "CALLS = []\n"
        "def GPU(duration=60):\n"
        "    def wrap(fn):\n"
        "        def inner(*a, **k):\n"
        "            CALLS.append((duration, fn.__name__))\n"
        "            return fn(*a, **k)\n"
        "        return inner\n"
        "    return wrap\n"
    )
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, "spaces", raising=False)


def test_spaces_decorator_only_on_zero_gpu(tmp_path, monkeypatch):
    """A `spaces` package on the path is not enough: without SPACES_ZERO_GPU the call runs directly; with it,
    every call goes through spaces.GPU(duration=...)."""
    fake_spaces_package(tmp_path, monkeypatch)
    monkeypatch.delenv(spaces.ZERO_GPU_ENV, raising=False)
    assert not spaces.on_zero_gpu()
    spaces.train_in_chunks(lambda stop: _Done(), max_steps_per_call=1)
    assert "spaces" not in sys.modules, "a local run must not import spaces"
    monkeypatch.setenv(spaces.ZERO_GPU_ENV, "true")
    assert spaces.on_zero_gpu()
    spaces.train_in_chunks(lambda stop: _Done(), max_steps_per_call=1, gpu_duration_s=90)
    assert sys.modules["spaces"].CALLS == [(90, "_one_call")]


def test_local_job_manager_keeps_subprocess_runs(tmp_path, monkeypatch):
    from hanorec.jobs import JobManager

    monkeypatch.delenv(spaces.ZERO_GPU_ENV, raising=False)
    manager = JobManager(tmp_path / "runs", autostart=False)
    assert not manager.in_process


def test_train_tab_job_on_zero_gpu_trains_in_chunks(tmp_path, monkeypatch):
    """A job launched from the Train tab on ZeroGPU (detection forced on, `spaces` faked) runs in the app's
    process as several decorated GPU calls of the asked duration, each resuming from the newest checkpoint,
    plus one for the evaluation; it ends on the same weights, metrics and results as one unchunked run."""
    from test_app_train import DEMO, FORM, make_ctx

    from app.tabs import train as T
    from hanorec import runs
    from hanorec.jobs import JobManager

    fake_spaces_package(tmp_path, monkeypatch)
    monkeypatch.setenv(spaces.ZERO_GPU_ENV, "1")
    runs_dir = (tmp_path / "runs").resolve()
    runs_dir.mkdir()
    ctx = make_ctx(runs_dir)
    ctx.jobs.close()
    ctx.jobs = JobManager(runs_dir, poll_s=0.2, chunk_steps=2, gpu_duration_s=45)
    assert ctx.jobs.in_process
    try:
        form = {**FORM, "max_steps": STEPS}
        T.launch(ctx, str(DEMO), "tiny-llava", "SFT", "hit3", T.FROM_SCRATCH, *form.values(), "zero")
        done = ctx.jobs.wait("zero", timeout=400)
    finally:
        ctx.jobs.close()
    assert done.state == "finished", done.log_tail
    calls = sys.modules["spaces"].CALLS
    assert calls == [(45, "_one_call")] * 3 + [(45, "run_pipeline")], calls  # 6 steps, 2 per call, then eval
    assert "GPU call 3 (45 s): step 6/6" in done.log_tail
    run = runs_dir / "zero"
    # the same run unchunked, in one call (the configuration the tab wrote, another folder)
    cfg = runs.read_config(run)
    cfg.output_dir = str(tmp_path / "whole")
    whole = pipeline.run_pipeline(cfg, print_fn=lambda *a: None)
    assert metrics(run) == metrics(tmp_path / "whole")
    a, b = adapter(tmp_path / "whole"), adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert runs.read_results(run)["rows"] == whole["rows"]


def test_no_zero_gpu_without_the_spaces_package(monkeypatch):
    monkeypatch.setenv(spaces.ZERO_GPU_ENV, "true")
    monkeypatch.setattr(spaces.importlib.util, "find_spec", lambda name: None)
    assert not spaces.on_zero_gpu()


# The Space's front matter and requirements: tests/test_space_bundle.py.


def test_stop_on_zero_gpu_ends_the_running_call_and_no_other_starts(tmp_path, monkeypatch):
    from hanorec import runs
    from hanorec.jobs import JobManager

    fake_spaces_package(tmp_path, monkeypatch)
    monkeypatch.setenv(spaces.ZERO_GPU_ENV, "1")
    manager = JobManager(tmp_path / "runs", poll_s=0.2, chunk_steps=3)
    try:
        job = manager.submit(tiny_sft_overrides(tmp_path / "unused", 400, max_train_examples=48), name="long")
        end = time.time() + 300
        while not (manager.status(job).step or 0) >= 1 and time.time() < end:
            time.sleep(0.2)
        stopped = manager.stop(job)
        stopped = manager.wait(job, timeout=120)
    finally:
        manager.close()
    assert stopped.state == "stopped", stopped.log_tail
    assert "resume continues from the last checkpoint" in stopped.message
    ckpt = runs.latest_checkpoint(stopped.run_dir / "sft")
    assert ckpt is not None and 1 <= int(ckpt.name.split("-")[1]) < 400
    assert all(name == "_one_call" for _, name in sys.modules["spaces"].CALLS)  # no evaluation after a stop


@pytest.mark.slow
def test_hano_dpo_job_on_zero_gpu_chunks_sft_and_preference(tmp_path, monkeypatch):
    """A HaNo-DPO job from the Train tab on ZeroGPU trains SFT then HaNo-DPO, each in GPU calls that resume
    from the newest checkpoint, then evaluates in one more call; the HaNo-DPO adapter equals an unchunked run's."""
    from test_app_train import DEMO, FORM, make_ctx

    from app.tabs import train as T
    from hanorec import runs
    from hanorec.jobs import JobManager

    fake_spaces_package(tmp_path, monkeypatch)
    monkeypatch.setenv(spaces.ZERO_GPU_ENV, "1")
    runs_dir = (tmp_path / "runs").resolve()
    runs_dir.mkdir()
    ctx = make_ctx(runs_dir)
    ctx.jobs.close()
    ctx.jobs = JobManager(runs_dir, poll_s=0.2, chunk_steps=2)
    try:
        form = {**FORM, "max_steps": 4}
        T.launch(ctx, str(DEMO), "tiny-llava", "HaNo-DPO", "hit3", T.FROM_SCRATCH, *form.values(), "zero-pref")
        done = ctx.jobs.wait("zero-pref", timeout=900)
    finally:
        ctx.jobs.close()
    assert done.state == "finished", done.log_tail
    calls = sys.modules["spaces"].CALLS
    assert calls == [(60, "_one_call")] * 4 + [(60, "run_preference_pipeline")], calls
    run = runs_dir / "zero-pref"
    cfg = runs.read_config(run)
    cfg.output_dir = str(tmp_path / "whole")
    pipeline.run_sft(cfg)
    pipeline.run_preference_pipeline(cfg, print_fn=lambda *a: None)
    a = load_file(str(latest_checkpoint(tmp_path / "whole" / "hano_dpo") / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(latest_checkpoint(run / "hano_dpo") / "adapter" / "adapter_model.safetensors"))
    assert latest_checkpoint(run / "hano_dpo").name == "step-000004"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
