"""The app on a trained run: a tiny SFT + HaNo-DPO run, then the Hardness tab's per-pair training view
and the Noise lab on its preference stage (slow: training takes about half a minute on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gradio")

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from hanorec.config import load_config
    from hanorec.pipeline import prepare_data, run_preference, run_sft

    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        overrides={
            "seed": 0,
            "output_dir": str(runs / "tiny"),
            "data": {"path": str(DEMO), "max_users": 40},
            "model": {"name": "tiny-llava", "tiny_hidden_size": 64, "tiny_vocab_size": 400},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "task": {"name": "hit3", "max_train_examples": 12, "max_eval_examples": 2},
            "sft": {"max_steps": 2, "lr": 1e-2, "batch_size": 3, "grad_accum": 1, "progress_bar": False},
            "pref": {"method": "hano_dpo", "max_steps": 2, "lr": 1e-2, "batch_size": 3, "grad_accum": 1,
                     "progress_bar": False},
        }
    )  # fmt: skip
    data = prepare_data(cfg)
    run_sft(cfg, data)
    run_preference(cfg, data)
    return runs


@pytest.fixture(scope="module")
def ctx(trained):
    from app.main import make_context

    c = make_context([str(DEMO)], str(trained), "cpu")
    yield c
    if c.jobs is not None:
        c.jobs.close()


class _NoProgress:
    def __call__(self, *args, **kwargs):
        pass


def test_models_of_the_run_are_listed(ctx, trained):
    values = [v for _, v in ctx.model_choices()]
    assert "runs/tiny::sft" in values and "runs/tiny::hano_dpo" in values  # public names, not the server's path
    assert ctx.resolve_path("runs/tiny") == (trained / "tiny").resolve()


def test_hardness_lambda_equals_what_training_used(ctx, trained):
    from safetensors.torch import load_file

    from app.tabs import hardness

    stage = f"{trained / 'tiny'}::hano_dpo"
    text, _, table, users = hardness.compute(ctx, str(DEMO), "hit3", stage, 10, 1.0, "random", 0)
    cached = load_file(next((trained / "tiny" / "hardness_cache").glob("*.safetensors")))["lambda"]
    assert len(table) == len(cached) == 12
    assert abs(table["lambda"].to_numpy() - cached.numpy()).max() < 1e-5  # the same lambdas training used


def test_per_pair_training_view(ctx, trained):
    from app.tabs import hardness

    stage = f"{trained / 'tiny'}::hano_dpo"
    text, df, fig = hardness.score_pairs(ctx, str(DEMO), "hit3", stage, progress=_NoProgress())
    assert len(df) == 12 and "reward accuracy" in text
    assert set(df.columns) >= {"pair", "user", "lambda", "beta", "reward_margin", "accurate"}
    # margin = beta * h and accuracy = margin > 0, pair by pair
    assert ((df["reward_margin"] > 0) == df["accurate"]).all()
    assert (abs(df["beta"] - 0.1 * df["lambda"]) < 1e-5).all()
    prompt, chosen, rejected, images = hardness.pair_prompt(ctx, str(DEMO), "hit3", stage, 3)
    assert prompt.count("<image>") == len(images) == 3 and chosen.count("\n") == 2


def test_noise_lab_on_a_trained_stage(ctx, trained):
    from app.tabs import noise

    stage = f"{trained / 'tiny'}::hano_dpo"
    from app.common import users_for

    u = users_for(ctx, str(DEMO), "hit3")["value"]
    text, fig, table = noise.draw_noise(ctx, str(DEMO), "hit3", u, stage, "lora", 0.05, 10, 0)
    assert "rms(B)" in text and "rms(B) = 0 " not in text  # a trained adapter has B != 0
    assert (table["shift_std"] > 0).all()
