"""The trained demo runs shipped in assets/demo_runs (scripts/make_demo_runs.py): small, free of the build
machine's paths and times, listed read-only, the model every tab shows first, and rebuilt byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
SHIPPED = ROOT / "assets" / "demo_runs" / "demo-hit3"
TEACH = ROOT / "assets" / "demo_runs" / "teach-hit3"  # the teaching SFT model configs/lab.yaml starts from
sys.path.insert(0, str(ROOT / "scripts"))


def test_the_demo_runs_ship_small_and_clean():
    from make_demo_runs import TIME_KEYS, digests

    from hanorec import runs

    files = digests(SHIPPED)
    size = sum((SHIPPED / f).stat().st_size for f in files)
    assert size < 6e6, size  # tiny adapters and one tiny base model: a few MB
    assert runs.stages(SHIPPED) == ["sft", "dpo", "hano_dpo"]
    for stage in ("dpo", "hano_dpo"):
        assert runs.read_results(SHIPPED, stage)["rows"][0]["method"] == stage
    assert runs.read_results(SHIPPED)["rows"][0]["method"] == "SFT"
    assert not any(f.endswith((".pt", "README.md")) for f in files)  # no optimizer, scheduler or RNG state
    for f in files:
        if f.endswith((".json", ".yaml", ".jsonl")):
            text = (SHIPPED / f).read_text()
            assert "/tmp" not in text and "/home" not in text and "/work" not in text, f
            assert not any(f'"{k}"' in text for k in TIME_KEYS), f
    assert runs.read_status(SHIPPED)["status"] == "finished"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from app.main import make_context

    c = make_context([str(DEMO)], str(tmp_path_factory.mktemp("runs")), "cpu")
    yield c
    c.jobs.close()


def test_every_tab_shows_the_trained_hano_dpo_model_first(ctx):
    import gradio as gr

    from app.main import build_app
    from app.tabs import train

    assert ctx.default_model() == "demo_runs/demo-hit3::hano_dpo"  # the public name, never the server's path
    assert sorted([v for _, v in ctx.model_choices()][:4]) == sorted(  # the shipped runs first, in any order
        [f"demo_runs/demo-hit3::{s}" for s in ("sft", "dpo", "hano_dpo")] + [f"demo_runs/{TEACH.name}::sft"])
    assert [v for _, v in ctx.model_choices()][4] == "base"
    assert ctx.resolve_path("demo_runs/demo-hit3") == SHIPPED.resolve()
    demo = build_app(ctx)
    pickers = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label in ("Model", "Score candidates with")]
    assert len(pickers) == 3 and {p.value for p in pickers} == {ctx.default_model()}  # Data, Hardness, Noise lab
    _, table, chosen, _ = train.page_load(ctx)  # Train: the demo runs listed read-only, HaNo-DPO chosen to compare
    assert chosen["value"] == ["demo:demo-hit3::hano_dpo"]
    demo_rows = table[table["run"] == "demo:demo-hit3"]
    assert list(demo_rows["stage"]) == ["SFT", "DPO", "HaNo-DPO"]
    assert set(demo_rows["status"]) == {"finished (demo, read-only)"} and all(demo_rows["eval"].str.startswith("HR@1"))
    assert ctx.jobs.jobs() == []  # a shipped run is not a job: nothing to stop or resume


def test_the_demo_model_works_in_every_tab_and_nothing_is_written(ctx):
    from make_demo_runs import digests

    from app.common import users_for
    from app.tabs import data, hardness, noise, train

    before = digests(SHIPPED)
    model = ctx.default_model()
    user = users_for(ctx, str(DEMO), "hit3")["value"]
    out = data.show_user(ctx, str(DEMO), "hit3", user, model)
    assert len(out[1]) == 7 and sorted(out[1]["rank"]) == list(range(1, 8))
    text, _, table = noise.draw_noise(ctx, str(DEMO), "hit3", user, model, "lora", 0.05, 5, 0)
    assert "rms(B) = 0 " not in text and (table["shift_std"] > 0).all()  # a trained adapter: B != 0
    summary, _, pairs, _ = hardness.compute(ctx, str(DEMO), "hit3", model, 10, 1.0, "random", 0)
    assert "training pairs" in summary and len(pairs) > 0
    cmp_table, _ = train.compare(ctx, ["demo:demo-hit3::hano_dpo", "demo:demo-hit3::dpo"], "loss")
    assert list(cmp_table["stage"]) == ["HaNo-DPO", "DPO"]
    assert digests(SHIPPED) == before


@pytest.mark.slow
@pytest.mark.parametrize("run", ["demo-hit3", "teach-hit3"])
def test_the_command_rebuilds_the_shipped_bytes(run):
    """scripts/make_demo_runs.py --check --runs RUN trains the run again (demo-hit3's three stages: about a CPU
    minute; teach-hit3's SFT and its evaluation on 240 test users under two protocols: 7.5 minutes on the 2-core sandbox) into
    a temporary folder and compares every file's SHA-256 with the shipped ones (within stated tolerances when
    this machine's CPU kernels differ from the ones recorded in build.json)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_runs.py"), "--check", "--runs", run],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import torch

    built = json.loads((SHIPPED.parent / "build.json").read_text())
    same = built == {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    assert ("identical: every file's SHA-256 matches" if same else "equal within tolerance") in proc.stdout
    assert json.loads((SHIPPED.parent / run / "status.json").read_text())["read_only"] is True


def test_the_teaching_model_ships_small_and_beats_random_and_popularity_under_both_protocols():
    """The teaching SFT model (scripts/learnability.py says why it trains longer on every window): a few MB,
    SFT only, evaluated on all 240 demo test users, its HR@3 above random and popularity under the ranking and
    the catalogue protocol (the paired intervals: scripts/learnability.py --teach, BENCHMARKS.md)."""
    from make_demo_runs import TIME_KEYS, digests

    from hanorec import runs

    files = digests(TEACH)
    size = sum((TEACH / f).stat().st_size for f in files)
    assert size < 6e6, size
    assert runs.stages(TEACH) == ["sft"] and runs.read_status(TEACH)["status"] == "finished"
    rows = runs.read_results(TEACH)["rows"]
    hr3 = {(r["method"], r["protocol"]): r["HR@3"] for r in rows}
    for protocol in ("ranking", "catalogue"):
        assert {r["n"] for r in rows if r["protocol"] == protocol} == {240}
        assert hr3["SFT", protocol] > max(hr3["random", protocol], hr3["popularity", protocol]) + 0.03, hr3
    for f in files:
        if f.endswith((".json", ".yaml", ".jsonl")):
            text = (TEACH / f).read_text()
            assert "/tmp" not in text and "/work" not in text and not any(f'"{k}"' in text for k in TIME_KEYS), f


def test_the_lab_preset_loads_and_starts_from_the_teaching_model():
    """configs/lab.yaml: a complete, valid config whose preference stage starts from the shipped teaching SFT
    run, with the held-out pair accuracy on, and whose model and data match that run's (else the SFT adapter
    would not fit the base model, or the pairs would come from other windows)."""
    from hanorec.config import load_config

    lab = load_config(ROOT / "configs" / "lab.yaml")
    assert (ROOT / lab.pref.sft_run).resolve() == TEACH.resolve()
    assert lab.pref.eval_pairs > 0 and lab.pref.eval_every > 0 and lab.pref.max_steps <= 60
    teach = load_config(TEACH / "config.yaml")
    assert lab.model == teach.model and lab.lora == teach.lora and lab.task.name == teach.task.name
    assert lab.data.max_train_windows_per_user == teach.data.max_train_windows_per_user
    assert (ROOT / lab.data.path).resolve() == (ROOT / teach.data.path).resolve() == DEMO.resolve()



def test_the_tolerance_check_for_other_kernels_accepts_rounding_and_rejects_real_changes(tmp_path):
    """On a CPU whose kernels differ from the build's, --check compares within tolerances: a weight moved by
    1e-4 or a result by 0.001 passes; a weight moved by 1e-2, a result by 0.05 or a changed text fails."""
    import shutil

    from make_demo_runs import RUN, _within_tolerance
    from safetensors.torch import load_file, save_file

    weights_file = "dpo/checkpoints/step-000030/adapter/adapter_model.safetensors"
    for k, (shift, ok) in enumerate(((1e-4, True), (1e-2, False))):
        new = tmp_path / f"w{k}" / RUN
        shutil.copytree(SHIPPED, new)
        weights = load_file(new / weights_file)
        key = sorted(weights)[0]
        weights[key] = weights[key] + shift
        save_file(weights, new / weights_file)
        assert _within_tolerance(SHIPPED, new, weights_file) is ok
    for k, (shift, ok) in enumerate(((0.001, True), (0.05, False))):
        new = tmp_path / f"r{k}" / RUN
        shutil.copytree(SHIPPED, new)
        results = json.loads((SHIPPED / "dpo" / "results.json").read_text())
        results["rows"][0]["HR@3"] += shift
        (new / "dpo" / "results.json").write_text(json.dumps(results))
        assert _within_tolerance(SHIPPED, new, "dpo/results.json") is ok
    new = tmp_path / "text" / RUN
    shutil.copytree(SHIPPED, new)
    results = json.loads((SHIPPED / "dpo" / "results.json").read_text())
    results["model"] = "another model"
    (new / "dpo" / "results.json").write_text(json.dumps(results))
    assert not _within_tolerance(SHIPPED, new, "dpo/results.json")
