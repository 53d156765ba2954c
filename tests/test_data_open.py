"""Opening a big dataset in the Data tab: the same windows, draws, counts and statistics, made on demand.

Lazy splits cut the train and val windows on first read, deferred unshuffled examples draw only up to the one
read, the training popularity is counted on first read, and the statistics are kept on disk per dataset
fingerprint. Every one of these must give exactly what the eager path gives for the same seed.
"""

from __future__ import annotations

import gc
import json
import pickle
import sys
from collections import Counter
from pathlib import Path

import pytest

from hanorec import explore
from hanorec.data import Splits, load_dataset, make_splits
from hanorec.eval import train_popularity
from hanorec.tasks import TASK_SHAPES, build_examples

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"


def _synthetic(folder: Path, n_users=300, n_items=200, per_user=12, seed=1) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_data import write_synthetic

    return write_synthetic(folder, n_users=n_users, n_items=n_items, per_user=per_user, seed=seed)


def _fields(s: Splits) -> tuple:
    return (s.train, s.val, s.test, s.policy, s.n_users_dropped, s.config)


# ---------------------------------------------------------------------------------------------- lazy splits
@pytest.mark.parametrize(
    "kw",
    [
        dict(n_history=3, n_target=3),
        dict(n_history=3, n_target=3, max_train_windows_per_user=4),
        dict(n_history=5, n_target=1, max_train_windows_per_user=2, max_items_per_user=9),
        dict(n_history=10, n_target=1, min_history=4, min_interactions=8),
        dict(n_history=3, n_target=3, max_train_windows_per_user=0),
    ],
)
def test_lazy_splits_cut_the_same_windows_on_first_read(ds, kw):
    eager = make_splits(ds, **kw)
    lazy = make_splits(ds, **kw, lazy=True)
    assert not lazy.cut and lazy.test == eager.test
    assert lazy.sizes() == eager.sizes() and lazy.describe() == eager.describe()  # counted without cutting
    assert not lazy.cut
    assert _fields(lazy) == _fields(eager) and lazy.cut  # read: the very windows of the eager split
    assert lazy == eager and lazy.sizes() == eager.sizes()
    plain = pickle.loads(pickle.dumps(lazy))
    assert type(plain) is Splits and plain == eager


def test_lazy_is_ignored_by_the_other_policies(ds):
    for policy in ("last_window_by_user",):
        s = make_splits(ds, n_history=3, n_target=3, policy=policy, lazy=True)
        assert type(s) is Splits and s == make_splits(ds, n_history=3, n_target=3, policy=policy)


# -------------------------------------------------------------------------------- draws up to the one read
@pytest.mark.parametrize("task", list(TASK_SHAPES))
def test_deferred_examples_list_users_without_drawing_and_draw_the_same(ds, task):
    shape = TASK_SHAPES[task]
    splits = make_splits(ds, n_history=shape["n_history"], n_target=shape["n_target"])
    eager = build_examples(task, splits.test, ds, seed=2000)
    lazy = build_examples(task, splits.test, ds, seed=2000, lazy=True, defer=True)
    assert lazy.users() == [e.user for e in eager] and len(lazy) == len(eager)
    assert lazy._prefix.made == []  # the user list drew nothing
    k = len(eager) // 2
    assert lazy.for_user(eager[k].user) == eager[k] and len(lazy._prefix.made) == k + 1  # drawn up to it only
    assert lazy[0] == eager[0] and lazy[-1] == eager[-1] and list(lazy) == eager  # bit-identical draws
    capped = build_examples(task, splits.test, ds, seed=2000, lazy=True, defer=True, max_examples=7)
    assert capped.users() == [e.user for e in eager[:7]] and list(capped) == eager[:7]
    with pytest.raises(IndexError):
        capped[7]
    windows = build_examples(task, lambda: splits.test, ds, seed=2000, lazy=True, defer=True)
    assert windows.for_user(eager[3].user) == eager[3]  # windows given by a function: read when first needed


def test_prepare_data_deferred_gives_the_run_s_examples_and_counts(tmp_path):
    from hanorec.config import load_config
    from hanorec.pipeline import prepare_data

    folder = _synthetic(tmp_path / "syn")
    cfg = load_config(
        overrides={"data": {"path": str(folder)}, "task": {"name": "hit3", "max_eval_examples": 50}}
    )
    eager = prepare_data(cfg)
    lazy = prepare_data(cfg, defer=True, freeze=True)
    assert gc.isenabled()
    assert not lazy.splits.cut and lazy.test.users() == eager.test.users()
    assert lazy.test.for_user(eager.test[20].user) == eager.test[20]
    assert list(lazy.test) == list(eager.test) and list(lazy.val) == list(eager.val)
    assert list(lazy.train) == list(eager.train)
    assert list(lazy.popularity.items()) == list(eager.popularity.items())  # same counts, same order
    assert lazy.splits == eager.splits


# ------------------------------------------------------------------------------------- counting at C speed
def _reference_train_popularity(windows):
    counts, seen = Counter(), {}
    for w in windows:
        mine = seen.setdefault(w.user, set())
        for item in (*w.history, *w.targets):
            if item not in mine:
                mine.add(item)
                counts[item] += 1
    return counts


def test_popularity_counts_equal_the_item_by_item_counts(ds):
    splits = make_splits(ds, n_history=3, n_target=3)
    for windows in (splits.train, splits.train[::-1], splits.val + splits.train, []):
        got, want = train_popularity(windows), _reference_train_popularity(windows)
        assert list(got.items()) == list(want.items())  # the same keys in the same order
    users = sorted(ds.sequences)[:30]
    want = dict.fromkeys(ds.items, 0)
    for u in users:
        for i in ds.sequences[u]:
            want[i] += 1
    assert list(ds.popularity(users).items()) == list(want.items())


# ---------------------------------------------------------------------------------- statistics on disk
def _stats_fields(s) -> dict:
    from dataclasses import asdict

    return asdict(s)


@pytest.fixture
def fresh_stats(monkeypatch):
    """An empty in-memory statistics cache (as in a new process) and a counter of the counting done."""
    monkeypatch.setattr(explore, "_STATS_CACHE", {})
    counted = []
    real = explore._dataset_stats
    monkeypatch.setattr(explore, "_dataset_stats", lambda d: counted.append(1) or real(d))
    return counted


def test_statistics_are_kept_on_disk_per_fingerprint(tmp_path, fresh_stats):
    folder = _synthetic(tmp_path / "syn")
    cache = tmp_path / "runs" / ".cache" / "dataset-stats"
    first = explore.dataset_stats(load_dataset(folder), cache_dir=cache)
    assert len(fresh_stats) == 1 and len(list(cache.glob("dataset-stats-*.json"))) == 1
    explore._STATS_CACHE.clear()  # another process
    again = explore.dataset_stats(load_dataset(folder), cache_dir=cache)
    assert len(fresh_stats) == 1 and _stats_fields(again) == _stats_fields(first)  # read, not counted
    with open(folder / "pairs.tsv", "a") as f:  # the folder changes: its fingerprint too
        f.write("extra\t1 2 3 4 5 6 7\n")
    explore._STATS_CACHE.clear()
    changed = explore.dataset_stats(load_dataset(folder), cache_dir=cache)
    assert (
        len(fresh_stats) == 2
        and changed.n_users == 301
        and changed.n_interactions == first.n_interactions + 7
    )
    assert len(list(cache.glob("dataset-stats-*.json"))) == 2


def _corrupt_variants(raw: dict) -> list:
    text = json.dumps(raw)
    bad_lengths = json.loads(text)
    bad_lengths["stats"]["sequence_lengths"] = bad_lengths["stats"]["sequence_lengths"][:-1]
    bad_type = json.loads(text)
    bad_type["stats"]["popularity"][0] = "many"
    bad_count = json.loads(text)
    bad_count["stats"]["n_interactions"] += 1
    other = json.loads(text)
    other["fingerprint"] = "0" * 16
    return [
        b"",
        b"\x00\xff garbage",
        text[: len(text) // 2].encode(),  # cut short
        b"[1, 2, 3]",
        b"null",
        json.dumps({**raw, "version": 999}).encode(),
        json.dumps({**raw, "stats": {}}).encode(),
        json.dumps(bad_lengths).encode(),
        json.dumps(bad_type).encode(),
        json.dumps(bad_count).encode(),
        json.dumps(other).encode(),
        b"[" * 100000,  # nested too deep for the decoder
    ]


def test_a_damaged_statistics_file_is_counted_again_and_rewritten(tmp_path, fresh_stats):
    folder = _synthetic(tmp_path / "syn")
    cache = tmp_path / "cache"
    ds = load_dataset(folder)
    want = _stats_fields(explore.dataset_stats(ds, cache_dir=cache))
    (path,) = cache.glob("dataset-stats-*.json")
    raw = json.loads(path.read_text())
    for k, bad in enumerate(_corrupt_variants(raw)):
        path.write_bytes(bad)
        explore._STATS_CACHE.clear()
        assert _stats_fields(explore.dataset_stats(ds, cache_dir=cache)) == want, k
        assert len(fresh_stats) == k + 2, k  # counted again
        assert json.loads(path.read_text()) == raw, k  # and the good file written back
    path.unlink()
    path.mkdir()  # not even a file: counted, nothing written, no error
    explore._STATS_CACHE.clear()
    assert _stats_fields(explore.dataset_stats(ds, cache_dir=cache)) == want


def test_the_statistics_folder_is_bounded(tmp_path, fresh_stats, monkeypatch):
    monkeypatch.setattr(explore, "STATS_CACHE_FILES", 3)
    ds = load_dataset(_synthetic(tmp_path / "syn"))
    cache = tmp_path / "cache"
    for n in range(10, 16):  # six different datasets (subsets): six fingerprints
        explore.dataset_stats(ds.subset_users(n * 10), cache_dir=cache)
    assert len(list(cache.glob("dataset-stats-*.json"))) == 3 and not list(cache.glob(".stats-*"))
    unwritable = tmp_path / "file"
    unwritable.write_text("")
    explore.dataset_stats(ds.subset_users(7), cache_dir=unwritable)  # no folder can be made there: no error


def test_figures_get_binned_statistics(ds):
    stats = explore.dataset_stats(ds)
    starts, widths, counts = stats.length_histogram()
    assert counts.sum() == stats.n_users and (widths >= 1).all()
    assert starts[0] == min(stats.sequence_lengths) and starts[-1] + widths[-1] - 1 == max(
        stats.sequence_lengths
    )
    wide = explore.DatasetStats(4, 3, 0, 0, [1, 5000, 7, 300], [3, 2, 0], 1)
    s, w, c = wide.length_histogram(max_bins=10)
    assert len(c) == 10 and c.sum() == 4 and s[0] == 1 and s[-1] + w[-1] - 1 == 5000
    ranks, pop = explore.DatasetStats(1, 5000, 0, 0, [1], list(range(5000, 0, -1)), 0).popularity_curve(300)
    assert ranks[0] == 1 and ranks[-1] == 5000 and len(ranks) <= 300 and list(pop[:3]) == [5000, 4999, 4998]
    assert (pop == 5001 - ranks).all()


# --------------------------------------------------------------------------------------------- the Data tab
def test_data_tab_opens_in_two_steps_and_keeps_statistics_under_the_runs_folder(tmp_path, monkeypatch):
    import gradio as gr

    from app.common import AppContext
    from app.tabs import data as tab

    monkeypatch.setattr(explore, "_STATS_CACHE", {})
    folder = _synthetic(tmp_path / "data" / "syn")
    ctx = AppContext(data_dirs=[folder.parent], runs_dir=tmp_path / "runs", device="cpu")
    steps = tab.open_dataset_steps(ctx, str(folder), "hit3")
    users, summary, table, *figs = next(steps)
    data = ctx.prepared(str(folder), "hit3")
    assert users["value"] == data.test.users()[0] and "300 users have a test prompt" in summary
    assert len(table) == 0 and figs == [None, None, None]
    assert not data.splits.cut and data.test._prefix.made == []  # nothing cut or drawn for the list
    shown = tab.show_user_text(ctx, str(folder), "hit3", users["value"])
    assert len(data.test._prefix.made) == 1 and shown[3] == data.test[0].prompt
    (later,) = list(steps)
    assert later[0] == gr.skip() and len(later[2]) > 0 and all(f is not None for f in later[3:])
    assert list((tmp_path / "runs" / ".cache" / "dataset-stats").glob("dataset-stats-*.json"))
    once = tab.open_dataset(ctx, str(folder), "hit3")  # the API's call: everything at once
    assert once[0] == users and once[1] == later[1] and once[2].equals(later[2])
    typed = tab.open_typed(ctx, str(folder), "hit3")
    assert typed[0]["value"] == ctx.public_path(folder) and typed[1] == users  # a public name, not the path
    assert str(tmp_path) not in typed[0]["value"] and ctx.resolve_path(typed[0]["value"]) == folder.resolve()
