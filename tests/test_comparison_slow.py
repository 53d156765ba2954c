"""run_comparison keeps per-example values and the paired table (slow: trains SFT and DPO for a few steps)."""

import json
from pathlib import Path

import pytest

from hanorec.config import load_config
from hanorec.pipeline import run_comparison
from hanorec.report import paired_differences, paired_table

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_comparison_json_holds_per_example_values_and_the_paired_table(tmp_path):
    cfg = load_config(
        REPO / "configs" / "tiny-cpu.yaml",
        {
            "output_dir": str(tmp_path / "cmp"),
            "data": {"path": str(REPO / "assets" / "demo"), "max_users": 20},
            "task": {"max_eval_examples": 20},
            "sft": {"max_steps": 3, "progress_bar": False},
            "pref": {"max_steps": 2, "progress_bar": False},
        },
    )
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
