"""Paired comparisons of two methods on the same test examples: a percentile bootstrap over test users.

Mean ± std over a few seeds cannot tell two methods apart when the seed-to-seed spread is larger than the
difference. Both methods are scored on the same test examples, so the per-example difference removes what
the examples share (an easy user is easy for both); resampling users (each user's examples and seeds kept
together) gives a 95% interval for the mean difference. An interval that contains 0 means "no difference
measurable at this size", not "equal".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """Method A minus method B: the point estimate, a percentile bootstrap interval, and its size."""

    mean: float
    low: float
    high: float
    n_users: int
    n_boot: int
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (a difference measurable at this level)."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}

    def __str__(self) -> str:
        star = " *" if self.excludes_zero else ""
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]{star}"


def _user_codes(users: Sequence) -> tuple[np.ndarray, int]:
    _, codes = np.unique(np.asarray([str(u) for u in users]), return_inverse=True)
    return codes.reshape(-1), int(codes.max()) + 1 if len(codes) else 0


def _user_draws(n_users: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_users) counts: how often each user is drawn in each bootstrap sample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_users, size=(n_boot, n_users))
    return np.stack([np.bincount(d, minlength=n_users) for d in draws]).astype(np.float64)


def _interval(point: float, reps: np.ndarray, n_users: int, n_boot: int, level: float) -> PairedDifference:
    reps = reps[np.isfinite(reps)]
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return PairedDifference(float(point), float(low), float(high), n_users, n_boot, level)


def _check(n_boot: int, level: float, *lengths: int) -> None:
    if len(set(lengths)) != 1:
        raise ValueError(f"paired values must have one entry per example each, got lengths {lengths}")
    if lengths[0] == 0:
        raise ValueError("no examples to compare")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    users: Sequence,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedDifference:
    """Mean per-user paired difference of A over B, with a percentile bootstrap interval over users.

    ``a[i]`` and ``b[i]`` are the two methods' values of one per-example metric (HR@3, NDCG@3, ...) on the
    same example i of user ``users[i]``; examples of several seeds are pooled by concatenation. Each user's
    difference is the mean of ``a - b`` over all its examples (all seeds); the estimate is the mean over
    users, and each bootstrap sample draws users with replacement (a user's seeds stay together).
    Reproducible for a given ``seed``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    _check(n_boot, level, len(a), len(b), len(users))
    codes, n_users = _user_codes(users)
    per_user = np.bincount(codes, weights=a - b, minlength=n_users) / np.bincount(codes, minlength=n_users)
    counts = _user_draws(n_users, n_boot, seed)
    reps = counts @ per_user / n_users
    return _interval(float(per_user.mean()), reps, n_users, n_boot, level)


def _weighted_auc(scores: np.ndarray, labels: np.ndarray, w: np.ndarray) -> float:
    """Mann-Whitney AUC with example weights (a user drawn twice counts twice); ties count one half."""
    _, inv = np.unique(scores, return_inverse=True)
    inv = inv.reshape(-1)
    n_values = int(inv.max()) + 1
    neg_at = np.bincount(inv[~labels], weights=w[~labels], minlength=n_values)
    neg_below = np.cumsum(neg_at) - neg_at
    w_pos, w_neg = w[labels].sum(), w[~labels].sum()
    if w_pos == 0 or w_neg == 0:
        return float("nan")
    p = inv[labels]
    return float((w[labels] * (neg_below[p] + 0.5 * neg_at[p])).sum() / (w_pos * w_neg))


def paired_bootstrap_auc(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    labels: Sequence[bool],
    users: Sequence,
    groups: Sequence | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedDifference:
    """AUC(A) - AUC(B) on the same examples, with a percentile bootstrap interval over users.

    AUC is not a mean over examples, so each bootstrap sample recomputes both AUCs on the drawn users'
    examples (weighted by how often each user is drawn). ``groups`` (e.g. the seed of each example) keeps
    scores of different trained models apart: the statistic is the mean over groups of the per-group AUC
    difference (scores of two seeds' models are not on one scale). Samples in which a group lacks a class
    are left out of the interval. A NaN score (a hit1 answer the paper protocol drops) leaves that example
    out of its own method's AUC only, so each AUC is over that method's kept answers, as the protocol's.
    """
    sa, sb = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    g = np.zeros(len(y), dtype=np.int64) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    _check(n_boot, level, len(sa), len(sb), len(y), len(users), len(g))
    codes, n_users = _user_codes(users)
    members = [np.flatnonzero(g == k) for k in np.unique(g)]

    kept_a, kept_b = np.isfinite(sa), np.isfinite(sb)  # NaN: an answer the paper protocol drops

    def statistic(user_weights: np.ndarray) -> float:
        w = user_weights[codes]
        diffs = []
        for m in members:
            ma, mb = m[kept_a[m]], m[kept_b[m]]
            diffs.append(_weighted_auc(sa[ma], y[ma], w[ma]) - _weighted_auc(sb[mb], y[mb], w[mb]))
        return float(np.mean(diffs))

    point = statistic(np.ones(n_users))
    if not np.isfinite(point):
        raise ValueError("AUC needs both classes (Yes and No answers) in every group")
    reps = np.array([statistic(c) for c in _user_draws(n_users, n_boot, seed)])
    return _interval(point, reps, n_users, n_boot, level)
