"""Stage 2 preference pairs (method.md section 6).

Every pair keeps aligned lists of positive and negative item ids, which HaRS needs:
- hit3: chosen = the 3 true titles (the example's answer); rejected = 3 negatives drawn from the
  prompt's candidates, formatted the same way; aligned pairs (true_j, negative_j).
- hit1: chosen = the correct Yes/No; rejected = the other; aligned pair (true next item, target item)
  for a No example, (true next item, a "not watched" item) for a Yes example.
- next1: chosen = the true title; rejected_1..K = other candidates (S-DPO); aligned (true, negative_j).

Negatives are drawn uniformly at random (the reference) or, with sampling="embedding", the prompt's
negatives closest to the positives in item-embedding space come first (hardness-aware sampling).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hanorec.data import RecDataset
from hanorec.tasks import Example, TaskError, format_titles, quote


@dataclass(frozen=True)
class PreferencePair:
    example: Example
    chosen: str
    rejected: tuple[str, ...]  # K rejected completions
    positive_item_ids: tuple[str, ...]  # aligned with negative_item_ids (all rejected completions together)
    negative_item_ids: tuple[str, ...]


def _order_negatives(
    negatives: Sequence[str],
    positives: Sequence[str],
    rng: random.Random,
    sampling: str,
    item_embeddings: dict[str, torch.Tensor] | None,
) -> list[str]:
    negs = list(negatives)
    rng.shuffle(negs)  # random order (the reference); also the tie-break for embedding sampling
    if sampling == "embedding":
        if item_embeddings is None:
            raise ValueError("negative_sampling='embedding' needs item embeddings")
        pos = torch.stack([item_embeddings[p] for p in positives])  # (P, D), unit rows

        def closeness(n: str) -> float:
            return float((pos @ item_embeddings[n]).mean())

        negs.sort(key=closeness, reverse=True)
    elif sampling != "random":
        raise ValueError(f"unknown negative sampling {sampling!r}; use 'random' or 'embedding'")
    return negs


def build_pair(
    example: Example,
    ds: RecDataset,
    rng: random.Random,
    *,
    k_negatives: int = 1,
    sampling: str = "random",
    item_embeddings: dict[str, torch.Tensor] | None = None,
) -> PreferencePair:
    titles = ds.items
    if example.task == "hit1":
        if k_negatives != 1:
            raise TaskError(
                f"hit1 has one rejected answer (the other of Yes/No), so pref.k_negatives = {k_negatives} cannot "
                "work; use --pref.k_negatives=1 (S-DPO on hit1 is DPO)"
            )
        rejected = "No" if example.label else "Yes"
        true_next = example.targets[0]
        neg = (
            example.candidates[0]
            if not example.label
            else _order_negatives(example.not_watched, [true_next], rng, sampling, item_embeddings)[0]
        )
        return PreferencePair(example, example.answer, (rejected,), (true_next,), (neg,))

    negs = _order_negatives(
        example.negatives,
        example.targets[:1] if example.task == "next1" else example.targets,
        rng,
        sampling,
        item_embeddings,
    )
    if example.task == "next1":
        if k_negatives > len(negs):
            raise TaskError(
                f"next1 has {len(negs)} negatives, fewer than k_negatives = {k_negatives} (--pref.k_negatives); lower it"
            )
        chosen_neg = negs[:k_negatives]
        rejected = tuple(quote(titles[n].title) for n in chosen_neg)
        return PreferencePair(
            example, example.answer, rejected, (example.targets[0],) * k_negatives, tuple(chosen_neg)
        )

    # hit3: each rejected completion is 3 negatives; K > 1 takes further 3-subsets of the negatives.
    n_target = len(example.targets)
    subsets = list(itertools.combinations(negs, n_target))
    if k_negatives > len(subsets):
        raise TaskError(
            f"hit3 with {len(negs)} negatives allows at most {len(subsets)} rejected answers, fewer than "
            f"pref.k_negatives = {k_negatives}; lower it or raise --task.n_negatives"
        )
    rejected, pos_ids, neg_ids = [], [], []
    for subset in subsets[:k_negatives]:
        rejected.append(format_titles([titles[n].title for n in subset]))
        pos_ids += list(example.targets)
        neg_ids += list(subset)
    return PreferencePair(example, example.answer, tuple(rejected), tuple(pos_ids), tuple(neg_ids))


def build_pairs(
    examples: Sequence[Example],
    ds: RecDataset,
    *,
    seed: int = 0,
    k_negatives: int = 1,
    sampling: str = "random",
    item_embeddings: dict[str, torch.Tensor] | None = None,
    swap: float = 0.0,
) -> list[PreferencePair]:
    """One pair per example, deterministic for a seed.

    swap: the preference-noise scenario (hanorec.data.SCENARIOS, beyond the paper): this fraction of the
    pairs, drawn with their own seeded generator, has the chosen and the first rejected completion swapped
    (with their aligned item ids), as a mislabelled comparison would."""
    rng = random.Random(seed)
    pairs = [
        build_pair(e, ds, rng, k_negatives=k_negatives, sampling=sampling, item_embeddings=item_embeddings)
        for e in examples
    ]
    if swap:
        flips = random.Random(seed + 104729)
        pairs = [swap_pair(p) if flips.random() < swap else p for p in pairs]
    return pairs


def swap_pair(pair: PreferencePair) -> PreferencePair:
    """The pair with its chosen and first rejected completion exchanged (and the first rejected answer's
    aligned positive and negative item ids with them)."""
    m = len(pair.negative_item_ids) // len(pair.rejected)  # aligned ids per rejected completion
    pos, neg = list(pair.positive_item_ids), list(pair.negative_item_ids)
    pos[:m], neg[:m] = neg[:m], pos[:m]
    return PreferencePair(pair.example, pair.rejected[0], (pair.chosen, *pair.rejected[1:]), tuple(pos), tuple(neg))
