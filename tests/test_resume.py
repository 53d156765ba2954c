"""A run killed at any moment (before its first checkpoint, or between checkpoints) and started again with the
same command reaches the same weights, metrics log and results as an uninterrupted run (issue: SIGKILL
before the first checkpoint used to start over from a different LoRA init and log steps twice)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_sft_overrides
from safetensors.torch import load_file

from hanorec import pipeline
from hanorec.config import load_config
from hanorec.train.checkpoint import checkpoint_dirs, latest_checkpoint
from hanorec.train.loop import trim_metrics_log

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def overrides(out: Path, steps: int = STEPS, **sft) -> dict:
    return tiny_sft_overrides(out, steps, **sft)


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows]


def final_adapter(run_dir: Path) -> dict:
    return load_file(str(latest_checkpoint(run_dir / "sft") / "adapter" / "adapter_model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(b) == losses(a)  # every step once, the same losses and learning rates, bit for bit
    wa, wb = final_adapter(a), final_adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_killed_before_the_first_checkpoint_restarts_to_the_same_result(tmp_path, capsys):
    """In one process: an uninterrupted run; a run that dies at step 3 (no checkpoint yet, base model and
    3 metrics lines already written); the global RNG disturbed; the rerun must equal the first run."""
    a, b = tmp_path / "a", tmp_path / "b"
    pipeline.run_sft(load_config(overrides=overrides(a)))

    class Killed(Exception):
        pass

    def die_at_3(record):
        if record["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        pipeline.run_sft(load_config(overrides=overrides(b)), on_log=die_at_3)
    assert latest_checkpoint(b / "sft") is None and len(losses(b)) == 3
    assert (b / "sft" / "base_model" / "config.json").is_file()
    torch.rand(1000)  # whatever ran before must not change the adapter's init
    capsys.readouterr()
    pipeline.run_sft(load_config(overrides=overrides(b)))
    assert "starting over at step 0" in capsys.readouterr().out
    assert_same_run(a, b)


def test_every_event_carries_stage_step_total_epoch_elapsed(tmp_path):
    events = []
    cfg = load_config(overrides=overrides(tmp_path, steps=3))
    data = pipeline.prepare_data(cfg, on_log=events.append)
    pipeline.run_sft(cfg, data, on_log=events.append)
    stages = [e["stage"] for e in events]
    assert stages[:5] == ["data"] * 5 and stages[5:] == ["sft"] * 3
    for e in events:
        assert {"stage", "step", "total_steps", "epoch", "elapsed_s"} <= e.keys(), e
        assert 0 < e["step"] <= e["total_steps"] and e["elapsed_s"] >= 0
    assert [e["step"] for e in events if e["stage"] == "sft"] == [1, 2, 3]
    assert events[-1]["total_steps"] == 3


def test_should_stop_during_data_preparation(tmp_path):
    from hanorec.progress import StopRequested

    polls = []

    def stop_on_second_poll():
        polls.append(1)
        return len(polls) >= 2

    with pytest.raises(StopRequested) as info:
        pipeline.prepare_data(load_config(overrides=overrides(tmp_path)), should_stop=stop_on_second_poll)
    assert info.value.stage == "data" and info.value.step == 1


def test_should_stop_during_hardness(ds):
    from hanorec.hardness import item_embeddings
    from hanorec.models import build_tiny
    from hanorec.progress import StopRequested
    from hanorec.tasks import corpus_text

    bundle = build_tiny("tiny-llava", corpus_text(ds), hidden_size=64, vocab_size=400)
    events = []
    with pytest.raises(StopRequested):
        item_embeddings(bundle, ds, batch_size=64, on_log=events.append, should_stop=lambda: len(events) >= 2)
    assert [e["step"] for e in events] == [1, 2] and events[0]["stage"] == "hardness"
    assert events[0]["total_steps"] == -(-len(ds.items) // 64)


def test_loop_refuses_zero_items(tmp_path):
    from hanorec.train.loop import EmptyTrainingSet, train_loop

    cfg = load_config(overrides=overrides(tmp_path))
    with pytest.raises(EmptyTrainingSet, match="no training examples"):
        train_loop(
            model=torch.nn.Linear(2, 1), items=[], collate=torch.stack, loss_fn=None, train_cfg=cfg.sft,
            seed=0, output_dir=tmp_path, config_yaml="",
        )  # fmt: skip


def test_trim_metrics_log_keeps_each_step_once(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    assert trim_metrics_log(log, 5) == 3
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_time_based_checkpoints_do_not_change_training(tmp_path):
    """save_every_minutes tiny enough to checkpoint after every step gives the same weights as none."""
    a, b = tmp_path / "a", tmp_path / "b"
    pipeline.run_sft(load_config(overrides=overrides(a, steps=4)))
    pipeline.run_sft(load_config(overrides=overrides(b, steps=4, save_every_minutes=1e-9, keep_checkpoints=5)))
    assert [p.name for p in checkpoint_dirs(b / "sft")] == [f"step-{k:06d}" for k in range(1, 5)]
    assert_same_run(a, b)


# ------------------------------------------------------------------------------------------------
# The real command, killed with SIGKILL
# ------------------------------------------------------------------------------------------------
def cli_args(out: Path, steps: int, save_every: int) -> list[str]:
    o = overrides(out, steps=steps, save_every=save_every)
    args = ["--seed=0", f"--output_dir={out}"]
    for section in ("data", "task", "model", "lora", "sft", "eval"):
        for k, v in o[section].items():
            args.append(f"--{section}.{k}={json.dumps(v) if isinstance(v, list) else v}")
    return [sys.executable, "-m", "hanorec", "run", *args]


def start(out: Path, steps: int, save_every: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cli_args(out, steps, save_every), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def kill_when(proc: subprocess.Popen, out: Path, step: int) -> None:
    log = out / "sft" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= step:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.01)
    raise AssertionError(f"the run ended before step {step}: {proc.communicate()[0]}")


@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_gives_the_uninterrupted_result(tmp_path):
    steps, save_every = 30, 10
    ref = tmp_path / "ref"
    done = subprocess.run(cli_args(ref, steps, save_every), cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    expected = json.loads((ref / "results.json").read_text())["rows"]
    for name, kill_at, message in (("early", 2, "starting over at step 0"), ("mid", 13, "resumed from")):
        out = tmp_path / name
        kill_when(start(out, steps, save_every), out, kill_at)
        if name == "early":
            assert latest_checkpoint(out / "sft") is None, "killed before the first checkpoint"
        else:
            assert latest_checkpoint(out / "sft") is not None
        again = subprocess.run(cli_args(out, steps, save_every), cwd=REPO, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)  # fmt: skip
        assert again.returncode == 0, again.stdout + again.stderr
        assert message in again.stdout, again.stdout
        assert_same_run(ref, out)
        assert json.loads((out / "results.json").read_text())["rows"] == expected


def test_resuming_with_another_configuration_says_what_differs(tmp_path, capsys):
    pipeline.run_sft(load_config(overrides=overrides(tmp_path, steps=2)))
    capsys.readouterr()
    pipeline.run_sft(load_config(overrides=overrides(tmp_path, steps=3, lr=5e-4, progress_bar=False)))
    out = capsys.readouterr().out
    assert "resumed from" in out and "differs from the checkpoint's in sft.lr, sft.max_steps" in out
    assert "another --output_dir" in out


def test_a_stop_between_two_log_lines_keeps_the_log_identical(tmp_path):
    """Stopped at step 3 with a log line every 4 steps: the resumed run's step-4 line still averages steps
    1-4, so metrics.jsonl equals the uninterrupted run's."""
    a, b = tmp_path / "a", tmp_path / "b"
    pipeline.run_sft(load_config(overrides=overrides(a, steps=6, log_every=4)))
    polls = []
    _, r = pipeline.run_sft(
        load_config(overrides=overrides(b, steps=6, log_every=4)), should_stop=lambda: polls.append(1) or len(polls) >= 3
    )
    assert r.stopped_early and r.global_step == 3
    pipeline.run_sft(load_config(overrides=overrides(b, steps=6, log_every=4)))
    assert_same_run(a, b)
