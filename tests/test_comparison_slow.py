"""run_comparison keeps per-example values and the paired table (slow: trains SFT and DPO for a few steps)."""

import json
from pathlib import Path

import pytest

from hanorec.config import load_config
from hanorec.pipeline import run_comparison, run_sweep
from hanorec.report import comparison_report, paired_differences, paired_table

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def tiny_comparison(out, max_eval_examples: int = 20, **sections):
    """The tiny preset on 20 demo users, 3 SFT and 2 preference steps, writing to `out`."""
    return load_config(
        REPO / "configs" / "tiny-cpu.yaml",
        {
            "output_dir": str(out),
            "data": {"path": str(REPO / "assets" / "demo"), "max_users": 20},
            "task": {"max_eval_examples": max_eval_examples},
            "sft": {"max_steps": 3, "progress_bar": False},
            "pref": {"max_steps": 2, "progress_bar": False},
            **sections,
        },
    )


def test_comparison_json_holds_per_example_values_and_the_paired_table(tmp_path):
    cfg = tiny_comparison(tmp_path / "cmp")
    result = run_comparison(cfg, seeds=(0, 1), tasks=("hit3",), variants=("DPO",), print_fn=lambda *a: None)
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    keys = {(e["task"], e["seed"], e["method"]) for e in saved["per_example"]}
    assert keys == {("hit3", s, m) for s in (0, 1) for m in ("random", "popularity", "SFT", "DPO")}
    # the per-example values average to the aggregated rows
    for e in saved["per_example"]:
        (row,) = [r for r in saved["rows"] if (r["task"], r["seed"], r["method"]) == (e["task"], e["seed"], e["method"])]
        assert sum(e["values"]["HR@3"]) / len(e["values"]["HR@3"]) == pytest.approx(row["HR@3"])
    # the saved intervals are recomputed from the saved per-example values, and comparison.md renders them
    assert saved["paired"] == paired_differences(saved["per_example"]) == result["paired"]
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert paired_table(saved["paired"], 2, "ranking", "test", saved["split_policy"]) in md
    assert saved["protocol"] == "ranking" and saved["split"] == "test"
    assert "ranking protocol (title likelihood), test split (leave_one_out windows)." in md


def test_sweep_reuses_the_comparison_sft_models_and_pairs_each_setting_with_the_reference(tmp_path):
    over = {
        "data": {"path": str(REPO / "assets" / "demo"), "max_users": 20},
        "task": {"max_eval_examples": 20},
        "sft": {"max_steps": 3, "progress_bar": False},
        "pref": {"max_steps": 2, "progress_bar": False},
    }
    cmp_cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", {**over, "output_dir": str(tmp_path / "cmp")})
    cmp = run_comparison(
        cmp_cfg, seeds=(0, 1), tasks=("hit3",), variants=("HaNo-DPO w/o NoDO",), print_fn=lambda *a: None
    )
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- comparison:sweep -->\nold\n<!-- /comparison:sweep -->\ntail\n")
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", {**over, "output_dir": str(tmp_path / "sweep")})
    settings = {"no noise": {"noise_target": "none"}, "sigma=0.05": {"noise_sigma": 0.05}}
    res = run_sweep(
        cfg, settings, reference="no noise", sft_root=tmp_path / "cmp", seeds=(0, 1), print_fn=lambda *a: None,
        readme=readme, command="sweep-cmd",
    )
    # no SFT was trained again: the sweep's runs read the comparison's SFT models
    assert not list((tmp_path / "sweep").rglob("sft"))
    # the reference setting is the comparison's "HaNo-DPO w/o NoDO" run: same SFT, data and config
    for seed in (0, 1):
        (mine,) = [e for e in res["per_example"] if e["seed"] == seed and e["method"] == "no noise"]
        (theirs,) = [e for e in cmp["per_example"] if e["seed"] == seed and e["method"] == "HaNo-DPO w/o NoDO"]
        assert mine["values"] == theirs["values"]
    # one paired row, the other setting against the reference, recomputable from the saved values
    assert [(p["method"], p["reference"]) for p in res["paired"]] == [("sigma=0.05", "no noise")]
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["paired"] == [p for p in paired_differences(saved["per_example"], ("no noise",))
                               if p["method"] in settings]
    text = readme.read_text()
    assert "old" not in text and "sweep-cmd" in text and "sigma=0.05" in text and text.endswith("tail\n")


def test_a_stopped_comparison_resumes_without_training_sft_again_and_uses_the_catalogue(tmp_path):
    """Stop during the second part (the first method), run again: SFT is not retrained, the method resumes,
    and the finished comparison's paired table reads the catalogue protocol with its detectable difference;
    the ranking and paper protocols it also ran get their own paired tables."""
    cfg = load_config(
        REPO / "configs" / "tiny-cpu.yaml",
        {
            "output_dir": str(tmp_path / "cmp"),
            "data": {"path": str(REPO / "assets" / "demo"), "max_users": 20},
            "task": {"max_eval_examples": 10},
            "sft": {"max_steps": 2, "progress_bar": False},
            "pref": {"max_steps": 3, "progress_bar": False, "save_every": 1},
            "eval": {"protocols": ["catalogue", "ranking", "paper"], "catalogue_items": 15, "max_new_tokens": 8},
        },
    )
    seen: list[dict] = []
    stop_at = {"part": 2}

    def should_stop() -> bool:
        return bool(seen) and seen[-1]["part"] >= stop_at["part"]

    first = run_comparison(cfg, seeds=(0,), tasks=("hit3",), variants=("DPO",), print_fn=lambda *a: None,
                           should_stop=should_stop, on_progress=seen.append)  # fmt: skip
    assert first["stopped_early"] and not (tmp_path / "cmp" / "comparison.json").exists()
    sft_log = (tmp_path / "cmp" / "hit3" / "seed0" / "sft" / "metrics.jsonl").read_text()
    stop_at["part"] = 99
    result = run_comparison(cfg, seeds=(0,), tasks=("hit3",), variants=("DPO",), print_fn=lambda *a: None,
                            should_stop=should_stop, on_progress=seen.append)  # fmt: skip
    assert (tmp_path / "cmp" / "hit3" / "seed0" / "sft" / "metrics.jsonl").read_text() == sft_log
    assert [p["current"] for p in seen] == ["hit3 seed 0: SFT", "hit3 seed 0: DPO"] * 2
    assert result["paired_protocol"] == "catalogue" and result["protocol"] == "catalogue"
    rows = {(r["method"], r["protocol"]) for r in result["rows"]}
    assert {("SFT", "catalogue"), ("DPO", "catalogue"), ("SFT", "ranking"), ("random", "catalogue")} <= rows
    d = result["paired"][0]["hit3 HR@3"]
    assert d["detectable"] >= 0 and "±" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert any(e["method"] == "chance" for e in result["summary"])
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    for p in ("ranking", "paper"):  # each protocol's own per-example values, paired table and detectable size
        assert result[f"paired_{p}"] == paired_differences(result["per_example"], protocol=p)
        assert result[f"paired_{p}"][0]["hit3 HR@3"]["detectable"] >= 0
        assert paired_table(result[f"paired_{p}"], 1, p, "test", result["split_policy"]) in md
    assert result["paired"] == paired_differences(result["per_example"], protocol="catalogue")


def test_comparison_under_both_protocols_gives_paired_intervals_under_each(tmp_path):
    """eval.protocols [ranking, paper] in one comparison: both protocols' per-example values are kept and the
    paper protocol gets its own paired table (the authors' evaluation, method.md section 4)."""
    cfg = tiny_comparison(tmp_path / "cmp", 8, eval={"protocols": ["ranking", "paper"], "max_new_tokens": 8})
    result = run_comparison(cfg, seeds=(0,), tasks=("hit3",), variants=("DPO",), print_fn=lambda *a: None)
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    paper = [e for e in saved["per_example"] if e["protocol"] == "paper"]
    assert {e["method"] for e in paper} == {"SFT", "DPO"} and all(len(e["values"]["HR@3"]) == 8 for e in paper)
    for e in paper:  # the per-example paper values average to the paper rows
        (row,) = [r for r in saved["rows"] if r["method"] == e["method"] and r["protocol"] == "paper"]
        assert sum(e["values"]["NDCG@3"]) / 8 == pytest.approx(row["NDCG@3"])
    assert saved["paired_paper"] == paired_differences(saved["per_example"], protocol="paper") == result["paired_paper"]
    assert [(p["method"], p["reference"]) for p in saved["paired_paper"]] == [("DPO", "SFT"), ("SFT", "DPO")]
    assert saved["paired"] == paired_differences(saved["per_example"])  # the ranking protocol's, as before
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert paired_table(saved["paired_paper"], 1, "paper", "test", saved["split_policy"]) in md
    assert paired_table(saved["paired_paper"], 1, "paper", "test", saved["split_policy"]) in comparison_report(saved)


def test_the_modality_meter_lands_in_comparison_json_and_the_run_results(tmp_path):
    """eval.image_ablation: every model of the comparison evaluated again with its images blanked; the
    metrics with the images are those of the same comparison without the meter; random's drop is 0."""
    from hanorec.pipeline import run_pipeline
    from hanorec.report import image_use, load_comparison

    over = {"eval": {"protocols": ["ranking", "catalogue"], "catalogue_items": 10, "image_ablation": True}}
    cfg = tiny_comparison(tmp_path / "cmp", max_eval_examples=8, **over)
    result = run_comparison(cfg, seeds=(0,), tasks=("hit3",), variants=("DPO",), print_fn=lambda *a: None)
    meter = load_comparison(tmp_path / "cmp")["image_ablation"]
    assert {(e["method"], e["protocol"]) for e in meter["per_example"]} == {
        (m, p) for m in ("random", "popularity", "SFT", "DPO") for p in ("ranking", "catalogue")
    }
    assert list(meter["drop"]) == ["catalogue", "ranking"]
    rows = {r["method"]: r for r in image_use(result)}
    assert list(rows) == ["random", "SFT", "DPO"] and rows["random"]["drop"] == 0.0
    assert "Uses the images?" in (tmp_path / "cmp" / "comparison.md").read_text()
    plain_cfg = tiny_comparison(tmp_path / "plain", max_eval_examples=8, eval={**over["eval"], "image_ablation": False})
    plain = run_comparison(plain_cfg, seeds=(0,), tasks=("hit3",), variants=("DPO",), print_fn=lambda *a: None)
    assert plain["per_example"] == result["per_example"] and "image_ablation" not in plain
    # a single run's results.json carries it too
    run = run_pipeline(tiny_comparison(tmp_path / "run", max_eval_examples=8, **over), print_fn=lambda *a: None)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["image_ablation"]["drop"]["catalogue"][0]["method"] == "random"
    assert {r["method"] for r in run["image_ablation"]["rows"]} == {"SFT", "random", "popularity"}


def test_a_comparison_sharing_its_reference_logps_gives_the_same_results(tmp_path):
    """Every variant of a seed reuses the reference sums the first computed (hanorec.train.refcache): the
    rows and per-example values are those of the comparison where each computes its own, exactly."""
    variants = ("DPO", "HaNo-DPO", "mDPO")
    shared = run_comparison(tiny_comparison(tmp_path / "shared"), seeds=(0,), tasks=("hit3",), variants=variants,
                            print_fn=lambda *a: None)  # fmt: skip
    own = run_comparison(tiny_comparison(tmp_path / "own"), seeds=(0,), tasks=("hit3",), variants=variants,
                         print_fn=lambda *a: None, share_reference=False)  # fmt: skip
    assert shared["per_example"] == own["per_example"]
    assert shared["rows"] == own["rows"]
    assert len(list((tmp_path / "shared" / "hit3" / "seed0" / "reference_logps").glob("*.safetensors"))) == 1
    assert not (tmp_path / "own" / "hit3" / "seed0" / "reference_logps").exists()
