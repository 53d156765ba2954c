import itertools
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from hanorec.metrics import (
    auc,
    format_table,
    generative_hit3_metrics,
    hit_and_ndcg_at_k,
    hit_ratio_at_1,
    mean_std,
    normalize_title,
    parse_generation,
    parse_yes_no,
    popularity_scores,
    random_scores,
    ranking_metrics,
)

TITLES = ["Heat (1995)", "Alien (1979)", "Aliens (1986)", "Toy Story (1995)", "1984 (1984)"]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('  "Heat (1995)" ', "heat (1995)"),
        ("1. \u201cToy  Story\u201d", "toy story"),
        ("2) 'Alien'", "alien"),
        ("- Heat", "heat"),
        ("* \u00abHeat\u00bb", "heat"),
        ("1984", "1984"),
        ("3.Heat", "heat"),
        ("2.0", "2.0"),
        ("TOY\tSTORY", "toy story"),
    ],
)
def test_normalize_title(raw, expected):
    assert normalize_title(raw) == expected


def test_parse_generation_quotes_numbering_and_unknown_lines():
    text = '1. "Toy Story (1995)"\n\n  \u201cHeat (1995)\u201d  \nThe Matrix (1999)\n- 1984 (1984)\n'
    p = parse_generation(text, TITLES)
    assert p.lines == [
        '1. "Toy Story (1995)"',
        "\u201cHeat (1995)\u201d",
        "The Matrix (1999)",
        "- 1984 (1984)",
    ]
    assert p.matched == [3, 0, None, 4]
    assert p.valid is False
    assert parse_generation('"Alien (1979)"\n"Heat (1995)"', TITLES).valid is True
    assert parse_generation("", TITLES).valid is False  # no line at all is invalid
    assert parse_generation("\n  \n", TITLES).matched == []


def test_parse_generation_containment():
    """A line containing exactly one candidate's title counts as it; the longest title wins over
    one it contains ("alien (1979)" is not inside "aliens (1986)", but "alien" is inside "aliens")."""
    p = parse_generation("I recommend Heat (1995).\nHeat (1995) or Alien (1979)\nmy heat (1995)x", TITLES)
    assert p.matched == [0, None, None]  # 2 candidates; glued to a word character
    titles = ["Alien", "Aliens", "Heat"]
    assert parse_generation("Aliens (1986)", titles).matched == [1]
    assert parse_generation("Alien: Covenant", titles).matched == [0]


def test_parse_yes_no():
    assert parse_yes_no("Yes.") is True
    assert parse_yes_no(" no, the user would not") is False
    assert parse_yes_no("Answer: YES") is True
    assert parse_yes_no("yes or no") is True  # the first word decides
    assert parse_yes_no("maybe yes, maybe no") is None
    assert parse_yes_no("I cannot tell") is None
    assert parse_yes_no("") is None


def test_hit_and_ndcg_at_k_by_rank():
    """True item 5 at ranks 0, 1, 2, absent: HR 1, 1, 1, 0; NDCG 1/log2(2)=1, 1/log2(3)=0.6309,
    1/log2(4)=0.5, 0. Rank 3 is outside k=3. Unknown lines (None) take a position."""
    assert hit_and_ndcg_at_k([5, 1, 2], 5) == (1.0, 1.0)
    assert hit_and_ndcg_at_k([1, 5, 2], 5) == (1.0, 1.0 / math.log2(3))
    assert hit_and_ndcg_at_k([None, 1, 5], 5) == (1.0, 0.5)
    assert hit_and_ndcg_at_k([1, 2, 3], 5) == (0.0, 0.0)
    assert hit_and_ndcg_at_k([1, 2, 3, 5], 5) == (0.0, 0.0)
    assert hit_and_ndcg_at_k([1, 5, 5], 5, k=1) == (0.0, 0.0)
    assert hit_and_ndcg_at_k([], 5) == (0.0, 0.0)


def test_ranking_metrics_hand_computed():
    """True item ranks 0, 1, 2, 3 over 4 samples (C=4):
    HR@1 = 1/4; HR@3 = 3/4; NDCG@3 = (1 + 1/log2(3) + 1/2 + 0) / 4 = (1.5 + 0.63093) / 4 = 0.53273."""
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],  # true 0 at rank 0
            [0.5, 0.9, 0.1, 0.2],  # true 0 at rank 1
            [0.1, 0.9, 0.8, 0.2],  # true 3 at rank 2
            [0.1, 0.2, 0.3, 0.4],  # true 0 at rank 3
        ]
    )
    m = ranking_metrics(scores, torch.tensor([0, 0, 3, 0]))
    assert m["n"] == 4 and m["candidates"] == 4
    assert_close(m["HR@1"], 0.25)
    assert_close(m["HR@3"], 0.75)
    assert_close(m["NDCG@3"], (1.5 + 1 / math.log2(3)) / 4)
    assert_close(m["NDCG@1"], m["HR@1"])


def test_ranking_metrics_ties_are_pessimistic():
    """All scores equal: the true item ranks behind the C-1 = 6 others -> HR@1 = HR@3 = NDCG@3 = 0.
    True tied with one other at the top: rank 1 -> HR@1 0, HR@3 1, NDCG@3 1/log2(3)."""
    m = ranking_metrics(np.zeros((5, 7)), np.arange(5))
    assert m["HR@1"] == m["HR@3"] == m["NDCG@3"] == 0.0
    assert m["candidates"] == 7
    for true in (0, 1):  # the order of the tied pair does not matter
        m = ranking_metrics(np.array([[2.0, 2.0, 1.0]]), [true])
        assert (m["HR@1"], m["HR@3"]) == (0.0, 1.0)
        assert_close(m["NDCG@3"], 1 / math.log2(3))


def test_ranking_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="index the 3 candidates"):
        ranking_metrics(np.zeros((1, 3)), [3])
    with pytest.raises(ValueError, match="NaN"):
        ranking_metrics(np.array([[np.nan, 1.0]]), [0])
    with pytest.raises(ValueError, match="2-D"):
        ranking_metrics(np.zeros(3), [0])


def _brute_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def test_auc_hand_and_brute_force():
    """pos {0.8, 0.5}, neg {0.5, 0.2}: pairs (0.8>0.5)=1, (0.8>0.2)=1, (0.5=0.5)=0.5, (0.5>0.2)=1
    -> 3.5 / 4 = 0.875."""
    assert auc([0.8, 0.5, 0.5, 0.2], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert auc([1.0, 1.0], [True, False]) == pytest.approx(0.5)
    assert auc(torch.tensor([0.1, 0.9]), torch.tensor([1, 0])) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = rng.integers(0, 4, size=30).astype(float)  # many ties
        y = rng.integers(0, 2, size=30)
        y[:2] = [0, 1]
        assert auc(s, y) == pytest.approx(_brute_auc(s, y))


def test_auc_single_class_raises():
    with pytest.raises(ValueError, match="both classes"):
        auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0/1"):
        auc([0.1, 0.2], [0, 2])


def test_hit_ratio_at_1_both_denominators():
    """5 samples, 4 valid (one None), 2 correct: HR@1_all = 2/5, HR@1_valid = 2/4, ValidRatio = 4/5."""
    m = hit_ratio_at_1([3, 1, None, 2, 0], [3, 1, 2, 0, 1])
    assert m == {"HR@1_all": 0.4, "HR@1_valid": 0.5, "ValidRatio": 0.8, "n": 5}
    assert hit_ratio_at_1([None], [0])["HR@1_valid"] == 0.0
    with pytest.raises(ValueError, match="same|entries"):
        hit_ratio_at_1([1], [1, 2])


def test_generative_hit3_metrics():
    """Sample 1: true 0 on line 1 -> (1, 1), valid. Sample 2: true 3 on line 2 behind an unknown
    line -> (1, 1/log2(3)), invalid. Sample 3: true 1 absent -> (0, 0), valid.
    HR@3 = 2/3; NDCG@3 = (1 + 0.63093) / 3; ValidRatio = 2/3."""
    gens = ['"Heat (1995)"\n"Alien (1979)"', "Star Wars\nToy Story (1995)", "1. Heat (1995)\n2. 1984 (1984)"]
    m = generative_hit3_metrics(gens, [TITLES] * 3, [0, 3, 1])
    assert m["n"] == 3
    assert_close(m["HR@3"], 2 / 3)
    assert_close(m["NDCG@3"], (1 + 1 / math.log2(3)) / 3)
    assert_close(m["ValidRatio"], 2 / 3)


def test_random_scores_seeded():
    a, b, c = random_scores(4, 7, seed=1), random_scores(4, 7, seed=1), random_scores(4, 7, seed=2)
    assert a.shape == (4, 7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_popularity_scores_and_ties():
    """Counts a=5, b=2, c=2, d unseen=0. Without jitter, ties stay ties (pessimistic ranking);
    with a seed, the jitter keeps the count order, is reproducible and separates the ties."""
    counts = {"a": 5, "b": 2, "c": 2}
    ids = [["b", "a", "d", "c"], ["c", "d", "b", "a"]]
    s = popularity_scores(ids, counts)
    np.testing.assert_array_equal(s, [[2, 5, 0, 2], [2, 0, 2, 5]])
    m = ranking_metrics(s, [0, 0])  # true "b" / "c" tied with one other at count 2 -> rank 2
    assert (m["HR@1"], m["HR@3"]) == (0.0, 1.0)
    j1, j2 = popularity_scores(ids, counts, tie_seed=3), popularity_scores(ids, counts, tie_seed=3)
    np.testing.assert_array_equal(j1, j2)
    np.testing.assert_array_equal(np.argsort(-s[:, [1, 2]], axis=1), np.argsort(-j1[:, [1, 2]], axis=1))
    assert j1[0, 0] != j1[0, 3] and np.all(np.floor(j1) == s)
    with pytest.raises(ValueError, match="sample 1"):
        popularity_scores([["a", "b"], ["a"]], counts)
    np.testing.assert_array_equal(popularity_scores([[3, 4]], {3: 7}), [[7, 0]])  # int item ids work too


def test_mean_std():
    """[1, 2, 3]: mean 2, sample std sqrt(((1)^2 + 0 + 1^2) / 2) = 1."""
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_format_table():
    rows = [{"model": "SFT", "HR@3": 0.5, "n": 10}, {"model": "HaNoRec", "HR@3": 0.123456, "n": 200}]
    text = format_table(rows, ["model", "HR@3", "n", "AUC"])
    lines = text.splitlines()
    assert lines[0].split() == ["model", "HR@3", "n", "AUC"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["SFT", "0.5000", "10", "-"]
    assert lines[3].split() == ["HaNoRec", "0.1235", "200", "-"]
    assert len({len(line) for line in lines[:2]}) == 1
    md = format_table(rows, ["model", "HR@3"], markdown=True).splitlines()
    assert md[0].startswith("| model") and md[0].endswith("|")
    assert md[1].replace(" ", "") == "|-------|-----:|"  # numeric column right-aligned
    assert md[3].split("|")[2].strip() == "0.1235"
