import math
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from hanorec.hardness import (
    HardnessCache,
    fingerprint,
    fuse_embeddings,
    hardness_lambda,
    neighbour_profiles,
    pair_distances,
    profile_distributions,
    sample_distances,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_fuse_embeddings_hand_vectors():
    """text (3, 0) -> (1, 0); image (0, 2) -> (0, 1); sum (1, 1) -> (1/sqrt2, 1/sqrt2).
    Item 2 has no image: e = normalize(text) = (0, 1) whatever its image row says."""
    text = torch.tensor([[3.0, 0.0], [0.0, 5.0]])
    image = torch.tensor([[0.0, 2.0], [7.0, 0.0]])
    e = fuse_embeddings(text, image, torch.tensor([True, False]))
    r = 1 / math.sqrt(2)
    assert_close(e, torch.tensor([[r, r], [0.0, 1.0]]))
    assert_close(fuse_embeddings(text), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert_close(fuse_embeddings(text, image)[1], torch.tensor([r, r]))  # has_image omitted = all True
    # A missing image given as a zero row gives the same as masking it.
    assert_close(fuse_embeddings(text, torch.tensor([[0.0, 2.0], [0.0, 0.0]]))[1], torch.tensor([0.0, 1.0]))


def test_fuse_embeddings_dim_mismatch():
    with pytest.raises(ValueError, match="text dim 2 != image dim 3"):
        fuse_embeddings(torch.ones(4, 2), torch.ones(4, 3))


def _dense_top_k(emb, k):
    e = F.normalize(emb.float(), dim=-1)
    sims = e @ e.T
    sims.fill_diagonal_(float("-inf"))
    return torch.topk(sims, k, dim=1)


@pytest.mark.parametrize("block_size", [1, 3, 7, 16, 37, 4096])
def test_neighbour_profiles_block_equals_dense(block_size):
    """Block-wise top-k equals the dense (N, N) computation, for block sizes that do and do not divide N."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(37, 8, generator=g)
    sims, idx = neighbour_profiles(emb, k=5, block_size=block_size)
    ref = _dense_top_k(emb, 5)
    assert sims.shape == idx.shape == (37, 5)
    assert_close(sims, ref.values)
    assert torch.equal(idx, ref.indices)
    assert (idx != torch.arange(37)[:, None]).all()  # self excluded
    assert (sims[:, :-1] >= sims[:, 1:]).all()  # sorted descending


def test_neighbour_profiles_never_allocates_n_by_n(monkeypatch):
    """Every similarity block has at most block_size rows (50 = 6 * 8 + 2): spy on what topk sees."""
    import hanorec.hardness as hardness

    shapes = []
    real_topk = torch.topk

    def spy_topk(x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return real_topk(x, *args, **kwargs)

    monkeypatch.setattr(hardness.torch, "topk", spy_topk)
    neighbour_profiles(torch.randn(50, 4), k=3, block_size=8)
    assert shapes == [(8, 50)] * 6 + [(2, 50)]


def test_neighbour_profiles_self_excluded_with_duplicates_and_errors():
    """Item 0 and 1 are identical: each is the other's nearest neighbour (sim 1), never itself."""
    emb = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    sims, idx = neighbour_profiles(emb, k=2, block_size=2)
    assert idx[0, 0] == 1 and idx[1, 0] == 0
    assert_close(sims[0, 0], torch.tensor(1.0))
    with pytest.raises(ValueError, match="k=4 .* N=4"):
        neighbour_profiles(emb, k=4)


def test_profile_distributions_softmax():
    """s = (0.9, 0.5): p = (e^0.9, e^0.5) / (e^0.9 + e^0.5) = (0.59869, 0.40131)."""
    p = profile_distributions(torch.tensor([[0.9, 0.5]]))
    a, b = math.exp(0.9), math.exp(0.5)
    assert_close(p, torch.tensor([[a / (a + b), b / (a + b)]]))


def test_pair_and_sample_distances():
    """Profiles p0 = (1, 0), p1 = (0, 1), p2 = (0.5, 0.5), p3 = (1, 0).
    D(0,1) = sqrt2, D(0,2) = sqrt(0.5), D(0,3) = 0.
    Sample 0 pairs (0,1), (0,3): mean (sqrt2 + 0) / 2; sample 1 pair (2,0): sqrt(0.5)."""
    prof = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    d = pair_distances(prof, torch.tensor([0, 0, 0]), torch.tensor([1, 2, 3]))
    assert_close(d, torch.tensor([math.sqrt(2), math.sqrt(0.5), 0.0]))
    ds = sample_distances(prof, [[0, 0], [2]], [[1, 3], [0]])
    assert_close(ds, torch.tensor([math.sqrt(2) / 2, math.sqrt(0.5)]))
    with pytest.raises(ValueError, match="sample 1: 2 positive ids but 1 negative"):
        sample_distances(prof, [[0], [0, 1]], [[1], [2]])
    with pytest.raises(ValueError, match="sample 0 has no"):
        sample_distances(prof, [[]], [[]])
    with pytest.raises(ValueError, match="index the 4 profiles"):
        pair_distances(prof, torch.tensor([0]), torch.tensor([4]))


def test_hardness_lambda_hand_numbers():
    """D = (0, 1, 2), mean 1: lambda = sigmoid(D) / sigmoid(1)
    = (0.5, 0.73106, 0.88080) / 0.73106 = (0.68394, 1, 1.20483).
    The smaller D (the harder pair) gets the smaller lambda; the sample at the mean gets 1."""
    lam = hardness_lambda(torch.tensor([0.0, 1.0, 2.0]))
    expected = torch.tensor([_sigmoid(0.0), _sigmoid(1.0), _sigmoid(2.0)]) / _sigmoid(1.0)
    assert_close(lam, expected)
    assert_close(lam, torch.tensor([0.68394, 1.0, 1.20483]), atol=1e-5, rtol=0)
    assert lam[0] < 1 < lam[2]
    assert_close(hardness_lambda(torch.tensor([0.3, 0.3])), torch.ones(2))


def test_end_to_end_profiles_to_lambda():
    g = torch.Generator().manual_seed(1)
    e = fuse_embeddings(torch.randn(20, 6, generator=g), torch.randn(20, 6, generator=g))
    sims, _ = neighbour_profiles(e, k=4, block_size=6)
    prof = profile_distributions(sims)
    assert_close(prof.sum(-1), torch.ones(20))
    lam = hardness_lambda(sample_distances(prof, [[0, 1], [2], [3]], [[4, 5], [6], [7]]))
    assert lam.shape == (3,) and torch.isfinite(lam).all()


def test_cache_round_trip_and_miss(tmp_path):
    cache = HardnessCache(tmp_path / "cache")
    key = {"model": "tiny", "dataset": fingerprint(["1", "2"], ["A", "B"]), "k": 10}
    assert cache.get(key) is None
    tensors = {"lambda": torch.tensor([0.9, 1.1]), "profiles": torch.rand(2, 10)}
    cache.put(key, tensors, meta={"n_samples": 2})
    got = cache.get(dict(reversed(list(key.items()))))  # key order does not matter
    assert set(got) == {"lambda", "profiles"}
    for name in tensors:
        assert torch.equal(got[name], tensors[name])
    assert cache.meta(key) == {"n_samples": 2}
    assert cache.get({**key, "k": 5}) is None
    assert cache.meta({**key, "model": "other"}) is None
    # Atomic writes: only the final files are left, no temp files.
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".safetensors"]
    assert not [p for p in os.listdir(tmp_path / "cache") if p.endswith(".tmp")]
    cache.put(key, {"lambda": torch.tensor([1.0])}, meta={})  # overwrite
    assert torch.equal(cache.get(key)["lambda"], torch.tensor([1.0]))


def test_cache_failed_write_leaves_no_tmp(tmp_path, monkeypatch):
    import hanorec.hardness as hardness

    cache = HardnessCache(tmp_path)
    with pytest.raises(TypeError, match="JSON-serializable"):
        cache.put({"model": object()}, {"x": torch.zeros(1)})
    with pytest.raises(TypeError, match="'x' must be a torch.Tensor"):
        cache.put({"model": "m"}, {"x": "not a tensor"})

    def half_write(tensors, path):  # the writer dies after creating part of the file
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hardness, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        cache.put({"model": "m"}, {"x": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []
    assert cache.get({"model": "m"}) is None


def test_fingerprint_stable_and_distinct():
    assert fingerprint(["1", "2"], ["A", "B"]) == fingerprint(["1", "2"], ["A", "B"])
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])
    assert fingerprint(torch.arange(3)) != fingerprint(torch.arange(3).float())
    assert fingerprint({"b": 1, "a": 2}) == fingerprint({"a": 2, "b": 1})
    assert len(fingerprint("x")) == 64


@pytest.mark.slow
def test_neighbour_profiles_100k_items():
    """N = 100,000, D = 64, k = 10 on CPU, block-wise (1024 rows: a 400 MB block, never N x N)."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(100_000, 64, generator=g)
    t0 = time.time()
    sims, idx = neighbour_profiles(emb, k=10, block_size=1024)
    elapsed = time.time() - t0
    assert sims.shape == idx.shape == (100_000, 10)
    assert (sims[:, :-1] >= sims[:, 1:]).all()
    assert (idx != torch.arange(100_000)[:, None]).all()
    assert elapsed < 600, f"took {elapsed:.0f} s"


# ----------------------------------------------------------------------------------------
# Exploration API: ItemIndex, pair_detail, pairs_table, item_index reuse, eta range


def _fake_pair(pos, neg, user="u1", task="hit3"):
    from types import SimpleNamespace

    return SimpleNamespace(
        positive_item_ids=tuple(pos),
        negative_item_ids=tuple(neg),
        example=SimpleNamespace(user=user, task=task),
    )


@pytest.fixture
def hand_index():
    """5 items in 2-D: a, b, c close together on the x axis, d and e on the y axis."""
    from hanorec.hardness import ItemIndex

    emb = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.3], [0.1, 1.0], [0.0, 1.0]]), dim=-1)
    return ItemIndex(list("abcde"), emb, {i: i.upper() * 3 for i in "abcde"})


def test_profile_temperature():
    """T = 0.5 doubles the similarities inside the softmax; T = 1 is the paper's profile exactly."""
    s = torch.tensor([[0.9, 0.5, 0.1]])
    assert_close(profile_distributions(s, 0.5), torch.softmax(2 * s, -1))
    assert torch.equal(profile_distributions(s, 1.0), profile_distributions(s))
    with pytest.raises(ValueError, match="temperature"):
        profile_distributions(s, 0.0)


def test_hardness_lambda_with_a_given_mean():
    """lambda = sigmoid(0.2) / sigmoid(0.5) when the training set's mean D is 0.5."""
    assert_close(hardness_lambda(torch.tensor([0.2]), 0.5), torch.tensor([_sigmoid(0.2) / _sigmoid(0.5)]))


def test_item_index_caches_neighbours_and_profiles(hand_index, monkeypatch):
    from hanorec import hardness

    calls = []
    real = hardness.neighbour_profiles
    monkeypatch.setattr(hardness, "neighbour_profiles", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    p1 = hand_index.profiles(2)
    assert hand_index.profiles(2) is p1 and len(calls) == 1
    p_sharp = hand_index.profiles(2, temperature=0.1)
    assert len(calls) == 1 and not torch.equal(p1, p_sharp)  # a new temperature reuses the neighbours
    sims, idx = real(hand_index.embeddings, k=2)
    assert_close(p1, profile_distributions(sims))
    table = hand_index.profile_table("a", k=2)
    assert list(table["neighbour"]) == ["b", "c"] and list(table["title"]) == ["BBB", "CCC"]
    assert_close(torch.tensor(table["p"].to_numpy()), p1[0])
    with pytest.raises(ValueError, match="item id 'z'"):
        hand_index.profile_table("z")
    with pytest.raises(ValueError, match="1 <= K < 5"):
        hand_index.profiles(5)


def test_pair_detail_matches_the_pure_functions(hand_index):
    """D(w, l) from pair_distances on the index's profiles; D_n their mean; lambda = sigmoid(D_n) /
    sigmoid(mean D); beta = beta0 * lambda, and beta0 * eta * lambda at the ends of the eta range."""
    from hanorec.hardness import beyond_paper_note, pair_detail

    pair = _fake_pair("ab", "de")
    p = hand_index.profiles(2)
    want = pair_distances(p, torch.tensor([0, 1]), torch.tensor([3, 4]))
    d = pair_detail(pair, hand_index, mean_distance=0.3, beta0=0.2, k=2, eta_range=(0.5, 2.0))
    assert_close(torch.tensor(d.items["distance"].to_numpy()), want)
    assert list(d.items["negative_title"]) == ["DDD", "EEE"]
    assert abs(d.distance - float(want.mean())) < 1e-6
    lam = _sigmoid(d.distance) / _sigmoid(0.3)
    assert abs(d.lam - lam) < 1e-6 and abs(d.beta - 0.2 * lam) < 1e-6
    assert d.beta_range == pytest.approx((0.2 * 0.5 * lam, 0.2 * 2.0 * lam))
    assert set(d.profiles) == set("abde") and "Beyond the paper: K = 2" in d.note
    assert d.summary()["beta = beta0 x lambda"] == d.beta
    sharp = pair_detail(pair, hand_index, mean_distance=0.3, k=2, temperature=0.5)
    assert "temperature 0.5" in sharp.note and sharp.beta_range is None
    assert beyond_paper_note(10, 1.0) == ""


def test_pairs_table_and_a_harder_pair_gets_a_smaller_beta(hand_index):
    """(a, b) are alike (a hard pair, small D); (a, e) are far apart: with one mean D the hard pair
    gets the smaller lambda and beta (method.md section 7's check)."""
    from hanorec.hardness import pair_detail, pairs_table

    pairs = [_fake_pair("a", "b"), _fake_pair("a", "e", user="u2")]
    table = pairs_table(pairs, hand_index, beta0=0.1, k=2)
    d = hand_index.sample_distances(pairs, k=2)
    assert_close(torch.tensor(table["lambda"].to_numpy()), hardness_lambda(d))
    assert table["beta"][0] < table["beta"][1] and list(table["user"]) == ["u1", "u2"]
    assert abs(table.attrs["mean_distance"] - float(d.mean())) < 1e-7
    one = pair_detail(pairs[0], hand_index, mean_distance=table.attrs["mean_distance"], k=2)
    assert abs(one.lam - table["lambda"][0]) < 1e-6
    with pytest.raises(ValueError, match="at least one"):
        pairs_table([], hand_index)


def test_observed_eta_range(tmp_path):
    from hanorec.hardness import observed_eta_range

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "hardness/eta": 0.98}\n{"step": 2, "loss": 0.6}\n\n{"hardness/eta": 1.03}\n')
    assert observed_eta_range(log) == (0.98, 1.03)
    assert observed_eta_range([{"loss": 1.0}]) is None
    log.write_text('{"hardness/eta": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        observed_eta_range(log)
    with pytest.raises(FileNotFoundError, match="no metrics log"):
        observed_eta_range(tmp_path / "missing.jsonl")


def test_item_index_built_once_per_model_and_used_by_pair_hardness(ds, monkeypatch):
    """Re-sampling negatives must not re-embed the items: item_index keeps one index per model object,
    pair_hardness reads it, and its lambdas equal pairs_table's."""
    from hanorec import hardness
    from hanorec.data import make_splits
    from hanorec.models import build_tiny
    from hanorec.pairs import build_pairs
    from hanorec.tasks import build_examples, corpus_text

    bundle = build_tiny("tiny-llava", corpus_text(ds), hidden_size=64, seed=0)
    examples = build_examples("hit3", make_splits(ds, n_history=3, n_target=3).train, ds, max_examples=40)
    calls = []
    real = hardness.item_embeddings
    monkeypatch.setattr(hardness, "item_embeddings", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    index = hardness.item_index(bundle, ds)
    assert hardness.item_index(bundle, ds) is index and len(calls) == 1
    first = hardness.pair_hardness(bundle, ds, build_pairs(examples, ds, seed=0))
    resampled_pairs = build_pairs(examples, ds, seed=1)
    second = hardness.pair_hardness(bundle, ds, resampled_pairs)
    assert len(calls) == 1 and not torch.equal(first["distance"], second["distance"])
    table = hardness.pairs_table(resampled_pairs, index)
    assert_close(torch.tensor(table["lambda"].to_numpy()), second["lambda"])
    assert hardness.item_index(bundle, ds, refresh=True) is not index and len(calls) == 2
    # a sharper profile widens the spread of lambda (at T = 1 it is close to 1 everywhere)
    assert (
        hardness.pairs_table(resampled_pairs, index, temperature=0.05)["lambda"].std() > table["lambda"].std()
    )
