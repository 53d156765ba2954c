"""hanorec.serving.ResultCache and the cached scoring of hanorec.explore (what the app serves many sessions from)."""

import gc
import os
import threading
import time

import pytest
import torch
from torch import nn

from hanorec.serving import ResultCache, weights_version


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, value):
        def make():
            self.calls += 1
            return value

        return make


class Owner:  # a dataset-like owner (weak-referenceable, no weights)
    pass


class Occupancy:
    """How many threads are inside ``stay`` now, and the most at once."""

    def __init__(self):
        self.now = self.peak = 0
        self._lock = threading.Lock()

    def stay(self, seconds: float) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(seconds)
        with self._lock:
            self.now -= 1


def test_hits_misses_and_lru_bound():
    cache, make, model = ResultCache(max_entries=2), Counter(), nn.Linear(2, 2)
    assert cache.get((model,), "a", make(1)) == 1
    assert cache.get((model,), "a", make(99)) == 1  # served from memory
    assert (cache.hits, cache.misses, make.calls) == (1, 1, 1)
    cache.get((model,), "b", make(2))
    cache.get((model,), "a", make(99))  # a is now the most recent
    cache.get((model,), "c", make(3))  # evicts b, the least recently used
    assert len(cache) == 2
    assert cache.get((model,), "a", make(99)) == 1
    assert cache.get((model,), "b", make(22)) == 22  # recomputed
    with pytest.raises(ValueError, match="at least one entry"):
        ResultCache(0)


def test_entries_are_per_owner_and_key():
    cache, make = ResultCache(), Counter()
    m1, m2, ds = nn.Linear(2, 2), nn.Linear(2, 2), Owner()
    assert cache.get((m1, ds), ("clean", "u1"), make("m1 u1")) == "m1 u1"
    assert cache.get((m2, ds), ("clean", "u1"), make("m2 u1")) == "m2 u1"
    assert cache.get((m1, ds), ("clean", "u2"), make("m1 u2")) == "m1 u2"
    assert cache.get((m1, Owner()), ("clean", "u1"), make("other data")) == "other data"
    assert make.calls == 4


def test_a_weight_change_invalidates_the_models_entries():
    cache, make, model = ResultCache(), Counter(), nn.Linear(2, 2)
    v0 = weights_version(model)
    cache.get((model,), "k", make("old"))
    with torch.no_grad():
        model.weight.add_(1.0)  # an optimizer step, load_state_dict and copy_ all write in place
    assert weights_version(model) > v0
    assert cache.get((model,), "k", make("new")) == "new"
    model.load_state_dict({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)})
    assert cache.get((model,), "k", make("loaded")) == "loaded"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert cache.get((model,), "k", make("stepped")) == "stepped"
    model.eval()  # mode switches and forwards do not change weights: still valid
    with torch.no_grad():
        model(torch.ones(1, 2))
    assert cache.get((model,), "k", make("unchanged?")) == "stepped"
    cache.invalidate(model)
    assert cache.get((model,), "k", make("after invalidate")) == "after invalidate"
    cache.invalidate()
    assert len(cache) == 0


def test_entries_of_a_collected_model_are_dropped():
    cache, make = ResultCache(), Counter()
    model, ds = nn.Linear(2, 2), Owner()
    cache.get((model, ds), "k", make(1))
    cache.get((nn.Linear(1, 1), ds), "k", make(2))  # its model is collected right away
    del model
    gc.collect()
    assert len(cache) == 0  # a new model at a recycled address can never see the old results


def test_concurrent_callers_of_one_entry_compute_it_once():
    cache, model, calls = ResultCache(), nn.Linear(2, 2), []

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return "value"

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get((model,), "k", slow))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == ["value"] * 6 and len(calls) == 1


def test_a_failed_computation_is_not_cached():
    cache, model = ResultCache(), nn.Linear(2, 2)

    def boom():
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        cache.get((model,), "k", boom)
    assert cache.get((model,), "k", lambda: "ok") == "ok"


# ---- the explorer's cached scoring ------------------------------------------------------------
@pytest.fixture(scope="module")
def lab():
    from hanorec.config import LoraConfig
    from hanorec.data import load_dataset, make_splits
    from hanorec.models import add_lora, build_tiny
    from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text

    ds = load_dataset("assets/demo")
    bundle = add_lora(build_tiny("tiny-qwen2.5-vl", corpus_text(ds), hidden_size=64, seed=0), LoraConfig())
    with torch.no_grad():
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    bundle.model.eval()
    shape = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=shape["n_history"], n_target=shape["n_target"])
    return bundle, ds, build_examples("hit3", splits.test, ds, seed=0, max_examples=2)


def test_cached_scoring_equals_uncached_and_follows_the_weights(lab):
    from hanorec.explore import candidate_scores, example_noise

    bundle, ds, examples = lab
    cache = ResultCache()
    ex = examples[0]
    args = dict(target="lora", sigma=0.05, draws=6, seed=3)
    plain = example_noise(bundle, ds, ex, **args)
    first = example_noise(bundle, ds, ex, **args, cache=cache)
    misses = cache.misses
    again = example_noise(bundle, ds, ex, **args, cache=cache)
    assert cache.misses == misses and again is first  # served from memory
    for a, b in zip(plain[:2], first[:2]):
        assert torch.equal(a, b)
    assert candidate_scores(bundle, ds, ex, cache=cache) == candidate_scores(bundle, ds, ex)
    assert cache.misses == misses  # the candidate table reuses the noise lab's clean scores
    other_seed = example_noise(bundle, ds, ex, **{**args, "seed": 4}, cache=cache)
    assert not torch.equal(other_seed[1], first[1])
    other_user = example_noise(bundle, ds, examples[1], **args, cache=cache)
    assert other_user[0].shape == (len(examples[1].options),)
    with torch.no_grad():  # the model changes (e.g. a newer checkpoint loaded in place)
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                p.mul_(2.0)
    changed = example_noise(bundle, ds, ex, **args, cache=cache)
    assert not torch.equal(changed[0], first[0]) and not torch.equal(changed[1], first[1])
    assert torch.equal(changed[1], example_noise(bundle, ds, ex, **args)[1])


# ---- the model lock: shared for state-free scoring, exclusive for state changes -----------------
def test_model_lock_lets_readers_in_together_and_writers_alone():
    from hanorec.models import ModelLock

    lock, occupancy, order = ModelLock(), Occupancy(), []

    def reader(k):
        with lock.shared():
            occupancy.stay(0.15)
        order.append(f"r{k}")

    def writer():
        with lock:
            assert occupancy.now == 0  # no reader runs beside a writer
            order.append("w")

    readers = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in readers:
        t.start()
    time.sleep(0.05)
    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.02)
    late = threading.Thread(target=reader, args=(9,))  # arrives while the writer waits: goes after it
    late.start()
    for t in [*readers, w, late]:
        t.join(10)
    assert occupancy.peak >= 2  # readers overlapped
    assert order.index("w") > max(order.index(f"r{k}") for k in range(3))
    assert order.index("r9") > order.index("w")


def test_model_lock_reentrancy_rules():
    from hanorec.models import ModelLock

    lock = ModelLock()
    with lock, lock, lock.shared(), lock.shared():  # exclusive is re-entrant and may be taken shared too
        pass
    with lock.shared(), lock.shared():
        with pytest.raises(RuntimeError, match="shared cannot take it exclusively"):
            lock.__enter__()
    with lock:  # released cleanly after all of the above
        pass


def test_scoring_an_eval_model_takes_the_lock_shared(lab):
    """score_options on a model in eval mode runs beside another scoring call of the same model (the app's
    light and heavy requests), and its clean scores stay exact while a noise draw runs in another thread."""
    from hanorec.explore import encoded_prompt
    from hanorec.noise import NoiseSpec
    from hanorec.scoring import score_options

    bundle, ds, examples = lab
    prompt = encoded_prompt(bundle, ds, examples[0])
    options = [list(examples[0].options)]
    clean = score_options(bundle, [prompt], options)[0]
    results, errors = {}, []

    def noisy():
        try:
            spec = NoiseSpec("lora", 0.2, draws=24, seed=0, draws_per_forward=8)
            results["noisy"] = score_options(bundle, [prompt], options, noise=spec)[0]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=noisy)
    with bundle.lock.shared():  # held shared here: a shared caller in another thread still gets in
        t.start()
        t.join(60)
    assert not errors and not t.is_alive()
    assert (results["noisy"] - clean).abs().max() > 1e-3
    runs = []
    for _ in range(3):  # clean scoring in this thread while noise draws run in another: always exact
        t = threading.Thread(target=noisy)
        t.start()
        runs.append(score_options(bundle, [prompt], options)[0])
        t.join(60)
    assert all(torch.equal(r, clean) for r in runs)


def test_heavy_computations_take_a_slot_and_cached_results_do_not():
    cache, model, occupancy = ResultCache(heavy_slots=1), nn.Linear(2, 2), Occupancy()

    def heavy(value):
        def make():
            occupancy.stay(0.3)
            return value

        return make

    cache.get((model,), "cached", heavy("c"), heavy=True)
    threads = [threading.Thread(target=cache.get, args=((model,), k, heavy(k)), kwargs={"heavy": True}) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    assert cache.get((model,), "cached", heavy("again"), heavy=True) == "c"  # no slot needed
    assert time.perf_counter() - t0 < 0.2  # a caller waiting for the slot would wait 0.25 s and more
    for t in threads:
        t.join(10)
    assert occupancy.peak == 1  # one heavy computation at a time
    with pytest.raises(ValueError, match="heavy_slots"):
        ResultCache(heavy_slots=0)


# ---- the disk store: results kept for the next process ---------------------------------------------
def test_disk_store_round_trip_damage_and_bound(tmp_path):
    import numpy as np

    from hanorec.serving import DiskStore, content_key

    store = DiskStore(tmp_path / "scores", max_files=3)
    k = content_key("a", 1, (2.5, "b"))
    assert k == content_key("a", 1, (2.5, "b")) and k != content_key("a", 1, (2.5, "c"))
    assert store.load(k) is None  # nothing yet (the folder does not even exist)
    store.save(k, {"x": np.arange(4, dtype=np.float32)})
    assert np.array_equal(store.load(k)["x"], np.arange(4, dtype=np.float32))
    with pytest.raises(ValueError, match="sha256"):
        store.load("../../etc/passwd")
    # damage: truncated, not a zip, a pickled object array; each is None and removed
    path = tmp_path / "scores" / f"{k}.npz"
    good = path.read_bytes()
    for bad in (good[: len(good) // 2], b"not an npz at all", None):
        if bad is None:
            with open(path, "wb") as f:
                np.savez(f, x=np.array([{"a": 1}], dtype=object))
        else:
            path.write_bytes(bad)
        assert store.load(k) is None and not path.exists()
    # bounded: beyond max_files the oldest go
    keys = [content_key(i) for i in range(5)]
    for i, key in enumerate(keys):
        store.save(key, {"x": np.zeros(1)})
        os.utime(tmp_path / "scores" / f"{key}.npz", (1000 + i, 1000 + i))
    store.prune()
    assert len(store) == 3 and store.load(keys[0]) is None and store.load(keys[-1]) is not None
    assert not list((tmp_path / "scores").glob(".tmp-*"))  # no half-written file left


def test_a_store_that_cannot_be_written_still_returns_the_value(tmp_path):
    import numpy as np

    from hanorec.serving import DiskStore, Persist, content_key

    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    cache = ResultCache(store=DiskStore(blocker / "scores"))
    codec = Persist(content_key("k"), lambda v: {"v": np.array(v)}, lambda a: float(a["v"]))
    assert cache.get((Owner(),), "k", lambda: 2.0, persist=lambda: codec) == 2.0


def test_a_second_cache_on_the_same_store_reads_instead_of_computing(tmp_path):
    import numpy as np

    from hanorec.serving import DiskStore, Persist, content_key

    count = Counter()

    def persist(key):
        return lambda: Persist(content_key("test", key), lambda v: {"v": np.array(v)},
                               lambda a: float(a["v"][()]))  # fmt: skip

    owner = Owner()
    first = ResultCache(store=DiskStore(tmp_path))
    assert first.get((owner,), "k", count(1.5), heavy=True, persist=persist("k")) == 1.5
    assert (count.calls, first.disk_made, first.disk_hits) == (1, 1, 0)
    second = ResultCache(store=DiskStore(tmp_path), heavy_slots=1)  # another process, same folder
    with second.heavy:  # the only compute slot is taken: a stored result needs none
        assert second.get((owner,), "k", count(9.9), heavy=True, persist=persist("k")) == 1.5
    assert count.calls == 1 and second.disk_hits == 1
    # a stored file that does not fit (decode raises) is computed again and replaced
    bad = lambda: Persist(content_key("test", "k3"), lambda v: {"v": np.array(v)}, lambda a: a["missing"])  # noqa: E731
    second.store.save(content_key("test", "k3"), {"v": np.array(1.0)})
    assert second.get((owner,), "k3", count(3.0), persist=bad) == 3.0 and count.calls == 2
    # without persist, nothing is stored
    assert second.get((owner,), "plain", count(4.0)) == 4.0 and len(second.store) == 2


def test_bundle_digest_follows_weights_and_device_but_not_the_object(lab):
    import copy

    from hanorec.serving import bundle_digest

    bundle, _, _ = lab
    d = bundle_digest(bundle)
    twin = copy.deepcopy(bundle)
    assert bundle_digest(twin) == d  # same content, another object: the same key in another process
    with torch.no_grad():
        next(p for n, p in twin.model.named_parameters() if "lora_A" in n).add_(1e-3)
    assert bundle_digest(twin) != d


def test_a_model_too_large_to_hash_is_kept_in_memory_only(lab, tmp_path, monkeypatch):
    from hanorec import serving
    from hanorec.explore import example_noise
    from hanorec.serving import DiskStore, bundle_digest

    bundle, ds, examples = lab
    monkeypatch.setattr(serving, "STORE_MAX_PARAMS", 10)
    assert bundle_digest(bundle) is None
    cache = ResultCache(store=DiskStore(tmp_path))
    example_noise(bundle, ds, examples[0], target="logits", sigma=0.1, draws=3, seed=0, cache=cache)
    assert len(cache) >= 2 and len(cache.store) == 0 and cache.disk_made == 0


def test_stored_draws_are_the_computed_ones_and_serve_a_new_process(lab, tmp_path, monkeypatch):
    """The noise draws and clean scores written by one cache are read by a fresh cache on the same folder
    (a restarted app, or the image's --warm step) bit for bit, without running the model."""
    from hanorec import scoring
    from hanorec.explore import candidate_scores, example_noise, warm_scores
    from hanorec.serving import DiskStore

    bundle, ds, examples = lab
    ex = examples[0]
    args = dict(target="lora", sigma=0.03, draws=5, seed=1)
    first = ResultCache(store=DiskStore(tmp_path))
    counts = warm_scores(bundle, ds, [ex], sigma=0.03, draws=5, seed=1, cache=first)
    assert counts == {"examples": 1, "read": 0, "computed": 3}  # clean scores + LoRA + logit draws
    plain = example_noise(bundle, ds, ex, **args)
    fresh = ResultCache(store=DiskStore(tmp_path))

    def no_model(*a, **k):
        raise AssertionError("the model ran although the result was stored")

    monkeypatch.setattr(scoring, "score_options", no_model)
    clean, noisy, summary = example_noise(bundle, ds, ex, **args, cache=fresh)
    assert torch.equal(clean, plain[0]) and torch.equal(noisy, plain[1])
    assert summary.as_dict() == plain[2].as_dict()
    assert fresh.disk_hits == 1 and [r["logp"] for r in candidate_scores(bundle, ds, ex, cache=fresh)]
    assert warm_scores(bundle, ds, [ex], sigma=0.03, draws=5, seed=1, cache=ResultCache(store=DiskStore(tmp_path))) == {
        "examples": 1, "read": 3, "computed": 0}  # fmt: skip
    # another setting or changed weights are not in the store: they would need the model
    with pytest.raises(AssertionError, match="the model ran"):
        example_noise(bundle, ds, ex, **{**args, "seed": 2}, cache=fresh)
