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
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext

__all__ = ["ResultCache", "weights_version"]


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

    def __init__(self, max_entries: int = 512, heavy_slots: int | None = None):
        if max_entries < 1:
            raise ValueError(f"a result cache needs room for at least one entry, got max_entries={max_entries}")
        if heavy_slots is not None and heavy_slots < 1:
            raise ValueError(f"heavy_slots must be at least 1 (or None for no limit), got {heavy_slots}")
        self.max_entries = int(max_entries)
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

    def get(self, owners: Sequence, key: Hashable, make: Callable, *, heavy: bool = False):
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
                with self.heavy if heavy else nullcontext():
                    value = make()
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
