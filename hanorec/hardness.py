"""HaRS, the offline half: item neighbour profiles and per-sample hardness weights lambda_n.

method.md section 7. The model-specific part (reading title-token embeddings and vision
tower outputs) lives elsewhere; this module starts from item embedding tensors:

    e_i       = normalize(normalize(text_i) + normalize(image_i))     # image part 0 if absent
    s_i       = top-K cosine similarities of e_i to other items, sorted descending
    p_i       = softmax(s_i)                                          # neighbour profile
    D(w, l)   = || p_w - p_l ||_2                                     # pair distance
    D_n       = mean over the sample's aligned (positive, negative) pairs
    lambda_n  = sigmoid(D_n) / sigmoid(mean_n D_n)                    # hard pair -> lambda < 1

Results are cached on disk by :class:`HardnessCache` (safetensors + a JSON sidecar).

For exploration (the explorer's Hardness tab, notebook 04): :class:`ItemIndex` holds one model's item
embeddings, computed once (:func:`item_index` keeps one per model in memory), with neighbour profiles
for any K and profile temperature T (p_i = softmax(s_i / T); T = 1 and K = 10 are the paper's and the
training defaults, anything else is labelled beyond the paper); :func:`pair_detail` explains one
preference pair; :func:`pairs_table` gives D, lambda and beta over a list of pairs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

# ----------------------------------------------------------------------------------------
# Embeddings and neighbour profiles


def fuse_embeddings(
    text: torch.Tensor, image: torch.Tensor | None = None, has_image: torch.Tensor | None = None
) -> torch.Tensor:
    """e_i = normalize(normalize(text_i) + normalize(image_i)); image part 0 where there is no image.

    ``text`` and ``image`` are (N, D) with the same D (project first if the towers differ);
    ``has_image`` is a (N,) bool mask, all True if omitted. ``image=None`` means no item has
    an image, so e_i = normalize(text_i). Returns float32 (N, D), unit rows (zero rows stay 0).
    """
    if text.ndim != 2:
        raise ValueError(f"text embeddings must be (N, D), got shape {tuple(text.shape)}")
    t = F.normalize(text.float(), dim=-1)  # (N, D)
    if image is None:
        return t
    if image.ndim != 2 or image.shape[0] != text.shape[0]:
        raise ValueError(
            f"image embeddings must be (N, D) with N={text.shape[0]} like text, got shape {tuple(image.shape)}"
        )
    if image.shape[1] != text.shape[1]:
        raise ValueError(
            f"text dim {text.shape[1]} != image dim {image.shape[1]}: project the image embeddings "
            "to the text dimension before fusing"
        )
    v = F.normalize(image.float(), dim=-1)  # (N, D)
    if has_image is not None:
        mask = torch.as_tensor(has_image, dtype=torch.bool, device=v.device).reshape(-1)
        if mask.shape[0] != text.shape[0]:
            raise ValueError(f"has_image has {mask.shape[0]} entries but there are {text.shape[0]} items")
        v = v * mask[:, None]
    return F.normalize(t + v, dim=-1)


@torch.no_grad()
def neighbour_profiles(
    emb: torch.Tensor, k: int = 10, block_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours of every item, excluding the item itself.

    Rows of ``emb`` (N, D) are normalized, then similarities are computed ``block_size``
    rows at a time: peak extra memory is one (block_size, N) float32 block (block_size * N *
    4 bytes: 1.6 GB for N=100k at the default 4096; lower block_size to save memory), never
    (N, N). Returns ``(sims, idx)``, both (N, k): similarities sorted descending and the
    neighbours' row indices.
    """
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {tuple(emb.shape)}")
    n = emb.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k={k} neighbours needs 1 <= k < N, but there are N={n} items")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    e = F.normalize(emb.float(), dim=-1)  # (N, D)
    sims = torch.empty(n, k, dtype=torch.float32, device=e.device)
    idx = torch.empty(n, k, dtype=torch.long, device=e.device)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        block = e[start:stop] @ e.T  # (B, N)
        rows = torch.arange(stop - start, device=e.device)
        block[rows, rows + start] = float("-inf")  # exclude the item itself
        top = torch.topk(block, k, dim=1, largest=True, sorted=True)
        sims[start:stop], idx[start:stop] = top.values, top.indices
        del block
    return sims, idx


PAPER_K = 10
PAPER_TEMPERATURE = 1.0


def profile_distributions(sims: torch.Tensor, temperature: float = PAPER_TEMPERATURE) -> torch.Tensor:
    """p_i = softmax(s_i / T) over the k sorted neighbour similarities. (N, k) -> (N, k).

    T = 1 is the paper's profile (method.md section 7) and the training default; other temperatures
    are for exploration only (a smaller T sharpens the profiles and widens the spread of D).
    """
    if not temperature > 0:
        raise ValueError(f"the profile temperature must be > 0, got {temperature}")
    return torch.softmax(sims.float() / temperature, dim=-1)


# ----------------------------------------------------------------------------------------
# Distances and hardness weights


def pair_distances(profiles: torch.Tensor, pos_index: torch.Tensor, neg_index: torch.Tensor) -> torch.Tensor:
    """D(w, l) = || p_w - p_l ||_2 for aligned item indices. (P,), (P,) -> (P,)."""
    pos = torch.as_tensor(pos_index, dtype=torch.long, device=profiles.device).reshape(-1)
    neg = torch.as_tensor(neg_index, dtype=torch.long, device=profiles.device).reshape(-1)
    if pos.shape != neg.shape:
        raise ValueError(f"pos_index has {pos.numel()} entries but neg_index has {neg.numel()}")
    n = profiles.shape[0]
    for name, ix in (("pos_index", pos), ("neg_index", neg)):
        if ix.numel() and (int(ix.min()) < 0 or int(ix.max()) >= n):
            raise ValueError(
                f"{name} must index the {n} profiles, got values in [{int(ix.min())}, {int(ix.max())}]"
            )
    return torch.linalg.vector_norm(profiles[pos] - profiles[neg], dim=-1)  # (P,)


def sample_distances(
    profiles: torch.Tensor, positive_ids: Sequence[Sequence[int]], negative_ids: Sequence[Sequence[int]]
) -> torch.Tensor:
    """D_n = mean over sample n's aligned (positive_ids[n][j], negative_ids[n][j]) pair distances.

    ids are row indices into ``profiles``. Returns (S,).
    """
    if len(positive_ids) != len(negative_ids):
        raise ValueError(
            f"positive_ids has {len(positive_ids)} samples but negative_ids has {len(negative_ids)}"
        )
    pos: list[int] = []
    neg: list[int] = []
    owner: list[int] = []
    for i, (p, q) in enumerate(zip(positive_ids, negative_ids)):
        if len(p) != len(q):
            raise ValueError(
                f"sample {i}: {len(p)} positive ids but {len(q)} negative ids; they must be aligned"
            )
        if len(p) == 0:
            raise ValueError(f"sample {i} has no (positive, negative) item pairs")
        pos += [int(x) for x in p]
        neg += [int(x) for x in q]
        owner += [i] * len(p)
    d = pair_distances(profiles, torch.tensor(pos), torch.tensor(neg))  # (P,)
    owner_t = torch.tensor(owner, dtype=torch.long, device=d.device)
    s = len(positive_ids)
    sums = torch.zeros(s, dtype=d.dtype, device=d.device).index_add_(0, owner_t, d)
    counts = torch.zeros(s, dtype=d.dtype, device=d.device).index_add_(0, owner_t, torch.ones_like(d))
    return sums / counts  # (S,)


def hardness_lambda(distances: torch.Tensor, mean_distance: float | None = None) -> torch.Tensor:
    """lambda_n = sigmoid(D_n) / sigmoid(mean D) over the training set (method.md section 7).

    Smaller D (profiles alike, a hard pair) -> lambda < 1; a sample at the mean gets exactly 1.
    mean_distance: the training set's mean D when ``distances`` are only some of its samples
    (default: the mean of ``distances`` themselves).
    """
    d = torch.as_tensor(distances).float().reshape(-1)  # (S,)
    if d.numel() == 0:
        raise ValueError("hardness_lambda needs at least one sample distance")
    mean = d.mean() if mean_distance is None else torch.tensor(float(mean_distance))
    return torch.sigmoid(d) / torch.sigmoid(mean)


# ----------------------------------------------------------------------------------------
# On-disk cache


def _canonical_json(obj) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except TypeError as err:
        raise TypeError(f"cache key must be JSON-serializable (str, numbers, lists, dicts): {err}") from None


def fingerprint(*parts) -> str:
    """Stable sha256 hex digest of ``parts`` (strings, numbers, lists/tuples, dicts, tensors, arrays).

    Use it to key the cache on a dataset, e.g. ``fingerprint(item_ids, titles)``. Each value
    is tagged with its type and length, so ("ab", "c") and ("a", "bc") differ.
    """
    h = hashlib.sha256()

    def feed(x) -> None:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.dtype == torch.bfloat16:
                x = x.float()
            x = x.numpy()
        if isinstance(x, np.ndarray):
            data = np.ascontiguousarray(x).tobytes()
            h.update(f"A{x.dtype.str}{x.shape}:{len(data)}:".encode())
            h.update(data)
        elif isinstance(x, bytes):
            h.update(f"B{len(x)}:".encode() + x)
        elif isinstance(x, str):
            b = x.encode()
            h.update(f"S{len(b)}:".encode() + b)
        elif isinstance(x, Mapping):
            h.update(f"D{len(x)}:".encode())
            for key in sorted(x, key=str):
                feed(str(key))
                feed(x[key])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}:".encode())
            for item in x:
                feed(item)
        else:
            h.update(("J" + _canonical_json(x) + ";").encode())

    feed(list(parts))
    return h.hexdigest()


class HardnessCache:
    """On-disk cache of neighbour profiles / lambdas keyed by a JSON-able dict.

    The key (e.g. ``{"model": ..., "dataset": fingerprint(...), "k": 10}``) is hashed as the
    sha256 of its sorted JSON into ``<root>/<hash>.safetensors`` plus ``<root>/<hash>.json``
    (``{"key": ..., "meta": ...}``). Both files are written to a temp file and moved into
    place with ``os.replace``; the sidecar is written last, so a half-written entry is a miss.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @staticmethod
    def key_hash(key: Mapping) -> str:
        return hashlib.sha256(_canonical_json(dict(key)).encode()).hexdigest()

    def paths(self, key: Mapping) -> tuple[Path, Path]:
        """(tensors file, JSON sidecar) for ``key``."""
        h = self.key_hash(key)
        return self.root / f"{h}.safetensors", self.root / f"{h}.json"

    def _sidecar(self, key: Mapping) -> dict | None:
        tensors_path, meta_path = self.paths(key)
        if not (tensors_path.is_file() and meta_path.is_file()):
            return None
        try:
            side = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        # Guard against a hash collision or a hand-edited file: the stored key must match.
        if _canonical_json(side.get("key")) != _canonical_json(dict(key)):
            return None
        return side

    def get(self, key: Mapping) -> dict[str, torch.Tensor] | None:
        """The cached tensors for ``key``, or ``None`` on a miss."""
        if self._sidecar(key) is None:
            return None
        return load_file(str(self.paths(key)[0]))

    def meta(self, key: Mapping) -> dict | None:
        """The ``meta`` dict stored with ``key``, or ``None`` on a miss."""
        side = self._sidecar(key)
        return None if side is None else side.get("meta", {})

    def put(self, key: Mapping, tensors: Mapping[str, torch.Tensor], meta: Mapping | None = None) -> Path:
        """Store ``tensors`` under ``key`` atomically; returns the tensors file path."""
        key = dict(key)
        sidecar = _canonical_json({"key": key, "meta": dict(meta or {})})
        self.root.mkdir(parents=True, exist_ok=True)
        tensors_path, meta_path = self.paths(key)
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"cache value {name!r} must be a torch.Tensor, got {type(t).__name__}")
        # safetensors wants contiguous CPU tensors that share no memory.
        payload = {str(name): t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
        self._atomic_write(tensors_path, lambda tmp: save_file(payload, tmp))
        self._atomic_write(meta_path, lambda tmp: Path(tmp).write_text(sidecar))
        return tensors_path

    def _atomic_write(self, dest: Path, write) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


# ----------------------------------------------------------------------------------------
# Item embeddings read from the model itself, and lambda for a set of preference pairs


# pixels (as the model receives them) per batch of item images: 32 tiny-preset images, 8 at 262,144 pixels,
# 2 at 896 x 896 (a 4,096-patch tower whose attention would otherwise take ~17 GB for 32 images on CPU)
IMAGE_PIXEL_BUDGET = 1 << 21


@torch.no_grad()
def item_embeddings(
    bundle, ds, item_ids: Sequence[str] | None = None, batch_size: int = 32, *, on_log=None, should_stop=None
) -> tuple[list[str], torch.Tensor]:
    """Fused item embeddings e_i from the model (method.md section 7).

    text part: mean of the input-embedding rows of the title's tokens; image part: mean over the
    image's visual tokens of the vision tower output after its merger / projector (the vectors the
    language model reads). Returns (item ids, (N, D) unit rows).
    on_log gets a "hardness" progress event per image batch; should_stop is polled between batches
    (it raises hanorec.progress.StopRequested).
    """
    from hanorec.progress import Progress

    ids = sorted(ds.items) if item_ids is None else list(item_ids)
    if ids:  # large images go fewer at a time: the vision tower's attention grows with the patches per batch
        first = bundle._process_images([ds.load_image(ids[0], size=bundle.image_size)])[0]
        batch_size = max(1, min(batch_size, IMAGE_PIXEL_BUDGET // max(1, first.numel() // 3)))
    progress = Progress("hardness", -(-len(ids) // batch_size), on_log=on_log, should_stop=should_stop)
    embed = bundle.model.get_input_embeddings()
    device = embed.weight.device
    text = []
    for i in ids:
        tok = bundle.tokenizer(ds.items[i].title, add_special_tokens=False)["input_ids"] or [
            bundle.pad_token_id
        ]
        text.append(embed(torch.tensor(tok, device=device)).float().mean(0))
    text_t = torch.stack(text)  # (N, D)
    image_rows, has_image = [], []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        image_rows.append(bundle.image_features([ds.load_image(i, size=bundle.image_size) for i in chunk]))
        has_image += [ds.items[i].image_path is not None for i in chunk]
        progress.tick()
    image_t = torch.cat(image_rows)  # (N, D)
    return ids, fuse_embeddings(text_t.cpu(), image_t.cpu(), torch.tensor(has_image))


def pair_hardness(
    bundle,
    ds,
    pairs,
    *,
    k: int = 10,
    temperature: float = PAPER_TEMPERATURE,
    cache_dir: str | os.PathLike | None = None,
    model_key: str = "",
    block_size: int = 1024,
    on_log=None,
    should_stop=None,
) -> dict[str, torch.Tensor]:
    """lambda_n for every preference pair, with the distances D_n; cached by (model, dataset, pairs, K, T).

    temperature: the profile temperature T (pref.hars_temperature; 1 = the paper's, beyond it otherwise).
    Returns {"lambda": (S,), "distance": (S,)}.
    """
    if not 1 <= k < len(ds.items):
        from hanorec.config import ConfigError

        raise ConfigError(
            f"pref.hardness_k = {k} neighbours needs 1 <= K < {len(ds.items)} (the items of dataset {ds.name!r}); "
            "lower --pref.hardness_k"
        )
    dataset_fp = dataset_fingerprint(ds)
    pairs_fp = fingerprint([[list(p.positive_item_ids), list(p.negative_item_ids)] for p in pairs])
    key = {"model": model_key or bundle.name, "dataset": dataset_fp, "pairs": pairs_fp, "k": k}
    if float(temperature) != PAPER_TEMPERATURE:  # the paper's T keeps the keys of caches written before T existed
        key["temperature"] = float(temperature)
    cache = HardnessCache(cache_dir) if cache_dir else None
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit
    index = item_index(bundle, ds, block_size=block_size, on_log=on_log, should_stop=should_stop)
    distance = index.sample_distances(pairs, k=min(k, len(index.ids) - 1), temperature=float(temperature))
    out = {"lambda": hardness_lambda(distance), "distance": distance}
    if cache is not None:
        cache.put(key, out, {"n_pairs": len(pairs), "n_items": len(index.ids)})
    return out


def dataset_fingerprint(ds) -> str:
    """sha256 of the dataset's (item id, title) list: what item embeddings depend on besides the model."""
    return fingerprint(sorted((i, it.title) for i, it in ds.items.items()))


# ----------------------------------------------------------------------------------------
# Exploration: one model's item index, one pair in detail, lambda over many pairs


class ItemIndex:
    """Item embeddings e_i of one model (method.md section 7), with neighbour profiles on demand.

    The embeddings are computed once (by :func:`item_embeddings`); top-K neighbours are computed once
    per K (:func:`neighbour_profiles`), profiles p_i = softmax(s_i / T) once per (K, T), so re-sampling
    negatives or re-drawing a chart never re-embeds an item.
    """

    def __init__(
        self,
        ids: Sequence[str],
        embeddings: torch.Tensor,
        titles: Mapping[str, str] | None = None,
        block_size: int = 4096,
    ):
        if len(ids) != embeddings.shape[0]:
            raise ValueError(f"{len(ids)} item ids but {embeddings.shape[0]} embedding rows")
        self.ids = list(ids)
        self.embeddings = embeddings  # (N, D), unit rows
        self.titles = dict(titles or {})
        self.row = {i: r for r, i in enumerate(self.ids)}
        self.block_size = block_size
        self._neighbours: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._profiles: dict[tuple[int, float], torch.Tensor] = {}

    @classmethod
    def from_model(cls, bundle, ds, block_size: int = 4096, *, on_log=None, should_stop=None) -> ItemIndex:
        """Embed every item of ``ds`` with the model (:func:`item_embeddings`, with its progress events)."""
        ids, emb = item_embeddings(bundle, ds, on_log=on_log, should_stop=should_stop)
        return cls(ids, emb, {i: ds.items[i].title for i in ids}, block_size)

    def rows(self, item_ids: Iterable[str]) -> list[int]:
        out = []
        for i in item_ids:
            if i not in self.row:
                raise ValueError(f"item id {i!r} is not in the item index ({len(self.ids)} items)")
            out.append(self.row[i])
        return out

    def embedding_dict(self) -> dict[str, torch.Tensor]:
        """{item id: e_i}, the form :func:`hanorec.pairs.build_pairs` takes for embedding sampling."""
        return dict(zip(self.ids, self.embeddings))

    def _check_k(self, k: int) -> int:
        if not 1 <= k < len(self.ids):
            raise ValueError(f"K={k} neighbours needs 1 <= K < {len(self.ids)} (the number of items)")
        return int(k)

    def neighbours(self, k: int = PAPER_K) -> tuple[torch.Tensor, torch.Tensor]:
        """(sims (N, K) sorted descending, neighbour rows (N, K)), computed once per K."""
        k = self._check_k(k)
        if k not in self._neighbours:
            self._neighbours[k] = neighbour_profiles(self.embeddings, k=k, block_size=self.block_size)
        return self._neighbours[k]

    def profiles(self, k: int = PAPER_K, temperature: float = PAPER_TEMPERATURE) -> torch.Tensor:
        """p_i = softmax(s_i / T) for every item, (N, K), computed once per (K, T)."""
        key = (self._check_k(k), float(temperature))
        if key not in self._profiles:
            self._profiles[key] = profile_distributions(self.neighbours(k)[0], temperature)
        return self._profiles[key]

    def sample_distances(
        self, pairs, k: int = PAPER_K, temperature: float = PAPER_TEMPERATURE
    ) -> torch.Tensor:
        """D_n of every preference pair (mean over its aligned (positive, negative) item pairs), (S,)."""
        pos = [self.rows(p.positive_item_ids) for p in pairs]
        neg = [self.rows(p.negative_item_ids) for p in pairs]
        return sample_distances(self.profiles(k, temperature), pos, neg)

    def profile_table(
        self, item_id: str, k: int = PAPER_K, temperature: float = PAPER_TEMPERATURE
    ) -> pd.DataFrame:
        """Item i's neighbour profile: rank, neighbour id, title, similarity s_ij, probability p_ij."""
        r = self.rows([item_id])[0]
        sims, idx = self.neighbours(k)
        p = self.profiles(k, temperature)[r]
        ids = [self.ids[j] for j in idx[r].tolist()]
        return pd.DataFrame(
            {
                "rank": range(1, len(ids) + 1),
                "neighbour": ids,
                "title": [self.titles.get(i, "") for i in ids],
                "similarity": sims[r].numpy(),
                "p": p.numpy(),
            }
        )


_INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def item_index(
    bundle, ds, *, refresh: bool = False, block_size: int = 4096, on_log=None, should_stop=None
) -> ItemIndex:
    """The :class:`ItemIndex` of (bundle's model, dataset), built at the first call and then reused.

    Kept in memory per model object (released with it) and dataset fingerprint. Item embeddings read
    the input embeddings and the vision tower, which LoRA never trains here; pass refresh=True after
    changing those weights.
    """
    per_model = _INDEXES.setdefault(bundle.model, {})
    key = dataset_fingerprint(ds)
    if refresh or key not in per_model:
        per_model[key] = ItemIndex.from_model(
            bundle, ds, block_size=block_size, on_log=on_log, should_stop=should_stop
        )
    return per_model[key]


def beyond_paper_note(k: int, temperature: float) -> str:
    """'' for the paper's setting (K = 10, T = 1), else a sentence saying what differs."""
    parts = []
    if int(k) != PAPER_K:
        parts.append(f"K = {k} neighbours (the paper uses {PAPER_K})")
    if float(temperature) != PAPER_TEMPERATURE:
        parts.append(f"profile temperature {temperature:g} (the paper's softmax has none, i.e. 1)")
    return (
        ""
        if not parts
        else "Beyond the paper: " + " and ".join(parts) + " (training follows its run's pref.hardness_k and pref.hars_temperature, the paper's by default)."
    )


def observed_eta_range(metrics) -> tuple[float, float] | None:
    """(min, max) of the responsiveness eta logged during preference training, or None if never logged.

    metrics: a run's metrics.jsonl path or its rows (dicts with "hardness/eta", method.md section 7).
    """
    if isinstance(metrics, (str, os.PathLike)):
        path = Path(metrics)
        if not path.is_file():
            raise FileNotFoundError(f"no metrics log at {path}")
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise ValueError(f"{path} line {n} is not JSON") from None
    else:
        rows = list(metrics)
    from hanorec.logkeys import ETA

    etas = [float(r[ETA]) for r in rows if isinstance(r, Mapping) and r.get(ETA) is not None]
    return (min(etas), max(etas)) if etas else None


@dataclass
class PairHardness:
    """One preference pair's HaRS numbers (method.md section 7), from :func:`pair_detail`.

    items: one row per aligned (positive, negative) item pair with its distance D(w, l) = ||p_w - p_l||_2;
    distance: the sample's D_n (their mean); lam: lambda_n = sigmoid(D_n) / sigmoid(mean D);
    beta: beta0 * lambda_n (eta = 1); beta_range: beta0 * eta * lambda_n at the observed eta's min and
    max (None without a training log); profiles: each item's neighbour profile table (see
    :meth:`ItemIndex.profile_table`); note: '' in the paper's setting, else what is beyond the paper.
    """

    items: pd.DataFrame
    distance: float
    mean_distance: float
    lam: float
    beta0: float
    beta: float
    eta_range: tuple[float, float] | None
    beta_range: tuple[float, float] | None
    k: int
    temperature: float
    profiles: dict[str, pd.DataFrame] = field(default_factory=dict)
    note: str = ""

    def summary(self) -> dict:
        """The scalars, for a one-row table."""
        return {
            "D": self.distance,
            "mean D": self.mean_distance,
            "lambda": self.lam,
            "beta0": self.beta0,
            "beta = beta0 x lambda": self.beta,
            "eta range": self.eta_range,
            "beta range (eta)": self.beta_range,
            "K": self.k,
            "temperature": self.temperature,
        }


def pair_detail(
    pair,
    index: ItemIndex,
    *,
    mean_distance: float,
    beta0: float = 0.1,
    k: int = PAPER_K,
    temperature: float = PAPER_TEMPERATURE,
    eta_range: tuple[float, float] | None = None,
) -> PairHardness:
    """Explain one preference pair's hardness weight (method.md section 7).

    For each aligned (w, l): D(w, l) = ||p_w - p_l||_2 with p = softmax(s / T) over the top-K
    neighbour similarities; D_n = mean_j D(w_j, l_j); lambda_n = sigmoid(D_n) / sigmoid(mean_distance)
    (mean_distance: the training set's mean D at the same K and T, e.g. ``pairs_table(...).attrs``);
    beta_n = beta0 * eta * lambda_n, shown at eta = 1 and over ``eta_range`` (see :func:`observed_eta_range`).
    """
    pos, neg = list(pair.positive_item_ids), list(pair.negative_item_ids)
    profiles = index.profiles(k, temperature)
    d_items = pair_distances(profiles, torch.tensor(index.rows(pos)), torch.tensor(index.rows(neg)))  # (P,)
    d = float(d_items.mean())
    lam = float(hardness_lambda(torch.tensor([d]), mean_distance)[0])
    items = pd.DataFrame(
        {
            "positive": pos,
            "positive_title": [index.titles.get(i, "") for i in pos],
            "negative": neg,
            "negative_title": [index.titles.get(i, "") for i in neg],
            "distance": d_items.numpy(),
        }
    )
    beta_range = None if eta_range is None else (beta0 * eta_range[0] * lam, beta0 * eta_range[1] * lam)
    return PairHardness(
        items=items,
        distance=d,
        mean_distance=float(mean_distance),
        lam=lam,
        beta0=beta0,
        beta=beta0 * lam,
        eta_range=eta_range,
        beta_range=beta_range,
        k=k,
        temperature=temperature,
        profiles={i: index.profile_table(i, k, temperature) for i in dict.fromkeys(pos + neg)},
        note=beyond_paper_note(k, temperature),
    )


def pairs_table(
    pairs, index: ItemIndex, *, beta0: float = 0.1, k: int = PAPER_K, temperature: float = PAPER_TEMPERATURE
) -> pd.DataFrame:
    """D_n, lambda_n and beta_n = beta0 * lambda_n (eta = 1) of every pair: lambda's distribution.

    lambda_n = sigmoid(D_n) / sigmoid(mean over these pairs of D) (method.md section 7): pass the
    whole training set. attrs: mean_distance, k, temperature, note (beyond-the-paper label or '').
    """
    if not pairs:
        raise ValueError("pairs_table needs at least one preference pair")
    d = index.sample_distances(pairs, k, temperature)  # (S,)
    lam = hardness_lambda(d)
    table = pd.DataFrame(
        {
            "pair": range(len(pairs)),
            "user": [p.example.user for p in pairs],
            "task": [p.example.task for p in pairs],
            "n_item_pairs": [len(p.positive_item_ids) for p in pairs],
            "distance": d.numpy(),
            "lambda": lam.numpy(),
            "beta": (beta0 * lam).numpy(),
        }
    )
    table.attrs.update(
        mean_distance=float(d.mean()), k=k, temperature=temperature, note=beyond_paper_note(k, temperature)
    )
    return table
