"""Serving many sessions from one process: a bounded cache of scoring results, tied to the model they came from.

A classroom of students clicking through the explorer asks for the same users, the same candidates and the
same noise settings again and again. :class:`ResultCache` keeps what the scoring functions of
:mod:`hanorec.explore` computed, keyed by the objects the result depends on (the model, the dataset) and a
key the caller builds from plain values (task, user, noise target, sigma, draws, seed):

- an entry is valid only for the weights it was computed with: every lookup reads the model's weight version
  (:func:`weights_version`, the sum of torch's in-place modification counters over its parameters and
  buffers), so an optimizer step, ``load_state_dict`` or any in-place edit of a weight invalidates every entry
  of that model; :meth:`ResultCache.invalidate` drops them explicitly;
- entries of a model or dataset that is garbage-collected (evicted from the app's model cache) are dropped
  with it, so a new object at the same address never sees them;
- the cache holds at most ``max_entries`` entries and evicts the least recently used;
- concurrent callers of one missing entry compute it once: the others wait for that result;
- heavy computations (``get(..., heavy=True)``: noise draws) take one of ``heavy_slots`` compute slots while
  they run, so at most that many run at once, while a cached result is returned at once, without a slot.

Results must not be modified by the caller (they are shared between sessions).

Results that cost seconds (noise draws, clean scores) can also be kept on disk (:class:`DiskStore`, given to
the cache as ``store``): a caller passes ``persist``, a function giving the entry's content key (digests of
the weights, tokenizer and dataset, see :func:`bundle_digest`, and the plain key) and how to turn the value
into arrays and back. Another process with the same weights and data (the app after a restart, or after
``python app/main.py --warm`` filled the folder when the image was built) then reads the result instead of
computing it. Files are plain ``.npz`` arrays read without pickle; a damaged or mismatched file is computed
again and replaced.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DiskStore", "Persist", "ResultCache", "bundle_digest", "content_key", "weights_version"]


def weights_version(model) -> int:
    """A number that changes whenever a parameter or buffer of ``model`` is modified in place (torch counts
    in-place writes per tensor); 0 for an object that is not a torch module."""
    params = getattr(model, "parameters", None)
    if params is None:
        return 0
    total = sum(p._version for p in model.parameters())
    return total + sum(b._version for b in model.buffers())


class ResultCache:
    """A thread-safe LRU of results keyed by their owners (model, dataset, ...) and a plain key (see the module doc).

    ``get(owners, key, make)`` returns the cached value for (owners, key) when its owners are the same live
    objects and the models among them have the weights the value was computed with; otherwise it calls
    ``make()``, stores and returns the result. ``hits`` and ``misses`` count lookups. heavy_slots: how many
    ``heavy=True`` computations may run at once (None: no limit); ``heavy`` is that limit as a context manager,
    for heavy work that is not cached.
    """

    def __init__(self, max_entries: int = 512, heavy_slots: int | None = None, store: DiskStore | None = None):
        if max_entries < 1:
            raise ValueError(f"a result cache needs room for at least one entry, got max_entries={max_entries}")
        if heavy_slots is not None and heavy_slots < 1:
            raise ValueError(f"heavy_slots must be at least 1 (or None for no limit), got {heavy_slots}")
        self.max_entries = int(max_entries)
        self.store = store
        self.disk_hits = 0  # values read from the store
        self.disk_made = 0  # values with a place in the store that were computed (then saved)
        self.heavy = threading.BoundedSemaphore(heavy_slots) if heavy_slots else nullcontext()
        self._data: OrderedDict = OrderedDict()  # (owner ids, key) -> (versions, value)
        self._lock = threading.RLock()
        self._building: dict = {}  # (owner ids, key) -> lock held while that value is made
        self._watched: dict[int, object] = {}  # owner id -> weakref.finalize dropping its entries
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def get(self, owners: Sequence, key: Hashable, make: Callable, *, heavy: bool = False, persist=None):
        """The value for (owners, key): from memory, else (``persist`` given and a store set) from the disk
        store, else ``make()``. persist: a function returning a :class:`Persist` (called only on a memory miss)."""
        owners = tuple(owners)
        full = (tuple(id(o) for o in owners), key)
        versions = tuple(weights_version(o) for o in owners)
        with self._lock:
            value = self._lookup(full, versions)
            if value is not _MISSING:
                return value
            building = self._building.setdefault(full, threading.Lock())
        with building:
            with self._lock:
                value = self._lookup(full, versions)  # another session made it while this one waited
                if value is not _MISSING:
                    return value
                self.misses += 1
            try:
                value = self._from_disk_or_make(make, heavy, persist)
            finally:
                with self._lock:
                    self._building.pop(full, None)
            with self._lock:
                for o in owners:
                    self._watch(o)
                self._data[full] = (versions, value)
                self._data.move_to_end(full)
                while len(self._data) > self.max_entries:
                    self._data.popitem(last=False)
        return value

    def _from_disk_or_make(self, make: Callable, heavy: bool, persist):
        spec = persist() if (persist is not None and self.store is not None) else None
        if spec is not None:
            arrays = self.store.load(spec.key)
            if arrays is not None:
                try:
                    value = spec.decode(arrays)
                except (KeyError, ValueError, TypeError, IndexError):  # a file of another shape: computed again
                    value = _MISSING
                if value is not _MISSING:
                    with self._lock:
                        self.disk_hits += 1
                    return value
        with self.heavy if heavy else nullcontext():
            value = make()
        if spec is not None:
            self.store.save(spec.key, spec.encode(value))
            with self._lock:
                self.disk_made += 1
        return value

    def _lookup(self, full, versions):
        entry = self._data.get(full)
        if entry is None:
            return _MISSING
        if entry[0] != versions:  # a model's weights changed since it was made: stale
            del self._data[full]
            return _MISSING
        self._data.move_to_end(full)
        self.hits += 1
        return entry[1]

    def _watch(self, owner) -> None:
        oid = id(owner)
        if oid in self._watched:
            return
        try:
            self._watched[oid] = weakref.finalize(owner, self._forget, oid)
        except TypeError:  # not weak-referenceable (a str, an int): it cannot be collected under a live key anyway
            self._watched[oid] = None

    def _forget(self, oid: int) -> None:
        with self._lock:
            self._watched.pop(oid, None)
            self._drop(lambda ids: oid in ids)

    def _drop(self, match: Callable) -> None:
        for full in [k for k in self._data if match(k[0])]:
            del self._data[full]

    def invalidate(self, owner=None) -> None:
        """Drop every entry of ``owner`` (a model, a dataset), or every entry when None."""
        with self._lock:
            if owner is None:
                self._data.clear()
            else:
                self._drop(lambda ids: id(owner) in ids)


_MISSING = object()


@dataclass(frozen=True)
class Persist:
    """How one cache entry is kept on disk: ``key`` (a hex digest of everything the value depends on, see
    :func:`content_key`), ``encode(value) -> dict of numpy arrays`` and ``decode(arrays) -> value`` (which
    raises KeyError or ValueError for arrays that do not fit, e.g. a file written for another shape)."""

    key: str
    encode: Callable
    decode: Callable


def content_key(*parts) -> str:
    """A hex digest of ``parts`` by their repr (strings, numbers, tuples, frozen dataclasses of those): the
    same values give the same key in every process."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class DiskStore:
    """A folder of results as ``<key>.npz`` files of plain arrays (numpy, no pickle), at most ``max_files``.

    ``save`` writes atomically (a temporary file renamed into place), so a reader never sees half a file; when
    the folder holds more than ``max_files`` results the oldest (by modification time) are removed. ``load``
    returns None for a missing file and for a file that is not a readable npz of plain arrays (it is removed:
    the caller computes the value again). Errors writing (a full or read-only disk) are ignored: the store is
    only a shortcut, the value is returned either way.
    """

    MAX_FILE_BYTES = 4 << 20  # a stored result is kilobytes; a bigger file is not one of ours
    MAX_ARRAY_BYTES = 16 << 20  # its arrays, uncompressed (a small compressed file can unpack to gigabytes)
    MAX_ARRAYS = 32
    MAX_DIMS = 4

    def __init__(self, folder: str | Path, max_files: int = 20_000):
        if max_files < 1:
            raise ValueError(f"a disk store needs room for at least one file, got max_files={max_files}")
        self.folder = Path(folder)
        self.max_files = int(max_files)
        self._saves = 0
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        if not (len(key) == 64 and all(c in "0123456789abcdef" for c in key)):
            raise ValueError(f"a disk store key is a sha256 hex digest, got {key[:80]!r}")
        return self.folder / f"{key}.npz"

    def load(self, key: str) -> dict | None:
        import numpy as np

        path = self._path(key)
        try:
            if not path.is_file() or path.is_symlink():
                return None
            if not self._bounded(path):
                raise ValueError("not a stored result")  # planted or damaged: dropped before numpy reads it
            with np.load(path, allow_pickle=False) as f:
                arrays = {name: f[name] for name in f.files}
            if any(a.dtype.kind not in "biuf" or a.ndim > self.MAX_DIMS for a in arrays.values()):
                raise ValueError("not plain numbers")
            return arrays
        except Exception:  # noqa: BLE001 - any unreadable file (truncated, not a zip, object arrays) is dropped
            try:
                path.unlink()
            except OSError:
                pass
            return None

    def _bounded(self, path: Path) -> bool:
        """The file's size, and the count, names and uncompressed sizes of its arrays (read from the zip's
        directory and each array's header, before any array is read) are within the store's bounds."""
        import zipfile

        import numpy as np

        if path.stat().st_size > self.MAX_FILE_BYTES:
            return False
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            if len(infos) > self.MAX_ARRAYS or sum(i.file_size for i in infos) > self.MAX_ARRAY_BYTES + 4096 * len(infos):
                return False
            for info in infos:
                if not info.filename.endswith(".npy") or info.file_size > self.MAX_ARRAY_BYTES + 4096:
                    return False
                with z.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(fh)
                if dtype.kind not in "biuf" or len(shape) > self.MAX_DIMS:
                    return False
                if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > self.MAX_ARRAY_BYTES:
                    return False
        return True

    def save(self, key: str, arrays: dict) -> None:
        import numpy as np

        path = self._path(key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".npz")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, **arrays)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            return
        with self._lock:
            self._saves += 1
            check = self._saves % 64 == 1
        if check:
            self.prune()

    def prune(self) -> None:
        """Remove the oldest result files beyond ``max_files``."""
        try:
            files = [(p.stat().st_mtime, p) for p in self.folder.glob("*.npz")]
        except OSError:
            return
        if len(files) <= self.max_files:
            return
        for _, p in sorted(files, key=lambda t: t[0])[: len(files) - self.max_files]:
            p.unlink(missing_ok=True)

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*.npz")) if self.folder.is_dir() else 0


_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DIGEST_LOCK = threading.Lock()


STORE_MAX_PARAMS = 50_000_000  # larger models (real checkpoints, on GPUs) are not hashed for the store


def bundle_digest(bundle) -> str | None:
    """A hex digest of what a bundle's scores depend on: the model's class, config and every parameter and
    buffer (names, dtypes, shapes, bytes), the device type it runs on (a GPU's scores differ from a CPU's in
    the last digits), the tokenizer and image processor (their serialised forms), the family and image size.
    Kept per model while its weights stay the same (:func:`weights_version`). None for a model of more than
    STORE_MAX_PARAMS parameters: hashing gigabytes (copied from a GPU) would cost more than the scores it
    keeps, so such a model's results stay in memory only."""
    import torch

    model = bundle.model
    if sum(p.numel() for p in model.parameters()) > STORE_MAX_PARAMS:
        return None
    version = weights_version(model)
    with _DIGEST_LOCK:
        known = _DIGESTS.get(model)
    if known is not None and known[0] == version:
        return known[1]
    h = hashlib.sha256()
    first = next(iter(model.parameters()), None)
    device = first.device.type if first is not None else "none"
    h.update(f"{type(model).__name__}|{bundle.family}|{bundle.image_size}|{device}|".encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string().encode())
    for name, t in list(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update((t.view(torch.uint8) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    backend = getattr(bundle.tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(bundle.tokenizer.get_vocab().items())).encode())
    processor = bundle.image_processor
    h.update((processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor)).encode())
    digest = h.hexdigest()
    with _DIGEST_LOCK:
        _DIGESTS[model] = (version, digest)
    return digest
