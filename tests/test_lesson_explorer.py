"""The explorer's lesson: the curves a DPO course draws, readouts that say what a result means, HaRS' profile
temperature in training, the Hardness tab on a stage trained from another run's SFT (with the planted false
negatives marked), the teaching-scenario datasets in every picker, and one preset behind both forms.

Synthetic metrics logs, comparison files and run folders: every test here runs in about a second."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest

from hanorec import curves as C
from hanorec import logkeys as K
from hanorec import report, runs

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"


# ---- curves --------------------------------------------------------------------------------------------
def _log(stage="hano_dpo", steps=12, sigma=0.05, eval_every=4):
    """A metrics log as the training loop writes it: one row per step (elapsed_s, TRL's keys, HaRS, noise),
    and every few steps a separate row with the held-out pair accuracy and the KL to the reference."""
    rows, rng = [], np.random.default_rng(0)
    for s in range(1, steps + 1):
        rows.append({"stage": stage, "stage_dir": stage, "step": s, "total_steps": steps, "elapsed_s": 0.5 * s,
                     K.LOSS: 0.69 - 0.01 * s, K.REWARD_ACCURACY: float(rng.choice([0.0, 0.25, 0.5, 0.75, 1.0])),
                     K.REWARD_MARGIN: float(rng.normal()), K.REWARD_CHOSEN: 0.1 * s, K.REWARD_REJECTED: -0.1 * s,
                     K.LOGP_CHOSEN: -90 + s, K.LOGP_REJECTED: -95 - s, K.LAMBDA_MEAN: 1.0 + 0.001 * s,
                     K.BETA_MEAN: 0.1, K.ETA: 1.0, K.NOISE_SIGMA: sigma})  # fmt: skip
        if s % eval_every == 0:
            rows.append({"stage": stage, "stage_dir": stage, "step": s, K.EVAL_PAIR_ACCURACY: 0.5 + 0.1 * s / eval_every,
                         K.KL_REFERENCE: 0.01 * s})  # fmt: skip
    return rows


def test_logkeys_name_the_held_out_accuracy_and_the_kl():
    assert K.EVAL_PAIR_ACCURACY == "eval/pair_accuracy" and K.KL_REFERENCE == "kl/reference"


def test_ema_is_tensorboards_debiased_average():
    assert C.ema([1.0, 2.0, 3.0], 0) == [1.0, 2.0, 3.0]
    out = C.ema([2.0, 2.0, 2.0], 0.9)
    assert out == pytest.approx([2.0, 2.0, 2.0])  # debiased: a constant stays constant from the first point
    out = C.ema([0.0, 1.0], 0.5)
    assert out[1] == pytest.approx((0.5 * 0 * 0.5 + 0.5 * 1.0) / (1 - 0.25))
    for bad in (1.0, -0.1, float("nan"), "x", True):
        with pytest.raises(ValueError, match="smoothing"):
            C.ema([1.0], bad)


def test_panels_offer_every_dpo_curve_and_merge_the_evaluation_rows():
    rows = _log()
    panels = {p.title: p for p in C.panels(rows, smoothing=0.6)}
    keys = {s.key for p in panels.values() for s in p.series}
    for key in (K.REWARD_CHOSEN, K.REWARD_REJECTED, K.REWARD_MARGIN, K.REWARD_ACCURACY, K.LOGP_CHOSEN,
                K.LOGP_REJECTED, K.KL_REFERENCE, K.EVAL_PAIR_ACCURACY, K.LAMBDA_MEAN, K.BETA_MEAN, K.ETA):  # fmt: skip
        assert key in keys, key
    titles = list(panels)
    assert titles.index("λ: hardness/lambda_mean (HaRS)") + 1 == titles.index("β: hardness/beta_mean")
    acc = next(p for p in panels.values() if K.EVAL_PAIR_ACCURACY in p.keys).series[0]
    assert acc.x == [4, 8, 12] and acc.raw == pytest.approx([0.6, 0.7, 0.8])
    # the evaluation row of a step does not hide that step's training values (merged, not replaced)
    loss = next(p for p in panels.values() if p.keys == (K.LOSS,)).series[0]
    assert loss.x == list(range(1, 13))
    assert len(loss.smooth) == len(loss.raw) and loss.smooth != loss.raw


def test_the_x_axis_can_be_wall_time_and_damaged_values_are_left_out():
    rows = _log(steps=4)
    rows[1][K.LOSS] = float("nan")
    rows[2][K.LOSS] = "text"
    (s,) = C.series(rows, K.LOSS, x="time", smoothing=0)
    assert s.x == [0.5, 2.0] and all(math.isfinite(v) for v in s.raw)
    assert C.series([{"step": 1, K.LOSS: 1.0}], K.LOSS, x="time") == []  # an older log without elapsed_s
    with pytest.raises(ValueError, match="x axis"):
        C.series(rows, K.LOSS, x="epoch")


def test_held_out_accuracy_and_the_nodo_note():
    rows = _log()
    assert C.held_out_accuracy(rows, "hano_dpo") == pytest.approx(0.8)
    assert C.held_out_accuracy(rows, "dpo") is None
    assert "NoDO" in C.noise_note(rows, "hano_dpo") and "swing" in C.noise_note(rows, "hano_dpo")
    assert C.noise_note(_log(stage="dpo", sigma=0.0), "dpo") == ""


def test_train_tab_draws_raw_faint_and_smoothed_bold_with_the_note():
    from app.tabs import train as T

    fig = T.curves_figure(_log(), "step", 0.8)
    raw = [t for t in fig.data if t.opacity == 0.3]
    bold = [t for t in fig.data if t.opacity is None and t.line.width == 2.5]
    assert raw and len(raw) == len(bold)
    assert any(K.EVAL_PAIR_ACCURACY in a.text for a in fig.layout.annotations)
    assert "NoDO" in fig.layout.title.text
    assert "held-out pair accuracy 0.800" in T.curves_note(_log()) and "NoDO" in T.curves_note(_log())


def test_the_run_list_shows_the_held_out_accuracy_not_the_last_batch():
    """The past-runs table's accuracy column is the held-out eval/pair_accuracy (0.8 here), never the last
    batch's rewards/accuracies (a batch of 4 reads 0, .25, ... 1 and contradicted the per-pair view)."""
    from app.tabs import train as T

    rows = _log()
    rows[-2][K.REWARD_ACCURACY] = 0.25
    info = runs.RunInfo(name="r", path=Path("/nonexistent/r"), config=None, stages=["hano_dpo"], status="finished",
                        metrics=rows)  # fmt: skip
    row = dict(zip(T.RUN_COLUMNS, T._summary_row(info, "hano_dpo")))
    assert row["pair acc. (held-out)"] == "0.8000"
    assert "0.2500" not in row.values()


# ---- readouts ------------------------------------------------------------------------------------------
def _comparison(n_users=60, seeds=(0, 1)):
    """SFT below chance; IPO identical to SFT on every user; DPO better on 12 users per seed; cDPO with a
    small difference inside the detectable one."""
    rng = np.random.default_rng(1)
    users = [f"u{i}" for i in range(n_users)]
    per_example, rows = [], []
    for seed in seeds:
        sft = (rng.random(n_users) < 0.05).astype(float)
        dpo = sft.copy()
        dpo[np.flatnonzero(sft == 0)[:12]] = 1.0
        cdpo = sft.copy()
        cdpo[np.flatnonzero(sft == 0)[:1]] = 1.0
        for method, hits in (("SFT", sft), ("DPO", dpo), ("IPO", sft), ("cDPO", cdpo)):
            values = {"user": users, "HR@3": hits.tolist(), "NDCG@3": (hits / 2).tolist(), "MRR": (hits / 2).tolist()}
            per_example.append({"task": "hit3", "seed": seed, "method": method, "protocol": "catalogue",
                                "values": values})  # fmt: skip
            rows.append({"task": "hit3", "seed": seed, "method": method, "protocol": "catalogue",
                         "HR@3": float(hits.mean()), "chance": {"HR@3": 0.0968}})  # fmt: skip
    from hanorec.metrics import mean_std

    return {"rows": rows, "summary": report.summarize(rows, mean_std, "catalogue"), "seeds": list(seeds),
            "per_example": per_example, "protocol": "catalogue", "dataset": "demo", "model": "tiny"}  # fmt: skip


def test_readouts_say_below_chance_identical_and_no_difference_larger_than():
    result = _comparison()
    said = report.readouts(result, "SFT", "hit3 HR@3", n_boot=300)
    text = "\n".join(said)
    assert "SFT is below chance on hit3 HR@3" in text and "0.0968" in text
    assert "IPO gives exactly the same hit3 HR@3 as SFT on every one of the 60 test users (2 seeds)" in text
    assert any(s.startswith("DPO is above SFT on hit3 HR@3") for s in said)
    cdpo = next(s for s in said if s.startswith("cDPO") and "chance" not in s)
    row = next(r for r in report.forest(result, "SFT", "hit3 HR@3", n_boot=300) if r["method"] == "cDPO")
    if -row["detectable"] <= row["low"] and row["high"] <= row["detectable"]:
        assert f"no difference larger than ±{row['detectable']:.4f}" in cdpo
    else:
        assert "too few users to tell" in cdpo
    # exactly one sentence per method, and the reference is never compared with itself
    assert sum(s.startswith(("DPO", "IPO", "cDPO")) and "chance" not in s for s in said) == 3
    assert not any(s.startswith("SFT") and "chance" not in s for s in said)


def test_difference_sentence_inside_the_detectable_band():
    row = {"method": "HaNo-DPO", "mean": 0.002, "low": -0.01, "high": 0.014, "detectable": 0.02, "excludes_zero": False}
    assert "no difference larger than ±0.0200" in report.difference_sentence(row, "SFT", "hit3 HR@3")
    wide = dict(row, low=-0.03, high=0.034)
    assert "too few users" in report.difference_sentence(wide, "SFT", "hit3 HR@3")
    assert report.difference_sentence(dict(row, mean=float("nan")), "SFT", "m") == ""


def test_the_compare_tab_shows_the_readout(tmp_path):
    from app.tabs import compare as tab

    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / report.COMPARISON_FILE).write_text(json.dumps(_comparison()))
    ctx = types.SimpleNamespace(resolve_path=lambda p: Path(p), _extra=types.SimpleNamespace(get=lambda k, make: make()))
    fig, table, readout = tab.show_forest(ctx, str(tmp_path / "cmp"), "SFT", "hit3 HR@3")
    assert "below chance" in readout and "exactly the same" in readout and "| DPO |" in table


def test_run_readouts_flag_below_chance_and_a_stage_identical_to_its_sft():
    sft = {"rows": [{"method": "SFT", "protocol": "ranking", "HR@3": 0.425, "HR@1": 0.1, "MRR": 0.3, "n": 40,
                     "chance": {"HR@3": 0.4286, "HR@1": 0.1429}},
                    {"method": "random", "protocol": "ranking", "HR@3": 0.2, "chance": {"HR@3": 0.4286}}]}  # fmt: skip
    dpo = json.loads(json.dumps(sft))
    dpo["rows"][0]["method"] = "DPO"
    said = report.run_readouts(dpo, sft, name="DPO")
    assert said[0].startswith("DPO is below chance on HR@3 (ranking protocol): 0.4250 against 0.4286")
    assert "exactly what its SFT model scores" in said[1]
    better = json.loads(json.dumps(dpo))
    better["rows"][0]["HR@3"] = 0.6
    assert report.run_readouts(better, sft, name="DPO") == []
    assert report.run_readouts(None) == [] and report.run_readouts({"rows": "x"}) == []


# ---- HaRS' temperature in training -----------------------------------------------------------------------
def test_hars_temperature_is_a_training_setting_and_beyond_the_paper_when_not_1():
    from hanorec.config import ConfigError, load_config
    from hanorec.hardness import beyond_paper_note

    assert load_config().pref.hars_temperature == 1.0
    assert load_config(overrides={"pref": {"hars_temperature": 0.05}}).pref.hars_temperature == 0.05
    for bad in (0, -1, float("nan"), 1e9):
        with pytest.raises(ConfigError, match="hars_temperature"):
            load_config(overrides={"pref": {"hars_temperature": bad}})
    assert beyond_paper_note(10, 1.0) == "" and "Beyond the paper" in beyond_paper_note(10, 0.05)


def test_a_lower_hars_temperature_widens_lambda_in_training(ds, tmp_path):
    """The lambdas training uses (build_preference_items, read by HaNo-DPO's and the HaRS add-on's step) are
    computed at pref.hars_temperature: a lower temperature widens their spread, and each temperature has its
    own cache entry."""
    from hanorec.config import load_config
    from hanorec.data import make_splits
    from hanorec.models import build_tiny
    from hanorec.tasks import build_examples, corpus_text
    from hanorec.train.preference import build_preference_items

    bundle = build_tiny("tiny-llava", corpus_text(ds), hidden_size=64, seed=0)
    examples = build_examples("hit3", make_splits(ds, n_history=3, n_target=3).train, ds, max_examples=40)
    spreads = {}
    for t in (1.0, 0.05):
        cfg = load_config(overrides={"pref": {"method": "hano_dpo", "hars_temperature": t}})
        lam = np.array([it.hardness_lambda for it in build_preference_items(cfg, bundle, ds, examples, tmp_path)])
        spreads[t] = lam.max() - lam.min()
    assert spreads[0.05] > 3 * spreads[1.0] > 0
    again = load_config(overrides={"pref": {"method": "hano_dpo"}})
    lam1 = np.array([it.hardness_lambda for it in build_preference_items(again, bundle, ds, examples, tmp_path)])
    assert lam1.max() - lam1.min() == pytest.approx(spreads[1.0])  # not the T = 0.05 entry of the cache


def test_the_train_form_sets_hars_k_and_temperature_for_methods_that_use_hars():
    from app.tabs import train as T

    hano = T.form_overrides("d", "tiny-llava", "HaNo-DPO", "hit3", hars_k=5, hars_temperature=0.03)
    assert hano["pref"]["hardness_k"] == 5 and hano["pref"]["hars_temperature"] == 0.03
    dpo = T.form_overrides("d", "tiny-llava", "DPO", "hit3", hars_k=5, hars_temperature=0.03)
    assert "hars_temperature" not in dpo["pref"]  # DPO computes no lambda
    addon = T.form_overrides("d", "tiny-llava", "DPO", "hit3", addons=["HaRS"], hars_temperature=0.03)
    assert addon["pref"]["hars"] is True and addon["pref"]["hars_temperature"] == 0.03
    *_, k, t, lr, steps = T.method_view("HaNo-DPO")
    assert k["visible"] and t["visible"]
    *_, k, t, lr, steps = T.method_view("HaNo-DPO w/o HaRS")
    assert not k["visible"]
    assert "Beyond the paper" in T.hars_label(10, 0.05) and "paper's setting" in T.hars_label(10, 1.0)


# ---- the Hardness tab on a stage trained from another run's SFT -------------------------------------------
def _checkpoint(stage_dir: Path, cfg, step=2) -> Path:
    ckpt = stage_dir / "checkpoints" / f"step-{step:06d}"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    cfg.save(ckpt / "config.yaml")
    return ckpt


@pytest.fixture
def pref_from_another_sft(tmp_path):
    """Run `base` holds only SFT; run `pref` holds only a hano_dpo stage trained from base's SFT (the Train
    tab's 'SFT model for a preference stage'), recorded in its checkpoint's config and sft_source.json."""
    from hanorec.config import load_config

    base, pref = tmp_path / "base", tmp_path / "pref"
    cfg = load_config(overrides={"data": {"path": str(DEMO)}})
    sft_ckpt = _checkpoint(base / "sft", cfg)
    cfg.save(base / "config.yaml")
    cfg.pref.sft_run = str(base)
    _checkpoint(pref / "hano_dpo", cfg)
    (pref / "hano_dpo" / "sft_source.json").write_text(json.dumps({"checkpoint": str(sft_ckpt), "digest": "x"}))
    cfg.save(pref / "config.yaml")
    return base, pref


def test_sft_run_of_a_stage_is_where_its_sft_came_from(pref_from_another_sft, tmp_path):
    base, pref = pref_from_another_sft
    assert runs.sft_run_of(pref, "hano_dpo") == base
    assert runs.sft_run_of(base, "sft") == base
    (pref / "hano_dpo" / "sft_source.json").write_text("not json")  # damaged: the config says the same
    assert runs.sft_run_of(pref, "hano_dpo") == base
    assert runs.sft_run_of(tmp_path / "nothing", "dpo") == tmp_path / "nothing"


def test_hardness_tab_embeds_with_the_sft_a_stage_was_trained_from(pref_from_another_sft):
    """Today's bug: the tab asked for <run>::sft, and a stage trained from another run's SFT failed with
    "no checkpoint found at .../sft/checkpoints (stages present: hano_dpo)"."""
    from app.tabs import hardness as tab

    base, pref = pref_from_another_sft
    asked = []

    class Ctx:
        def resolve_path(self, text):
            return Path(text)

        def config(self, dataset, task):
            return runs.read_config(base)

        def prepared_for(self, cfg):
            return types.SimpleNamespace(dataset="the run's data")

        def model(self, source, dataset, task):
            asked.append(source)
            run, _, stage = source.rpartition("::")
            if runs.latest_checkpoint(Path(run) / stage) is None:  # as hanorec.runs.load_stage says it
                raise runs.RunError(f"no checkpoint found at {Path(run) / stage / 'checkpoints'} "
                                    f"(stages present: {', '.join(runs.stages(run))})")  # fmt: skip
            return "bundle", runs.read_config(run, stage)

        def cached(self, key, make):
            return key

    cfg, data, index = tab._setup(Ctx(), str(DEMO), "hit3", f"{pref}::hano_dpo")
    assert asked == [f"{pref}::hano_dpo", f"{base}::sft"]
    assert index[1] == f"{base}::sft"


def test_planted_false_negatives_are_marked_and_summarised(tmp_path):
    from hanorec.config import load_config
    from hanorec.data import load_dataset, make_demo
    from hanorec.explore import false_negative_summary, same_taste_negatives
    from hanorec.pairs import build_pairs
    from hanorec.pipeline import prepare_data

    planted_dir = make_demo(tmp_path / "fn", false_negatives=0.5, n_users=60)
    cfg = load_config(overrides={"data": {"path": str(planted_dir)}})
    data = prepare_data(cfg)
    pairs = build_pairs(data.train[:300], data.dataset, seed=0)
    marks = same_taste_negatives(pairs, data.dataset)
    plain = prepare_data(load_config(overrides={"data": {"path": str(make_demo(tmp_path / "plain", n_users=60))}}))
    plain_marks = same_taste_negatives(build_pairs(plain.train[:300], plain.dataset, seed=0), plain.dataset)
    assert np.mean(np.array(marks) > 0) > 3 * np.mean(np.array(plain_marks) > 0)  # planted, not chance
    lam = [0.9 if m else 1.0 for m in marks]  # a lambda that finds every one of them
    text = false_negative_summary(lam, marks, 0.5)
    assert "planted at 0.5" in text and "lower, as HaRS intends" in text and "100%" in text
    assert "not lower" in false_negative_summary([1.1 if m else 1.0 for m in marks], marks)
    assert same_taste_negatives(pairs, types.SimpleNamespace(items=load_dataset(DEMO).items | {})) is not None
    assert false_negative_summary(lam, None) == ""


# ---- scenarios in the app ----------------------------------------------------------------------------------
def test_teaching_datasets_are_made_once_and_carry_their_sentences(tmp_path):
    from hanorec.data import DEMO_LOGIC, TEACHING_DATASETS, load_dataset, planted_sentences, teaching_datasets
    from hanorec.explore import find_datasets

    root = teaching_datasets(tmp_path / "scenarios")
    found = find_datasets([root])
    assert [p.name for p in found] == sorted(TEACHING_DATASETS)
    stamp = {p.name: (p / "pairs.tsv").stat().st_mtime_ns for p in found}
    teaching_datasets(tmp_path / "scenarios")  # a second start writes nothing
    assert stamp == {p.name: (p / "pairs.tsv").stat().st_mtime_ns for p in found}
    fn = load_dataset(root / "demo-false-negatives-30")
    said = planted_sentences(fn)
    assert said[0] == DEMO_LOGIC and "colour is shown only in its image" in said[0] and "False negatives" in said[1]
    assert planted_sentences(load_dataset(DEMO)) == [DEMO_LOGIC]
    # the plain demo's items and users: only the planted training data differ
    assert (root / "demo-uneven-density" / "titles.csv").read_text() != (DEMO / "titles.csv").read_text()
    assert (root / "demo-false-negatives-30" / "pairs.tsv").read_text() == (DEMO / "pairs.tsv").read_text()


def test_the_app_offers_the_scenarios_in_every_picker(tmp_path):
    from app.main import make_context

    ctx = make_context([str(DEMO)], str(tmp_path / "runs"), "cpu")
    try:
        values = [v for _, v in ctx.dataset_choices()]
        assert values[0] == "demo"  # public names (no server path), each opening its folder
        assert ctx.resolve_path(values[0]) == DEMO.resolve()
        assert all(ctx.resolve_path(v).parent.name == "scenarios" for v in values[1:])
        assert [Path(v).name for v in values[1:]] == ["demo-false-negatives-30", "demo-preference-noise-30",
                                                      "demo-uneven-density"]  # fmt: skip
    finally:
        ctx.jobs.close()


def _sft_run(folder: Path, dataset: Path) -> Path:
    from hanorec.config import load_config

    cfg = load_config(overrides={"data": {"path": str(dataset)}})
    folder.mkdir(parents=True)
    cfg.save(folder / "config.yaml")
    _checkpoint(folder / "sft", cfg)
    return folder


def test_an_sft_source_of_another_dataset_is_refused_in_one_sentence(tmp_path):
    """Today the Compare tab swapped the chosen dataset for the SFT run's without a word."""
    from hanorec.data import make_demo
    from hanorec.jobs import comparison_request

    scenario = make_demo(tmp_path / "demo-false-negatives-30", false_negatives=0.3)
    sft = _sft_run(tmp_path / "sft-demo", DEMO)
    with pytest.raises(runs.RunError, match="was trained on demo, not on the chosen dataset demo-false-negatives-30"):
        comparison_request(dataset=str(scenario), task="hit3", methods=["DPO"], seeds="0", sft_run=str(sft))
    over, args, base = comparison_request(dataset=str(DEMO), task="hit3", methods=["DPO"], seeds="0", sft_run=str(sft))
    assert base == sft.resolve() / "config.yaml"


# ---- one source of truth for the form defaults -----------------------------------------------------------------
def test_train_and_compare_launch_the_same_preset(tmp_path):
    """'SFT max steps 30' means the same learning rate and batch in the Train and the Compare tab: both launch
    from configs/lab.yaml (today Train ran lr 2e-3 at batch 4 and Compare lr 1e-4 at 2 x 8)."""
    from app.tabs import compare as compare_tab
    from app.tabs import train as T
    from hanorec.config import load_config
    from hanorec.jobs import JobManager

    jm = JobManager(tmp_path, autostart=False, python="/bin/false")
    ctx = types.SimpleNamespace(jobs=jm, runs_dir=tmp_path, demo=False, data_dirs=[DEMO],
                                resolve_path=lambda p: Path(p).resolve())  # fmt: skip
    form = {"dataset": str(DEMO), "backbone": "tiny-qwen2.5-vl", "stage": "SFT", "task": "hit3", "beta0": 0.1,
            "sigma": 0.05, "noise_target": "lora", "k_negatives": 1, "sampling": "random", "epochs": 1, "lr": None,
            "max_steps": 30, "eval_examples": 40, "log_with": T.NO_TRACKER, "seed": 0, "name": "train-sft"}  # fmt: skip
    T.launch_form(ctx, form)  # the learning rate left to the form's base
    compare_tab.launch(ctx, str(DEMO), "hit3", compare_tab.TRAIN_SFT, ["DPO"], "0", 30, 30, 0.1, None, 0.05, 0, 0, "")
    cmp_name = next(j for j in compare_tab.compare_jobs(ctx))
    train_cfg = load_config(tmp_path / "train-sft" / "config.yaml")
    cmp_cfg = load_config(tmp_path / cmp_name / "config.yaml")
    same = ("lr", "batch_size", "grad_accum", "max_steps")
    assert [getattr(train_cfg.sft, k) for k in same] == [getattr(cmp_cfg.sft, k) for k in same]
    from hanorec.presets import lab_config

    lab = lab_config()
    for cfg in (train_cfg, cmp_cfg):
        assert (cfg.sft.lr, cfg.sft.batch_size, cfg.sft.grad_accum, cfg.sft.max_steps) == (
            lab.sft.lr, lab.sft.batch_size, lab.sft.grad_accum, 30)  # the preset's recipe, the forms' 30 steps  # fmt: skip
        assert (cfg.model.tiny_hidden_size, cfg.lora.r) == (lab.model.tiny_hidden_size, lab.lora.r)
    assert cmp_cfg.task.max_eval_examples is None  # "test prompts 0" = all of them, whatever the preset says


def test_every_form_field_shows_its_value():
    """No field reads "0: the preset's": the Train tab's learning rate and steps are the stage's preset values."""
    from app.tabs import train as T
    from hanorec.presets import form_defaults

    d = form_defaults()
    *_, lr, steps = T.method_view("SFT")
    assert lr["value"] == d["sft_lr"] > 0 and steps["value"] == d["sft_max_steps"]
    *_, lr, steps = T.method_view("DPO")
    assert lr["value"] == d["pref_lr"] > 0 and steps["value"] == d["pref_max_steps"]
    source = (ROOT / "app" / "tabs" / "train.py").read_text() + (ROOT / "app" / "tabs" / "compare.py").read_text()
    assert "the preset's)" not in source


def test_the_held_out_accuracy_panel_is_there_before_its_first_point():
    from app.tabs import train as T

    rows = [r for r in _log() if K.EVAL_PAIR_ACCURACY not in r]
    panels = C.panels(rows)
    acc = next(p for p in panels if p.keys == (K.EVAL_PAIR_ACCURACY,))
    assert acc.series == []
    assert all(p.keys != (K.EVAL_PAIR_ACCURACY,) for p in C.panels([{"step": 1, "stage": "sft", "loss": 1.0}]))
    fig = T.curves_figure(rows)
    assert any(a.text == "not logged yet" for a in fig.layout.annotations)


def test_readouts_speak_of_trained_models_not_the_baselines_differences():
    result = _comparison()
    for e in result["per_example"][:]:
        if e["method"] == "IPO":
            result["per_example"].append({**e, "method": "popularity"})
    said = report.readouts(result, "SFT", "hit3 HR@3", n_boot=200)
    assert not any(s.startswith("popularity") and "chance" not in s for s in said)


@pytest.mark.slow
def test_a_stage_trained_from_the_shipped_sft_opens_in_the_hardness_tab(tmp_path):
    """End to end (about a minute on 2 cores): the Train tab launches HaNo-DPO from the shipped demo run's SFT
    model (2 steps), and the Hardness tab computes lambda for that stage from the demo run's SFT."""
    from app.common import DEMO_RUNS
    from app.main import make_context
    from app.tabs import hardness as H
    from app.tabs import train as T

    if not (DEMO_RUNS / "demo-hit3" / "sft").is_dir():
        pytest.skip("the shipped demo runs are absent")
    ctx = make_context([str(DEMO)], str(tmp_path / "runs"), "cpu")
    try:
        form = {"dataset": str(DEMO), "backbone": "tiny-qwen2.5-vl", "stage": "HaNo-DPO", "task": "hit3",
                "sft_from": T.DEMO_PREFIX + "demo-hit3", "beta0": 0.1, "sigma": 0.05, "noise_target": "lora",
                "k_negatives": 1, "sampling": "random", "epochs": 1, "lr": None, "max_steps": 2, "eval_examples": 4,
                "log_with": T.NO_TRACKER, "seed": 0, "name": "from-demo", "hars_k": 10, "hars_temperature": 0.05}  # fmt: skip
        T.launch_form(ctx, form)
        done = ctx.jobs.wait("from-demo", timeout=600)
        assert done.state == "finished", done.log_tail
        run = ctx.runs_dir / "from-demo"
        assert runs.stages(run) == ["hano_dpo"] and runs.sft_run_of(run, "hano_dpo") == DEMO_RUNS / "demo-hit3"
        assert runs.read_config(run, "hano_dpo").pref.hars_temperature == 0.05
        # training computed its lambdas at T = 0.05: spread over 0.1 (the paper's T = 1 keeps them within 0.01 here)
        from safetensors.torch import load_file

        (cached,) = (run / "hardness_cache").glob("*.safetensors")
        lam = load_file(str(cached))["lambda"]
        assert float(lam.max() - lam.min()) > 0.1, lam
        text, *_ = H.compute(ctx, str(DEMO), "hit3", f"{run}::hano_dpo", 10, 1.0, "random", 0)
        assert "training pairs" in text
    finally:
        ctx.jobs.close()


def test_the_shipped_sft_is_a_source_in_both_forms(tmp_path, monkeypatch):
    """The teaching SFT model ships under assets/demo_runs: Train and Compare both offer it (read, never
    written), and the Train form opens on the run the lesson preset names."""
    from app.common import DEMO_RUNS
    from app.tabs import compare as compare_tab
    from app.tabs import train as T
    from hanorec import presets
    from hanorec.config import load_config
    from hanorec.jobs import JobManager

    if not (DEMO_RUNS / "demo-hit3" / "sft").is_dir():
        pytest.skip("the shipped demo runs are absent")
    jm = JobManager(tmp_path, autostart=False, python="/bin/false")
    allowed = (DEMO.resolve(), tmp_path.resolve(), DEMO_RUNS.resolve())

    def resolve(p):
        path = Path(p).resolve()
        assert any(path == a or a in path.parents for a in allowed), path
        return path

    ctx = types.SimpleNamespace(jobs=jm, runs_dir=tmp_path, demo=False, data_dirs=[DEMO], demo_runs_dir=DEMO_RUNS,
                                resolve_path=resolve)  # fmt: skip
    assert "demo:demo-hit3" in compare_tab.sft_choices(ctx)
    _, names, sft_runs = T.past_runs(ctx)
    assert "demo:demo-hit3" in sft_runs
    real = presets.form_defaults()
    monkeypatch.setattr(presets, "form_defaults", lambda: {**real, "sft_run": "assets/demo_runs/demo-hit3"})
    assert T.preset_sft_source(ctx, sft_runs) == "demo:demo-hit3"
    picker, _, _ = compare_tab.launch(ctx, str(DEMO), "hit3", "demo:demo-hit3", ["DPO"], "0", 30, 30, 0.1, None, 0.05,
                                      0, 0, "")  # fmt: skip
    cfg = load_config(tmp_path / picker["value"] / "config.yaml")
    assert Path(cfg.data.path) == DEMO.resolve()
    assert f"--from-sft={(DEMO_RUNS / 'demo-hit3').resolve()}" in json.loads((tmp_path / picker["value"] / "job.json").read_text())["args"]


def test_the_run_list_flags_a_stage_below_chance(tmp_path):
    from app.tabs import train as T

    res = {"rows": [{"method": "DPO", "protocol": "ranking", "HR@3": 0.425, "chance": {"HR@3": 0.4286}}]}
    info = runs.RunInfo(name="r", path=tmp_path, config=None, stages=["sft", "dpo"], status="finished",
                        metrics=_log(stage="dpo"), stage_results={"dpo": res})  # fmt: skip
    row = dict(zip(T.RUN_COLUMNS, T._summary_row(info, "dpo")))
    assert "below chance" in row["readout"] and row["eval"].startswith("HR@3 0.425")
