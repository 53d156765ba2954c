"""Exploration helpers behind the app's panels and the notebooks: pure functions over the package.

- :func:`find_datasets`: dataset folders inside a set of allowed folders.
- :func:`dataset_stats`: users, items, sequence lengths, item popularity, missing images.
- :func:`candidate_scores`: the ranking protocol's scores of one example's candidates (method.md section 4).
- :func:`example_noise` / :func:`noise_sweep`: the noise lab (scores under NoDO noise at inference).
  These take an optional ``cache`` (hanorec.serving.ResultCache) to serve repeated requests from memory.
- :func:`pair_stats`: per-pair training statistics of a preference run (reward margin, accuracy,
  lambda, beta), computed by scoring the pairs with the trained policy and its reference (adapter
  disabled), since training logs only batch averages.
- :func:`spread`: the numbers that show how far lambda (or anything) spreads around its mean.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hanorec.data import RecDataset
from hanorec.tasks import Example, render

# torch is imported inside the functions that need it: listing datasets and their statistics (the app's
# first page) must not wait for it.

__all__ = [
    "DatasetStats",
    "candidate_scores",
    "clean_scores",
    "dataset_stats",
    "encoded_prompt",
    "example_noise",
    "find_datasets",
    "noise_sweep",
    "pair_stats",
    "spread",
]


def is_dataset_folder(path: Path) -> bool:
    """A folder in the hanorec format (pairs.tsv or one *_pairs.tsv) or MovieLens' (ratings.csv + movies.csv)."""
    if not path.is_dir():
        return False
    if (path / "pairs.tsv").is_file() or len(list(path.glob("*_pairs.tsv"))) == 1:
        return True
    return (path / "ratings.csv").is_file() and (path / "movies.csv").is_file()


def find_datasets(folders: Sequence[Path]) -> list[Path]:
    """Every allowed folder that is a dataset, then its immediate sub-folders that are, in the given order."""
    out: list[Path] = []
    for folder in folders:
        folder = Path(folder)
        if is_dataset_folder(folder):
            out.append(folder)
        elif folder.is_dir():
            out += [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and is_dataset_folder(p)]
    return list(dict.fromkeys(out))


@dataclass
class DatasetStats:
    n_users: int
    n_items: int
    n_interactions: int
    missing_images: int
    sequence_lengths: list[int]  # one per user, sorted user order
    popularity: list[int]  # interaction count per item, most popular first
    items_never_seen: int  # items no user interacted with

    @property
    def table(self) -> list[tuple[str, str]]:
        lengths = np.asarray(self.sequence_lengths)
        pop = np.asarray(self.popularity)
        top = pop[: max(1, len(pop) // 10)].sum() / max(1, pop.sum())
        return [
            ("users", f"{self.n_users:,}"),
            ("items", f"{self.n_items:,}"),
            ("interactions", f"{self.n_interactions:,}"),
            ("sequence length min / median / max", f"{lengths.min()} / {np.median(lengths):g} / {lengths.max()}"),
            ("items with a missing image", f"{self.missing_images:,} ({self.missing_images / max(1, self.n_items):.1%})"),
            ("items no user interacted with", f"{self.items_never_seen:,}"),
            ("share of interactions on the top 10% of items", f"{top:.1%}"),
        ]

    def length_histogram(self, max_bins: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bin starts, bin widths, users per bin) of the sequence lengths: one bin per length when there are at
        most ``max_bins`` different lengths from min to max, else ``max_bins`` equal bins of whole lengths."""
        lengths = np.asarray(self.sequence_lengths, dtype=np.int64)
        if lengths.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        lo, hi = int(lengths.min()), int(lengths.max())
        edges = np.unique(np.linspace(lo, hi + 1, min(hi + 1 - lo, max_bins) + 1).round().astype(np.int64))
        counts, _ = np.histogram(lengths, bins=edges)
        return edges[:-1], np.diff(edges), counts

    def popularity_curve(self, max_points: int = 1500) -> tuple[np.ndarray, np.ndarray]:
        """(rank, interactions) points of the long-tail curve (rank 1 = the most popular item): every rank when
        there are at most ``max_points`` items, else ranks spaced evenly on a log scale (the first and last
        included), each with its exact count."""
        pop = np.asarray(self.popularity, dtype=np.int64)
        n = pop.size
        if n <= max_points:
            ranks = np.arange(1, n + 1)
        else:
            ranks = np.unique(np.geomspace(1, n, max_points).round().astype(np.int64))
        return ranks, pop[ranks - 1] if n else pop


_STATS_CACHE: dict[str, DatasetStats] = {}
_STATS_CACHE_SIZE = 8
STATS_CACHE_FILES = 32  # statistics files kept on disk (the least recently used beyond are removed)
_STATS_VERSION = 1


def dataset_fingerprint(ds: RecDataset) -> str:
    """Identifies a dataset's content cheaply: its folder, its data files' sizes and modification times, and
    its counts (a subset of users or items differs); never reads the files."""
    import hashlib

    parts = [str(Path(ds.root).resolve()), ds.name, ds.summary.format, str(ds.summary.n_users),
             str(len(ds.items)), str(len(ds.sequences)), str(ds.summary.n_interactions), str(ds.summary.missing_images)]  # fmt: skip
    root = Path(ds.root)
    if root.is_dir():
        for f in sorted(root.iterdir()):
            if f.is_file() and f.suffix in (".tsv", ".csv", ".txt"):
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def dataset_stats(ds: RecDataset, *, cache: bool = True, cache_dir: str | Path | None = None) -> DatasetStats:
    """Counts for the dataset panel (all users, not a split); computed once per :func:`dataset_fingerprint`
    (a changed file or another subset computes them again). cache_dir: also keep them on disk there, one
    JSON file per fingerprint (at most STATS_CACHE_FILES files), so another process reads them instead of
    counting again; a file that cannot be read or does not hold what this dataset's statistics must (a
    damaged or foreign file) is ignored and written again."""
    key = dataset_fingerprint(ds) if cache else None
    if key is not None and key in _STATS_CACHE:
        return _STATS_CACHE[key]
    stats = _read_stats(Path(cache_dir), key, ds) if (key is not None and cache_dir is not None) else None
    if stats is None:
        stats = _dataset_stats(ds)
        if key is not None and cache_dir is not None:
            _write_stats(Path(cache_dir), key, stats)
    if key is not None:
        _STATS_CACHE[key] = stats
        while len(_STATS_CACHE) > _STATS_CACHE_SIZE:
            _STATS_CACHE.pop(next(iter(_STATS_CACHE)))
    return stats


def _stats_file(folder: Path, key: str) -> Path:
    return folder / f"dataset-stats-{key}.json"


def _read_stats(folder: Path, key: str, ds: RecDataset) -> DatasetStats | None:
    """The statistics stored for this fingerprint, or None (no file, or a file not to be trusted)."""
    import json

    path = _stats_file(folder, key)
    try:
        if path.stat().st_size > 24 * (len(ds.sequences) + len(ds.items)) + 65536:
            return None  # more than its numbers can take
        raw = json.loads(path.read_bytes())
        if raw.get("version") != _STATS_VERSION or raw.get("fingerprint") != key:
            return None
        stats = DatasetStats(**{f: raw["stats"][f] for f in DatasetStats.__dataclass_fields__})
        ints = (stats.n_users, stats.n_items, stats.n_interactions, stats.missing_images,
                stats.items_never_seen)  # fmt: skip
        lengths, pop = stats.sequence_lengths, stats.popularity
        ok = (
            all(type(v) is int and v >= 0 for v in ints)
            and isinstance(lengths, list) and isinstance(pop, list)
            and (stats.n_users, stats.n_items) == (len(ds.sequences), len(ds.items))
            and stats.n_interactions == ds.summary.n_interactions
            and len(lengths) == stats.n_users and len(pop) == stats.n_items
            and all(type(v) is int for v in lengths) and all(type(v) is int for v in pop)
            and sum(lengths) == stats.n_interactions >= sum(pop)
        )  # fmt: skip
        if not ok:
            return None
        os.utime(path)  # recently used: kept when the folder is trimmed
        return stats
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None  # missing, unreadable, not JSON, not the expected shape


def _write_stats(folder: Path, key: str, stats: DatasetStats) -> None:
    """Write the file atomically (a reader never sees half of it), then keep the newest STATS_CACHE_FILES;
    a folder that cannot be written only costs the next process the counting."""
    import json
    import tempfile
    from dataclasses import asdict

    try:
        folder.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"version": _STATS_VERSION, "fingerprint": key, "stats": asdict(stats)})
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".stats-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(body)
            os.replace(tmp, _stats_file(folder, key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        files = sorted(folder.glob("dataset-stats-*.json"), key=lambda f: f.stat().st_mtime_ns, reverse=True)
        for old in files[STATS_CACHE_FILES:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def _dataset_stats(ds: RecDataset) -> DatasetStats:
    from collections import Counter
    from itertools import chain

    counts = Counter(chain.from_iterable(ds.sequences.values()))  # counted at C speed
    pop = [counts.get(i, 0) for i in ds.items]
    lengths = list(map(len, map(ds.sequences.__getitem__, sorted(ds.sequences))))
    return DatasetStats(
        n_users=len(ds.sequences),
        n_items=len(ds.items),
        n_interactions=sum(lengths),
        missing_images=sum(1 for it in ds.items.values() if it.image_path is None),
        sequence_lengths=lengths,
        popularity=sorted(pop, reverse=True),
        items_never_seen=pop.count(0),
    )


def spread(values) -> dict[str, float]:
    """min, max, mean, std and the 5th / 95th percentiles; ``max - min`` as "range"."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("spread needs at least one value")
    return {
        "n": int(v.size),
        "min": float(v.min()),
        "p05": float(np.percentile(v, 5)),
        "mean": float(v.mean()),
        "p95": float(np.percentile(v, 95)),
        "max": float(v.max()),
        "std": float(v.std()),
        "range": float(v.max() - v.min()),
    }


def _cached(cache, bundle, ds, key, make, heavy: bool = False, codec=None):
    """make() through ``cache`` (a hanorec.serving.ResultCache) keyed by the model, the dataset and key (heavy:
    the computation takes one of the cache's compute slots); no cache: make(). codec: (encode, decode) to keep
    the value in the cache's disk store too, keyed by the bundle's and the dataset's content and ``key``."""
    if cache is None:
        return make()
    persist = None
    if codec is not None:
        from hanorec.serving import Persist, bundle_digest, content_key

        def persist():
            model = bundle_digest(bundle)
            if model is None:  # too large to hash: kept in memory only
                return None
            return Persist(content_key(_STORE_VERSION, model, dataset_fingerprint(ds), key), *codec)

    return cache.get((bundle.model, ds), key, make, heavy=heavy, persist=persist)


# bumped when what a stored score means changes (the scoring protocol, the noise draws for a seed)
_STORE_VERSION = "scores-v1"


def _clean_codec(n_options: int):
    import torch

    def decode(a):
        clean = a["clean"]
        if clean.shape != (n_options,) or clean.dtype.kind != "f":
            raise ValueError(f"stored clean scores of shape {clean.shape}, expected ({n_options},)")
        return torch.from_numpy(clean.copy())

    return (lambda clean: {"clean": clean.detach().cpu().numpy()}), decode


def _noise_codec(options: list[str], draws: int):
    import torch

    from hanorec.noise import noise_summary

    def decode(a):
        clean, noisy = a["clean"], a["noisy"]
        if clean.shape != (len(options),) or noisy.shape != (draws, len(options)) or "f" != clean.dtype.kind or noisy.dtype.kind != "f":
            raise ValueError(f"stored draws of shapes {clean.shape} and {noisy.shape} do not fit {draws} draws of {len(options)} options")
        clean, noisy = torch.from_numpy(clean.copy()), torch.from_numpy(noisy.copy())
        return clean, noisy, noise_summary(clean, noisy, options)

    def encode(value):
        clean, noisy, _ = value
        return {"clean": clean.detach().cpu().numpy(), "noisy": noisy.detach().cpu().numpy()}

    return encode, decode


def encoded_prompt(bundle, ds: RecDataset, example: Example, *, cache=None):
    """The example's prompt as the model reads it (text and images encoded by the bundle), cached per example."""

    def make():
        r = render(example, ds)
        return bundle.encode_prompt(r.text, r.images)

    return _cached(cache, bundle, ds, ("prompt", example), make)


def clean_scores(bundle, ds: RecDataset, example: Example, *, mode: str = "shared_prefix", cache=None):
    """The ranking protocol's clean scores logp(option | prompt), one per option (C,), cached per example and
    mode; shared by the candidate table and the noise lab (both compare against them)."""
    from hanorec.scoring import score_options

    def make():
        prompt = encoded_prompt(bundle, ds, example, cache=cache)
        return score_options(bundle, [prompt], [list(example.options)], mode=mode)[0]

    return _cached(cache, bundle, ds, ("clean", example, mode), make, codec=_clean_codec(len(example.options)))


def candidate_scores(bundle, ds: RecDataset, example: Example, *, mode: str = "shared_prefix", cache=None) -> list[dict]:
    """Every option of the example scored by title log-likelihood (the ranking protocol).

    Returns one row per option in displayed order: option text, item id, log-prob, the softmax
    probability over the options, its rank (1 = top) and whether it is a true answer. cache: a
    hanorec.serving.ResultCache to reuse the scores across calls (valid while the model's weights stay the same).
    """
    import torch

    logps = clean_scores(bundle, ds, example, mode=mode, cache=cache).double()
    probs = torch.softmax(logps, 0)
    order = torch.argsort(logps, descending=True).tolist()
    rank = {i: k + 1 for k, i in enumerate(order)}
    true = _true_options(example)
    return [
        {
            "option": opt,
            "item": example.option_items[i],
            "logp": float(logps[i]),
            "prob": float(probs[i]),
            "rank": rank[i],
            "true": i in true,
        }
        for i, opt in enumerate(example.options)
    ]


def true_options(example: Example) -> set[int]:
    """Indices of the example's options that are a true answer (hit1: the correct one of Yes / No)."""
    return _true_options(example)


def _true_options(example: Example) -> set[int]:
    if example.task == "hit1":
        return {example.correct_option}
    return {i for i, item in enumerate(example.candidates) if item in set(example.targets)}


def pair_stats(
    bundle,
    ds: RecDataset,
    pairs: Sequence,
    lambdas: Sequence[float],
    *,
    beta0: float,
    eta: float = 1.0,
    mode: str = "shared_prefix",
    batch_size: int = 8,
    progress=None,
) -> list[dict]:
    """Per-pair statistics of a trained preference policy (method.md sections 6-7).

    For pair n with chosen y_w and rejected y_l (the first rejected answer, as DPO and HaNo-DPO use):
    h_n = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), the reference being the policy
    with its adapter disabled; beta_n = beta0 * eta * lambda_n (HaRS, eq. of section 7; eta is the
    batch responsiveness, 1 unless given); reward margin = beta_n * h_n; accurate when the margin > 0.
    ``progress(done, total)`` is called after each batch.
    """
    import torch

    from hanorec.scoring import multi_completion_logps

    model = bundle.model
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    rows: list[dict] = []
    with bundle.lock, torch.no_grad():  # eval mode and a disabled adapter: no concurrent caller sees them
        was = model.training
        model.eval()
        try:
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                prompts, completions = [], []
                for p in chunk:
                    r = render(p.example, ds)
                    prompts.append(bundle.encode_prompt(r.text, r.images))
                    completions.append([bundle.encode_completion(c) for c in (p.chosen, p.rejected[0])])
                pol, _ = multi_completion_logps(model, bundle, prompts, completions, mode=mode, dtype=dtype, device=device)
                with model.disable_adapter():
                    ref, _ = multi_completion_logps(
                        model, bundle, prompts, completions, mode=mode, dtype=dtype, device=device
                    )
                for k, (p, a, b) in enumerate(zip(chunk, pol, ref)):
                    a, b = a.double().cpu(), b.double().cpu()
                    lam = float(lambdas[start + k])
                    beta = max(1e-6, beta0 * eta * lam)
                    h = float((a[0] - b[0]) - (a[1] - b[1]))
                    rows.append(
                        {
                            "pair": start + k,
                            "user": p.example.user,
                            "lambda": lam,
                            "beta": beta,
                            "chosen_reward": beta * float(a[0] - b[0]),
                            "rejected_reward": beta * float(a[1] - b[1]),
                            "reward_margin": beta * h,
                            "accurate": h > 0,
                            "logp_chosen": float(a[0]),
                            "logp_rejected": float(a[1]),
                        }
                    )
                if progress is not None:
                    progress(min(start + batch_size, len(pairs)), len(pairs))
        finally:
            model.train(was)
    return rows


# ------------------------------------------------------------------------------------------------
# Noise at inference for one example (the noise lab): wraps hanorec.scoring.score_options(noise=...)
# ------------------------------------------------------------------------------------------------
SWEEP_SIGMAS = {  # per target: LoRA factors are small (rms ~0.05), logits are O(1-10)
    "lora": (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2),
    "logits": (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0),
}


def example_noise(
    bundle, ds: RecDataset, example: Example, *, target: str, sigma: float, draws: int, seed: int = 0, cache=None
):
    """(clean scores (C,), noisy scores (draws, C), hanorec.noise.NoiseSummary) for one example's options.

    LoRA noise: up to 64 draws per batched forward (one row per draw), the prompt's image features computed
    once for all of them (hanorec.scoring.score_options). cache: a hanorec.serving.ResultCache; the result is
    then kept per example and noise setting (target, sigma, draws, seed) while the model's weights stay the
    same, and the clean scores are shared with :func:`candidate_scores`; LoRA draws take one of the cache's
    compute slots while they run (logit draws, one light forward, do not).
    """
    from hanorec.noise import NoiseSpec, noise_summary
    from hanorec.scoring import score_options

    # many draws per batched forward: one forward per draw costs ~10x more on a small CPU (tiny models)
    spec = NoiseSpec(
        target=target, sigma=float(sigma), draws=int(draws), seed=int(seed), draws_per_forward=min(int(draws), 64)
    )

    def make():
        prompt = encoded_prompt(bundle, ds, example, cache=cache)
        clean = clean_scores(bundle, ds, example, cache=cache)
        noisy = score_options(bundle, [prompt], [list(example.options)], noise=spec)[0]
        return clean, noisy, noise_summary(clean, noisy, list(example.options))

    key = ("noise", example, spec.target, spec.sigma, spec.draws, spec.seed)
    # LoRA draws hold a core for a second or more: they take a compute slot. Logit draws are one forward with
    # the noise added to the kept logits (~0.07 s for 100 draws), as light as a user view: no slot, so they
    # never queue behind LoRA draws.
    codec = _noise_codec(list(example.options), spec.draws)
    return _cached(cache, bundle, ds, key, make, heavy=spec.target != "logits", codec=codec)


def warm_scores(
    bundle, ds: RecDataset, examples, *, sigma: float, draws: int, seed: int = 0, targets=("lora", "logits"),
    cache, progress=None,
) -> dict:
    """Compute (or find) the clean scores and the noise draws at one setting for every example, through
    ``cache`` (a hanorec.serving.ResultCache, with a disk store to keep them for other processes): what a
    server computes before a classroom arrives. Returns counts: examples, results read from the store,
    results computed. ``progress(done, total)`` after each example."""
    examples = list(examples)
    read0, made0 = cache.disk_hits, cache.disk_made
    for k, example in enumerate(examples):
        clean_scores(bundle, ds, example, cache=cache)
        for target in targets:
            example_noise(bundle, ds, example, target=target, sigma=sigma, draws=draws, seed=seed, cache=cache)
        if progress is not None:
            progress(k + 1, len(examples))
    return {"examples": len(examples), "read": cache.disk_hits - read0, "computed": cache.disk_made - made0}


def noise_sweep(
    bundle,
    ds: RecDataset,
    example: Example,
    *,
    target: str,
    sigmas=None,
    draws: int = 20,
    seed: int = 0,
    progress=None,
    cache=None,
) -> list[dict]:
    """KL from the clean distribution and top-1 / top-3 change rates per sigma (one row per sigma).

    The same seed at every sigma rescales one set of standard normals (common random numbers), so the
    curve is smooth in sigma. ``progress(done, total)`` after each sigma. cache: as in :func:`example_noise`
    (each sigma's draws are cached on their own).
    """
    sigmas = SWEEP_SIGMAS[target] if sigmas is None else sigmas
    rows = []
    for k, sigma in enumerate(sigmas):
        _, noisy, summary = example_noise(
            bundle, ds, example, target=target, sigma=sigma, draws=draws, seed=seed, cache=cache
        )
        d = summary.as_dict()
        rows.append(
            {
                "sigma": float(sigma),
                "kl_mean": d["kl_mean"],
                "kl_std": d["kl_std"],
                "top1_change_rate": d["top1_change_rate"],
                "top3_change_rate": d["top3_change_rate"],
                "mean_abs_shift": d["mean_abs_shift"],
            }
        )
        if progress is not None:
            progress(k + 1, len(sigmas))
    return rows


# ------------------------------------------------------------------------------------------------
# The preference pairs behind the Hardness tab (its HaRS numbers come from hanorec.hardness: ItemIndex,
# pairs_table, pair_detail)
# ------------------------------------------------------------------------------------------------
def training_pairs(cfg, data, emb_ids=None, emb=None, *, sampling: str | None = None, seed: int | None = None,
                   k_negatives: int | None = None):  # fmt: skip
    """The preference pairs a run with this config trains on (hanorec.pairs.build_pairs over the first
    cfg.pref.max_pairs training examples, a preference-noise scenario's swaps included); sampling / seed may be
    changed to re-sample the negatives, and k_negatives to draw another number of rejected answers per pair."""
    from hanorec.pairs import build_pairs

    p = cfg.pref
    sampling = sampling or p.negative_sampling
    table = dict(zip(emb_ids, emb)) if sampling == "embedding" else None
    if sampling == "embedding" and table is None:
        raise ValueError("embedding-nearest negatives need the model's item embeddings")
    return build_pairs(
        data.train[: p.max_pairs],
        data.dataset,
        seed=(cfg.seed if getattr(p, "pair_seed", None) is None else p.pair_seed) if seed is None else int(seed),
        k_negatives=p.k_negatives if k_negatives is None else int(k_negatives),
        sampling=sampling,
        item_embeddings=table,
        swap=getattr(data.dataset, "scenario", {}).get("preference_noise", 0.0),  # as training builds them
    )


def taste_cluster(ds: RecDataset, item: str) -> tuple | None:
    """An item's (colour, genre) taste cluster on a demo dataset (hanorec.data.make_demo), None when the item
    is unknown or carries no colour or no genre. A false negative is a rejected item in the true item's one."""
    attrs = ds.items[item].attributes if item in ds.items else {}
    key = (attrs.get("color"), attrs.get("genre"))
    return None if None in key else key


def same_taste_negatives(pairs: Sequence, ds: RecDataset) -> list[int] | None:
    """Per pair, how many of its rejected items share the true item's (colour, genre) cluster: the false
    negatives a teaching scenario plants (hanorec.data.SCENARIOS, false_negatives; a random draw lands there
    too, about 1 time in 16 on the demo). None when the items carry no colour and genre (not a demo dataset)."""
    if not pairs or taste_cluster(ds, next(iter(ds.items))) is None:
        return None
    out = []
    for p in pairs:
        target = taste_cluster(ds, p.example.targets[0]) if p.example.targets else None
        out.append(sum(1 for n in dict.fromkeys(p.negative_item_ids)
                       if target is not None and taste_cluster(ds, n) == target))  # fmt: skip
    return out


def false_negative_summary(lambdas: Sequence[float], marks: Sequence[int] | None, planted: float = 0.0) -> str:
    """One sentence: lambda on the pairs whose rejected answer holds a same-taste (false) negative against the
    other pairs, so a student sees whether HaRS finds them (a hard negative should get lambda < the rest's).
    '' without marks or without both kinds of pair."""
    if marks is None:
        return ""
    lam = np.asarray(lambdas, dtype=np.float64)
    fn = np.asarray(marks) > 0
    if len(lam) != len(fn) or not fn.any() or fn.all():
        return ""
    a, b = float(lam[fn].mean()), float(lam[~fn].mean())
    rank = float((lam[fn][:, None] < lam[~fn][None, :]).mean() + 0.5 * (lam[fn][:, None] == lam[~fn][None, :]).mean())
    what = f"planted at {planted:g}" if planted else "not planted here: random draws from the true item's cluster"
    verdict = "lower, as HaRS intends for hard negatives" if a < b else "not lower: lambda does not single them out"
    return (
        f"False negatives ({what}): {int(fn.sum())} of {len(fn)} pairs reject an item of the true item's own "
        f"colour and genre. Their mean lambda is {a:.5f} against {b:.5f} for the other pairs ({verdict}); a "
        f"false-negative pair has the lower lambda in {rank:.0%} of comparisons with another pair (50% = chance)."
    )
