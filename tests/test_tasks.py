"""Tasks and prompts on the bundled demo data: hit3, hit1, next1 (method.md section 3)."""

from pathlib import Path

import pytest

from hanorec.data import make_splits
from hanorec.tasks import (
    DOMAINS,
    IMAGE_PLACEHOLDER,
    PRESENT,
    TASK_SHAPES,
    build_example,
    build_examples,
    corpus_text,
    format_titles,
    render,
    wording,
)

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"


@pytest.fixture(scope="module")
def splits(ds):
    return {
        task: make_splits(ds, n_history=s["n_history"], n_target=s["n_target"])
        for task, s in TASK_SHAPES.items()
    }


@pytest.fixture(scope="module")
def examples(ds, splits):
    """Validation examples of every task (fixed seed)."""
    return {task: build_examples(task, splits[task].val, ds, seed=0) for task in TASK_SHAPES}


def quoted(ds, item):
    return f'"{ds.items[item].title}"'


@pytest.mark.parametrize("task", list(TASK_SHAPES))
def test_placeholders_match_rendered_images(ds, examples, task):
    for ex in examples[task][:20]:
        r = render(ex, ds, image_size=32)
        n = r.text.count(IMAGE_PLACEHOLDER)
        assert n == len(r.images) == len(ex.image_items) > 0
        assert all(im.size == (32, 32) and im.mode == "RGB" for im in r.images)
        assert r.text == ex.prompt and r.answer == ex.answer
        # the item shown before each placeholder is the one whose image fills it
        pieces = r.text.split(IMAGE_PLACEHOLDER)[1:]
        for piece, item in zip(pieces, ex.image_items):
            assert piece.startswith(" " + quoted(ds, item))


def test_hit3_candidates_and_answer(ds, splits, examples):
    windows = splits["hit3"].val
    assert len(examples["hit3"]) == len(windows) > 100
    for ex, w in zip(examples["hit3"], windows):
        seen = set(ds.sequences[w.user])
        assert ex.task == "hit3" and ex.user == w.user
        assert ex.history == w.history and len(ex.history) == 3
        assert ex.image_items == ex.history
        assert len(ex.candidates) == 7 == len(set(ex.candidates))
        assert ex.targets == tuple(reversed(w.targets))  # most recent first
        assert set(w.targets) <= set(ex.candidates)
        assert len(ex.negatives) == 4
        assert set(ex.negatives) == set(ex.candidates) - set(w.targets)
        assert not set(ex.negatives) & seen, "negatives must be items the user never interacted with"
        expected = "\n".join(quoted(ds, i) for i in reversed(w.targets))
        assert ex.answer == expected == format_titles([ds.items[i].title for i in ex.targets])
        assert len(ex.answer.splitlines()) == 3
        assert ex.options == tuple(quoted(ds, i) for i in ex.candidates)
        assert ex.candidates[ex.correct_option] == w.targets[-1]
        for item in ex.candidates:
            assert quoted(ds, item) in ex.prompt
        for item in ex.history:
            assert f"{IMAGE_PLACEHOLDER} {quoted(ds, item)}" in ex.prompt
        assert ex.prompt.count(IMAGE_PLACEHOLDER) == 3
    # candidates are shuffled: the true items are not always in the same slots
    assert len({ex.correct_option for ex in examples["hit3"]}) >= 5


def test_hit1_label_balance_and_answer(ds, splits, examples):
    exs = examples["hit1"]
    windows = splits["hit1"].val
    labels = [ex.label for ex in exs]
    assert 0.35 < sum(labels) / len(labels) < 0.65, "hit1 Yes/No should be about 50/50"
    for ex, w in zip(exs, windows):
        seen = set(ds.sequences[w.user])
        (shown,) = ex.candidates
        assert len(ex.history) == 5 and ex.history == w.history
        assert ex.targets == w.targets
        assert len(ex.not_watched) == 4 and not set(ex.not_watched) & seen
        assert ex.options == ("Yes", "No")
        # the authors' prompt: images for the 5 history items only; the target by its title
        assert ex.image_items == ex.history
        assert ex.prompt.count(IMAGE_PLACEHOLDER) == 5
        assert f"next: {quoted(ds, shown)}?" in ex.prompt
        for item in ex.not_watched:
            assert quoted(ds, item) in ex.prompt
        if ex.label:
            assert shown == w.targets[0] and ex.answer == "Yes" and ex.correct_option == 0
        else:
            assert shown != w.targets[0] and ex.answer == "No" and ex.correct_option == 1
            assert shown not in seen and shown not in ex.not_watched


def test_hit1_target_image_is_an_option(ds, splits):
    """--task.hit1_target_image=true adds the target item's image (beyond the authors' prompt)."""
    plain = build_examples("hit1", splits["hit1"].val, ds, seed=0, max_examples=5)
    shown = build_examples("hit1", splits["hit1"].val, ds, seed=0, max_examples=5, hit1_target_image=True)
    for a, b in zip(plain, shown):
        (target,) = b.candidates
        assert a.candidates == b.candidates and a.answer == b.answer  # the same draws, only the images differ
        assert b.image_items == b.history + (target,) and b.prompt.count(IMAGE_PLACEHOLDER) == 6
        assert f"{IMAGE_PLACEHOLDER} {quoted(ds, target)}?" in b.prompt


def test_next1_has_20_candidates(ds, splits, examples):
    for ex, w in zip(examples["next1"], splits["next1"].val):
        seen = set(ds.sequences[w.user])
        assert len(ex.candidates) == 20 == len(set(ex.candidates))
        assert len(ex.history) == 10 and ex.image_items == ex.history
        assert ex.prompt.count(IMAGE_PLACEHOLDER) == 10
        assert ex.targets == w.targets and len(ex.targets) == 1
        assert ex.candidates[ex.correct_option] == w.targets[0]
        assert ex.answer == quoted(ds, w.targets[0])
        assert len(ex.negatives) == 19 and not set(ex.negatives) & seen


def test_n_negatives_override(ds, splits):
    ex = build_examples("next1", splits["next1"].val[:5], ds, n_negatives=5)
    assert all(len(e.candidates) == 6 for e in ex)


@pytest.mark.parametrize("task", list(TASK_SHAPES))
def test_deterministic_for_a_seed(ds, splits, task):
    windows = splits[task].val[:40]
    a = build_examples(task, windows, ds, seed=7)
    b = build_examples(task, windows, ds, seed=7)
    c = build_examples(task, windows, ds, seed=8)
    assert a == b
    assert [e.candidates for e in a] != [e.candidates for e in c]
    assert [e.prompt for e in a] != [e.prompt for e in c]


def test_training_shuffle_and_cap_are_seeded(ds, splits):
    windows = splits["hit3"].train[:50]
    a = build_examples("hit3", windows, ds, seed=1, shuffle=True, max_examples=20)
    b = build_examples("hit3", windows, ds, seed=1, shuffle=True, max_examples=20)
    plain = build_examples("hit3", windows, ds, seed=1)
    assert a == b and len(a) == 20
    # the same examples (candidates drawn in window order), permuted before the cap
    assert set(a) <= set(plain)
    assert a != plain[:20]


@pytest.mark.parametrize("domain", list(DOMAINS))
@pytest.mark.parametrize("task", list(TASK_SHAPES))
def test_every_domain_template_uses_its_wording(ds, splits, domain, task):
    verb, singular, plural = DOMAINS[domain]
    w = splits[task].val[0]
    ex = build_examples(task, [w], ds, domain=domain)[0]
    assert ex.prompt.startswith(f"The user has {verb} the following {plural}: ")
    assert f" {PRESENT[verb]} " in ex.prompt
    if task == "hit1":
        assert f"has not {verb} these {plural}" in ex.prompt
        assert f"this {singular} next" in ex.prompt
    else:
        assert f"Below are the candidate {plural}: " in ex.prompt
    for d in DOMAINS:
        if d != domain:
            assert f"following {DOMAINS[d][2]}:" not in ex.prompt
    # same candidates whatever the wording
    assert ex.candidates == build_examples(task, [w], ds, domain="movies")[0].candidates


def test_domain_wording_differs():
    assert len({DOMAINS[d] for d in DOMAINS}) == len(DOMAINS)


def test_unknown_task_or_domain(ds, splits):
    import random

    w = splits["hit3"].val[0]
    with pytest.raises(ValueError, match="hit9"):
        build_example("hit9", w, ds, random.Random(0))
    with pytest.raises(ValueError, match="books"):
        build_example("hit3", w, ds, random.Random(0), domain="books")


def test_too_few_unseen_items_is_a_clear_error(ds, splits):
    import random

    w = splits["hit3"].val[0]
    with pytest.raises(ValueError, match=f"user {w.user}.*unseen"):
        build_example("hit3", w, ds, random.Random(0), n_negatives=len(ds.items))


def test_corpus_text_covers_titles_and_templates(ds):
    texts = corpus_text(ds)
    joined = "\n".join(texts)
    for item in list(ds.items.values())[:50]:
        assert item.title in texts
    for name, (_, singular, plural) in DOMAINS.items():
        if name != "music":  # the tokenizer corpus of the first four domains is kept fixed
            assert plural in joined and singular in joined
    assert "Yes" in texts and "No" in texts
    assert "artists" not in joined
    music = "\n".join(corpus_text(ds, wording("music")))
    assert "listened to the following artists" in music


def test_domain_wording_presets_and_custom_words():
    assert wording("music")["verb"] == "listened to" and wording("music")["verb_present"] == "listen to"
    assert wording("music")["plural"] == "artists"
    custom = wording("movies", noun="podcast", verb="played")
    assert custom == {"verb": "played", "verb_present": "play", "singular": "podcast", "plural": "podcasts"}
    assert wording("products", nouns="goods")["plural"] == "goods"
    from hanorec.tasks import TaskError

    with pytest.raises(TaskError, match="item_verb_present"):
        wording(verb="read")


def test_a_text_only_music_dataset_runs_end_to_end(tmp_path, capsys):
    """A LastFM-like dataset (artists, no images) in the music domain: prompts speak of artists one listened
    to, and data -> SFT -> evaluation runs through the command line."""
    import json

    from hanorec.cli import main
    from hanorec.config import load_config
    from hanorec.pipeline import prepare_data

    root = tmp_path / "lastfm"
    root.mkdir()
    (root / "titles.csv").write_text("item,title\n" + "".join(f"{i},Band {i}\n" for i in range(1, 41)))
    (root / "pairs.tsv").write_text(
        "".join(f"u{u}\t" + " ".join(str(1 + (u * 5 + 3 * k) % 40) for k in range(12)) + "\n" for u in range(24))
    )
    over = [f"--data.path={root}", "--data.domain=music", f"--output_dir={tmp_path / 'run'}"]
    data = prepare_data(load_config(overrides=over))
    ex = data.train[0]
    assert "The user has listened to the following artists:" in ex.prompt
    assert "Answer with the 3 candidate artists the user is most likely to listen to next" in ex.prompt
    assert data.dataset.summary.missing_images == len(data.dataset.items)  # text only: grey placeholders
    podcast = prepare_data(load_config(overrides=[*over, "--task.item_noun=podcast", "--task.item_verb=played"]))
    assert "The user has played the following podcasts:" in podcast.train[0].prompt
    tiny = ["--model.name=tiny-llava", "--model.tiny_hidden_size=64", "--sft.max_steps=2",
            "--sft.progress_bar=false", "--task.max_eval_examples=8"]  # fmt: skip
    assert main(["run", *over, *tiny]) == 0
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"SFT", "random", "popularity"}


def test_image_size_is_honoured_by_the_tiny_presets(tmp_path):
    from hanorec.config import load_config
    from hanorec.pipeline import prepare_data, prepare_model
    from hanorec.tasks import render

    cfg = load_config(overrides=["--data.image_size=32", "--data.max_users=5", f"--output_dir={tmp_path}"])
    data = prepare_data(cfg)
    bundle = prepare_model(cfg, data.dataset, tmp_path / "sft")
    assert bundle.image_size == 32
    r = render(data.test[0], data.dataset)
    enc = bundle.encode_prompt(r.text, r.images)
    n_images = r.text.count(IMAGE_PLACEHOLDER)
    assert enc.input_ids.count(bundle.image_token_id) == 4 * n_images  # 32x32: 4x4 patches merged 2x2
    again = prepare_model(cfg, data.dataset, tmp_path / "sft")  # reloaded from the run folder
    assert again.image_size == 32
