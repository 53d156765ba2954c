"""Evaluation (method.md section 4): the ranking, generative and paper protocols, and baselines on the same
candidates. Metric arithmetic lives in hanorec.metrics; this module runs the model and parses.

- ranking (ours, the default): every candidate scored by its title's likelihood; deterministic.
- catalogue (ours, the low-chance protocol): the most recent true item ranked against every item the user
  never interacted with (or a seeded sample of ``catalogue_items`` of them), each scored by its title's
  likelihood after the task's prompt without its candidate sentence (hanorec.tasks.catalogue_prompt);
  hit3 / next1 only. Random HR@3 is 3 / (candidates), 0.0018 on MovieLens-100K's 1,682 items.
- generative (ours): greedy decoding, lenient title matching, an invalid hit1 answer scored 0.5.
- paper (the authors' evaluation): sampled decoding (:data:`PAPER_SAMPLING`, seeded per example by
  :func:`sampling_seed`), quotes stripped from each line, exact case-sensitive titles, hit1 AUC over the
  answers that read Yes or No once stripped of surrounding whitespace and lowercased, at most :data:`PAPER_MAX_EXAMPLES` examples (the first ones, in order).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hanorec import metrics as M
from hanorec.data import RecDataset, Window
from hanorec.models import ModelBundle
from hanorec.progress import Progress
from hanorec.scoring import generate, score_options
from hanorec.tasks import Example, render

PROTOCOLS = ("ranking", "catalogue", "generative", "paper")
# Items scored per forward by the catalogue protocol (one prompt row holding this many titles): bounds memory.
CATALOGUE_CHUNK = 256
# The authors' decoding (their inference script and LLaMA-Factory's defaults: sampling, temperature 0.95,
# top-p 0.7, top-k 50, no repetition penalty; 512 new tokens at most, eval.max_new_tokens in the paper presets)
# and their test cap (max_samples 3000).
PAPER_SAMPLING = {"temperature": 0.95, "top_p": 0.7, "top_k": 50, "repetition_penalty": 1.0}
PAPER_MAX_EXAMPLES = 3000


def sampling_seed(seed: int, index: int) -> int:
    """The seed of example ``index``'s sampled answer: a hash of (run seed, index), so an answer depends on
    neither the batch it was decoded in nor the examples before it, and two seeds give unrelated draws."""
    digest = hashlib.sha256(f"hanorec-paper-protocol:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def paper_examples(examples: Sequence[Example], cap: int | None = PAPER_MAX_EXAMPLES) -> list[Example]:
    """The examples the paper protocol scores: the first ``cap`` in order (the authors' max_samples keeps a
    file's first rows; ours are in sorted-user order, so the same data and seed give the same examples)."""
    return list(examples if cap is None else examples[:cap])


@dataclass
class EvalResult:
    rows: list[dict]  # one row per (method, protocol): metrics as fractions + n + candidates
    option_scores: list[list[float]] = field(default_factory=list)  # per example, the model's option scores
    generations: list[str] = field(default_factory=list)  # the generative protocol's greedy answers
    paper_generations: list[str] = field(default_factory=list)  # the paper protocol's sampled answers
    # per method (model and baselines), the ranking protocol's value for each example, as columns
    # (:func:`per_example_values`): what a paired comparison between methods resamples (hanorec.stats)
    per_example: dict[str, dict[str, list]] = field(default_factory=dict)
    # the ranking protocol's, when per_example holds the catalogue protocol's and ranking ran too
    ranking_per_example: dict[str, dict[str, list]] = field(default_factory=dict)
    # the same for the paper protocol (:func:`paper_per_example_values`), for the model only
    paper_per_example: dict[str, dict[str, list]] = field(default_factory=dict)
    stopped: bool = False  # should_stop() ended evaluation early: rows is empty
    per_example_protocol: str = "ranking"  # the protocol whose values per_example holds
    catalogue_scores: list[list[float]] = field(default_factory=list)  # per example, over its catalogue


def train_popularity(windows: Sequence[Window]) -> Counter:
    """Interaction counts over the training windows only (no test targets leak into the baseline)."""
    from itertools import chain
    from operator import attrgetter

    mine: dict[str, set] = {}  # per user: the items of its windows (an item counts once per user)
    for w in windows:
        items = mine.get(w.user)
        if items is None:
            items = mine[w.user] = set()
        items.update(w.history)
        items.update(w.targets)
    total = Counter(chain.from_iterable(mine.values()))  # counted at C speed
    # keys in the order the windows first name them (history, then targets), as counting window by window gave
    first = dict.fromkeys(chain.from_iterable(chain.from_iterable(map(attrgetter("history", "targets"), windows))))
    return Counter({item: total[item] for item in first})


# Model scores that differ by less than this are one tie (float32 rounding: the same option scored in a
# packed batch, alone, or at another place in a shared-prefix row differs by ~1e-6 relative).
TIE_ATOL, TIE_RTOL = 1e-4, 1e-5


def snap_ties(scores: np.ndarray, true_first: Sequence[int]) -> np.ndarray:
    """Set every option within float rounding of the true option's score to exactly that score.

    The ranking protocol counts ties against the true item (hanorec.metrics.pessimistic_ranks); snapping
    makes "a tie" mean the same whether options were scored one example at a time or packed several
    prompts per forward, so both give the same table (tests/test_eval.py).
    """
    s = np.array(scores, dtype=np.float64, copy=True)
    rows = np.arange(s.shape[0])
    true = s[rows, np.asarray(true_first, dtype=np.int64)][:, None]
    near = np.abs(s - true) <= TIE_ATOL + TIE_RTOL * np.abs(true)
    return np.where(near, true, s)


def metrics_from_scores(
    examples: Sequence[Example],
    scores: np.ndarray,
    snap: bool = False,
    popularity: Counter | None = None,
    n_catalogue: int | None = None,
) -> dict:
    """Ranking-protocol metrics of one method's (N, C) option scores, per task, with their chance levels
    under ``"chance"``.

    snap: treat model scores within float rounding of the true option's as ties (:func:`snap_ties`).
    popularity (training counts): also Coverage@3 (over ``n_catalogue`` items) and Pop@3 of the top 3.
    """
    task = examples[0].task
    n_cand = len(examples[0].options) if task != "hit1" else 1 + len(examples[0].not_watched)
    if task == "hit1":
        labels = np.array([e.label for e in examples], dtype=bool)
        margin = scores[:, 0] - scores[:, 1] if scores.shape[1] == 2 else scores[:, 0]
        out = {"AUC": M.auc(margin, labels), "Accuracy": float(((margin > 0) == labels).mean())}
        return {**out, "n": len(examples), "candidates": n_cand}
    true_first = [e.correct_option for e in examples]
    s = snap_ties(scores, true_first) if snap else np.asarray(scores, dtype=np.float64)
    out = M.ranking_metrics(s, true_first)
    if popularity is not None:
        tops = [[e.candidates[j] for j in row] for e, row in zip(examples, M.top_k_indices(s, 3))]
        out.update(M.top_k_summary(tops, popularity, n_catalogue or len({i for e in examples for i in e.candidates})))
    return {**out, "chance": chance_row(task, [n_cand])}


def chance_row(task: str, n_candidates, popularity: Counter | None = None, candidates=None) -> dict:
    """Each metric's value under a uniformly random ranking (hanorec.metrics.chance_levels); hit1 AUC and
    Accuracy 0.5. With popularity and the candidate lists, Pop@3's chance level too (the mean count of a
    candidate)."""
    if task == "hit1":
        return {"AUC": 0.5, "Accuracy": 0.5}
    out = M.chance_levels(n_candidates)
    if popularity is not None and candidates:
        out["Pop@3"] = float(np.mean([np.mean([M._count(popularity, i) for i in c]) for c in candidates]))
    return out


def per_example_values(examples: Sequence[Example], scores: np.ndarray, snap: bool = False) -> dict[str, list]:
    """The ranking protocol per example, as columns, with each example's user id.

    hit3 / next1: ``HR@1``, ``HR@3``, ``NDCG@3``, ``MRR`` (reciprocal rank) per example (their means are the row of
    :func:`metrics_from_scores`). hit1: the Yes-minus-No ``score`` and the ``label``, since AUC is not a mean
    over examples (hanorec.stats.paired_bootstrap_auc recomputes it on resampled users).
    """
    users = [e.user for e in examples]
    scores = np.asarray(scores, dtype=np.float64)
    if examples[0].task == "hit1":
        margin = scores[:, 0] - scores[:, 1] if scores.shape[1] == 2 else scores[:, 0]
        return {"user": users, "score": margin.tolist(), "label": [bool(e.label) for e in examples]}
    true_first = [e.correct_option for e in examples]
    ranks = M.pessimistic_ranks(snap_ties(scores, true_first) if snap else scores, true_first)
    return {"user": users, **M.rank_values(ranks)}


def paper_per_example_values(examples: Sequence[Example], ds: RecDataset, generations: Sequence[str]) -> dict[str, list]:
    """The paper protocol per example (the examples it scored, in order), as columns, with each example's user.

    hit3: ``HR@3`` and ``NDCG@3`` of each answer (their means are the paper row's); next1: ``HR@1``. hit1: the
    hard prediction as ``score`` (Yes 1, No 0, NaN for an answer the protocol drops) and the ``label``: AUC over
    each method's own kept answers is recomputed on resampled users (hanorec.stats.paired_bootstrap_auc leaves
    NaN scores out)."""
    examples = list(examples)[: len(generations)]
    users = [e.user for e in examples]
    if examples[0].task == "hit1":
        answers = [M.paper_yes_no(g) for g in generations]
        return {
            "user": users,
            "score": [float("nan") if a is None else float(a) for a in answers],
            "label": [bool(e.label) for e in examples],
        }
    cols: dict[str, list] = {"user": users}
    for e, g in zip(examples, generations):
        titles = [ds.items[i].title for i in e.candidates]
        true = ds.items[e.targets[0]].title
        if e.task == "hit3":
            m = M.paper_hit3_metrics([g], [true], [titles])
            keys = ("HR@3", "NDCG@3")
        else:
            m = M.paper_next1_metrics([g], [true], [titles])
            keys = ("HR@1",)
        for k in keys:
            cols.setdefault(k, []).append(float(m[k]))
    return cols


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


def paper_metrics(examples: Sequence[Example], ds: RecDataset, generations: Sequence[str]) -> dict:
    """The paper protocol's metrics of sampled answers (hanorec.metrics.paper_*), with the candidate count.

    hit3: HR@3 / NDCG@3 for the most recent true item, which is the first line of our hit3 answer (targets
    are listed most recent first, as in the authors' data); hit1: AUC over Yes/No answers only, with the
    number dropped; next1: HR@1 by the same matching rules.
    """
    examples = list(examples[: len(generations)])  # format only the examples scored
    task = examples[0].task
    if task == "hit1":
        out = M.paper_hit1_metrics(generations, [bool(e.label) for e in examples])
        return {**out, "candidates": 1 + len(examples[0].not_watched)}
    titles = [[ds.items[i].title for i in e.candidates] for e in examples]
    true = [ds.items[e.targets[0]].title for e in examples]
    if task == "hit3":
        out = M.paper_hit3_metrics(generations, true, titles)
    else:
        out = M.paper_next1_metrics(generations, true, titles)
    return {**out, "candidates": len(examples[0].candidates)}


class _Progress(Progress):
    """Evaluation's progress: the shared Progress events and should_stop polling, plus a tqdm bar."""

    def __init__(self, total: int, method: str, show: bool | None, on_log, should_stop):
        import sys

        super().__init__("eval", total, on_log=on_log, should_stop=should_stop)
        self.total, self.method = total, method
        if show is None:
            show = sys.stderr.isatty()
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"eval {method}", unit="ex", dynamic_ncols=True)

    def advance(self, n: int, protocol: str) -> bool:
        """Count n finished examples; returns True when the caller should stop."""
        self.step += n
        if self.bar is not None:
            self.bar.update(n)
        self.emit(self.event(method=self.method, protocol=protocol))
        return self.stop_requested()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def catalogue_candidates(example: Example, ds: RecDataset, size: int | None = None, seed: int = 0) -> list[str]:
    """The items the catalogue protocol ranks for one example: its most recent true item first, then every
    item the user never interacted with (sorted by id), or a sample of ``size`` of them drawn with a
    generator seeded by (seed, user), so every method of one run ranks the same items."""
    seen = set(ds.sequences[example.user])
    pool = [i for i in sorted(ds.items) if i not in seen]
    if size is not None and size < len(pool):
        import random

        pool = sorted(random.Random(sampling_seed(seed, hash_user(example.user))).sample(pool, size))
    return [example.targets[0], *pool]


def encode_example_prompt(bundle: ModelBundle, text: str, images, blank_images: bool = False):
    """``bundle.encode_prompt(text, images)``; with ``blank_images`` every image blanked after processing, as
    mDPO's imageless rows are (:func:`hanorec.train.preference.imageless_prompt`: the normalised pixel values
    set to 0, the image processor's mean colour, a flat grey), so the image tokens, the grid, the positions
    and the token count are those of the prompt with its images (the modality meter, eval.image_ablation)."""
    prompt = bundle.encode_prompt(text, images)
    if not blank_images:
        return prompt
    from hanorec.train.preference import imageless_prompt

    return imageless_prompt(prompt)


def hash_user(user: str) -> int:
    """A stable integer for a user id (Python's hash() of a str changes between processes)."""
    return int.from_bytes(hashlib.sha256(str(user).encode()).digest()[:4], "little")


def catalogue_scores(
    bundle: ModelBundle,
    ds: RecDataset,
    examples: Sequence[Example],
    candidates: Sequence[Sequence[str]],
    *,
    chunk: int = CATALOGUE_CHUNK,
    device=None,
    progress: _Progress | None = None,
    blank_images: bool = False,
) -> list[np.ndarray] | None:
    """The catalogue protocol's scores: per example, the log-likelihood of every candidate's quoted title
    after :func:`hanorec.tasks.catalogue_prompt`. The prompt is encoded once per example; its titles go
    ``chunk`` at a time into one shared-prefix row (prompt + chunk titles), so memory is bounded by the
    chunk, not by the catalogue. Returns None when ``progress`` asked to stop."""
    from hanorec.tasks import catalogue_prompt, quote

    if chunk < 1:
        raise ValueError(f"catalogue chunk must be >= 1, got {chunk}")
    out: list[np.ndarray] = []
    for e, items in zip(examples, candidates):
        images = [ds.load_image(i) for i in e.image_items]
        prompt = encode_example_prompt(bundle, catalogue_prompt(e, ds), images, blank_images)
        # the answer's opening as the ranking options have it (task.hit3_outer_quotes adds one quote)
        lead = e.options[0][: len(e.options[0]) - len(quote(ds.items[e.candidates[0]].title))] if e.options else ""
        titles = [lead + quote(ds.items[i].title) for i in items]
        pieces = [titles[k : k + chunk] for k in range(0, len(titles), chunk)]
        scores = score_options(bundle, [prompt] * len(pieces), pieces, batch_size=chunk, device=device)
        out.append(torch.cat(scores).double().cpu().numpy())
        if progress is not None and progress.advance(1, "catalogue"):
            return None
    return out


def catalogue_baseline(name: str, candidates: Sequence[Sequence[str]], popularity: Counter, seed: int) -> list:
    """Random or popularity scores over each example's catalogue candidates (seeded, reproducible)."""
    if name == "random":
        rng = np.random.default_rng(seed)
        return [rng.random(len(c)) for c in candidates]
    if name == "popularity":
        return [M.popularity_scores([c], popularity, tie_seed=seed + k)[0] for k, c in enumerate(candidates)]
    raise ValueError(f"unknown baseline {name!r}")


def catalogue_metrics(
    examples: Sequence[Example],
    candidates: Sequence[Sequence[str]],
    scores: Sequence[np.ndarray],
    popularity: Counter,
    n_catalogue: int,
    snap: bool = False,
) -> tuple[dict, dict]:
    """(row, per-example values) of the catalogue protocol: HR@1/3, NDCG@3, MRR (the true item is candidate
    0; ties count against it), Coverage@3 and Pop@3 of the top 3, and the chance levels of this catalogue."""
    ranks, tops = [], []
    for items, s in zip(candidates, scores):
        s = np.asarray(s, dtype=np.float64)[None, :]
        if snap:
            s = snap_ties(s, [0])
        ranks.append(int(M.pessimistic_ranks(s, [0])[0]))
        tops.append([items[j] for j in M.top_k_indices(s, 3)[0]])
    values = M.rank_values(ranks)
    sizes = [len(c) for c in candidates]
    row = {k: float(np.mean(v)) for k, v in values.items()}
    row.update(M.top_k_summary(tops, popularity, n_catalogue))
    row.update(n=len(examples), candidates=int(round(float(np.mean(sizes)))))
    row["chance"] = chance_row(examples[0].task, sizes, popularity, candidates)
    return row, {"user": [e.user for e in examples], **values}


def rank_options(
    bundle: ModelBundle,
    ds: RecDataset,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    mode: str = "shared_prefix",
    device=None,
    progress: _Progress | None = None,
    blank_images: bool = False,
) -> torch.Tensor | None:
    """Ranking-protocol scores (N, C): every option's log-likelihood given its prompt.

    ``batch_size`` prompts are packed into one forward (shared-prefix: one row per prompt holding all its
    options; naive: one row per (prompt, option), so batch_size x C rows). Each option's score is the
    same sum of token log-probs as when its example is scored alone (equal up to float rounding, see
    tests/test_eval.py). Returns None when ``progress`` asked to stop.
    """
    out: list[torch.Tensor] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = []
        for e in chunk:
            r = render(e, ds)
            prompts.append(encode_example_prompt(bundle, r.text, r.images, blank_images))
        options = [e.options for e in chunk]
        per_forward = sum(len(o) for o in options)  # all of the chunk's options in one forward
        out += score_options(bundle, prompts, options, batch_size=per_forward, device=device, mode=mode)
        if progress is not None and progress.advance(len(chunk), "ranking"):
            return None
    return torch.stack(out)


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
    scoring: str = "shared_prefix",
    on_log: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    sampling: dict | None = None,
    paper_max_examples: int | None = PAPER_MAX_EXAMPLES,
    catalogue_items: int | None = None,
    catalogue_chunk: int = CATALOGUE_CHUNK,
    blank_images: bool = False,
) -> EvalResult:
    """Score `examples` with the model (if given) under each protocol, and the baselines on the same candidates.

    Ranking packs ``batch_size`` prompts into one forward (:func:`rank_options`); generation decodes one
    example at a time. The paper protocol samples with ``sampling`` (default :data:`PAPER_SAMPLING`), example
    i seeded by ``sampling_seed(seed, i)``, on the first ``paper_max_examples`` examples only (its rows' ``n``
    says how many); the other protocols and the baselines score every example.
    progress: a tqdm bar with a time estimate (default: when stderr is a terminal).
    on_log receives one event per finished batch: ``stage="eval"``, ``step`` (examples done, over all
    protocols), ``total_steps``, ``epoch`` (0), ``elapsed_s``, ``method``, ``protocol``. should_stop() is
    polled after every batch; when it returns True evaluation ends early and the result has
    ``stopped=True`` and no rows (metrics of a partial test set would mislead).
    The catalogue protocol (hit3 / next1; skipped for hit1) ranks each example's true item against
    :func:`catalogue_candidates` (``catalogue_items``: a seeded sample of that many unseen items, None =
    all), ``catalogue_chunk`` titles per forward; when it runs, ``per_example`` holds its values (the
    comparison's main paired intervals then use it) and ``ranking_per_example`` the ranking protocol's,
    else ``per_example`` holds the ranking protocol's.
    blank_images: the model sees every history image blanked (:func:`encode_example_prompt`; the token count
    unchanged), for the modality meter; the baselines see no images either way.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol {unknown[0]!r}; use some of {list(PROTOCOLS)}")
    if "catalogue" in protocols and examples[0].task == "hit1" and "ranking" not in protocols:
        protocols = (*protocols, "ranking")  # hit1 has no catalogue: it is scored by the ranking protocol
    rows: list[dict] = []
    result = EvalResult(rows)
    sampling = dict(PAPER_SAMPLING if sampling is None else sampling)
    capped = paper_examples(examples, paper_max_examples) if "paper" in protocols else []
    use_catalogue = "catalogue" in protocols and examples[0].task != "hit1"
    cat_items = (
        [catalogue_candidates(e, ds, catalogue_items, seed) for e in examples] if use_catalogue else []
    )
    pop = popularity or Counter()
    if use_catalogue:
        result.per_example_protocol = "catalogue"
    if bundle is not None:
        sizes = {"ranking": len(examples), "generative": len(examples), "paper": len(capped),
                 "catalogue": len(cat_items)}  # fmt: skip
        bar = _Progress(sum(sizes[p] for p in PROTOCOLS if p in protocols), method, progress, on_log, should_stop)
        try:
            if "ranking" in protocols:
                scores = rank_options(
                    bundle, ds, examples, batch_size=batch_size, mode=scoring, device=device, progress=bar,
                    blank_images=blank_images,
                )
                if scores is None:
                    result.stopped = True
                    return result
                scores = scores.numpy()
                result.option_scores = scores.tolist()
            if use_catalogue:
                cat_scores = catalogue_scores(
                    bundle, ds, examples, cat_items, chunk=catalogue_chunk, device=device, progress=bar,
                    blank_images=blank_images,
                )
                if cat_scores is None:
                    result.stopped = True
                    return result
                result.catalogue_scores = [c.tolist() for c in cat_scores]
            if "generative" in protocols:
                for e in examples:
                    r = render(e, ds)
                    p = encode_example_prompt(bundle, r.text, r.images, blank_images)
                    result.generations.append(generate(bundle, p, max_new_tokens=max_new_tokens, device=device))
                    if bar.advance(1, "generative"):
                        result.stopped = True
                        return result
            for i, e in enumerate(capped):  # the paper protocol: seeded sampling, one example at a time
                r = render(e, ds)
                p = encode_example_prompt(bundle, r.text, r.images, blank_images)
                result.paper_generations.append(
                    generate(
                        bundle, p, max_new_tokens=max_new_tokens, device=device, sampling=sampling,
                        seed=sampling_seed(seed, i),
                    )  # fmt: skip
                )
                if bar.advance(1, "paper"):
                    result.stopped = True
                    return result
        finally:
            bar.close()
        if "ranking" in protocols:
            rows.append(
                {"method": method, "protocol": "ranking",
                 **metrics_from_scores(examples, scores, snap=True, popularity=pop, n_catalogue=len(ds.items))}
            )  # fmt: skip
            kept = result.ranking_per_example if use_catalogue else result.per_example
            kept[method] = per_example_values(examples, scores, snap=True)
        if use_catalogue:
            row, values = catalogue_metrics(examples, cat_items, cat_scores, pop, len(ds.items), snap=True)
            rows.append({"method": method, "protocol": "catalogue", **row})
            result.per_example[method] = values
        if "generative" in protocols:
            rows.append(
                {
                    "method": method,
                    "protocol": "generative",
                    **generative_metrics(examples, ds, result.generations),
                }
            )
        if "paper" in protocols:
            rows.append(
                {
                    "method": method,
                    "protocol": "paper",
                    **paper_metrics(capped, ds, result.paper_generations),
                    "decoding": describe_sampling(sampling, seed),
                    "max_examples": paper_max_examples,
                }
            )
            result.paper_per_example[method] = paper_per_example_values(capped, ds, result.paper_generations)
    for name in baselines:
        if name == "popularity" and popularity is None:
            raise ValueError("the popularity baseline needs training popularity counts")
        if "ranking" in protocols or not use_catalogue:
            scores = baseline_scores(name, examples, pop, seed)
            rows.append(
                {"method": name, "protocol": "ranking",
                 **metrics_from_scores(examples, scores, popularity=pop, n_catalogue=len(ds.items))}
            )  # fmt: skip
            kept = result.ranking_per_example if use_catalogue else result.per_example
            kept[name] = per_example_values(examples, scores)
        if use_catalogue:
            cat = catalogue_baseline(name, cat_items, pop, seed)
            row, values = catalogue_metrics(examples, cat_items, cat, pop, len(ds.items))
            rows.append({"method": name, "protocol": "catalogue", **row})
            result.per_example[name] = values
    return result


METRIC_COLUMNS = {
    "hit3": ["method", "protocol", "HR@1", "HR@3", "NDCG@3", "MRR", "Coverage@3", "Pop@3", "ValidRatio", "n",
             "candidates"],
    "next1": [
        "method",
        "protocol",
        "HR@1",
        "HR@3",
        "NDCG@3",
        "MRR",
        "Coverage@3",
        "Pop@3",
        "HR@1_all",
        "HR@1_valid",
        "ValidRatio",
        "n",
        "candidates",
    ],
    "hit1": ["method", "protocol", "AUC", "Accuracy", "ValidRatio", "dropped", "n", "candidates"],
}


def describe_sampling(sampling: dict, seed: int) -> str:
    """The paper protocol's decoding in words, kept in its result rows and printed under its tables."""
    parts = [f"{k.replace('_', '-')} {v}" for k, v in sampling.items() if k != "repetition_penalty"]
    return f"sampled ({', '.join(parts)}), example i seeded by (seed {seed}, i)"


def protocol_note(protocol: str, row: dict | None = None) -> str:
    """One line saying what a protocol computes (the paper protocol's decoding read from its row)."""
    if protocol == "ranking":
        return "ranking = every candidate scored by the likelihood of its title (ours, deterministic)"
    if protocol == "catalogue":
        return (
            "catalogue = the most recent true item ranked against every item the user never interacted with (or a "
            "seeded sample of them) by title likelihood, after the task's prompt without its candidate list (ours)"
        )
    if protocol == "generative":
        return "generative = greedy decoding, lenient title matching, an invalid hit1 answer scored 0.5 (ours)"
    if protocol == "paper":
        row = row or {}
        decoding = row.get("decoding") or describe_sampling(PAPER_SAMPLING, 0)
        cap = row.get("max_examples", PAPER_MAX_EXAMPLES)
        return (
            f"paper = the authors' protocol: {decoding}; quotes stripped from each line, exact case-sensitive "
            "titles, the most recent true item in the first 3 lines; hit1 AUC over Yes/No answers only "
            f"(dropped = the others); {f'the first {cap:,} examples at most' if cap else 'every example'}"
        )
    return f"{protocol} = an unknown protocol"


def split_label(split: str | None, policy: str | None = None) -> str:
    """``test split (last_window_by_user windows)``: which windows a table's numbers come from."""
    if not split:
        return ""
    from hanorec.data import SPLIT_ALIASES

    return f"{split} split" + (f" ({SPLIT_ALIASES.get(policy, policy)} windows)" if policy else "")


def with_chance_rows(rows: list[dict]) -> list[dict]:
    """The rows grouped by protocol (in order of first appearance), each group followed by a "chance" row:
    every metric's value under a random ranking of that protocol's candidates (the rows' ``chance`` entries)."""
    out: list[dict] = []
    for p in dict.fromkeys(r.get("protocol") for r in rows):
        mine = [r for r in rows if r.get("protocol") == p]
        out += mine
        chance = next((r["chance"] for r in mine if isinstance(r.get("chance"), dict)), None)
        if chance:
            out.append({"method": "chance", "protocol": p, **chance})
    return out


def format_results(
    task: str, rows: list[dict], markdown: bool = False, *, split: str | None = None, split_policy: str | None = None
) -> str:
    """The metric table of evaluation rows, with a note naming each protocol used and (given) the split."""
    rows = with_chance_rows(rows)
    cols = [c for c in METRIC_COLUMNS[task] if any(c in r for r in rows)]
    protocols = list(dict.fromkeys(r.get("protocol") for r in rows if r.get("protocol")))
    lines = [
        "metrics are fractions in [0, 1], higher is better, except Pop@3 (mean training interactions of the top 3 "
        "items: lower = less popularity bias); chance = a random ranking; n = examples scored, candidates = "
        "options each (catalogue: mean per example)"
    ]
    where = split_label(split, split_policy)
    if where:
        lines[0] += f"; evaluated on the {where}"
    lines += [
        "protocol " + protocol_note(p, next((r for r in rows if r.get("protocol") == p), None)) for p in protocols
    ]
    sep = "\n\n" if markdown else "\n"
    return M.format_table(rows, cols, markdown=markdown) + sep + sep.join(lines)
