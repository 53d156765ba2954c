"""Tests for hanorec.data: loading both formats, bad input, splits, and the demo dataset."""

import random
import re
from pathlib import Path

import pytest
from PIL import Image

from hanorec.data import (
    DEMO_COLORS,
    DataError,
    Window,
    demo_image_oracle,
    demo_oracle,
    demo_text_oracle,
    load_dataset,
    make_demo,
    make_splits,
)

TITLES = 'item,title,genres\n1,Toy Story (1995),Comedy\n2,"Good, the Bad and the Ugly, The (1966)",Western\n3,"Say ""Hi"" (2001)",Drama\n'


def write_hanorec(root: Path, pairs: str, titles: str = TITLES, images=("1", "2", "3")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pairs.tsv").write_text(pairs, encoding="utf-8")
    (root / "titles.csv").write_text(titles, encoding="utf-8")
    (root / "images").mkdir(exist_ok=True)
    for item in images:
        Image.new("RGB", (8, 12), (200, 10, 10)).save(root / "images" / f"{item}.jpg")
    return root


def write_movielens(root: Path, ratings: str, movies: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + ratings, encoding="utf-8")
    (root / "movies.csv").write_text(
        movies or "movieId,title,genres\n" + TITLES.split("\n", 1)[1], encoding="utf-8"
    )
    return root


def raises(path, match_parts, **kwargs):
    """load_dataset raises DataError with one sentence naming every part of match_parts."""
    with pytest.raises(DataError) as info:
        load_dataset(path, **kwargs)
    message = str(info.value)
    for part in match_parts:
        assert part in message, (part, message)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- loading


def test_hanorec_format_loads_titles_attributes_and_sequences(tmp_path):
    root = write_hanorec(tmp_path / "ds", "u1\t1 2 3\nu2\t3 1\n\n")
    ds = load_dataset(root, domain="tv")
    assert ds.domain == "tv" and ds.name == "ds"
    assert ds.sequences == {"u1": ["1", "2", "3"], "u2": ["3", "1"]}
    assert ds.items["2"].title == "Good, the Bad and the Ugly, The (1966)"
    assert ds.items["3"].title == 'Say "Hi" (2001)'
    assert ds.items["1"].attributes == {"genres": "Comedy"}
    assert ds.summary.n_users == 2 and ds.summary.n_items == 3 and ds.summary.n_interactions == 5
    assert ds.summary.format == "hanorec" and ds.summary.bad_rows == []
    image = ds.load_image("1", size=16)
    assert image.mode == "RGB" and image.size == (16, 16)
    assert ds.load_image("1").size == (8, 12)
    assert ds.popularity() == {"1": 2, "2": 1, "3": 2}
    assert ds.popularity(["u2"]) == {"1": 1, "2": 0, "3": 1}


def test_covers_folder_png_and_jpeg_are_accepted(tmp_path):
    root = write_hanorec(tmp_path / "ds", "u1\t1 2 3\n", images=())
    (root / "images").rmdir()
    (root / "covers").mkdir()
    Image.new("RGBA", (4, 4), (0, 0, 255, 255)).save(root / "covers" / "1.png")
    Image.new("RGB", (4, 4)).save(root / "covers" / "2.jpeg", format="JPEG")
    ds = load_dataset(root)
    assert ds.items["1"].image_path.name == "1.png" and ds.items["2"].image_path.name == "2.jpeg"
    assert ds.load_image("1").getpixel((0, 0)) == (0, 0, 255)
    assert ds.summary.missing_images == 1 and ds.summary.missing_image_ids == ["3"]


def test_missing_image_is_a_counted_placeholder(tmp_path):
    root = write_hanorec(tmp_path / "ds", "u1\t1 2 3\n", images=("1", "3"))
    ds = load_dataset(root)
    assert ds.items["2"].image_path is None
    assert ds.summary.missing_images == 1 and ds.summary.missing_image_ids == ["2"]
    assert "1 missing images" in str(ds.summary) and "0 bad rows" in str(ds.summary)
    placeholder = ds.load_image("2", size=32)
    assert placeholder.size == (32, 32) and placeholder.getcolors() == [(32 * 32, (128, 128, 128))]


def test_unreadable_image_is_reported_naming_the_file(tmp_path):
    root = write_hanorec(tmp_path / "ds", "u1\t1 2 3\n")
    (root / "images" / "2.jpg").write_bytes(b"this is not a jpeg")
    raises(root, ["2.jpg", "'2'"])
    ds = load_dataset(root, on_error="report")
    assert len(ds.summary.bad_rows) == 1 and "2.jpg" in ds.summary.bad_rows[0]
    assert ds.items["2"].image_path is None and "1 bad rows" in str(ds.summary)
    # Without the header check the error comes at load_image, still naming the file.
    lazy = load_dataset(root, check_images=False)
    with pytest.raises(DataError, match=r"2\.jpg"):
        lazy.load_image("2")


@pytest.mark.parametrize(
    "pairs, parts",
    [
        ("u1\t1 2\nu2 1 2\n", ["pairs.tsv", "Line 2", "no tab"]),
        ("u1\t1 2\nu2\t  \n", ["pairs.tsv", "Line 2", "empty item list", "'u2'"]),
        ("u1\t1 2\n\t1 2\n", ["pairs.tsv", "Line 2", "empty user id"]),
        ("u1\t1 2\nu2\t1 99 3\n", ["pairs.tsv", "Line 2", "'99'"]),
        ("u1\t1 2\nu2\t3\nu1\t2\n", ["pairs.tsv", "Line 3", "'u1'", "line 1"]),
    ],
)
def test_bad_pairs_lines_name_file_and_line(tmp_path, pairs, parts):
    root = write_hanorec(tmp_path / "ds", pairs)
    raises(root, parts)
    ds = load_dataset(root, on_error="report")
    assert len(ds.summary.bad_rows) == 1
    assert all(p in ds.summary.bad_rows[0] for p in parts)
    assert ds.sequences["u1"] == ["1", "2"]


def test_unknown_item_in_report_mode_drops_only_that_item(tmp_path):
    ds = load_dataset(write_hanorec(tmp_path / "ds", "u1\t1 99 2\n"), on_error="report")
    assert ds.sequences == {"u1": ["1", "2"]}
    assert "'99'" in ds.summary.bad_rows[0]


@pytest.mark.parametrize(
    "titles, parts",
    [
        ("item,title\n1,A\n2,B\n1,C\n3,D\n", ["titles.csv", "Lines 2 and 4", "'1'"]),
        ("item,title\n1,A\n2,B,extra\n3,D\n", ["titles.csv", "Line 3", "3 fields", "header has 2"]),
        ("item,title\n1,A\n2,  \n3,D\n", ["titles.csv", "Line 3", "empty title", "'2'"]),
        ('item,title\n1,"A\nB"\n2,B\n3,""\n', ["titles.csv", "Line 5", "empty title", "'3'"]),
    ],
)
def test_bad_titles_rows_name_file_and_line(tmp_path, titles, parts):
    root = write_hanorec(tmp_path / "ds", "u1\t1\n", titles=titles)
    raises(root, parts)
    ds = load_dataset(root, on_error="report")
    assert len(ds.summary.bad_rows) == 1 and all(p in ds.summary.bad_rows[0] for p in parts)


def test_report_mode_lists_every_bad_row_and_keeps_the_rest(tmp_path):
    titles = "item,title\n1,A\n2,B\n2,B again\n3,\n"
    pairs = "u1\t1 2\nbroken line\nu2\t2 3\nu1\t1\nu3\t1\n"
    ds = load_dataset(write_hanorec(tmp_path / "ds", pairs, titles=titles), on_error="report")
    assert len(ds.summary.bad_rows) == 5  # duplicate item, empty title, no tab, unknown '3', duplicate u1
    assert ds.sequences == {"u1": ["1", "2"], "u2": ["2"], "u3": ["1"]}
    assert "5 bad rows" in str(ds.summary)


def test_titles_without_header_and_microlens_file_names(tmp_path):
    root = tmp_path / "MicroLens"
    root.mkdir()
    (root / "MicroLens-50k_pairs.tsv").write_text("7\t10 11\n", encoding="utf-8")
    (root / "MicroLens-50k_titles.csv").write_text("10,first video\n11,second video\n", encoding="utf-8")
    ds = load_dataset(root, domain="micro-videos")
    assert ds.sequences == {"7": ["10", "11"]} and ds.items["10"].title == "first video"
    assert ds.summary.missing_images == 2


def test_missing_paths_and_bad_arguments_are_one_sentence(tmp_path):
    raises(tmp_path / "nope", ["nope", "does not exist"])
    (tmp_path / "empty").mkdir()
    raises(tmp_path / "empty", ["empty", "pairs.tsv", "ratings.csv"])
    raises(tmp_path / "empty", ["pairs.tsv", "does not exist"], format="hanorec")
    root = write_hanorec(tmp_path / "ds", "u1\t1\n")
    raises(root, ["images2"], image_dir=tmp_path / "images2")
    raises(root, ["'cinema'"], domain="cinema")
    (root / "titles.csv").unlink()
    raises(root, ["titles.csv", "does not exist"])


def test_movielens_format_orders_by_timestamp_then_item_id(tmp_path):
    ratings = "1,3,4.0,300\n1,2,3.5,100\n1,10,5,200\n1,1,4,200\n2,2,1.0,50\n10,1,2,5\n"
    movies = (
        'movieId,title,genres\n1,A (1990),Drama\n2,B (1991),Comedy\n3,C,Action\n10,"J, the movie",Drama\n'
    )
    root = write_movielens(tmp_path / "ml", ratings, movies)
    (root / "images").mkdir()
    Image.new("RGB", (4, 6)).save(root / "images" / "1.jpg")
    ds = load_dataset(root)
    assert ds.summary.format == "movielens"
    assert ds.sequences == {"1": ["2", "1", "10", "3"], "2": ["2"], "10": ["1"]}  # ties: 1 before 10
    assert ds.items["10"].title == "J, the movie" and ds.items["1"].attributes == {"genres": "Drama"}
    assert ds.items["1"].image_path is not None and ds.summary.missing_images == 3


@pytest.mark.parametrize(
    "bad_line, parts",
    [
        ("1,2,great,100\n", ["ratings.csv", "Line 3", "'great'"]),
        ("1,2,4.0,yesterday\n", ["ratings.csv", "Line 3", "'yesterday'"]),
        ("1,99,4.0,100\n", ["ratings.csv", "Line 3", "'99'", "movies.csv"]),
        ("1,2,4.0\n", ["ratings.csv", "Line 3", "3 fields"]),
    ],
)
def test_bad_ratings_rows_name_file_and_line(tmp_path, bad_line, parts):
    root = write_movielens(tmp_path / "ml", "1,1,4.0,10\n" + bad_line + "2,3,4,20\n")
    raises(root, parts)
    ds = load_dataset(root, on_error="report")
    assert len(ds.summary.bad_rows) == 1 and all(p in ds.summary.bad_rows[0] for p in parts)
    assert ds.sequences == {"1": ["1"], "2": ["3"]}


def test_shared_movielens_both_layouts(movielens_dir):
    ds = load_dataset(movielens_dir)
    assert ds.summary.format == "hanorec"
    assert ds.summary.n_users == 610 and ds.summary.n_items == 1500
    assert ds.summary.missing_images == 0 and ds.summary.bad_rows == []
    assert ds.load_image("1", size=32).size == (32, 32)
    root = Path(movielens_dir)
    raw = load_dataset(root / "raw", image_dir=root / "images", check_images=False)
    assert raw.summary.format == "movielens" and raw.summary.n_users == 610
    assert raw.summary.n_interactions == 100_836
    # pairs.tsv is the raw ratings restricted to the 1,500 poster items, in the same order.
    for user in ["1", "2", "414"]:
        assert [i for i in raw.sequences[user] if i in ds.items] == ds.sequences[user]


def test_subset_users_is_deterministic_and_keeps_used_items(tmp_path):
    pairs = "".join(f"u{k}\t{1 + k % 3} {1 + (k + 1) % 3}\n" for k in range(10))
    ds = load_dataset(write_hanorec(tmp_path / "ds", pairs))
    a, b = ds.subset_users(4, seed=1), ds.subset_users(4, seed=1)
    assert a.sequences == b.sequences and len(a.sequences) == 4
    assert set(a.items) == {i for s in a.sequences.values() for i in s}
    assert a.summary.n_users == 4 and a.summary.n_interactions == 8


# ----------------------------------------------------------------------------- splits


def dataset_with(tmp_path, sequences: dict[str, list[str]]):
    items = sorted({i for s in sequences.values() for i in s}, key=int)
    titles = "item,title\n" + "".join(f"{i},T{i}\n" for i in items)
    pairs = "".join(f"{u}\t{' '.join(s)}\n" for u, s in sequences.items())
    return load_dataset(write_hanorec(tmp_path / "ds", pairs, titles=titles, images=()))


def test_leave_one_out_positions_on_a_hand_made_sequence(tmp_path):
    """seq = 1..10, n_history=2, n_target=2: test ends at 10, val at 8, train at 6, 5, 4."""
    ds = dataset_with(tmp_path, {"a": [str(k) for k in range(1, 11)], "short": ["1", "2", "3"]})
    s = make_splits(ds, n_history=2, n_target=2, min_interactions=4)
    assert s.test == [Window("a", ("7", "8"), ("9", "10"))]
    assert s.val == [Window("a", ("5", "6"), ("7", "8"))]
    assert [w.targets for w in s.train] == [("3", "4"), ("4", "5"), ("5", "6")]
    assert s.train[0].history == ("1", "2")
    assert s.n_users_dropped == 1 and "1 dropped" in s.describe()
    # No val or test target is a target of a training window.
    held_out = set(s.test[0].targets) | set(s.val[0].targets)
    assert not any(set(w.targets) & held_out for w in s.train)
    # n_target=1 is classic leave-one-out: test ends at L, val at L-1, train at L-2, ...
    s1 = make_splits(ds, n_history=3, n_target=1, min_interactions=4)
    assert s1.test[0].targets == ("10",) and s1.val[0].targets == ("9",)
    assert [w.targets for w in s1.train] == [(str(k),) for k in range(4, 9)]
    # Options: only the latest train windows, shorter histories, truncated sequences.
    assert [
        w.targets for w in make_splits(ds, n_history=3, n_target=1, max_train_windows_per_user=2).train
    ] == [
        ("7",),
        ("8",),
    ]
    short = make_splits(ds, n_history=3, n_target=1, min_history=1, min_interactions=1)
    assert short.train[0] == Window("a", ("1",), ("2",)) and short.test[1] == Window(
        "short", ("1", "2"), ("3",)
    )
    cut = make_splits(ds, n_history=2, n_target=2, max_items_per_user=6)
    assert cut.test[0].history == ("7", "8") and cut.val[0].history == ("5", "6") and cut.train == []


def test_splits_are_deterministic_and_last_window_by_user_splits_users(tmp_path):
    rng = random.Random(3)
    sequences = {f"u{k:02d}": [str(rng.randint(1, 40)) for _ in range(rng.randint(3, 12))] for k in range(50)}
    ds = dataset_with(tmp_path, sequences)
    for policy in ("leave_one_out", "last_window_by_user"):
        a = make_splits(ds, n_history=3, n_target=3, policy=policy, seed=5)
        b = make_splits(ds, n_history=3, n_target=3, policy=policy, seed=5)
        assert a == b
    s = make_splits(ds, n_history=3, n_target=3, policy="last_window_by_user", val_frac=0.2, test_frac=0.2, seed=5)
    kept = [u for u, seq in sequences.items() if len(seq) >= 6]
    assert s.n_users_dropped == 50 - len(kept)
    users = [{w.user for w in part} for part in (s.train, s.val, s.test)]
    assert sum(map(len, users)) == len(kept) and set.union(*users) == set(kept)
    assert len(s.test) == round(0.2 * len(kept)) == len(s.val)
    for w in s.train + s.val + s.test:  # the user's last 6 items
        assert list(w.history + w.targets) == sequences[w.user][-6:]
    other = make_splits(ds, n_history=3, n_target=3, policy="last_window_by_user", val_frac=0.2, test_frac=0.2, seed=6)
    assert {w.user for w in other.test} != users[2]
    with pytest.raises(ValueError, match="policy"):
        make_splits(ds, n_history=3, n_target=3, policy="random")


def test_last_window_by_user_is_one_last_6_window_per_user_and_by_user_is_its_alias(tmp_path):
    """hit3 (3 history + 3 targets): every kept user has exactly one window, its last 6 items, and lies in exactly
    one of train / val / test; the old name by_user gives the very same splits, under the new name."""
    rng = random.Random(11)
    sequences = {f"u{k:02d}": [str(rng.randint(1, 60)) for _ in range(rng.randint(4, 15))] for k in range(40)}
    ds = dataset_with(tmp_path, sequences)
    s = make_splits(ds, n_history=3, n_target=3, policy="last_window_by_user", seed=2)
    assert s.policy == "last_window_by_user" and s.config["policy"] == "last_window_by_user"
    windows = s.train + s.val + s.test
    per_user = {}
    for w in windows:
        per_user.setdefault(w.user, []).append(w)
    kept = {u for u, seq in sequences.items() if len(seq) >= 6}
    assert set(per_user) == kept and all(len(ws) == 1 for ws in per_user.values())
    for u, (w,) in per_user.items():
        assert len(w.history) == 3 and len(w.targets) == 3
        assert list(w.history + w.targets) == sequences[u][-6:]
    train, val, test = ({w.user for w in part} for part in (s.train, s.val, s.test))
    assert not (train & val) and not (train & test) and not (val & test) and test and val
    alias = make_splits(ds, n_history=3, n_target=3, policy="by_user", seed=2)
    assert alias == s
    assert "last_window_by_user splits" in alias.describe()


# ----------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo1") / "demo", seed=0)


def test_make_demo_is_deterministic_small_and_clean(demo_root, tmp_path):
    again = make_demo(tmp_path / "demo", seed=0)
    files = sorted(p.relative_to(demo_root) for p in demo_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((demo_root / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert sum((demo_root / f).stat().st_size for f in files) < 5_000_000
    ds = load_dataset(demo_root)
    assert len(ds.items) == 300 and len(ds.sequences) == 240 and ds.summary.missing_images == 0
    assert set(ds.items) == {str(k) for k in range(1, 301)} and "u001" in ds.sequences
    assert all(10 <= len(s) <= 30 for s in ds.sequences.values())
    assert ds.items["1"].attributes.keys() == {"color", "genre"}
    colour_words = re.compile("|".join(DEMO_COLORS), re.IGNORECASE)
    assert not any(colour_words.search(item.title) for item in ds.items.values())
    assert len({item.title for item in ds.items.values()}) == 300
    assert "seed=0" in (demo_root / "README.txt").read_text()


def top3_precision(ds, windows, scorer, seed=0):
    """Mean share of the 3 true items among the 3 best-scored of 7 candidates (3 true + 4 unseen)."""
    rng = random.Random(seed)
    all_items = sorted(ds.items)
    total = 0.0
    for w in windows:
        seen = set(ds.sequences[w.user])
        candidates = list(w.targets) + rng.sample([i for i in all_items if i not in seen], 4)
        rng.shuffle(candidates)
        scores = scorer(ds, w.history, candidates)
        ties = [rng.random() for _ in candidates]
        best = sorted(range(7), key=lambda k: (-scores[k], ties[k]))[:3]
        total += len({candidates[k] for k in best} & set(w.targets)) / 3
    return total / len(windows)


def test_demo_needs_both_modalities(demo_root):
    """Expected (seed 0): both ~0.79, text ~0.69, image ~0.67, random 3/7 ~0.43."""
    ds = load_dataset(demo_root)
    test = make_splits(ds, n_history=3, n_target=3).test
    assert len(test) == 240
    both = top3_precision(ds, test, demo_oracle)
    text = top3_precision(ds, test, demo_text_oracle)
    image = top3_precision(ds, test, demo_image_oracle)
    rand = top3_precision(ds, test, lambda ds, h, c: [0.0] * len(c))
    assert both > text + 0.05 and both > image + 0.05
    assert text > rand + 0.15 and image > rand + 0.15
    assert 0.35 < rand < 0.5
