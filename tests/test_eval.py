"""Batched evaluation: several prompts per forward give the same metric tables as one example at a time.

"Before" is what evaluate did until batching: ``score_options`` on one prompt per call. "After" packs
``batch_size`` prompts into one forward. Scores agree to float32 rounding (relative 1e-6) and the metric tables are
identical, ties included (pessimistic: every other candidate with the same score ranks above the true
one). Also: progress events (stage "eval"), should_stop, the tqdm bar.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from hanorec.data import make_splits
from hanorec.eval import (
    evaluate,
    format_results,
    metrics_from_scores,
    per_example_values,
    rank_options,
    snap_ties,
    train_popularity,
)
from hanorec.models import build_tiny
from hanorec.scoring import score_options
from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text, render

PRESETS = ("tiny-qwen2.5-vl", "tiny-llava")


@pytest.fixture(scope="module")
def bundles(ds):
    out = {}
    for preset in PRESETS:
        b = build_tiny(preset, corpus_text(ds), hidden_size=64, seed=0)
        b.model.float().eval()
        out[preset] = b
    return out


def _examples(ds, task, n, n_negatives=None):
    s = TASK_SHAPES[task]
    splits = make_splits(ds, n_history=s["n_history"], n_target=s["n_target"])
    return build_examples(task, splits.test, ds, seed=0, max_examples=n, n_negatives=n_negatives), splits


def one_at_a_time(bundle, ds, examples) -> np.ndarray:
    """The evaluation loop before batching: one prompt per score_options call."""
    out = []
    for e in examples:
        r = render(e, ds)
        p = bundle.encode_prompt(r.text, r.images)
        out.append(score_options(bundle, [p], [e.options], batch_size=8)[0])
    return torch.stack(out).numpy()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("task,n_negatives", [("hit3", None), ("hit1", None), ("hit3", 17)])
def test_batched_tables_match_one_at_a_time(ds, bundles, preset, task, n_negatives):
    bundle = bundles[preset]
    examples, splits = _examples(ds, task, 11, n_negatives)
    before = one_at_a_time(bundle, ds, examples)
    pop = train_popularity(splits.train)
    after = evaluate(bundle, ds, examples, batch_size=4, popularity=pop, progress=False)  # chunks 4, 4, 3
    np.testing.assert_allclose(np.array(after.option_scores), before, atol=1e-5, rtol=1e-6)
    rows_before = [
        {"method": "model", "protocol": "ranking",
         **metrics_from_scores(examples, before, snap=True, popularity=pop, n_catalogue=len(ds.items))}
    ]  # fmt: skip
    assert after.rows[0] == rows_before[0]
    # the per-example values average to the aggregated row (hit1: AUC recomputed from scores and labels)
    _check_per_example(after.per_example["model"], after.rows[0], examples)
    assert format_results(task, after.rows[:1]) == format_results(task, rows_before)
    if task == "hit3":
        assert after.rows[0]["candidates"] == 3 + (n_negatives or TASK_SHAPES["hit3"]["n_negatives"])
    # the naive path (prompt repeated per option) gives the same scores too
    naive = rank_options(bundle, ds, examples, batch_size=4, mode="naive").numpy()
    np.testing.assert_allclose(naive, before, atol=1e-5, rtol=1e-6)


def _check_per_example(values, row, examples):
    assert values["user"] == [e.user for e in examples]
    if examples[0].task == "hit1":
        assert values["label"] == [e.label for e in examples]
        assert np.isclose(metrics_from_scores(examples, np.array(values["score"])[:, None])["AUC"], row["AUC"])
        return
    for metric in ("HR@1", "HR@3", "NDCG@3", "MRR"):
        assert len(values[metric]) == len(examples)
        assert np.isclose(np.mean(values[metric]), row[metric]), metric


@pytest.mark.parametrize("task", ["hit3", "hit1", "next1"])
def test_per_example_values_average_to_the_rows_for_baselines(ds, task):
    examples, splits = _examples(ds, task, 40)
    ev = evaluate(None, ds, examples, popularity=train_popularity(splits.train), progress=False)
    assert set(ev.per_example) == {"random", "popularity"}
    for row in ev.rows:
        _check_per_example(ev.per_example[row["method"]], row, examples)


def test_per_example_values_by_hand():
    """Ranks 0, 2 and 3 of the true option (ties pessimistic): HR@3 1, 1, 0; NDCG@3 1, 1/log2(4), 0."""
    examples, _ = _examples_stub(3)
    scores = np.array([[3.0, 2.0, 1.0, 0.0], [1.0, 3.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    v = per_example_values(examples, scores)
    assert v["HR@1"] == [1.0, 0.0, 0.0] and v["HR@3"] == [1.0, 1.0, 0.0]
    assert np.allclose(v["NDCG@3"], [1.0, 0.5, 0.0])


def _examples_stub(n):
    from types import SimpleNamespace

    return [SimpleNamespace(task="hit3", user=f"u{i}", correct_option=0) for i in range(n)], None


def test_ties_resolved_the_same_way(ds, bundles):
    """A duplicated option text scores equal up to float rounding (not bit-equal: its place in the packed
    row differs); both paths count it as a tie against the true option, so the true one is never first."""
    bundle = bundles["tiny-qwen2.5-vl"]
    examples, _ = _examples(ds, "hit3", 6)
    tied = []
    for e in examples:
        opts = list(e.options)
        opts[(e.correct_option + 1) % len(opts)] = opts[e.correct_option]  # a twin of the true option
        tied.append(replace(e, options=tuple(opts)))
    before = one_at_a_time(bundle, ds, tied)
    after = np.array(evaluate(bundle, ds, tied, batch_size=3, baselines=(), progress=False).option_scores)
    for scores in (before, after):
        for i, e in enumerate(tied):
            twin = scores[i, (e.correct_option + 1) % len(e.options)]
            assert twin == pytest.approx(scores[i, e.correct_option], rel=1e-6, abs=1e-5)
        assert metrics_from_scores(tied, scores, snap=True)["HR@1"] == 0.0  # ties go against the true one
    assert metrics_from_scores(tied, after, snap=True) == metrics_from_scores(tied, before, snap=True)


def test_snap_ties_only_merges_rounding_differences():
    scores = np.array([[-10.0, -10.00001, -9.0, -10.5], [-3.0, -3.0, -3.2, -2.0]])
    snapped = snap_ties(scores, [0, 1])
    assert snapped[0].tolist() == [-10.0, -10.0, -9.0, -10.5]
    assert snapped[1].tolist() == scores[1].tolist()


def test_progress_events_and_should_stop(ds, bundles):
    bundle = bundles["tiny-llava"]
    examples, _ = _examples(ds, "hit3", 7)
    events = []
    res = evaluate(bundle, ds, examples, batch_size=3, baselines=(), progress=False, on_log=events.append)
    assert [e["step"] for e in events] == [3, 6, 7]
    assert all(e["stage"] == "eval" and e["total_steps"] == 7 and e["elapsed_s"] >= 0 for e in events)
    assert not res.stopped and len(res.rows) == 1

    events.clear()
    res = evaluate(
        bundle,
        ds,
        examples,
        batch_size=3,
        progress=False,
        popularity=None,
        baselines=("random",),
        on_log=events.append,
        should_stop=lambda: len(events) >= 1,
    )
    assert res.stopped and res.rows == [] and res.option_scores == []
    assert [e["step"] for e in events] == [3]  # stopped after the first batch


def test_progress_bar_shows_a_time_estimate(ds, bundles, capsys):
    bundle = bundles["tiny-llava"]
    examples, _ = _examples(ds, "hit3", 4)
    evaluate(bundle, ds, examples, batch_size=2, baselines=(), progress=True, method="SFT")
    err = capsys.readouterr().err
    assert "eval SFT" in err and "4/4" in err and "<" in err  # tqdm's "elapsed<remaining"
