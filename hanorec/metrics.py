"""Recommendation metrics (method.md section 4): pure functions, no model, no I/O.

Every metric is a fraction in [0, 1]; the dicts also carry the number of samples ``n``
(and ``candidates`` where the candidate count is fixed) so a table can report them.

Three protocols share these functions:

- Generative (ours, lenient): decode, :func:`parse_generation` into candidate indices,
  then :func:`hit_and_ndcg_at_k` per sample; :func:`generative_hit3_metrics` does all of it.
- Paper (the authors' evaluation script): :func:`paper_lines` strips double quotes and spaces
  from each generated line, titles must match exactly (case-sensitive);
  :func:`paper_hit3_metrics`, :func:`paper_hit1_metrics` (hard Yes/No, other answers dropped),
  :func:`paper_next1_metrics`.
- Ranking (ours, deterministic): a score per candidate (e.g. the log-likelihood of its
  title), then :func:`ranking_metrics`. Ties are broken *pessimistically*: a candidate with
  the same score as the true item is ranked above it, so a constant scorer gets no credit.

Baselines over the same candidates: :func:`random_scores` and :func:`popularity_scores`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

# ----------------------------------------------------------------------------------------
# Parsing generations


_QUOTE_CHARS = "\"'`\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u00ab\u00bb\u2039\u203a\u300c\u300d"
# "1. " "1)" "(1) " "#1." "- " "* " "• " at the start of a line; "1.Heat" too, but not "2.0".
_LIST_MARKER = re.compile(
    r"^\s*(?:\(?#?\d{1,3}[.)]|[-*\u2022\u2013\u2014])\s+|^\s*\(?#?\d{1,3}[.)](?=[^\s\d])"
)
_WHITESPACE = re.compile(r"\s+")


def normalize_title(s: str) -> str:
    """Canonical form of a title for matching.

    Lowercase, strip, drop a leading list marker ("1.", "2)", "(3)", "- ", "* ", "• "),
    strip surrounding quote-like characters (straight, curly, guillemets, backticks) and
    collapse runs of whitespace to one space. Applied to both generated lines and
    candidate titles, so a title that itself starts with "1." still matches itself.
    A bare leading number without "." or ")" is kept ("1984" stays "1984").
    """
    s = _WHITESPACE.sub(" ", str(s)).strip().lower()
    prev = None
    while s != prev:  # "1. "Heat"" -> strip the marker, then the quotes
        prev = s
        s = _LIST_MARKER.sub("", s, count=1).strip()
        s = s.strip(_QUOTE_CHARS).strip()
    return s


@dataclass
class ParsedOutput:
    """A generation split into lines and matched against the candidate titles."""

    lines: list[str] = field(default_factory=list)  # non-empty lines, stripped
    matched: list[int | None] = field(default_factory=list)  # candidate index per line, None = unknown
    valid: bool = False  # at least one line and every line names a candidate


def _contains_word(haystack: str, needle: str) -> bool:
    """True if ``needle`` occurs in ``haystack`` not glued to a word character on either side."""
    return re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", haystack) is not None


def parse_generation(text: str, candidate_titles: Sequence[str]) -> ParsedOutput:
    """Split ``text`` into non-empty lines and match each to a candidate index.

    A line matches candidate ``j`` if its :func:`normalize_title` equals candidate ``j``'s.
    Otherwise, if the normalized line contains exactly one candidate's normalized title
    (as a whole phrase, not inside a longer word), it matches that candidate. When several
    candidates are contained and one contains another ("alien" inside "aliens (1986)"),
    only the longest, maximal ones count. Two candidates with the same normalized title
    resolve to the first. Unknown lines are ``None``.
    """
    normalized = [normalize_title(t) for t in candidate_titles]
    exact: dict[str, int] = {}
    for j, t in enumerate(normalized):
        if t:
            exact.setdefault(t, j)

    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    matched: list[int | None] = []
    for line in lines:
        norm = normalize_title(line)
        if norm in exact:
            matched.append(exact[norm])
            continue
        contained = {t for t in exact if _contains_word(norm, t)}
        maximal = {t for t in contained if not any(t != u and t in u for u in contained)}
        matched.append(exact[maximal.pop()] if len(maximal) == 1 else None)
    valid = bool(lines) and all(m is not None for m in matched)
    return ParsedOutput(lines=lines, matched=matched, valid=valid)


def parse_yes_no(text: str) -> bool | None:
    """Read a Yes/No answer (hit1 task).

    The first word decides ("Yes.", "no, because ..." -> True, False). Otherwise, if exactly
    one of the whole words "yes" / "no" appears ("Answer: Yes"), that one. Else ``None``
    (an invalid answer).
    """
    words = re.findall(r"[a-z]+", str(text).lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0] == "yes"
    found = {w for w in words if w in ("yes", "no")}
    if len(found) == 1:
        return found.pop() == "yes"
    return None


# ----------------------------------------------------------------------------------------
# Per-sample and aggregate metrics


def hit_and_ndcg_at_k(ranked: Sequence[int | None], true_first: int, k: int = 3) -> tuple[float, float]:
    """HR@k and NDCG@k of one sample.

    ``ranked`` are candidate indices in the order produced (``None`` for an unknown line,
    which still takes a position). With ``r`` the 0-based position of the first occurrence
    of ``true_first``: HR@k = 1 if r < k, NDCG@k = 1 / log2(r + 2) if r < k; both 0 otherwise.
    There is a single relevant item, so the ideal DCG is 1.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for r, idx in enumerate(list(ranked)[:k]):
        if idx is not None and int(idx) == int(true_first):
            return 1.0, 1.0 / math.log2(r + 2)
    return 0.0, 0.0


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64 if x.is_floating_point() else x.dtype).numpy()
    return np.asarray(x)


def pessimistic_ranks(scores, true_first) -> np.ndarray:
    """0-based rank of the true candidate per row, ties counted against it.

    rank_n = #{j : s_nj > s_n,true} + #{j != true : s_nj == s_n,true}. Higher score = better.
    """
    s = _as_numpy(scores).astype(np.float64)
    t = _as_numpy(true_first).astype(np.int64).reshape(-1)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (N, C), got shape {s.shape}")
    n, c = s.shape
    if t.shape[0] != n:
        raise ValueError(f"true_first has {t.shape[0]} entries but scores has {n} rows")
    if n and (t.min() < 0 or t.max() >= c):
        raise ValueError(f"true_first must index the {c} candidates, got values in [{t.min()}, {t.max()}]")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; cannot rank candidates")
    true_score = s[np.arange(n), t][:, None]  # (N, 1)
    # >= counts the true item itself once, so subtract it: ties go against the true item.
    return (s >= true_score).sum(axis=1) - 1


def ranking_metrics(scores, true_first, ks: Sequence[int] = (1, 3)) -> dict:
    """HR@k and NDCG@k from candidate scores (ranking protocol, higher score = better).

    ``scores`` is (N, C) (tensor or array), ``true_first`` (N,) indices of the most recent
    true next item. Ties are broken deterministically and pessimistically: every other
    candidate with the same score ranks above the true one (see :func:`pessimistic_ranks`),
    so constant scores give HR@1 = 0 for C > 1. Returns ``HR@k`` and ``NDCG@k`` for each k
    (NDCG@1 equals HR@1), plus ``n`` (samples) and ``candidates`` (C).
    """
    scores = _as_numpy(scores)
    ranks = pessimistic_ranks(scores, true_first)  # (N,)
    n, c = int(scores.shape[0]), int(scores.shape[1])
    out: dict = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean()) if n else 0.0
        gains = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
        out[f"NDCG@{k}"] = float(gains.mean()) if n else 0.0
    out["MRR"] = float((1.0 / (ranks + 1.0)).mean()) if n else 0.0
    out["n"] = n
    out["candidates"] = c
    return out


def rank_values(ranks) -> dict[str, list[float]]:
    """Per-example HR@1, HR@3, NDCG@3 and reciprocal rank (MRR's terms) of 0-based ranks of the true item."""
    r = _as_numpy(ranks).astype(np.float64).reshape(-1)
    return {
        "HR@1": (r < 1).astype(float).tolist(),
        "HR@3": (r < 3).astype(float).tolist(),
        "NDCG@3": np.where(r < 3, 1.0 / np.log2(r + 2.0), 0.0).tolist(),
        "MRR": (1.0 / (r + 1.0)).tolist(),
    }


def chance_levels(n_candidates, ks: Sequence[int] = (1, 3)) -> dict:
    """Each ranking metric's expected value under a uniformly random order of the candidates.

    ``n_candidates`` holds each example's candidate count C (one int for all, or one per example: the
    catalogue protocol's C varies with what each user has seen). For one example the true item's rank is
    uniform on 0..C-1, so HR@k = min(k, C)/C, NDCG@k = sum_{r<min(k,C)} 1/log2(r+2) / C and
    MRR = H_C / C (H_C the C-th harmonic number); the returned values are means over examples.
    """
    c = np.atleast_1d(np.asarray(n_candidates, dtype=np.int64)).reshape(-1)
    if c.size == 0 or (c < 1).any():
        raise ValueError(f"candidate counts must be >= 1, got {sorted(set(c.tolist()))[:5]}")
    out: dict = {}
    for k in ks:
        kk = np.minimum(k, c)
        out[f"HR@{k}"] = float((kk / c).mean())
        gains = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))  # gains[j] = sum over ranks 0..j
        out[f"NDCG@{k}"] = float((gains[kk - 1] / c).mean())
    harmonic = np.cumsum(1.0 / np.arange(1, int(c.max()) + 1))
    out["MRR"] = float((harmonic[c - 1] / c).mean())
    return out


def top_k_summary(top_items: Sequence[Sequence[str]], popularity: Mapping, n_catalogue: int, k: int = 3) -> dict:
    """Coverage and mean popularity of the top-k recommendations over all examples.

    ``Coverage@k``: distinct items in any example's top k over the catalogue size (a model that shows
    everyone the same items covers little). ``Pop@k``: the mean training-interaction count of the top-k
    items (recommender papers explain preference-training gains through popularity bias; compare with
    the popularity baseline's and the chance level's value).
    """
    if n_catalogue < 1:
        raise ValueError(f"the catalogue needs at least one item, got {n_catalogue}")
    tops = [list(t)[:k] for t in top_items]
    flat = [i for t in tops for i in t]
    return {
        f"Coverage@{k}": len(set(flat)) / n_catalogue,
        f"Pop@{k}": float(np.mean([_count(popularity, i) for i in flat])) if flat else 0.0,
    }


def top_k_indices(scores, k: int = 3) -> np.ndarray:
    """(N, min(k, C)) candidate indices of each row's k best scores, best first (ties: lower index first)."""
    s = _as_numpy(scores).astype(np.float64)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def auc(scores, labels) -> float:
    """ROC AUC as the Mann-Whitney statistic: P(score_pos > score_neg) + 0.5 * P(tie).

    Computed from average ranks (ties share their mean rank), which equals the pairwise
    count over all (positive, negative) pairs. ``labels`` are 0/1 or booleans.
    """
    s = _as_numpy(scores).astype(np.float64).reshape(-1)
    y = _as_numpy(labels).reshape(-1)
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores has {s.shape[0]} entries but labels has {y.shape[0]}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1 or booleans, got values {sorted(set(y.tolist()))[:5]}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; cannot compute AUC")
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes, got {n_pos} positives and {n_neg} negatives")
    # Average 1-based ranks: ties share the mean of the ranks they span.
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # last 1-based rank of each distinct value
    avg_rank = (ends - (counts - 1) / 2.0)[inverse]
    u = avg_rank[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def hit_ratio_at_1(predicted: Sequence[int | None], truth: Sequence[int]) -> dict:
    """HitRatio@1 for the next1 task, with both denominators in use in the literature.

    ``predicted[i]`` is the parsed answer (candidate index or item id), ``None`` if invalid.
    - ``HR@1_all``   = correct / all samples (S-DPO's convention).
    - ``HR@1_valid`` = correct / valid answers (LLaRA's convention; 0 if none is valid).
    - ``ValidRatio`` = valid answers / all samples.
    """
    predicted, truth = list(predicted), list(truth)
    if len(predicted) != len(truth):
        raise ValueError(f"predicted has {len(predicted)} entries but truth has {len(truth)}")
    n = len(truth)
    valid = [p is not None for p in predicted]
    correct = sum(1 for p, t in zip(predicted, truth) if p is not None and p == t)
    n_valid = sum(valid)
    return {
        "HR@1_all": correct / n if n else 0.0,
        "HR@1_valid": correct / n_valid if n_valid else 0.0,
        "ValidRatio": n_valid / n if n else 0.0,
        "n": n,
    }


def generative_hit3_metrics(
    generations: Sequence[str], candidates: Sequence[Sequence[str]], true_first: Sequence[int]
) -> dict:
    """HR@3, NDCG@3 and ValidRatio of the hit3 task under the generative protocol.

    Each generation is parsed against its own candidate titles; the first 3 lines (unknown
    lines included, they take a position) are searched for the first true item.
    """
    if not (len(generations) == len(candidates) == len(true_first)):
        raise ValueError(
            f"generations ({len(generations)}), candidates ({len(candidates)}) and "
            f"true_first ({len(true_first)}) must have the same length"
        )
    n = len(generations)
    hr = ndcg = valid = 0.0
    for text, titles, t in zip(generations, candidates, true_first):
        parsed = parse_generation(text, titles)
        h, g = hit_and_ndcg_at_k(parsed.matched, int(t), k=3)
        hr, ndcg, valid = hr + h, ndcg + g, valid + parsed.valid
    return {
        "HR@3": hr / n if n else 0.0,
        "NDCG@3": ndcg / n if n else 0.0,
        "ValidRatio": valid / n if n else 0.0,
        "n": n,
    }


# ----------------------------------------------------------------------------------------
# The paper's protocol (the authors' evaluation script, method.md section 4)

PAPER_STRIP = '" '  # the characters the authors' script strips from both ends of every line


def paper_lines(text: str) -> list[str]:
    """A generation's lines as the authors' script reads them.

    The text is stripped of surrounding whitespace and split at newlines; lines that are blank are
    dropped; every kept line is stripped of double quotes and spaces at both ends (only those: curly
    quotes, tabs and list markers stay). ``'"Heat"\\n\\n "Up" '`` -> ``["Heat", "Up"]``.
    """
    return [line.strip(PAPER_STRIP) for line in str(text).strip().split("\n") if line.strip()]


def paper_hit3_metrics(
    generations: Sequence[str], true_titles: Sequence[str], candidates: Sequence[Sequence[str]], k: int = 3
) -> dict:
    """HR@k and NDCG@k under the paper's protocol, plus ValidRatio.

    ``true_titles[i]`` is the title of sample i's most recent true item (the first line of its answer).
    Both it and the generated lines go through the same quote stripping (:func:`paper_lines`), then the
    comparison is exact and case-sensitive: HR@k = 1 if the true title is among the first k lines;
    NDCG@k = 1 / log2(r + 2) for its first position r < k. ValidRatio (ours, for information; the
    authors do not report it for hit3): the share of generations with at least one line and every line
    exactly a candidate title.
    """
    if not (len(generations) == len(true_titles) == len(candidates)):
        raise ValueError(
            f"generations ({len(generations)}), true_titles ({len(true_titles)}) and candidates "
            f"({len(candidates)}) must have the same length"
        )
    n = len(generations)
    hr = ndcg = valid = 0.0
    for text, true, titles in zip(generations, true_titles, candidates):
        lines = paper_lines(text)
        target = str(true).strip(PAPER_STRIP)
        for r, line in enumerate(lines[:k]):
            if line == target:
                hr, ndcg = hr + 1.0, ndcg + 1.0 / math.log2(r + 2)
                break
        names = {str(t).strip(PAPER_STRIP) for t in titles}
        valid += bool(lines) and all(line in names for line in lines)
    return {
        f"HR@{k}": hr / n if n else 0.0,
        f"NDCG@{k}": ndcg / n if n else 0.0,
        "ValidRatio": valid / n if n else 0.0,
        "n": n,
    }


def paper_yes_no(text: str) -> bool | None:
    """The authors' reading of a hit1 answer: the whole answer, stripped and lowercased, must be "yes" or
    "no" (``" Yes\\n"`` -> True); anything else (``"Yes."``, ``"yes, because"``) is None, an answer dropped."""
    answer = str(text).strip().lower()
    return {"yes": True, "no": False}.get(answer)


def paper_hit1_metrics(generations: Sequence[str], labels: Sequence[bool]) -> dict:
    """hit1 AUC under the paper's protocol: hard predictions Yes = 1 / No = 0 after dropping every answer
    that is neither (:func:`paper_yes_no`).

    AUC is :func:`auc` of the 0/1 predictions against the labels over the kept answers (with 0/1 scores
    this is (TPR + TNR) / 2, what scikit-learn's roc_auc_score gives the authors' script). Conventions at the
    edges: no kept answer -> AUC 0.0 (the authors' script prints 0 then); kept answers of one class only ->
    AUC None (undefined; their script stops with an error there). Also returned: Accuracy over the kept
    answers, ValidRatio = kept / n, ``dropped`` = n - kept, ``n`` = all answers.
    """
    if len(generations) != len(labels):
        raise ValueError(f"generations has {len(generations)} entries but labels has {len(labels)}")
    n = len(generations)
    kept = [(p, bool(y)) for p, y in zip(map(paper_yes_no, generations), labels) if p is not None]
    pred = np.array([float(p) for p, _ in kept])
    true = np.array([y for _, y in kept], dtype=bool)
    if not kept:
        value = 0.0
    elif true.all() or not true.any():
        value = None
    else:
        value = auc(pred, true)
    return {
        "AUC": value,
        "Accuracy": float(((pred > 0.5) == true).mean()) if kept else 0.0,
        "ValidRatio": len(kept) / n if n else 0.0,
        "dropped": n - len(kept),
        "n": n,
    }


def paper_next1_metrics(
    generations: Sequence[str], true_titles: Sequence[str], candidates: Sequence[Sequence[str]]
) -> dict:
    """next1 under the paper's matching rules (the authors evaluate hit1 and hit3 only; this extends their
    rules): the first line, quote-stripped, must equal a candidate title exactly; HR@1 over all samples and
    over valid answers (:func:`hit_ratio_at_1`)."""
    predicted: list[str | None] = []
    for text, titles in zip(generations, candidates):
        lines = paper_lines(text)
        names = {str(t).strip(PAPER_STRIP) for t in titles}
        predicted.append(lines[0] if lines and lines[0] in names else None)
    return hit_ratio_at_1(predicted, [str(t).strip(PAPER_STRIP) for t in true_titles])


# ----------------------------------------------------------------------------------------
# Baselines over the same candidates


def random_scores(n: int, c: int, seed: int) -> np.ndarray:
    """(n, c) uniform scores in [0, 1) from ``numpy.random.default_rng(seed)``: same seed, same scores."""
    return np.random.default_rng(seed).random((n, c))


def _count(counts: Mapping, item) -> float:
    """counts[item], tolerant of int vs str item ids; 0 for an item never seen in training."""
    if item in counts:
        return float(counts[item])
    return float(counts.get(str(item), 0))


def popularity_scores(
    candidate_item_ids: Sequence[Sequence[str]], counts: Mapping[str, int], tie_seed: int | None = None
) -> np.ndarray:
    """(N, C) scores = training-set interaction count of each candidate item (0 if unseen).

    Ties: by default (``tie_seed=None``) equal counts stay equal and :func:`ranking_metrics`
    breaks them pessimistically (against the true item). With ``tie_seed`` set, a seeded
    jitter smaller than half the smallest gap between distinct counts is added, so ties are
    broken at random but reproducibly and the order between different counts is unchanged.
    """
    rows = [list(r) for r in candidate_item_ids]
    if not rows:
        return np.zeros((0, 0))
    c = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != c:
            raise ValueError(f"sample {i} has {len(r)} candidates, expected {c} like sample 0")
    scores = np.array([[_count(counts, item) for item in r] for r in rows], dtype=np.float64)
    if tie_seed is not None:
        distinct = np.unique(scores)
        gap = float(np.diff(distinct).min()) if distinct.size > 1 else 1.0
        scores = scores + np.random.default_rng(tie_seed).random(scores.shape) * 0.5 * gap
    return scores


# ----------------------------------------------------------------------------------------
# Reporting


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) over runs/seeds; std is 0 for one value."""
    v = np.asarray(list(values), dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4f}"
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _cell(value.item())
    return str(value)


def format_table(rows: list[dict], columns: list[str], markdown: bool = False) -> str:
    """Render ``rows`` as a fixed-width text table (or a Markdown table with ``markdown=True``).

    Floats print with 4 decimals, missing values as "-". Numeric columns are right-aligned.
    """
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]

    def numeric(j: int) -> bool:
        vals = [row.get(columns[j]) for row in rows if row.get(columns[j]) is not None]
        return bool(vals) and all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in vals
        )

    right = [numeric(j) for j in range(len(columns))]
    widths = [max([len(str(col))] + [len(r[j]) for r in cells]) for j, col in enumerate(columns)]
    if markdown:
        widths = [max(w, 3) for w in widths]

    def fmt(values: list[str]) -> list[str]:
        return [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]

    header = fmt([str(c) for c in columns])
    if markdown:
        sep = [("-" * (w - 1) + ":") if r else "-" * w for w, r in zip(widths, right)]
        lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
        lines += ["| " + " | ".join(fmt(r)) + " |" for r in cells]
    else:
        lines = ["  ".join(header).rstrip(), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(fmt(r)).rstrip() for r in cells]
    return "\n".join(lines)
