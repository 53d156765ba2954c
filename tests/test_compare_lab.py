"""The comparison lab's package side (what the Compare tab calls): reading a comparison folder back, the
forest rows against any reference, the per-user scatter, CSV / LaTeX, and a comparison job request."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hanorec import report
from hanorec.jobs import COMPARE, JobError, JobManager, comparison_request
from hanorec.metrics import mean_std


def _comparison(folder, n_users=40, seeds=(0, 1)):
    """A comparison.json as `compare` writes it: SFT, DPO (better on 10 users) and IPO (= SFT)."""
    rng = np.random.default_rng(0)
    users = [f"u{i}" for i in range(n_users)]
    per_example, rows = [], []
    for seed in seeds:
        sft = (rng.random(n_users) < 0.3).astype(float)
        dpo = sft.copy()
        dpo[np.flatnonzero(sft == 0)[:10]] = 1.0
        for method, hits in (("SFT", sft), ("DPO", dpo), ("IPO", sft)):
            values = {"user": users, "HR@1": hits.tolist(), "HR@3": hits.tolist(), "NDCG@3": (hits / 2).tolist(),
                      "MRR": (hits / 2).tolist()}  # fmt: skip
            per_example.append({"task": "hit3", "seed": seed, "method": method, "protocol": "catalogue",
                                "values": values})  # fmt: skip
            rows.append({"task": "hit3", "seed": seed, "method": method, "protocol": "catalogue",
                         "HR@3": float(hits.mean()), "NDCG@3": float(hits.mean() / 2), "MRR": float(hits.mean() / 2),
                         "Coverage@3": 0.1, "Pop@3": 7.0, "chance": {"HR@3": 0.01, "MRR": 0.02}})  # fmt: skip
    result = {"rows": rows, "summary": report.summarize(rows, mean_std, "catalogue"), "seeds": list(seeds),
              "per_example": per_example, "protocol": "catalogue", "dataset": "demo", "model": "tiny"}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "comparison.json").write_text(json.dumps(result))
    return folder


def test_load_and_forest_against_any_reference(tmp_path):
    result = report.load_comparison(_comparison(tmp_path / "cmp"))
    assert report.comparison_methods(result) == ["SFT", "DPO", "IPO"]
    assert report.comparison_metrics(result) == ["hit3 HR@3", "hit3 NDCG@3", "hit3 MRR"]
    rows = {r["method"]: r for r in report.forest(result, "SFT", "hit3 HR@3", n_boot=300)}
    assert set(rows) == {"DPO", "IPO"}
    assert rows["DPO"]["mean"] == pytest.approx(10 / 40) and rows["DPO"]["excludes_zero"]
    assert rows["IPO"]["mean"] == 0 and rows["IPO"]["detectable"] == 0
    assert rows["DPO"]["detectable"] > 0 and rows["DPO"]["n_users"] == 40
    against_dpo = {r["method"]: r for r in report.forest(result, "DPO", "hit3 HR@3", n_boot=300)}
    assert against_dpo["SFT"]["mean"] == pytest.approx(-10 / 40)
    with pytest.raises(ValueError, match="not a method"):
        report.forest(result, "SimPO", "hit3 HR@3")


def test_scatter_is_per_user_means_over_seeds(tmp_path):
    result = report.load_comparison(_comparison(tmp_path / "cmp"))
    pts = report.scatter(result, "hit3 HR@3", "DPO", "SFT")
    assert len(pts["user"]) == 40 and all(a >= b for a, b in zip(pts["a"], pts["b"]))
    assert np.mean(pts["a"]) - np.mean(pts["b"]) == pytest.approx(10 / 40)
    with pytest.raises(ValueError, match="no hit3 HR@3 values"):
        report.scatter(result, "hit3 HR@3", "DPO", "SimPO")


def test_csv_and_latex_carry_the_table_and_the_chance_row(tmp_path):
    result = report.load_comparison(_comparison(tmp_path / "cmp"))
    csv = report.summary_csv(result).splitlines()
    assert csv[0].startswith("method,hit3 HR@3 mean,hit3 HR@3 std")
    assert [line.split(",")[0] for line in csv[1:]] == ["SFT", "DPO", "IPO", "chance"]
    tex = report.summary_latex(result)
    assert r"\begin{tabular}" in tex and "chance & 0.0100" in tex and r"$\pm$" in tex
    assert report.summary_records(result)[1]["hit3 HR@3 mean"] == pytest.approx(result["summary"][1]["hit3 HR@3"][0])


@pytest.mark.parametrize("content,words", [(None, "holds no comparison.json"), ("{", "not readable JSON"),
                                           ('{"rows": []}', "lacks")])
def test_a_folder_that_is_not_a_comparison_is_one_sentence(tmp_path, content, words):
    if content is not None:
        (tmp_path / "comparison.json").write_text(content)
    with pytest.raises((FileNotFoundError, ValueError), match=words):
        report.load_comparison(tmp_path)


def test_find_comparisons(tmp_path):
    _comparison(tmp_path / "a")
    _comparison(tmp_path / "b" / "inner")
    (tmp_path / "c").mkdir()
    assert {p.name for p in report.find_comparisons(tmp_path)} == {"a", "inner"}


def test_comparison_request(tmp_path):
    over, args, base = comparison_request(dataset="assets/demo", task="hit3", methods=["DPO", "HaNo-DPO w/o HaRS"],
                                          seeds="0, 2", sft_steps=3, pref_steps=4, beta=0.2, catalogue_items=50,
                                          extra="--pref.options.epsilon=0.2")  # fmt: skip
    assert base is None
    assert args == ["--seeds=0,2", "--tasks=hit3", "--variants=DPO,HaNo-DPO w/o HaRS"]
    assert over["eval"] == {"protocols": ["catalogue", "ranking"], "catalogue_items": 50}
    assert over["sft"] == {"max_steps": 3} and over["pref"]["max_steps"] == 4 and over["pref"]["beta"] == 0.2
    assert over["pref"]["options"] == {"epsilon": "0.2"}
    for kw, words in ((dict(methods=[]), "at least one method"), (dict(methods=["XPO"]), "unknown method"),
                      (dict(seeds="a"), "comma-separated"), (dict(seeds="1,1"), "each once")):  # fmt: skip
        base_kw = dict(dataset="assets/demo", task="hit3", methods=["DPO"], seeds="0")
        with pytest.raises(JobError, match=words):
            comparison_request(**{**base_kw, **kw})
    with pytest.raises(JobError, match="no SFT checkpoint"):
        comparison_request(dataset=None, task="hit3", methods=["DPO"], seeds="0", sft_run=tmp_path)


def test_a_comparison_job_is_queued_with_its_arguments(tmp_path):
    jm = JobManager(tmp_path, autostart=False, python="/bin/false")
    over, args, _ = comparison_request(dataset="assets/demo", task="hit3", methods=["DPO"], seeds="0")
    job = jm.submit(over, stage=COMPARE, args=args, name="cmp")
    saved = json.loads((tmp_path / "cmp" / "job.json").read_text())
    assert saved["commands"] == ["compare"] and saved["args"] == args and saved["stage"] == COMPARE
    with pytest.raises(JobError, match="only a comparison"):
        jm.submit({}, stage="SFT", args=["--seeds=0"])
    assert job == "cmp"


def test_a_running_comparison_job_reports_its_part_and_the_parts_steps(tmp_path):
    from hanorec import runs

    jm = JobManager(tmp_path, autostart=False, python="/bin/false")
    over, args, _ = comparison_request(dataset="assets/demo", task="hit3", methods=["DPO"], seeds="0")
    run = tmp_path / jm.submit(over, stage=COMPARE, args=args, name="cmp")
    stage = run / "hit3" / "seed0" / "dpo"
    stage.mkdir(parents=True)
    (stage / "metrics.jsonl").write_text(json.dumps({"stage": "dpo", "step": 3, "total_steps": 8}) + "\n")
    runs.write_status(run, "running", command="compare", part=2, parts=2, current="hit3 seed 0: DPO",
                      stage_dir="hit3/seed0/dpo", pid=os.getpid())  # fmt: skip
    st = jm.status("cmp", tick=False)
    assert (st.step, st.total) == (3, 8)
    assert "part 2 of 2: hit3 seed 0: DPO" in st.describe()


def _split_by_seed(result, seed):
    return {**result, "seeds": [seed], "rows": [r for r in result["rows"] if r["seed"] == seed],
            "per_example": [e for e in result["per_example"] if e["seed"] == seed], "split": "test"}  # fmt: skip


def test_merging_per_seed_comparisons_gives_the_pooled_tables(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import merge_comparisons as script

    full = {**report.load_comparison(_comparison(tmp_path / "full")), "split": "test"}
    parts = [_split_by_seed(full, s) for s in (0, 1)]
    merged = report.merge_comparisons(parts, n_boot=300)
    assert merged["seeds"] == [0, 1] and merged["summary"] == report.summarize(full["rows"], mean_std, "catalogue")
    assert merged["paired"] == report.paired_differences(full["per_example"], n_boot=300)
    with pytest.raises(ValueError, match="share a seed"):
        report.merge_comparisons([parts[0], parts[0]])
    with pytest.raises(ValueError, match="differ in dataset"):
        report.merge_comparisons([parts[0], {**parts[1], "dataset": "other"}])
    for s, part in zip((0, 1), parts):
        (tmp_path / f"s{s}").mkdir()
        (tmp_path / f"s{s}" / "comparison.json").write_text(json.dumps(part))
    assert script.main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]) == 0
    assert report.load_comparison(tmp_path / "m")["seeds"] == [0, 1]
    assert "| DPO | SFT |" in (tmp_path / "m" / "comparison.md").read_text()
    assert script.main([str(tmp_path / "s0"), str(tmp_path / "s0"), "--out", str(tmp_path / "m2")]) == 2
    assert "share a seed" in capsys.readouterr().err


def test_the_compare_tab_names_the_chosen_methods_knobs():
    from app.tabs.compare import knob_note

    text = knob_note(["cDPO", "DPO"])
    assert "--pref.options.epsilon" in text and "(cdpo)" in text and "(rdpo)" not in text
    assert "no knobs of their own" in knob_note(["DPO"])


def _three_protocols(folder):
    """A comparison that evaluated the catalogue, ranking and paper protocols: DPO beats SFT on 10 users under
    the catalogue protocol, equals it under ranking, loses on 5 users under paper; hit1 has ranking values."""
    result = report.load_comparison(_comparison(folder))
    more = []
    for e in result["per_example"]:
        v = e["values"]
        same = {**v, "HR@3": list(result_of(result, e["seed"], "SFT")["HR@3"])}
        more.append({**e, "protocol": "ranking", "values": same})
        worse = [0.0 if i < 5 and e["method"] == "DPO" else h for i, h in enumerate(same["HR@3"])]
        more.append({**e, "protocol": "paper", "values": {"user": v["user"], "HR@3": worse, "NDCG@3": worse}})
        scores = np.linspace(-1, 1, len(v["user"])).tolist()
        labels = [i % 2 == 0 for i in range(len(v["user"]))]
        more.append({"task": "hit1", "seed": e["seed"], "method": e["method"], "protocol": "ranking",
                     "values": {"user": v["user"], "score": scores, "label": labels}})  # fmt: skip
    result["per_example"] += more
    return result


def result_of(result, seed, method):
    (e,) = [e for e in result["per_example"] if (e["seed"], e["method"], e.get("protocol")) == (seed, method,
                                                                                                 "catalogue")]
    return e["values"]


def test_each_protocol_gets_its_own_paired_intervals_and_the_catalogue_is_the_default(tmp_path):
    result = _three_protocols(tmp_path / "cmp")
    assert report.main_protocol(result["per_example"]) == "catalogue"
    assert report.main_protocol([{**e, "protocol": "ranking"} for e in result["per_example"]]) == "ranking"
    # the catalogue protocol's entries, hit1 read from its ranking values (it has no catalogue)
    cat = report.protocol_entries(result["per_example"], "catalogue")
    assert {(e["task"], e["protocol"]) for e in cat} == {("hit3", "catalogue"), ("hit1", "ranking")}
    means = {}
    for p in ("catalogue", "ranking", "paper"):
        (dpo,) = [e for e in report.paired_differences(result["per_example"], references=("SFT",), n_boot=200,
                                                       protocol=p) if e["method"] == "DPO"]  # fmt: skip
        means[p] = dpo["hit3 HR@3"]["mean"]
        assert dpo["hit3 HR@3"]["detectable"] >= 0
    assert means["catalogue"] == pytest.approx(10 / 40) and means["ranking"] == 0 and means["paper"] < 0
    default = report.paired_differences(result["per_example"], n_boot=200)
    assert default == report.paired_differences(result["per_example"], n_boot=200, protocol="catalogue")
    assert "hit1 AUC" in default[0]
    forest = {p: {r["method"]: r["mean"] for r in report.forest(result, "SFT", "hit3 HR@3", n_boot=200, protocol=p)}
              for p in (None, "ranking", "paper")}  # fmt: skip
    assert forest[None]["DPO"] == pytest.approx(10 / 40) and forest["ranking"]["DPO"] == 0
    assert forest["paper"]["DPO"] == pytest.approx(means["paper"])
    assert report.scatter(result, "hit3 HR@3", "DPO", "SFT", "ranking")["a"] == report.scatter(
        result, "hit3 HR@3", "SFT", "SFT", "ranking")["a"]  # fmt: skip
    # merged per seed, each protocol's paired table is recomputed; the report prints all three
    full = {**result, "split": "test", "wall_s": 1.0,
            **{f"paired_{p}": report.paired_differences(result["per_example"], n_boot=200, protocol=p)
               for p in ("ranking", "paper")}}  # fmt: skip
    full["paired"] = default
    merged = report.merge_comparisons([_split_by_seed(full, s) for s in (0, 1)], n_boot=200)
    for p in ("ranking", "paper"):
        assert merged[f"paired_{p}"] == full[f"paired_{p}"]
    text = report.comparison_tables(merged)
    assert text.count("method minus reference") == 3
    assert "Catalogue protocol" in text and "Ranking protocol" in text and "Paper protocol" in text


def test_a_comparison_launched_from_the_tab_belongs_to_its_browser_and_is_refused_in_demo_mode(tmp_path):
    import types

    import gradio as gr

    from app.tabs import compare as tab

    jm = JobManager(tmp_path, autostart=False, python="/bin/false")
    ctx = types.SimpleNamespace(jobs=jm, runs_dir=tmp_path, demo=False, resolve_path=lambda p: os.path.abspath(p))
    mine, other = "a" * 24, "b" * 24
    args = ("assets/demo", "hit3", tab.TRAIN_SFT, ["DPO"], "0", 2, 2, 0.1, 1e-3, 0.05, 10, 5, "")
    picker, status, token = tab.launch(ctx, *args, owner=mine)
    assert token == mine and picker["value"] in tab.compare_jobs(ctx) and "comparison" in status
    for action in ("stop", "resume"):
        with pytest.raises(gr.Error, match="another browser"):
            tab.control(ctx, picker["value"], action, other)
    assert "comparison" in tab.control(ctx, picker["value"], "resume", mine)  # (/bin/false: it failed at once)
    ctx.demo = True
    with pytest.raises(gr.Error, match="demo mode"):
        tab.launch(ctx, *args, owner=mine)
