"""Teaching scenarios planted by make-demo (beyond the paper): false negatives, preference noise, uneven
cluster density; each reaches training only, and each is named with the mechanism it stresses."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from hanorec.cli import main
from hanorec.data import DataError, load_dataset, make_demo, make_splits, read_scenario, scenario_sentences
from hanorec.pairs import build_pairs
from hanorec.tasks import build_examples


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenario")
    make_demo(out, n_items=160, n_users=60, image_size=16, false_negatives=1.0, preference_noise=0.5,
              uneven_density=1.0)  # fmt: skip
    return load_dataset(out)


def _cell(ds, item):
    a = ds.items[item].attributes
    return a["color"], a["genre"]


def test_scenario_file_and_sentences(planted):
    assert planted.scenario == {"false_negatives": 1.0, "preference_noise": 0.5, "uneven_density": 1.0}
    text = " ".join(scenario_sentences(planted.scenario))
    assert text.count("beyond the paper") == 3
    assert "HaRS" in text and "rDPO and cDPO" in text and "NoDO and IPO" in text
    assert "beyond the paper" in (planted.root / "README.txt").read_text()


def test_uneven_density_spreads_the_cluster_sizes(planted, tmp_path):
    sizes = Counter(_cell(planted, i) for i in planted.items)
    assert len(sizes) == 16 and max(sizes.values()) >= 8 * min(sizes.values())
    make_demo(tmp_path, n_items=160, n_users=5, image_size=16)
    plain = Counter(_cell(load_dataset(tmp_path), i) for i in load_dataset(tmp_path).items)
    assert set(plain.values()) == {10}
    assert not (tmp_path / "scenario.json").exists() and load_dataset(tmp_path).scenario == {}


def test_false_negatives_come_from_the_users_taste(planted):
    windows = make_splits(planted, n_history=3, n_target=3).train[:80]
    clean = build_examples("hit3", windows, planted, seed=0)
    fn = build_examples("hit3", windows, planted, seed=0, false_negatives=1.0)
    assert clean == build_examples("hit3", windows, planted, seed=0, false_negatives=0.0)

    def share(examples):
        same = [_cell(planted, n) == _cell(planted, e.targets[0]) for e in examples for n in e.negatives]
        return sum(same) / len(same)

    assert share(fn) > 0.5 > 0.2 > share(clean)
    for e in fn:  # still never an item the user interacted with
        assert not set(e.negatives) & set(planted.sequences[e.user])


def test_preference_noise_swaps_that_fraction_of_the_pairs(planted):
    examples = build_examples("hit3", make_splits(planted, n_history=3, n_target=3).train[:200], planted, seed=0)
    clean = build_pairs(examples, planted, seed=0)
    noisy = build_pairs(examples, planted, seed=0, swap=0.5)
    swapped = [n.chosen == c.rejected[0] and n.rejected[0] == c.chosen for c, n in zip(clean, noisy)]
    kept = [n == c for c, n in zip(clean, noisy)]
    assert all(s or k for s, k in zip(swapped, kept)) and 0.35 < sum(swapped) / len(swapped) < 0.65
    s = next(n for n, c in zip(noisy, clean) if n != c)
    assert set(s.positive_item_ids) <= set(s.example.negatives)  # the ids travel with the answers
    assert build_pairs(examples, planted, seed=0, swap=0.0) == clean


def test_training_sees_the_scenario_and_the_test_split_does_not(planted):
    from hanorec.config import load_config
    from hanorec.pipeline import prepare_data

    cfg = load_config(overrides={"data": {"path": str(planted.root)}, "task": {"name": "hit3"}})
    data = prepare_data(cfg)
    same = [_cell(planted, n) == _cell(planted, e.targets[0]) for e in data.train for n in e.negatives]
    test = [_cell(planted, n) == _cell(planted, e.targets[0]) for e in data.test for n in e.negatives]
    assert sum(same) / len(same) > 0.5 > 0.25 > sum(test) / len(test)


@pytest.mark.parametrize(
    "content,words",
    [("{", "not readable JSON"), ('{"label_noise": 0.1}', "label_noise"), ('{"preference_noise": 1.5}', "[0, 1]"),
     ("[1]", "an object")],
)
def test_a_damaged_scenario_file_is_one_sentence(tmp_path, content, words):
    (tmp_path / "scenario.json").write_text(content)
    with pytest.raises(DataError, match=words.replace("[", r"\[").replace("]", r"\]")):
        read_scenario(tmp_path)


def test_make_demo_cli_options(tmp_path, capsys):
    assert main(["make-demo", f"--out={tmp_path}", "--preference-noise=0.2"]) == 0
    assert json.loads((tmp_path / "scenario.json").read_text()) == {"preference_noise": 0.2}
    assert "rDPO and cDPO" in capsys.readouterr().out
    assert main(["make-demo", f"--out={tmp_path}", "--false-negatives=x"]) == 2
    assert "fraction in [0, 1]" in capsys.readouterr().err


def _title_genre(title: str) -> set[str]:
    from hanorec.data import DEMO_GENRE_WORDS

    return {g for g, words in DEMO_GENRE_WORDS.items() if any(w in title.split() for w in words)}


def test_title_noise_takes_the_taste_out_of_the_titles_only(tmp_path):
    """At 1 a title's words match its item's genre no more than chance; the images and the sequences are
    byte for byte those of the plain demo (its own seeded stream), and the same call gives the same files."""
    plain, noisy, again = tmp_path / "plain", tmp_path / "noisy", tmp_path / "again"
    make_demo(plain, n_items=160, n_users=20, image_size=16)
    make_demo(noisy, n_items=160, n_users=20, image_size=16, title_noise=1.0)
    make_demo(again, n_items=160, n_users=20, image_size=16, title_noise=1.0)
    ds_plain, ds = load_dataset(plain), load_dataset(noisy)
    assert ds.scenario == {"title_noise": 1.0} and "Title noise" in scenario_sentences(ds.scenario)[0]
    assert (noisy / "pairs.tsv").read_bytes() == (plain / "pairs.tsv").read_bytes()
    assert all((noisy / "images" / f).read_bytes() == (plain / "images" / f).read_bytes()
               for f in ("1.jpg", "80.jpg", "160.jpg"))  # fmt: skip
    assert (noisy / "titles.csv").read_bytes() == (again / "titles.csv").read_bytes()

    def agree(d):
        return sum(d.items[i].attributes["genre"] in _title_genre(d.items[i].title) for i in d.items) / len(d.items)

    assert agree(ds_plain) == 1.0
    assert agree(ds) < 0.45  # chance is 1/4; 160 items put 0.45 about 5 standard errors above it
    assert main(["make-demo", f"--out={tmp_path / 'cli'}", "--title-noise=0.5"]) == 0
    assert json.loads((tmp_path / "cli" / "scenario.json").read_text()) == {"title_noise": 0.5}
