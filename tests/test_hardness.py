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
