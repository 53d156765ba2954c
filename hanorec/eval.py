"""Evaluation (method.md section 4): the ranking and generative protocols, and baselines on the same
candidates. Metric arithmetic lives in hanorec.metrics; this module runs the model and parses.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hanorec import metrics as M
from hanorec.data import RecDataset, Window
from hanorec.models import ModelBundle
from hanorec.scoring import generate, score_options
from hanorec.tasks import Example, render


@dataclass
class EvalResult:
    rows: list[dict]  # one row per (method, protocol): metrics as fractions + n + candidates
    option_scores: list[list[float]] = field(default_factory=list)  # per example, the model's option scores
    generations: list[str] = field(default_factory=list)


def train_popularity(windows: Sequence[Window]) -> Counter:
    """Interaction counts over the training windows only (no test targets leak into the baseline)."""
    counts: Counter = Counter()
    seen = set()
    for w in windows:
        for item in (*w.history, *w.targets):
            if (w.user, item) not in seen:
                seen.add((w.user, item))
                counts[item] += 1
    return counts


def metrics_from_scores(examples: Sequence[Example], scores: np.ndarray) -> dict:
    """Ranking-protocol metrics of one method's (N, C) option scores, per task."""
    task = examples[0].task
    n_cand = len(examples[0].options) if task != "hit1" else 1 + len(examples[0].not_watched)
    if task == "hit1":
        labels = np.array([e.label for e in examples], dtype=bool)
        margin = scores[:, 0] - scores[:, 1] if scores.shape[1] == 2 else scores[:, 0]
        out = {"AUC": M.auc(margin, labels), "Accuracy": float(((margin > 0) == labels).mean())}
        return {**out, "n": len(examples), "candidates": n_cand}
    return M.ranking_metrics(scores, [e.correct_option for e in examples])


def baseline_scores(name: str, examples: Sequence[Example], popularity: Counter, seed: int) -> np.ndarray:
    task = examples[0].task
    if name == "random":
        return M.random_scores(len(examples), 1 if task == "hit1" else len(examples[0].options), seed)
    if name == "popularity":
        items = [[e.candidates[0]] if task == "hit1" else list(e.candidates) for e in examples]
        return M.popularity_scores(items, popularity, tie_seed=seed)
    raise ValueError(f"unknown baseline {name!r}")


def generative_metrics(examples: Sequence[Example], ds: RecDataset, generations: Sequence[str]) -> dict:
    task = examples[0].task
    if task == "hit3":
        titles = [[ds.items[i].title for i in e.candidates] for e in examples]
        return {
            **M.generative_hit3_metrics(generations, titles, [e.correct_option for e in examples]),
            "candidates": len(examples[0].candidates),
        }
    if task == "next1":
        predicted = []
        for e, g in zip(examples, generations):
            parsed = M.parse_generation(g, [ds.items[i].title for i in e.candidates])
            predicted.append(parsed.matched[0] if parsed.valid and len(parsed.matched) == 1 else None)
        return {
            **M.hit_ratio_at_1(predicted, [e.correct_option for e in examples]),
            "candidates": len(examples[0].candidates),
        }
    answers = [M.parse_yes_no(g) for g in generations]
    labels = np.array([e.label for e in examples], dtype=bool)
    pred = np.array([0.5 if a is None else float(a) for a in answers])
    valid = np.array([a is not None for a in answers])
    out = {
        "AUC": M.auc(pred, labels),
        "Accuracy": float(((pred > 0.5) == labels).mean()),
        "ValidRatio": float(valid.mean()),
    }
    return {**out, "n": len(examples), "candidates": 1 + len(examples[0].not_watched)}


def evaluate(
    bundle: ModelBundle | None,
    ds: RecDataset,
    examples: Sequence[Example],
    *,
    protocols=("ranking",),
    baselines=("random", "popularity"),
    popularity: Counter | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    method: str = "model",
    progress: bool | None = None,
    device=None,
) -> EvalResult:
    """Score `examples` with the model (if given) under each protocol, and the baselines on the same candidates."""
    if not examples:
        raise ValueError("no examples to evaluate")
    rows: list[dict] = []
    result = EvalResult(rows)
    if bundle is not None:
        iterator = examples
        if progress is None:
            import sys

            progress = sys.stderr.isatty()
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(examples, desc=f"eval {method}", dynamic_ncols=True, leave=False)
        all_scores = []
        if "ranking" in protocols or "generative" in protocols:
            for e in iterator:
                r = render(e, ds)
                p = bundle.encode_prompt(r.text, r.images)
                if "ranking" in protocols:
                    all_scores.append(
                        score_options(bundle, [p], [e.options], batch_size=batch_size, device=device)[0]
                    )
                if "generative" in protocols:
                    result.generations.append(
                        generate(bundle, p, max_new_tokens=max_new_tokens, device=device)
                    )
        if "ranking" in protocols:
            scores = torch.stack(all_scores).numpy()
            result.option_scores = scores.tolist()
            rows.append({"method": method, "protocol": "ranking", **metrics_from_scores(examples, scores)})
        if "generative" in protocols:
            rows.append(
                {
                    "method": method,
                    "protocol": "generative",
                    **generative_metrics(examples, ds, result.generations),
                }
            )
    for name in baselines:
        if name == "popularity" and popularity is None:
            raise ValueError("the popularity baseline needs training popularity counts")
        scores = baseline_scores(name, examples, popularity or Counter(), seed)
        rows.append({"method": name, "protocol": "ranking", **metrics_from_scores(examples, scores)})
    return result


METRIC_COLUMNS = {
    "hit3": ["method", "protocol", "HR@1", "HR@3", "NDCG@3", "ValidRatio", "n", "candidates"],
    "next1": [
        "method",
        "protocol",
        "HR@1",
        "HR@3",
        "NDCG@3",
        "HR@1_all",
        "HR@1_valid",
        "ValidRatio",
        "n",
        "candidates",
    ],
    "hit1": ["method", "protocol", "AUC", "Accuracy", "ValidRatio", "n", "candidates"],
}


def format_results(task: str, rows: list[dict], markdown: bool = False) -> str:
    cols = [c for c in METRIC_COLUMNS[task] if any(c in r for r in rows)]
    return M.format_table(rows, cols, markdown=markdown)
