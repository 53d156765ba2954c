"""Paired intervals under the paper protocol (method.md section 4): evaluate() keeps the paper protocol's value
per example, a comparison's per-example entries carry both protocols, and paired_differences reads either."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from hanorec import eval as E
from hanorec.data import load_dataset, make_splits
from hanorec.metrics import auc
from hanorec.models import build_tiny
from hanorec.pipeline import per_example_entries
from hanorec.report import paired_differences, paired_table
from hanorec.stats import paired_bootstrap_auc
from hanorec.tasks import build_examples, corpus_text

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"


@pytest.fixture(scope="module")
def demo():
    ds = load_dataset(DEMO)
    bundle = build_tiny("tiny-qwen2.5-vl", corpus_text(ds), hidden_size=64, seed=0)
    return ds, bundle


def _evaluate(ds, bundle, examples, answers, method, monkeypatch):
    it = iter(answers)
    monkeypatch.setattr(E, "generate", lambda *a, **k: next(it))
    return E.evaluate(bundle, ds, examples, protocols=["ranking", "paper"], baselines=(), method=method,
                      progress=False, max_new_tokens=4)  # fmt: skip


def test_hit3_paper_values_per_example_and_their_paired_difference(demo, monkeypatch):
    ds, bundle = demo
    examples = build_examples("hit3", make_splits(ds, n_history=3, n_target=3).test[:12], ds, seed=0)
    t = lambda e, k: ds.items[e.targets[k]].title  # noqa: E731
    right = [f'"{t(e, 0)}"\n"{t(e, 1)}"' if i % 2 == 0 else f'"x"\n"{t(e, 0)}"' for i, e in enumerate(examples)]
    wrong = ['"nothing"'] * len(examples)
    a = _evaluate(ds, bundle, examples, right, "HaNo-DPO", monkeypatch)
    b = _evaluate(ds, bundle, examples, wrong, "SFT", monkeypatch)
    va = a.paper_per_example["HaNo-DPO"]
    assert va["HR@3"] == [1.0] * 12 and va["NDCG@3"] == [1.0 if i % 2 == 0 else 1 / math.log2(3) for i in range(12)]
    row = next(r for r in a.rows if r["protocol"] == "paper")
    assert row["NDCG@3"] == pytest.approx(np.mean(va["NDCG@3"]))
    entries = per_example_entries("hit3", 0, a) + per_example_entries("hit3", 0, b)
    assert {e["protocol"] for e in entries} == {"ranking", "paper"}
    (paper,) = paired_differences(entries, references=("SFT",), protocol="paper", n_boot=200)
    assert paper["hit3 HR@3"]["mean"] == pytest.approx(1.0) and paper["hit3 HR@3"]["excludes_zero"]
    assert paper["hit3 NDCG@3"]["mean"] == pytest.approx(np.mean(va["NDCG@3"]))
    (ranking,) = paired_differences(entries, references=("SFT",), n_boot=200)
    assert ranking["hit3 HR@3"]["mean"] == 0.0  # the same model under the ranking protocol
    assert "Paper protocol" in paired_table([paper], 1, "paper", "test", "leave_one_out")


def test_hit1_dropped_answers_leave_each_methods_own_auc(demo, monkeypatch):
    ds, bundle = demo
    examples = build_examples("hit1", make_splits(ds, n_history=5, n_target=1).test[:40], ds, seed=0)
    labels = [bool(e.label) for e in examples]
    assert 0 < sum(labels) < len(labels)
    good = ["Yes" if y else "No" for y in labels]
    good[:4] = ["maybe"] * 4  # dropped by the protocol
    flat = ["Yes"] * len(examples)
    a = _evaluate(ds, bundle, examples, good, "A", monkeypatch)
    b = _evaluate(ds, bundle, examples, flat, "B", monkeypatch)
    va, vb = a.paper_per_example["A"], b.paper_per_example["B"]
    assert all(math.isnan(s) for s in va["score"][:4]) and va["label"] == labels
    d = paired_bootstrap_auc(va["score"], vb["score"], va["label"], va["user"], n_boot=200)
    kept = slice(4, None)
    expected = auc(np.array(va["score"][kept]), np.array(labels[kept])) - auc(np.array(vb["score"]), np.array(labels))
    assert d.mean == pytest.approx(expected) == pytest.approx(0.5)
    row = next(r for r in a.rows if r["protocol"] == "paper")
    assert row["AUC"] == 1.0 and row["dropped"] == 4
