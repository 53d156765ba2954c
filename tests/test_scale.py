"""Preparing a dataset costs time linear in the interactions used: examples are drawn exactly as before.

`_reference_build_example` below is the example builder as it was before building became linear (it
sorted the whole catalogue and built a title table for every example): the new one must give the very
same Examples for the same seed, eagerly and lazily.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hanorec.data import make_splits
from hanorec.models import TINY_PRESETS
from hanorec.tasks import (
    IMAGE_PLACEHOLDER,
    TASK_SHAPES,
    TEMPLATES,
    Example,
    ExampleList,
    _wording,
    build_examples,
    format_titles,
    quote,
)


def _ref_sample_unseen(rng, pool, seen, n):
    assert len(pool) - len(seen & set(pool)) >= n
    out, chosen = [], set()
    while len(out) < n:
        item = pool[rng.randrange(len(pool))]
        if item not in seen and item not in chosen:
            out.append(item)
            chosen.add(item)
    return out


def _ref_shown(ds, items, with_images):
    if with_images:
        return ", ".join(f"{IMAGE_PLACEHOLDER} {quote(ds.items[i].title)}" for i in items)
    return ", ".join(quote(ds.items[i].title) for i in items)


def _reference_build_example(task, window, ds, rng, n_negatives=None, hit1_target_image=False):
    n_neg = TASK_SHAPES[task]["n_negatives"] if n_negatives is None else n_negatives
    words = _wording(ds.domain)
    pool = sorted(ds.items)
    seen = set(ds.sequences[window.user])
    history = tuple(window.history)
    titles = {i: ds.items[i].title for i in pool}
    if task in ("hit3", "next1"):
        targets = tuple(window.targets)
        if task == "hit3":
            targets = tuple(reversed(targets))
        negatives = _ref_sample_unseen(rng, pool, seen, n_neg)
        candidates = list(targets) + negatives
        rng.shuffle(candidates)
        prompt = TEMPLATES[task].format(
            history=_ref_shown(ds, history, True), candidates=_ref_shown(ds, candidates, False), **words
        )
        answer = format_titles([titles[i] for i in targets]) if task == "hit3" else quote(titles[targets[0]])
        return Example(task, window.user, history, tuple(candidates), targets, prompt, history, answer,
                       tuple(quote(titles[i]) for i in candidates), candidates.index(targets[0]),
                       negatives=tuple(negatives))  # fmt: skip
    not_watched = _ref_sample_unseen(rng, pool, seen, n_neg)
    label = rng.random() < 0.5
    true_next = window.targets[0]
    target = true_next if label else _ref_sample_unseen(rng, pool, seen | set(not_watched), 1)[0]
    prompt = TEMPLATES["hit1"].format(
        history=_ref_shown(ds, history, True),
        not_watched=_ref_shown(ds, not_watched, False),
        target=f"{IMAGE_PLACEHOLDER} {quote(titles[target])}" if hit1_target_image else quote(titles[target]),
        **words,
    )
    return Example("hit1", window.user, history, (target,), (true_next,), prompt,
                   history + ((target,) if hit1_target_image else ()), "Yes" if label else "No", ("Yes", "No"),
                   0 if label else 1, label=label, not_watched=tuple(not_watched),
                   negatives=(target,) if not label else tuple(not_watched[:1]))  # fmt: skip


def _reference_build_examples(task, windows, ds, seed, shuffle=False, max_examples=None, **kw):
    rng = random.Random(seed)
    out = [_reference_build_example(task, w, ds, rng, **kw) for w in windows]
    if shuffle:
        random.Random(seed + 1).shuffle(out)
    return out if max_examples is None else out[:max_examples]


@pytest.mark.parametrize("task", list(TASK_SHAPES))
@pytest.mark.parametrize("seed", [0, 7])
def test_examples_identical_to_the_reference_builder(ds, task, seed):
    shape = TASK_SHAPES[task]
    splits = make_splits(ds, n_history=shape["n_history"], n_target=shape["n_target"])
    for windows, shuffle, cap in ((splits.train[:400], True, 150), (splits.test, False, None)):
        want = _reference_build_examples(task, windows, ds, seed, shuffle=shuffle, max_examples=cap)
        eager = build_examples(task, windows, ds, seed=seed, shuffle=shuffle, max_examples=cap)
        lazy = build_examples(task, windows, ds, seed=seed, shuffle=shuffle, max_examples=cap, lazy=True)
        assert isinstance(eager, list) and isinstance(lazy, ExampleList)
        assert eager == want
        assert lazy == want and list(lazy) == want and lazy[3:9] == want[3:9] and lazy[-1] == want[-1]
    hit1_img = _reference_build_examples("hit1", splits.test[:50], ds, seed, hit1_target_image=True, n_negatives=3)
    assert build_examples("hit1", splits.test[:50], ds, seed=seed, hit1_target_image=True, n_negatives=3) == hit1_img


def test_lazy_examples_by_user(ds):
    splits = make_splits(ds, n_history=3, n_target=3)
    lazy = build_examples("hit3", splits.test, ds, seed=2000, lazy=True)
    eager = list(lazy)
    assert lazy.users() == [e.user for e in eager]
    u = eager[17].user
    assert lazy.for_user(u) == eager[17]
    assert lazy.for_user("no such user") is None
    assert list(lazy.subset([5, 2])) == [eager[5], eager[2]]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_lazy_length_check_keeps_what_tokenizing_every_example_keeps(ds, preset):
    from hanorec.models import build_tiny
    from hanorec.tasks import corpus_text
    from hanorec.train.sft import drop_too_long, example_lengths, length_bounds

    splits = make_splits(ds, n_history=3, n_target=3)
    examples = build_examples("hit3", splits.train, ds, seed=0, shuffle=True, max_examples=40, lazy=True)
    bundle = build_tiny(preset, corpus_text(ds), hidden_size=32, vocab_size=400, image_size=32)
    exact = example_lengths(bundle, ds, list(examples))
    bounds = length_bounds(bundle, list(examples))
    assert all(b is not None and b >= n for b, n in zip(bounds, exact))
    for cut in (max(exact), sorted(exact)[20], min(bounds)):  # none, some and (with bounds) no cheap skip
        kept, skipped = drop_too_long(bundle, ds, examples, cut)
        assert list(kept) == [e for e, n in zip(examples, exact) if n <= cut]
        assert skipped == sum(n > cut for n in exact)
        assert isinstance(kept, ExampleList)


# ---------------------------------------------------------------------------------------------- text only
@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    """The demo dataset without its images folder, and one with half its images (mixed)."""
    import shutil

    from hanorec.data import load_dataset

    root = tmp_path_factory.mktemp("textonly")
    demo = Path(__file__).resolve().parents[1] / "assets" / "demo"
    for name in ("text", "mixed"):
        (root / name).mkdir()
        for f in ("pairs.tsv", "titles.csv"):
            shutil.copy(demo / f, root / name / f)
    (root / "mixed" / "images").mkdir()
    for k, img in enumerate(sorted((demo / "images").iterdir())):
        if k % 2:
            shutil.copy(img, root / "mixed" / "images" / img.name)
    return load_dataset(root / "text"), load_dataset(root / "mixed")


def test_text_only_dataset_has_no_image_tokens_and_the_summary_says_so(text_only):
    from hanorec.tasks import shows_images

    text, mixed = text_only
    assert "text only" in str(text.summary) and "text only" not in str(mixed.summary)
    assert f"{mixed.summary.missing_images:,} missing images" in str(mixed.summary)
    assert not shows_images(text) and shows_images(text, "always") and shows_images(mixed)
    assert not shows_images(mixed, "never")
    with pytest.raises(ValueError, match="task.images = 'sometimes'"):
        shows_images(text, "sometimes")
    for task, shape in TASK_SHAPES.items():
        windows = make_splits(text, n_history=shape["n_history"], n_target=shape["n_target"]).test[:20]
        plain = build_examples(task, windows, text, seed=0, images="auto", hit1_target_image=True)
        forced = build_examples(task, windows, text, seed=0, images="always", hit1_target_image=True)
        assert all(IMAGE_PLACEHOLDER not in e.prompt and e.image_items == () for e in plain)
        assert all(e.prompt.count(IMAGE_PLACEHOLDER) == len(e.image_items) > 0 for e in forced)
        # the same draws: only the images differ
        assert [(e.candidates, e.answer, e.label) for e in plain] == [(e.candidates, e.answer, e.label) for e in forced]
        assert [e.prompt.replace(f"{IMAGE_PLACEHOLDER} ", "") for e in forced] == [e.prompt for e in plain]
    windows = make_splits(mixed, n_history=3, n_target=3).test[:20]
    ex = build_examples("hit3", windows, mixed, seed=0, images="auto")
    missing = [i for e in ex for i in e.image_items if mixed.items[i].image_path is None]
    assert missing and all(e.prompt.count(IMAGE_PLACEHOLDER) == 3 for e in ex)  # placeholders kept, as before


def test_a_text_only_run_trains_and_scores_without_images(text_only, tmp_path):
    from hanorec.config import load_config
    from hanorec.pipeline import prepare_data, run_eval, run_sft

    text, _ = text_only
    cfg = load_config(overrides={
        "seed": 0, "output_dir": str(tmp_path / "run"), "data": {"path": str(text.root), "max_users": 30},
        "model": {"name": "tiny-qwen2.5-vl", "tiny_hidden_size": 32, "tiny_vocab_size": 400},
        "lora": {"r": 4, "alpha": 8}, "task": {"max_train_examples": 6, "max_eval_examples": 4},
        "sft": {"max_steps": 1, "batch_size": 3, "progress_bar": False},
        "eval": {"protocols": ["ranking"], "baselines": []},
    })  # fmt: skip
    data = prepare_data(cfg)
    assert all(not e.image_items for e in list(data.train) + list(data.test))
    bundle, result = run_sft(cfg, data)
    assert result.global_step == 1
    enc = bundle.encode_prompt(data.test[0].prompt, [])
    assert bundle.image_token_id not in enc.input_ids and enc.pixel_values is None
    ev = run_eval(cfg, bundle, data)
    assert ev.rows and ev.rows[0]["n"] == 4


# ---------------------------------------------------------------------------------------------- the app's view
def test_dataset_stats_are_cached_per_fingerprint(tmp_path):
    import sys

    from hanorec.data import load_dataset
    from hanorec.explore import dataset_fingerprint, dataset_stats

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_data import write_synthetic

    folder = write_synthetic(tmp_path / "syn", n_users=300, n_items=200, per_user=12, seed=1)
    ds = load_dataset(folder)
    assert ds.summary.n_users == 300 and ds.summary.text_only
    first = dataset_stats(ds)
    assert dataset_stats(load_dataset(folder)) is first  # the same content: computed once
    assert dataset_stats(ds.subset_users(50)) is not first
    with open(folder / "pairs.tsv", "a") as f:
        f.write("extra\t1 2 3 4 5 6 7\n")
    again = load_dataset(folder)
    assert dataset_fingerprint(again) != dataset_fingerprint(ds)
    assert dataset_stats(again).n_users == 301


def test_bench_data_prepares_a_synthetic_folder(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_data import prepare_once, write_synthetic

    folder = write_synthetic(tmp_path / "syn", n_users=400, n_items=300, per_user=14, seed=0)
    row = prepare_once(str(folder))
    assert row["users"] == 400 and row["test"] == 400 and row["train"] > 400 and row["images"] == "text only"
    assert row["seconds"] > 0 and row["peak_mib"] > 0


def test_deferred_examples_draw_on_first_use_and_match(ds):
    splits = make_splits(ds, n_history=3, n_target=3)
    want = build_examples("hit3", splits.train, ds, seed=3, shuffle=True, max_examples=30)
    deferred = build_examples("hit3", splits.train, ds, seed=3, shuffle=True, max_examples=30, lazy=True, defer=True)
    assert deferred._made is None  # nothing drawn yet
    assert len(deferred) == 30 and deferred._made is not None and list(deferred) == want


def test_data_tab_shows_a_user_before_the_model_scores(ds):
    import tempfile

    from app.common import AppContext
    from app.tabs import data as tab

    demo = Path(__file__).resolve().parents[1] / "assets" / "demo"
    ctx = AppContext(data_dirs=[demo], runs_dir=Path(tempfile.mkdtemp()), device="cpu")
    users = tab.open_dataset(ctx, str(demo), "hit1")[0]["choices"]
    user = users[3][0] if isinstance(users[3], (tuple, list)) else users[3]
    quick = tab.show_user_text(ctx, str(demo), "hit1", user)
    full = tab.show_user(ctx, str(demo), "hit1", user, "base")
    assert quick[3:5] == full[3:5] and len(quick[0]) == len(full[0])  # prompt, answer, history
    q, f = quick[1], full[1]
    assert list(q["candidate"]) == list(f["candidate"]) and list(q["true next"]) == list(f["true next"])
    assert q["log-prob"].isna().all() and not f["log-prob"].isna().any()


@pytest.mark.parametrize("task", ["hit3", "hit1"])
def test_authors_options_draw_as_the_per_example_builder_with_the_pool_made_once(ds, tmp_path, monkeypatch, task):
    """The authors' options on the linear path: negatives over an id range (made once per build, not once per
    example), a window's own seen items (their split files), their templates and outer quotes, lazily."""
    from hanorec import tasks
    from hanorec.data import load_dataset, write_split_files

    ds = load_dataset(write_split_files(ds, tmp_path), split_files=True)
    shape = TASK_SHAPES[task]
    windows = make_splits(ds, n_history=shape["n_history"], n_target=shape["n_target"], policy="files").train
    assert windows and all(w.seen is not None for w in windows)
    max_id = 280  # below the largest titled id (300), so the pool is not the catalogue
    pool = [str(i) for i in range(1, max_id + 1)]
    rng, want = random.Random(3), []
    for w in windows:  # the reference walk: the row's own items are the seen set, the pool the id range
        seen = set(w.seen)
        if task == "hit3":
            negatives = _ref_sample_unseen(rng, pool, seen, 4)
            candidates = list(reversed(w.targets)) + negatives
            rng.shuffle(candidates)
            want.append((tuple(candidates), tuple(negatives)))
        else:
            not_watched = _ref_sample_unseen(rng, pool, seen, 4)
            label = rng.random() < 0.5
            target = w.targets[0] if label else _ref_sample_unseen(rng, pool, seen | set(not_watched), 1)[0]
            want.append(((target,), tuple(not_watched)))
    calls = {"pool": 0, "keys": 0}
    real_pool, real_keys = tasks.id_range_pool, tasks._pool_keys

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapper

    monkeypatch.setattr(tasks, "id_range_pool", counted("pool", real_pool))
    monkeypatch.setattr(tasks, "_pool_keys", counted("keys", real_keys))
    kw = dict(seed=3, negatives="id_range", max_item_id=max_id, template_set="authors", outer_quotes=True)
    lazy = build_examples(task, windows, ds, lazy=True, **kw)
    assert calls == {"pool": 1, "keys": 1}  # once per build, whatever the number of windows
    got = list(lazy)
    assert [(e.candidates, e.not_watched if task == "hit1" else e.negatives) for e in got] == want
    assert got == build_examples(task, windows, ds, **kw)
    if task == "hit3":
        assert got[0].prompt.startswith(tasks.AUTHORS_HIT3_INSTRUCTION) and got[0].answer.startswith('""')
        assert all(o.startswith('""') for o in got[0].options)
    else:
        assert "Whether the user will like the target movie:\n" in got[0].prompt
