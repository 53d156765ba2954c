"""Paired bootstrap over test users (hanorec.stats) on hand-made cases."""

import numpy as np
import pytest

from hanorec import metrics as M
from hanorec.stats import _weighted_auc, paired_bootstrap, paired_bootstrap_auc


def _users(n, repeat=1):
    return [f"u{i}" for i in range(n)] * repeat


def test_identical_methods_give_zero_and_an_interval_containing_it():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 60).astype(float)
    d = paired_bootstrap(a, a.copy(), _users(30, 2))
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0)
    assert not d.excludes_zero and d.n_users == 30


def test_constant_per_user_improvement_gives_a_tight_interval_around_it():
    rng = np.random.default_rng(2)
    b = rng.random(50)
    d = paired_bootstrap(b + 0.1, b, _users(50))
    assert d.mean == pytest.approx(0.1)
    assert d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1)
    assert d.excludes_zero


def test_each_user_weighs_once_and_keeps_its_seeds_together():
    """u0 has two examples (two seeds) with differences 1 and 0, u1 one with 0: per-user means 0.5 and 0,
    so the estimate is 0.25 (the example mean would be 1/3); a bootstrap sample is a mean of user means,
    so every replicate is one of 0, 0.25, 0.5."""
    d = paired_bootstrap([1.0, 0.0, 0.0], [0.0, 0.0, 0.0], ["u0", "u0", "u1"], n_boot=500)
    assert d.mean == pytest.approx(0.25)
    assert d.low == pytest.approx(0.0) and d.high == pytest.approx(0.5)
    assert not d.excludes_zero


def test_noisy_difference_is_reproducible_for_a_seed_and_detects_a_clear_gain():
    rng = np.random.default_rng(3)
    b = rng.integers(0, 2, 400).astype(float)
    a = np.where(rng.random(400) < 0.3, 1.0, b)  # A hits wherever B does, and on 30% more
    users = _users(200, 2)
    d1, d2 = paired_bootstrap(a, b, users, seed=7), paired_bootstrap(a, b, users, seed=7)
    assert d1 == d2
    assert paired_bootstrap(a, b, users, seed=8) != d1
    assert d1.low < d1.mean < d1.high and d1.excludes_zero and d1.low > 0
    assert d1.mean == pytest.approx((a - b).mean())  # two examples per user: user mean = example mean


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="one entry per example"):
        paired_bootstrap([1.0, 0.0], [1.0], ["u0", "u1"])
    with pytest.raises(ValueError, match="no examples"):
        paired_bootstrap([], [], [])


def test_weighted_auc_matches_auc_and_counts_a_drawn_twice_user_twice():
    rng = np.random.default_rng(4)
    s = np.round(rng.random(40), 1)  # ties included
    y = rng.random(40) < 0.5
    assert _weighted_auc(s, y, np.ones(40)) == pytest.approx(M.auc(s, y))
    w = rng.integers(0, 3, 40).astype(float)
    rep = np.repeat(np.arange(40), w.astype(int))
    assert _weighted_auc(s, y, w) == pytest.approx(M.auc(s[rep], y[rep]))


def test_auc_difference_identical_hand_made_and_per_seed():
    y = np.array([True, False, True, False])
    a = np.array([0.9, 0.1, 0.8, 0.2])  # AUC 1
    b = np.array([0.1, 0.9, 0.8, 0.2])  # pairs (0.1 vs 0.9) no, (0.1 vs 0.2) no, (0.8 vs 0.9) no, (0.8 vs 0.2) yes
    users = ["u0", "u1", "u2", "u3"]
    same = paired_bootstrap_auc(a, a, y, users, n_boot=200)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    d = paired_bootstrap_auc(a, b, y, users, n_boot=200)
    assert d.mean == pytest.approx(1.0 - 0.25)
    # two seeds: seed 1's model scores on another scale; the statistic averages per-seed differences
    d2 = paired_bootstrap_auc(
        np.r_[a, 100 * a], np.r_[b, 100 * a], np.r_[y, y], users * 2, groups=[0] * 4 + [1] * 4, n_boot=200
    )
    assert d2.mean == pytest.approx((0.75 + 0.0) / 2)
    assert d2 == paired_bootstrap_auc(
        np.r_[a, 100 * a], np.r_[b, 100 * a], np.r_[y, y], users * 2, groups=[0] * 4 + [1] * 4, n_boot=200
    )


def test_detectable_difference_is_2_8_standard_errors_from_the_per_user_variance():
    from hanorec.stats import detectable_difference, paired_bootstrap

    rng = np.random.default_rng(0)
    diffs = rng.normal(0.0, 0.3, size=400)
    d = paired_bootstrap(diffs, np.zeros(400), [f"u{i}" for i in range(400)], n_boot=200)
    se = diffs.std(ddof=1) / np.sqrt(400)
    assert d.se == pytest.approx(se) and d.detectable == pytest.approx(2.8016 * se, rel=1e-3)
    assert detectable_difference(1.0, 0.95, 0.5) == pytest.approx(1.95996, rel=1e-4)
    with pytest.raises(ValueError, match="power"):
        detectable_difference(1.0, power=1.0)


def test_a_true_difference_of_the_detectable_size_is_seen_about_80_percent_of_the_time():
    """Simulated comparisons whose true per-user difference equals the detectable size: the interval
    excludes 0 in about 80% of them (the claim the comparison report makes)."""
    from hanorec.stats import paired_bootstrap

    rng = np.random.default_rng(1)
    n, sd = 200, 0.5
    size = 2.8016 * sd / np.sqrt(n)
    users = [f"u{i}" for i in range(n)]
    seen = [
        paired_bootstrap(rng.normal(size, sd, n), np.zeros(n), users, n_boot=400, seed=k).excludes_zero
        for k in range(300)
    ]
    assert 0.72 <= np.mean(seen) <= 0.88
