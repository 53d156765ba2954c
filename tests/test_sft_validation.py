"""SFT validation after every epoch with early stopping (issue 8: SFT long enough that validation stops rising).

Tiny runs: 8 training examples, batch 2 x grad-acc 2 = 2 optimizer steps per epoch, 12 validation examples."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_sft_overrides
from safetensors.torch import load_file

from hanorec import pipeline
from hanorec.config import ConfigError, load_config
from hanorec.train import sft as sft_module
from hanorec.train.checkpoint import checkpoint_dirs, latest_checkpoint
from hanorec.train.loop import Validation

STEPS_PER_EPOCH = 2


def overrides(out: Path, epochs: int = 3, task: str = "hit3", **sft) -> dict:
    o = tiny_sft_overrides(out, steps=1, max_train_examples=4 * STEPS_PER_EPOCH)
    o["sft"].update(max_steps=None, epochs=epochs, keep_checkpoints=10, **sft)
    o["task"]["name"] = task
    return o


def log_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]


def adapter(ckpt: Path) -> dict:
    return load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_after_every_epoch_is_logged_and_does_not_change_training(tmp_path):
    events = []
    _, r = pipeline.run_sft(load_config(overrides=overrides(tmp_path / "v", val_every_epoch=True)), on_log=events.append)
    assert [(v["step"], v["epoch"]) for v in r.validation] == [(2, 1.0), (4, 2.0), (6, 3.0)]
    assert all(v["metric"] == "HR@3" and v["metrics"]["n"] == 12 for v in r.validation)
    val_lines = [row for row in log_rows(tmp_path / "v") if "val/HR@3" in row]
    assert [row["step"] for row in val_lines] == [2, 4, 6]
    assert [row["val/HR@3"] for row in val_lines] == [v["value"] for v in r.validation]
    assert [e["step"] for e in events if "val/HR@3" in e] == [2, 4, 6]
    assert r.best["value"] == max(v["value"] for v in r.validation) and r.kept == "last"
    # validating (model.eval, scoring, RNG restored) never changes the training trajectory
    pipeline.run_sft(load_config(overrides=overrides(tmp_path / "plain")))
    losses = [(row["step"], row["loss"]) for row in log_rows(tmp_path / "v") if "loss" in row]
    assert losses == [(row["step"], row["loss"]) for row in log_rows(tmp_path / "plain")]
    assert same_weights(adapter(latest_checkpoint(tmp_path / "v" / "sft")), adapter(latest_checkpoint(tmp_path / "plain" / "sft")))


def scripted(values: list[float], seen: list):
    """A validation whose metric follows `values`, one per call (a forced curve)."""

    def make(cfg, bundle, ds, val_examples):
        def evaluate(model):
            v = values[len(seen)]
            seen.append(v)
            return {"HR@3": v, "n": 1}

        return Validation(evaluate=evaluate, metric="HR@3", patience=cfg.sft.patience)

    return make


def test_patience_stops_early_and_keeps_the_best_adapter(tmp_path, monkeypatch, capsys):
    seen: list = []
    monkeypatch.setattr(sft_module, "sft_validation", scripted([0.3, 0.5, 0.4, 0.9, 0.9], seen))
    bundle, r = pipeline.run_sft(load_config(overrides=overrides(tmp_path, epochs=5, patience=1)))
    assert seen == [0.3, 0.5, 0.4], "epoch 3 did not improve on epoch 2: patience 1 ends training there"
    assert r.early_stopped and not r.stopped_early and r.global_step == 3 * STEPS_PER_EPOCH < r.total_steps
    assert r.kept == "best" and r.best["step"] == 2 * STEPS_PER_EPOCH and r.best["value"] == 0.5
    steps = [int(p.name.split("-")[1]) for p in checkpoint_dirs(tmp_path / "sft")]
    assert steps == [2, 4, 6]
    best, final = adapter(tmp_path / "sft" / "checkpoints" / "step-000004"), adapter(latest_checkpoint(tmp_path / "sft"))
    assert same_weights(final, best), "the stage's final adapter is the best validation's"
    from peft import get_peft_model_state_dict

    live = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(bundle.model).items()}
    assert same_weights(live, best), "the returned model holds the best adapter too"
    assert "stopped early after 3 validations" in capsys.readouterr().out
    # a rerun of the same command finds the finished stage: no more training, the same adapter
    seen.clear()
    _, again = pipeline.run_sft(load_config(overrides=overrides(tmp_path, epochs=5, patience=1)))
    assert seen == [] and again.global_step == r.global_step and again.kept == "best"
    assert same_weights(adapter(latest_checkpoint(tmp_path / "sft")), best)


def test_killed_between_a_validation_and_its_checkpoint_resumes_to_the_same_history(tmp_path):
    """save_every = steps per epoch puts a checkpoint at each epoch's last step before its validation; the
    run dies right after the epoch-2 validation is logged, and the rerun validates again (one line, the
    same value) and ends as the uninterrupted run: same losses, validation history and adapter."""
    o = dict(val_every_epoch=True, patience=2, save_every=STEPS_PER_EPOCH)
    a, b = tmp_path / "a", tmp_path / "b"
    _, ra = pipeline.run_sft(load_config(overrides=overrides(a, epochs=4, **o)))

    class Killed(Exception):
        pass

    def die(e):
        if "val/HR@3" in e and e["step"] == 2 * STEPS_PER_EPOCH:
            raise Killed

    with pytest.raises(Killed):
        pipeline.run_sft(load_config(overrides=overrides(b, epochs=4, **o)), on_log=die)
    state = json.loads((latest_checkpoint(b / "sft") / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [v["step"] for v in state["val"]["history"]] == [2]
    _, rb = pipeline.run_sft(load_config(overrides=overrides(b, epochs=4, **o)))
    assert rb.validation == ra.validation and rb.best == ra.best and rb.kept == ra.kept
    strip = [{k: v for k, v in row.items() if k != "elapsed_s"} for row in log_rows(a)]
    assert [{k: v for k, v in row.items() if k != "elapsed_s"} for row in log_rows(b)] == strip
    assert same_weights(adapter(latest_checkpoint(a / "sft")), adapter(latest_checkpoint(b / "sft")))


def test_hit1_validates_with_auc_and_a_wrong_metric_is_one_sentence(tmp_path):
    _, r = pipeline.run_sft(load_config(overrides=overrides(tmp_path, epochs=1, task="hit1", val_every_epoch=True)))
    assert [v["metric"] for v in r.validation] == ["AUC"] and 0 <= r.validation[0]["value"] <= 1
    assert "val/AUC" in log_rows(tmp_path)[-1]
    cfg = load_config(overrides=overrides(tmp_path / "x", task="hit1", val_metric="HR@3", patience=1))
    with pytest.raises(ConfigError, match="sft.val_metric = 'HR@3' is not a metric of task hit1"):
        sft_module.val_metric_name(cfg)


def test_early_stopping_refuses_a_sharded_run_with_one_sentence(tmp_path, monkeypatch):
    # the best-validation weights are plain parameter copies: under FSDP they would be one process's shard
    import hanorec.train.sharding as sharding

    monkeypatch.setattr(sharding, "cpu_fsdp_requested", lambda acc: True)
    with pytest.raises(ValueError, match="early stopping .* does not run under FSDP or DeepSpeed"):
        pipeline.run_sft(load_config(overrides=overrides(tmp_path / "s", patience=1)))
