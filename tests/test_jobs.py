"""hanorec.jobs: background runs of the real CLI in subprocesses, one at a time, with a queue, stop and resume.

The subprocess tests train a tiny LLaVA for a few steps on a subset of the bundled demo data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hanorec import runs
from hanorec.config import ConfigError
from hanorec.jobs import JobError, JobManager, commands_for

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def fast(max_steps: int = 3, **sft) -> dict:
    return {
        "data": {"path": str(DEMO), "max_users": 30},
        "model": {"name": "tiny-llava", "tiny_hidden_size": 64, "tiny_vocab_size": 400},
        "lora": {"r": 4, "alpha": 8},
        "task": {"max_train_examples": 12, "max_eval_examples": 2},
        "sft": {"max_steps": max_steps, "batch_size": 2, "grad_accum": 1, "log_every": 1, "progress_bar": False, **sft},
        "pref": {"max_steps": max_steps, "batch_size": 3, "grad_accum": 1, "log_every": 1, "progress_bar": False},
        "eval": {"baselines": []},
    }


@pytest.fixture
def manager(tmp_path):
    m = JobManager(tmp_path / "runs", poll_s=0.2, env=ENV)
    yield m
    m.close()
    for job in m.jobs():  # never leave a training process behind
        if job.state in ("running", "queued"):
            m.stop(job.job_id)
            m.wait(job.job_id, timeout=60)


def wait_for(predicate, timeout=120.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow  # three CLI subprocesses: about a minute on 2 shared cores
def test_queue_one_at_a_time_stop_checkpoints_and_resume_finishes(manager):
    first = manager.submit(fast(3), name="first")
    second = manager.submit(fast(400), name="second")
    assert manager.status(first).state == "running"
    st = manager.status(second)
    assert st.state == "queued" and st.position == 1, st
    assert "position 1" in st.describe()

    done = manager.wait(first, timeout=240)
    assert done.state == "finished", done.log_tail
    assert done.step == 3 and done.total == 3 and done.fraction == 1.0
    assert runs.read_results(done.run_dir)["train_steps"] == 3  # `run` evaluated after SFT

    # the second starts once the first is done; stop it mid-training
    wait_for(lambda: manager.status(second).step, what="the second job's first logged step")
    running = manager.status(second)
    assert running.state == "running" and running.command == "run" and running.total == 400
    stopped = manager.stop(second)
    stopped = manager.wait(second, timeout=120)
    assert stopped.state == "stopped", stopped.log_tail
    ckpt = runs.latest_checkpoint(stopped.run_dir / "sft")
    step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    assert 1 <= step < 400 and ckpt.name == f"step-{step:06d}"
    with pytest.raises(JobError, match="only a stopped or failed job"):
        manager.resume(first)

    # resume: the same command again, continuing from the checkpoint (shorten the rest through its config)
    cfg = (stopped.run_dir / runs.CONFIG_FILE).read_text().replace("max_steps: 400", f"max_steps: {step + 2}")
    (stopped.run_dir / runs.CONFIG_FILE).write_text(cfg)
    manager.resume(second)
    done = manager.wait(second, timeout=240)
    assert done.state == "finished", done.log_tail
    assert f"resumed from {ckpt}" in done.log_tail
    assert done.step == step + 2
    info = {r.name: r for r in runs.list_runs(manager.runs_dir)}
    assert info["first"].status == "finished" and info["second"].status == "finished"


@pytest.mark.slow
def test_preference_job_trains_sft_then_the_variant(manager):
    job = manager.submit(fast(2), stage="HaNo-DPO w/o NoDO", name="pref")
    cfg = runs.read_config(manager.runs_dir / job)
    assert cfg.pref.method == "hano_dpo" and cfg.pref.noise_target == "none"
    done = manager.wait(job, timeout=300)
    assert done.state == "finished", done.log_tail
    assert runs.stages(done.run_dir) == ["sft", "hano_dpo"]
    assert done.command == "pref" and done.step == 2 and done.commands == ["sft", "pref"]
    assert runs.read_results(done.run_dir, "hano_dpo")["stage"] == "hano_dpo"
    # another variant from this run's SFT model: only `pref` runs
    other = manager.submit(fast(2), stage="DPO", name="dpo-only", sft_run=str(done.run_dir))
    done = manager.wait(other, timeout=300)
    assert done.state == "finished", done.log_tail
    assert runs.stages(done.run_dir) == ["dpo"]
    assert "$ python -m hanorec sft" not in done.log_tail and "$ python -m hanorec pref" in done.log_tail
    runs.load_stage(done.run_dir, "dpo")  # base and SFT adapter come from the other run


def test_a_failing_run_reports_the_cli_sentence(manager, tmp_path):
    empty = tmp_path / "empty-model"  # a folder: accepted when queued, refused by the run (no config.json)
    empty.mkdir()
    job = manager.submit({**fast(2), "model": {"name": str(empty)}}, name="bad")
    done = manager.wait(job, timeout=120)
    assert done.state == "failed"
    assert "empty-model" in done.message and "config.json" in done.message and "\n" not in done.message


# ------------------------------------------------------------------------------------------------
# no subprocess: the queue lives in the run folders
# ------------------------------------------------------------------------------------------------
def test_queue_survives_a_restart_and_stop_removes_from_it(tmp_path):
    m = JobManager(tmp_path, autostart=False)
    m.tick = lambda: None  # nothing starts: look at the queue alone
    a, b, c = (m.submit(fast(2), name=n) for n in ("a", "b", "c"))
    assert m.queue() == ["a", "b", "c"]
    again = JobManager(tmp_path, autostart=False)
    again.tick = lambda: None
    assert [again.status(j).position for j in (a, b, c)] == [1, 2, 3]
    again.stop(b)
    assert again.status(b).state == "stopped" and again.status(c).position == 2
    again.resume(b)
    assert again.queue() == ["a", "c", "b"]
    assert [j.job_id for j in again.jobs()] == ["a", "c", "b"]


def test_bad_requests_are_one_sentence(tmp_path):
    m = JobManager(tmp_path, autostart=False)
    with pytest.raises(ConfigError, match="sft.lr"):
        m.submit({"sft": {"lr": -1}})
    with pytest.raises(JobError, match="dataset folder .*nowhere does not exist"):
        m.submit({"data": {"path": str(tmp_path / "nowhere")}})
    with pytest.raises(JobError, match="stage 'PPO' is not one of"):
        m.submit(stage="PPO")
    with pytest.raises(JobError, match="no job named 'x'"):
        m.status("x")
    with pytest.raises(JobError, match="has no SFT checkpoint"):
        m.submit(stage="DPO", sft_run=str(tmp_path))
    with pytest.raises(JobError, match="may use letters"):
        m.submit(name="../escape")
    assert list(tmp_path.iterdir()) == [] or all(p.name.startswith(".") for p in tmp_path.iterdir())


def test_commands_per_stage():
    from hanorec.jobs import JobStatus

    running = JobStatus("j", Path("j"), "running", command="pref", step=3, total=30, commands=["sft", "pref"])
    assert running.describe() == "j: running pref (command 2 of 2), step 3/30"
    assert commands_for("SFT") == ["run"]
    assert commands_for("HaNo-DPO") == ["sft", "pref"]
    assert commands_for("S-DPO", sft_run="runs/x") == ["pref"]


def test_runner_stops_at_the_first_failing_command_with_its_sentence(tmp_path):
    """`python -m hanorec.jobs <run>` runs the job's CLI commands in order; a failing one ends the job."""
    import os
    import subprocess
    import sys

    run = tmp_path / "job"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "job.json").write_text(json.dumps({"stage": "SFT", "commands": ["config", "trian", "run"]}))
    runs.write_status(run, "queued")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(run / "job.log", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "hanorec.jobs", str(run)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, timeout=120).returncode  # fmt: skip
    st = runs.read_status(run)
    assert rc == 2 and st["status"] == "failed", (run / "job.log").read_text()
    assert st["message"].startswith("unknown command 'trian'") and st.get("runner_pid") is None
    text = (run / "job.log").read_text()
    assert "$ python -m hanorec config" in text and "seed: 0" in text and "hanorec run" not in text


def test_a_cli_run_in_the_same_folder_holds_the_queue(tmp_path):
    import os

    runs.write_status(tmp_path / "by-hand", "running", command="sft", pid=os.getpid())  # alive: this process
    m = JobManager(tmp_path, autostart=False)
    job = m.submit(fast(2), name="waits")
    assert m.running() == "by-hand"
    assert m.status(job).state == "queued" and m.status(job).position == 1
    m.stop(job)
    assert m.status(job).state == "stopped"


def test_device_reaches_the_run_through_its_environment():
    from hanorec.jobs import device_env

    assert device_env(None) == device_env("auto") == device_env("cuda") == {}
    assert device_env("cpu") == {"CUDA_VISIBLE_DEVICES": ""}
    assert device_env("cuda:1") == {"CUDA_VISIBLE_DEVICES": "1"}
    with pytest.raises(JobError, match="'tpu' is not one of"):
        JobManager("unused-never-created", device="tpu", autostart=False)
