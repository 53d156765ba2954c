"""The Train tab's handlers, called directly (no browser): launch, watch, stop, resume, compare.

The runs are real: a subprocess of the CLI trains a tiny model for a few steps on the bundled demo data.
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import pytest

from app.tabs import train as T
from hanorec import presets, runs
from hanorec.config import load_config
from hanorec.jobs import JobManager

DEMO = (Path(__file__).resolve().parents[1] / "assets" / "demo").resolve()
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class _Ctx:
    """The AppContext contract (data_dirs, runs_dir, jobs, resolve_path, device) for handler tests."""

    def __init__(self, runs_dir: Path):
        self.data_dirs = [DEMO]
        self.runs_dir = runs_dir
        self.device = "cpu"
        self.jobs = JobManager(runs_dir, poll_s=0.2, env=ENV)

    def resolve_path(self, text: str) -> Path:
        path = Path(text).resolve()
        if not any(path == d or d in path.parents for d in (*self.data_dirs, self.runs_dir)) or not path.exists():
            raise gr.Error(f"{text} is not inside the allowed folders.")
        return path


def make_ctx(runs_dir: Path):
    try:
        from app.common import AppContext
    except ImportError:
        return _Ctx(runs_dir)
    return AppContext(data_dirs=[DEMO], runs_dir=runs_dir, device="cpu",
                      jobs=JobManager(runs_dir, poll_s=0.2, env=ENV))  # fmt: skip


@pytest.fixture
def ctx(tmp_path):
    runs_dir = (tmp_path / "runs").resolve()
    runs_dir.mkdir()
    c = make_ctx(runs_dir)
    yield c
    c.jobs.close()
    for job in c.jobs.jobs():
        if job.state in ("running", "queued"):
            c.jobs.stop(job.job_id)
            c.jobs.wait(job.job_id, timeout=60)


FORM = dict(
    beta0=0.1, sigma=0.05, noise_target="lora", k_negatives=3, sampling="random", epochs=1, lr=None,
    max_steps=3, eval_examples=2, log_with=T.NO_TRACKER, seed=0,
)  # fmt: skip


def launch(ctx, stage="SFT", backbone="tiny-llava", name="", **form):
    fields = {"dataset": str(DEMO), "backbone": backbone, "stage": stage, "task": "hit3", "sft_from": T.FROM_SCRATCH}
    return T.launch_form(ctx, {**fields, **FORM, **form, "name": name})


def poll_until(ctx, job, states, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        out = T.poll(ctx, job)
        if any(f"{job}: {s}" in out[0] for s in states):
            return out
        time.sleep(0.3)
    raise AssertionError(f"{job} did not reach {states}: {T.poll(ctx, job)[0]}\n{T.poll(ctx, job)[3]}")


def test_form_overrides_per_stage():
    sft = T.form_overrides("d", "tiny-llava", "SFT", "hit3", lr=1e-3, max_steps=30, log_with="tensorboard")
    assert sft["sft"]["lr"] == 1e-3 and "lr" not in sft["pref"]
    assert sft["sft"]["max_steps"] == 30 and "lora" not in sft  # the tiny model's LoRA: the lesson preset's
    assert T.base_config("tiny-llava") == presets.lab_path() and T.base_config("org/model") is None
    assert sft["sft"]["log_with"] == "tensorboard" == sft["pref"]["log_with"]
    hano = T.form_overrides("d", "tiny-llava", "HaNo-DPO", "hit1", beta0=0.2, sigma=0.1, noise_target="logits",
                            sampling="embedding", lr=5e-4, max_steps=10)  # fmt: skip
    assert hano["pref"]["beta"] == 0.2 and hano["pref"]["noise_sigma"] == 0.1
    assert hano["pref"]["noise_target"] == "logits" and hano["pref"]["negative_sampling"] == "embedding"
    assert hano["pref"]["lr"] == 5e-4 and hano["task"]["name"] == "hit1"
    assert hano["pref"]["max_pairs"] == 10 * presets.lab_config().pref.batch_size  # each pair once in 10 steps
    assert "noise_target" not in T.form_overrides("d", "tiny-llava", "HaNo-DPO w/o NoDO", "hit3")["pref"]
    assert T.form_overrides("d", "tiny-llava", "S-DPO", "hit3", k_negatives=3)["pref"]["k_negatives"] == 3
    real = T.form_overrides("d", "org/model", "SFT", "hit3")
    assert "lora" not in real and real["model"]["name"] == "org/model"
    lab = presets.lab_config({"data": {"path": str(DEMO)}})
    assert load_config(T.base_config("tiny-llava"), sft).lora.modules_to_save == lab.lora.modules_to_save


def test_picking_a_stage_shows_its_loss_paper_and_only_its_knobs():
    text, beta, sigma, noise_target, k_neg, addons, *options = T.method_view("SimPO")
    assert "2405.14734" in text and "gamma" in text
    shown = {f for f, o in zip(T.option_fields(), options) if o["visible"]}
    assert shown == {"simpo.gamma"} and beta["visible"] and not k_neg["visible"]
    assert addons["choices"] == ["NoDO"] and sigma["visible"]  # SimPO has no beta for HaRS; NoDO can be added
    text, beta, sigma, noise_target, k_neg, addons, *options = T.method_view("HaNo-DPO")
    options = options[: len(T.option_fields())]  # then HaRS' K and temperature, the learning rate and the steps
    assert sigma["visible"] and noise_target["visible"] and not any(o["visible"] for o in options)
    assert not addons["visible"]  # HaRS and NoDO are its own
    assert T.method_view("S-DPO")[4]["visible"] and T.method_view("S-DPO")[5]["choices"] == ["HaRS", "NoDO"]
    over = T.form_overrides("d", "tiny-llava", "SimPO", "hit3", options={"simpo.gamma": 1.5, "cdpo.epsilon": 0.2})
    assert over["pref"]["options"] == {"gamma": 1.5} and "noise_target" not in over["pref"]
    both = T.form_overrides("d", "tiny-llava", "S-DPO", "hit3", addons=["HaRS", "NoDO"], noise_target="logits")
    assert both["pref"]["hars"] is True and both["pref"]["noise_target"] == "logits"


def test_past_runs_table_compare_and_curves_of_a_finished_run(ctx):
    """A run made in-process (the CLI's `run`) is listed, compared and drawn."""
    from hanorec.pipeline import run_pipeline

    over = T.form_overrides(str(DEMO), "tiny-llava", "SFT", "hit3", max_steps=3, eval_examples=2)
    cfg = load_config(T.base_config("tiny-llava"), over)
    cfg.output_dir = str(ctx.runs_dir / "inproc")
    cfg.model.tiny_hidden_size, cfg.task.max_train_examples, cfg.sft.log_every = 64, 12, 1
    run_pipeline(cfg, print_fn=lambda *a: None)
    table, names, sft_runs = T.past_runs(ctx)
    assert list(table["run"]) == ["inproc"] and list(table["steps"]) == [3] and sft_runs == ["inproc"]
    assert table["eval"].item().startswith("HR@1") and names == ["inproc::sft"]
    assert table["eval"].item().endswith("(ranking protocol, test split)")
    cmp_table, fig = T.compare(ctx, names, "loss")
    assert cmp_table["stage"].item() == "SFT" and [list(t.x) for t in fig.data] == [[1, 2, 3]]
    curves = T.curves_figure(runs.read_metrics(ctx.runs_dir / "inproc"))
    assert [t.name for t in curves.data] == ["sft", "sft"]  # SFT logs a loss only: raw (faint) and smoothed


@pytest.mark.slow
def test_launch_watch_and_compare_a_tiny_run(ctx):
    picker, status, _ = launch(ctx, name="tab-sft")
    assert picker["value"] == "tab-sft" and "tab-sft" in status
    queued_picker, queued_status, _ = launch(ctx, name="tab-next", max_steps=2)
    assert "queued, position 1" in queued_status
    out = poll_until(ctx, "tab-sft", ["finished"])
    status, bar, fig, log, jobs = out
    assert 'value="1.0000"' in bar and "step 3/3" in bar
    loss = [t for t in fig.data if t.name == "sft" and list(t.x) == [1, 2, 3]]
    assert loss, [(t.name, t.x) for t in fig.data]
    assert "tab-next" in list(jobs["job"])
    poll_until(ctx, "tab-next", ["finished"])

    table, names, sft_runs = T.past_runs(ctx)
    assert set(table["run"]) == {"tab-sft", "tab-next"} and set(table["status"]) == {"finished"}
    assert "HR@3" in table.loc[table["run"] == "tab-sft", "eval"].item()
    assert sorted(sft_runs) == ["tab-next", "tab-sft"]
    cmp_table, cmp_fig = T.compare(ctx, ["tab-sft::sft", "tab-next::sft"], "loss")
    assert list(cmp_table["steps"]) == [3, 2]
    assert [len(t.x) for t in cmp_fig.data] == [3, 2]

    # a reload follows the newest job and lists the runs
    picker, past, chosen, sft_from = T.page_load(ctx)
    assert picker["value"] in ("tab-sft", "tab-next") and "tab-sft::sft" in chosen["choices"]


@pytest.mark.slow
def test_stop_then_resume_from_the_tab(ctx):
    T.launch(ctx, str(DEMO), "tiny-llava", "SFT", "hit3", T.FROM_SCRATCH, *{**FORM, "max_steps": 400}.values(), "long")
    end = time.time() + 180
    while ctx.jobs.status("long").step is None and time.time() < end:
        time.sleep(0.3)
    assert "long" in T.stop(ctx, "long")
    status = poll_until(ctx, "long", ["stopped"])[0]
    assert "Resume" in status
    assert runs.latest_checkpoint(ctx.runs_dir / "long" / "sft") is not None
    assert "long" in T.resume(ctx, "long")
    with pytest.raises(gr.Error, match="only a stopped or failed job"):
        T.resume(ctx, "long")
    end = time.time() + 180
    while "resumed from" not in ctx.jobs.status("long").log_tail and time.time() < end:
        time.sleep(0.3)
    assert "resumed from" in ctx.jobs.status("long").log_tail
    T.stop(ctx, "long")
    poll_until(ctx, "long", ["stopped"])


def test_errors_are_one_sentence(ctx, tmp_path):
    with pytest.raises(gr.Error, match="learning rate: -1 is below the minimum"):
        launch(ctx, lr=-1.0)
    with pytest.raises(gr.Error):
        launch(ctx, backbone=str(tmp_path.parent / "elsewhere"))  # a folder outside the allowed ones
    with pytest.raises(gr.Error, match="hit1 has one rejected answer"):
        T.launch(ctx, str(DEMO), "tiny-llava", "S-DPO", "hit1", T.FROM_SCRATCH, *FORM.values(), "")
    with pytest.raises(gr.Error, match="Pick a job"):
        T.stop(ctx, "")
    with pytest.raises(gr.Error, match="no job named 'nope'"):
        T.resume(ctx, "nope")
    with pytest.raises(gr.Error, match="Choose one or more"):
        T.compare(ctx, [], "loss")
    assert T.poll(ctx, "")[0].startswith("No run selected")


def test_the_tab_builds_and_exposes_its_handlers(ctx):
    with gr.Blocks() as demo:
        T.build(ctx)
    names = {d.api_name for d in demo.fns.values() if d.api_name}
    assert {"train_launch", "train_poll", "train_stop", "train_resume", "train_runs", "train_compare"} <= names


def test_past_runs_refresh_when_a_job_changes_state(ctx):
    """The timer refreshes the past runs only when a job starts, ends or is queued (a finished run must not
    stay listed as running until the page is reloaded)."""
    unchanged = T.refresh_if_jobs_changed(ctx, "")
    assert unchanged[:4] == (gr.skip(),) * 4 and unchanged[4] == ""
    job = ctx.jobs.submit(T.form_overrides(str(DEMO), "tiny-llava", "SFT", "hit3", max_steps=3), name="a-run")
    ctx.jobs.stop(job)  # an ended job: its state no longer moves while the test looks at it
    ctx.jobs.wait(job, timeout=120)
    state = ctx.jobs.status(job).state
    assert state in ("stopped", "finished", "failed")
    table, names, sft_from, picker, seen = T.refresh_if_jobs_changed(ctx, f"{job}:running")
    assert seen == f"{job}:{state}" and list(table["run"]) == ["a-run"] and job in picker["choices"]
    assert list(table["status"]) == [state]
    assert T.refresh_if_jobs_changed(ctx, seen)[:4] == (gr.skip(),) * 4
