"""The low-chance catalogue protocol, MRR, chance levels, coverage and popularity of the top 3."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hanorec import metrics as M
from hanorec.data import make_splits
from hanorec.eval import (
    catalogue_candidates,
    evaluate,
    format_results,
    train_popularity,
)
from hanorec.models import build_tiny
from hanorec.tasks import TaskError, build_examples, catalogue_prompt, corpus_text


@pytest.mark.parametrize("c", [1, 2, 3, 7, 50])
def test_chance_levels_match_every_permutation(c):
    """The analytic chance level equals the average over every position of the true item."""
    ranks = np.arange(c)
    expected = M.rank_values(ranks)
    got = M.chance_levels([c])
    for key in ("HR@1", "HR@3", "NDCG@3", "MRR"):
        assert got[key] == pytest.approx(np.mean(expected[key]), rel=1e-12)
    assert M.chance_levels([7])["HR@3"] == pytest.approx(3 / 7)
    assert M.chance_levels([1682])["HR@3"] < 0.002


def test_chance_levels_average_over_examples_and_reject_bad_counts():
    assert M.chance_levels([4, 10])["HR@1"] == pytest.approx((1 / 4 + 1 / 10) / 2)
    with pytest.raises(ValueError, match="candidate counts"):
        M.chance_levels([0])


def test_mrr_in_ranking_metrics_and_ties_count_against_the_true_item():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.1], [0.1, 0.5, 0.9]])
    out = M.ranking_metrics(scores, [0, 0, 0])
    assert out["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_top_k_summary():
    pop = {"a": 10, "b": 2, "c": 0}
    out = M.top_k_summary([["a", "b"], ["a", "c"]], pop, n_catalogue=6, k=2)
    assert out["Coverage@2"] == pytest.approx(3 / 6)
    assert out["Pop@2"] == pytest.approx((10 + 2 + 10 + 0) / 4)


def _setup(ds, n=4):
    splits = make_splits(ds, n_history=3, n_target=3)
    return build_examples("hit3", splits.test, ds, seed=0, max_examples=n), splits


def test_catalogue_prompt_drops_only_the_candidate_sentence(ds):
    (e, *_), _ = _setup(ds, 1)
    p = catalogue_prompt(e, ds)
    assert "Below are the candidate" not in p
    assert p.startswith(e.prompt.split(" Below are the candidate ")[0])
    assert p.endswith(e.prompt.split("Answer with")[1]) and p.count("<image>") == e.prompt.count("<image>")
    h1 = build_examples("hit1", make_splits(ds, n_history=5, n_target=1).test, ds, seed=0, max_examples=1)
    with pytest.raises(TaskError, match="hit1"):
        catalogue_prompt(h1[0], ds)


def test_catalogue_candidates_are_unseen_items_with_the_true_item_first(ds):
    (e, *_), _ = _setup(ds, 1)
    full = catalogue_candidates(e, ds)
    seen = set(ds.sequences[e.user])
    assert full[0] == e.targets[0] and not (set(full[1:]) & seen)
    assert len(full) == 1 + len(ds.items) - len(set(seen) & set(ds.items))
    part = catalogue_candidates(e, ds, size=20, seed=3)
    assert len(part) == 21 and set(part[1:]) <= set(full[1:])
    assert part == catalogue_candidates(e, ds, size=20, seed=3) != catalogue_candidates(e, ds, size=20, seed=4)


def test_catalogue_protocol_chunking_does_not_change_scores(ds):
    """Titles scored 5 per forward or 400 per forward give the same table (memory is bounded by the chunk)."""
    examples, splits = _setup(ds, 3)
    b = build_tiny("tiny-qwen2.5-vl", corpus_text(ds), hidden_size=64, seed=0)
    b.model.float().eval()
    pop = train_popularity(splits.train)
    kw = dict(protocols=("catalogue",), popularity=pop, progress=False, catalogue_items=30)
    small = evaluate(b, ds, examples, catalogue_chunk=5, **kw)
    big = evaluate(b, ds, examples, catalogue_chunk=400, **kw)
    np.testing.assert_allclose(
        np.concatenate([np.asarray(x) for x in small.catalogue_scores]),
        np.concatenate([np.asarray(x) for x in big.catalogue_scores]),
        rtol=1e-5,
        atol=1e-4,
    )
    assert small.rows == big.rows and small.per_example_protocol == "catalogue"
    model = small.rows[0]
    assert model["protocol"] == "catalogue" and model["candidates"] == 31
    assert model["chance"]["HR@3"] == pytest.approx(3 / 31)
    assert set(small.per_example) == {"model", "random", "popularity"}
    mrr = np.mean(small.per_example["model"]["MRR"])
    assert model["MRR"] == pytest.approx(mrr) and 0 < mrr <= 1
    text = format_results("hit3", small.rows)
    assert "chance" in text and "Coverage@3" in text and "Pop@3" in text and "MRR" in text


def test_popularity_baseline_tops_the_popular_items(ds):
    examples, splits = _setup(ds, 4)
    pop = train_popularity(splits.train)
    ev = evaluate(None, ds, examples, protocols=("catalogue",), popularity=pop, progress=False)
    rows = {r["method"]: r for r in ev.rows}
    assert rows["popularity"]["Pop@3"] > rows["random"]["Pop@3"]
    assert rows["popularity"]["Pop@3"] > rows["popularity"]["chance"]["Pop@3"]
    top = sorted(pop.values(), reverse=True)
    assert rows["popularity"]["Pop@3"] >= np.mean(top[: 3 * 4 + 60]) - 1e-9
    assert math.isfinite(rows["random"]["MRR"])
    assert not any(itertools.chain.from_iterable(np.isnan(v).tolist() for v in ev.per_example["random"].values()
                                                 if isinstance(v[0], float)))


def test_catalogue_prompt_and_titles_follow_the_authors_template_and_outer_quotes(ds, monkeypatch):
    """task.template_set=authors lists candidates one per line: the catalogue prompt drops that list too; with
    task.hit3_outer_quotes the catalogue titles open with the extra quote, as the ranking options do."""
    import torch

    import hanorec.eval
    from hanorec.eval import catalogue_scores

    windows = make_splits(ds, n_history=3, n_target=3).test
    (e,) = build_examples("hit3", windows, ds, seed=0, max_examples=1, template_set="authors", outer_quotes=True)
    p = catalogue_prompt(e, ds)
    assert "Below are the candidate" not in p and p.endswith("may watch.") and p.count("<image>") == 3
    assert e.options[0].startswith('""')

    class Recorder:
        def encode_prompt(self, text, images):
            return text

    seen = {}

    def fake_score(bundle, prompts, pieces, **kw):
        seen["titles"] = [t for piece in pieces for t in piece]
        return [torch.zeros(len(piece)) for piece in pieces]

    monkeypatch.setattr(hanorec.eval, "score_options", fake_score)
    items = catalogue_candidates(e, ds, size=5, seed=0)
    catalogue_scores(Recorder(), ds, [e], [items])
    assert seen["titles"] == ['""' + ds.items[i].title + '"' for i in items]
