"""hanorec.runs: a run folder read back (stages, status, metrics, results) and every stage's model reloaded.

One tiny run (a few SFT steps, then a few HaNo-DPO steps) is trained once for the module; reloading a stage
must give back exactly the model the training process held at its end, and a model that differs from the
one it started from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hanorec import runs
from hanorec.config import load_config
from hanorec.models import add_lora
from hanorec.scoring import score_options
from hanorec.tasks import render

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo"


def tiny_cfg(out: Path, **pref):
    return load_config(
        overrides={
            "seed": 0,
            "output_dir": str(out),
            "data": {"path": str(DEMO), "max_users": 40},
            "model": {"name": "tiny-llava", "tiny_hidden_size": 64, "tiny_vocab_size": 400},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "task": {"name": "hit3", "max_train_examples": 6, "max_eval_examples": 2},
            "sft": {"max_steps": 2, "lr": 1e-2, "batch_size": 3, "grad_accum": 1, "progress_bar": False},
            "pref": {
                "method": "hano_dpo",
                "max_steps": 2,
                "lr": 1e-2,
                "batch_size": 3,
                "grad_accum": 1,
                "log_every": 1,
                "progress_bar": False,
                **pref,
            },
        }
    )


def scores(bundle, data) -> torch.Tensor:
    ex = data.test[:2]
    prompts = [bundle.encode_prompt(r.text, r.images) for r in (render(e, data.dataset) for e in ex)]
    return torch.cat(score_options(bundle, prompts, [e.options for e in ex]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SFT then HaNo-DPO into one run folder; the scores each training process held at its end."""
    from hanorec.pipeline import prepare_data, run_preference, run_sft

    out = tmp_path_factory.mktemp("run") / "tiny"
    cfg = tiny_cfg(out)
    data = prepare_data(cfg)
    sft_bundle, sft_result = run_sft(cfg, data)
    sft_scores = scores(sft_bundle, data)
    pref_bundle, pref_result = run_preference(cfg, data)
    pref_scores = scores(pref_bundle, data)
    sdpo_bundle, _ = run_preference(tiny_cfg(out, method="sdpo", k_negatives=3, noise_target="none"), data,
                                    name="s-dpo")  # fmt: skip
    assert sft_result.global_step == 2 and pref_result.global_step == 2
    return {"out": out, "cfg": cfg, "data": data, "sft": sft_scores, "hano_dpo": pref_scores,
            "s-dpo": scores(sdpo_bundle, data)}  # fmt: skip


def test_every_stage_reloads_to_the_model_training_ended_with(trained):
    out, data = trained["out"], trained["data"]
    assert runs.stages(out) == ["sft", "hano_dpo", "s-dpo"]
    base = runs.base_model(trained["cfg"], out / "sft")
    base_scores = scores(base, data)
    sft = runs.load_stage(out, "sft")
    pref = runs.load_stage(out, "hano_dpo")
    got_sft, got_pref = scores(sft, data), scores(pref, data)
    torch.testing.assert_close(got_sft, trained["sft"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got_pref, trained["hano_dpo"], rtol=0, atol=1e-5)
    assert (got_sft - base_scores).abs().max() > 1e-3, "SFT moved the scores away from the base model"
    assert (got_pref - got_sft).abs().max() > 1e-3, "HaNo-DPO moved the scores away from SFT"
    assert sft.meta["checkpoint"].endswith("sft/checkpoints/step-000002")
    assert pref.meta["checkpoint"].endswith("hano_dpo/checkpoints/step-000002")
    assert not sft.model.training and not pref.model.training
    got_sdpo = scores(runs.load_stage(out, "s-dpo"), data)  # a comparison-style folder name, K = 3
    torch.testing.assert_close(got_sdpo, trained["s-dpo"], rtol=0, atol=1e-5)
    assert (got_sdpo - got_sft).abs().max() > 1e-3 and (got_sdpo - got_pref).abs().max() > 1e-3


def test_a_fresh_lora_on_the_base_scores_like_the_base(trained):
    """The comparison above is meaningful: an untrained LoRA (B = 0) does not move a score."""
    cfg, data = trained["cfg"], trained["data"]
    base = runs.base_model(cfg, trained["out"] / "sft")
    before = scores(base, data)
    add_lora(base, cfg.lora)
    torch.testing.assert_close(scores(base, data), before, rtol=0, atol=0)


def test_preference_stage_records_its_sft_checkpoint_and_survives_a_move(trained, tmp_path):
    import shutil

    src = json.loads((trained["out"] / "hano_dpo" / runs.SFT_SOURCE_FILE).read_text())
    assert src["checkpoint"].endswith("sft/checkpoints/step-000002")
    moved = tmp_path / "moved"
    shutil.copytree(trained["out"], moved)
    (moved / "sft" / "checkpoints" / "step-000002").rename(moved / "sft" / "checkpoints" / "step-000003")
    src["checkpoint"] = str(tmp_path / "gone")
    (moved / "hano_dpo" / runs.SFT_SOURCE_FILE).write_text(json.dumps(src))
    pref = runs.load_stage(moved, "hano_dpo")  # found by the adapter's digest
    assert pref.meta["sft_checkpoint_path"].endswith("step-000003")
    torch.testing.assert_close(scores(pref, trained["data"]), trained["hano_dpo"], rtol=0, atol=1e-5)


def test_metrics_and_listing(trained):
    out = trained["out"]
    rows = runs.read_metrics(out, "hano_dpo")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["stage"] == "hano_dpo" and "rewards/margins" in r for r in rows)
    every = runs.read_metrics(out)
    assert [r["stage_dir"] for r in every] == ["sft", "hano_dpo", "hano_dpo", "s-dpo", "s-dpo"]
    assert every[-1]["stage"] == "sdpo"  # the loss it trained with; stage_dir is the folder
    (info,) = runs.list_runs(out.parent)
    assert info.name == "tiny" and info.stages == ["sft", "hano_dpo", "s-dpo"]
    assert [runs.stage_label(info.config, s) for s in info.stages] == ["SFT", "HaNo-DPO", "S-DPO"]
    assert info.status == "finished"  # no status.json (not started by the CLI): it holds checkpoints
    assert info.config["pref"]["method"] == "hano_dpo"


def test_missing_stage_is_one_sentence(trained):
    with pytest.raises(runs.RunError, match=r"no checkpoint found at .*dpo.*stages present: sft, hano_dpo, s-dpo"):
        runs.load_stage(trained["out"], "dpo")


def test_evaluate_command_scores_the_named_stage(trained, capsys):
    from hanorec.cli import main

    out = trained["out"]
    code = main(["evaluate", f"--data.path={DEMO}", "--data.max_users=40", f"--output_dir={out}",
                 "--task.max_eval_examples=2", "--eval.baselines=[]", "--stage=hano_dpo"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    assert f"scoring hano_dpo checkpoint {out / 'hano_dpo' / 'checkpoints' / 'step-000002'}" in text


# ------------------------------------------------------------------------------------------------
# status
# ------------------------------------------------------------------------------------------------
def test_track_status_finished_stopped_failed(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    with runs.track_status(run, "sft"):
        assert runs.read_status(run)["status"] == "running"
        assert runs.read_status(run)["pid"] == os.getpid()
    assert runs.read_status(run)["status"] == "finished"
    with runs.track_status(run, "sft", should_stop=lambda: True):
        pass
    assert runs.read_status(run)["status"] == "stopped"
    with pytest.raises(ValueError), runs.track_status(run, "pref"):
        raise ValueError("pref.beta = -1 must be > 0")
    st = runs.read_status(run)
    assert st["status"] == "failed" and st["message"] == "pref.beta = -1 must be > 0"


def test_a_run_that_cannot_start_leaves_no_folder(tmp_path):
    with pytest.raises(ValueError), runs.track_status(tmp_path / "new", "sft"):
        raise ValueError("no dataset")
    assert not (tmp_path / "new").exists()


def test_running_with_a_dead_pid_reads_failed(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    runs.write_status(tmp_path, "running", pid=int(proc.stdout))
    st = runs.read_status(tmp_path)
    assert st["status"] == "failed" and "ended without recording" in st["message"]
