"""Who sets beta? (hanorec.beta_views): HaRS, beta-DPO and DynamicPO's betas for the same pairs, by hand, on
the shipped demo run, and through the Hardness tab's handler."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hanorec import beta_views as B
from hanorec import losses as L
from hanorec.methods.dynamicpo import dynamic_betas

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "demo_runs" / "demo-hit3"


def test_betas_side_by_side_by_hand():
    # 4 pairs, K = 2, reference 0 (so r = logp); micro-batches of 3 then 1
    pol = torch.tensor([[-5.0, -4.0, -6.0], [-3.0, -9.0, -8.0], [-7.0, -7.5, -6.5], [-2.0, -10.0, -3.0]])
    ref = torch.zeros_like(pol)
    lam = [1.1, 0.9, 1.0, 1.2]
    table, negatives = B.betas_side_by_side(pol, ref, lam, beta0=0.1, batch_size=3, rho=0.5)
    h = [-5 + 5, -3 + 8.5, -7 + 7, -2 + 6.5]  # r_w - mean_j r_j
    assert table["h"].tolist() == pytest.approx(h)
    assert table["reward_margin"].tolist() == pytest.approx([0.1 * x for x in h])
    eta = float(L.responsiveness(torch.tensor(h[:3], dtype=torch.float64), 0.1))
    assert table["eta"].tolist() == pytest.approx([eta] * 3 + [1.0])  # a micro-batch of 1: eta needs 3 pairs
    assert table["beta_hars"].tolist() == pytest.approx([0.1 * eta * x for x in lam[:3]] + [0.1 * 1.2])
    # beta-DPO (first rejected answer): batch 1 sets M0 -> beta0; batch 2: beta0 (1 + 0.5 (M - M0))
    m1 = [0.1 * (-5 + 4), 0.1 * (-3 + 9), 0.1 * (-7 + 7.5)]
    m0 = sum(m1) / 3
    m0_next = 0.9 * m0 + 0.1 * m0
    assert table["beta_dpo_batch"].tolist() == pytest.approx([0.1] * 3 + [0.1 * (1 + 0.5 * (0.1 * 8 - m0_next))])
    # rho 0.5 keeps ceil(1.5) = 2 of the first batch, the margins nearest M0 = 0.1833: -0.1 and 0.05, not 0.6
    assert table["beta_dpo_kept"].tolist() == [True, False, True, True]
    beta_j, boundary, _ = dynamic_betas(pol[:, 0], pol[:, 1:], beta0=0.1)
    assert negatives["boundary"].tolist() == boundary.flatten().tolist()
    want = [(beta_j[i] * boundary[i]).sum().item() / boundary[i].sum().item() for i in range(4)]
    assert table["beta_dynamicpo"].tolist() == pytest.approx(want)
    assert table["dynamicpo_boundary"].tolist() == [1, 1, 1, 1]  # -4 and -6.5 by the rule, -8 and -3 the top
    # example 0: -4 >= -5 is the boundary, the rest is -6: d_wb = -1, d_bd = 2
    assert table["beta_dynamicpo"][0] == pytest.approx(0.1 * (1 + 0.5 * math.tanh((-1 - 2 - 2) / 3)))


def test_planted_false_negatives_mark_the_targets_cluster(ds):
    from hanorec.data import make_splits
    from hanorec.explore import taste_cluster
    from hanorec.pairs import build_pairs
    from hanorec.tasks import TASK_SHAPES, build_examples

    s = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=s["n_history"], n_target=s["n_target"])
    pairs = build_pairs(build_examples("hit3", splits.train, ds, seed=0, max_examples=40), ds, seed=0, k_negatives=2)
    marks = [B.planted_false_negatives(p, ds) for p in pairs]
    for p, m in zip(pairs[:40], marks):
        key = taste_cluster(ds, p.example.targets[0])
        for j in range(2):
            items = p.negative_item_ids[j * 3 : (j + 1) * 3]
            assert m[j] == any(taste_cluster(ds, i) == key for i in items)
    assert any(any(m) for m in marks) and not all(all(m) for m in marks)  # both cases occur by chance


def test_bad_inputs_are_one_sentence():
    with pytest.raises(ValueError, match=r"must both be \(N, 1\+K\)"):
        B.betas_side_by_side(torch.zeros(3, 1), torch.zeros(3, 1), [1, 1, 1])
    with pytest.raises(ValueError, match="2 lambdas for 3 pairs"):
        B.betas_side_by_side(torch.zeros(3, 2), torch.zeros(3, 2), [1, 1])
    with pytest.raises(ValueError, match="not a preference stage"):
        B.for_run(SHIPPED, "sft")


@pytest.mark.slow  # two tiny models loaded and 8 pairs scored: about 10 s
def test_who_sets_beta_on_the_shipped_demo_run():
    table, negatives, info = B.for_run(SHIPPED, "hano_dpo", max_pairs=8, k_negatives=3)
    assert info["label"] == "HaNo-DPO" and info["k_negatives"] == 3 and info["scenario"] == {}
    assert list(table.columns) == B.PAIR_COLUMNS and len(table) == 8 and len(negatives) == 24
    assert table[["h", "beta_hars", "beta_dpo_batch", "beta_dynamicpo"]].notna().all().all()
    assert (table["beta_hars"] > 0).all() and (table["beta_dynamicpo"] > 0).all()
    assert table["beta_hars"].nunique() > 1  # lambda differs per pair, eta per micro-batch
    assert (table["beta_dpo_batch"][:4] == 0.1).all()  # the first micro-batch: beta0
    assert table["beta_dynamicpo"].nunique() > 1 and table["false_negatives"].notna().all()
    s = B.summary(table)
    assert list(s["method"]) == ["HaRS", "beta-DPO", "DynamicPO"] and "beta mean, false negative" in s.columns


@pytest.mark.slow  # the app's context loads the demo run's models: about 15 s
def test_the_hardness_tab_shows_who_sets_beta_for_the_demo_run(tmp_path):
    import gradio as gr

    from app.main import build_app, make_context
    from app.tabs import hardness

    demo = ROOT / "assets" / "demo"
    ctx = make_context([str(demo)], str(tmp_path / "runs"), "cpu")
    try:
        model = ctx.default_model()
        assert model.endswith("::hano_dpo")
        text, summary, table, fig = hardness.who_sets_beta(ctx, str(demo), "hit3", model, 3, 8)
        assert "Who sets beta" in text and "no false negatives are planted" in text
        assert len(table) == 8 and list(summary["method"]) == ["HaRS", "beta-DPO", "DynamicPO"]
        assert [len(t.x) for t in fig.data if t.xaxis == "x3"] and sum(len(t.x) for t in fig.data if t.xaxis == "x") == 8
        for bad, words in (((model, 0, 8), "K rejected answers"), ((f"{model[:-len('hano_dpo')]}sft", 3, 8), "preference stage")):
            with pytest.raises(gr.Error, match=words):
                hardness.who_sets_beta(ctx, str(demo), "hit3", *bad)
        api = build_app(ctx).fns
        assert any(getattr(f, "api_name", None) == "hardness_who_sets_beta" for f in api.values())
    finally:
        ctx.jobs.close()
