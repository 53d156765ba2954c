"""Reference log-probs shared by the preference stages of one comparison seed (hanorec.train.refcache): a
stage that reuses another's kept reference sums trains bit for bit as it does with its own per-step reference
forward, for DPO, NoDO (the reference is noise-free), mDPO's imageless rows and K > 1 rejected answers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hanorec.config import load_config
from hanorec.data import make_splits
from hanorec.models import add_lora, build_tiny
from hanorec.pairs import build_pairs
from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text
from hanorec.train.preference import PrefItem, merge_sft_adapter, train_preference
from hanorec.train.refcache import FORMAT, ReferenceCache

BATCH = 3
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def make_cfg(out_dir, **pref):
    return load_config(overrides={
        "seed": 0, "output_dir": str(out_dir),
        "model": {"name": "tiny-llava", "tiny_hidden_size": 64, "tiny_layers": 2, "tiny_vocab_size": 400},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
        "pref": {"max_steps": 3, "batch_size": BATCH, "grad_accum": 1, "lr": 1e-2, "log_every": 1,
                 "save_every": 0, "progress_bar": False, **pref},
    })  # fmt: skip


@pytest.fixture(scope="module")
def merged(ds, tmp_path_factory):
    """Stage 2's start: a tiny LLaVA with a perturbed SFT adapter merged in, a fresh LoRA on top."""
    cfg = make_cfg(tmp_path_factory.mktemp("unused"))
    m = cfg.model

    def fresh():
        return build_tiny(m.name, corpus_text(ds), hidden_size=m.tiny_hidden_size, layers=m.tiny_layers,
                          vocab_size=m.tiny_vocab_size, seed=0)  # fmt: skip

    sft = add_lora(fresh(), cfg.lora)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sft.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out = tmp_path_factory.mktemp("sft")
    sft.model.save_pretrained(out)
    bundle = merge_sft_adapter(fresh(), cfg.lora, out)
    bundle.meta["sft_checkpoint"] = "tiny@sft-test"
    bundle.model.train()
    return bundle


@pytest.fixture(scope="module")
def items(ds):
    s = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=s["n_history"], n_target=s["n_target"])
    examples = build_examples("hit3", splits.train, ds, seed=0, shuffle=True, max_examples=6)
    return {k: [PrefItem(p) for p in build_pairs(examples, ds, seed=0, k_negatives=k)] for k in (1, 3)}


def train(merged, ds, items, out, cache=None, **pref):
    bundle = copy.deepcopy(merged)
    result = train_preference(make_cfg(out, **pref), bundle, ds, items, out, resume=False, reference_cache=cache)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    state = {n: p.detach().clone() for n, p in bundle.model.named_parameters() if p.requires_grad}
    return result, [{k: r[k] for k in KEYS} for r in rows], state


def assert_same(a, b):
    assert a[1] == b[1]  # every logged value, exactly
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][n], b[2][n]) for n in a[2])


# (the method that fills the cache, the method that reuses it, their pairs' K)
SHARED = [  # mDPO's and K = 3's cases are slow (about 10 s each): CI runs them with -m slow
    ({"method": "dpo", "noise_target": "none"}, {"method": "hano_dpo", "noise_target": "lora", "noise_sigma": 0.05}, 1),
    pytest.param({"method": "mdpo", "noise_target": "none"}, {"method": "mdpo", "noise_target": "none"}, 1,
                 marks=pytest.mark.slow, id="mdpo>mdpo"),  # fmt: skip
    pytest.param({"method": "sdpo", "k_negatives": 3, "noise_target": "none"},
                 {"method": "dmpo", "k_negatives": 3, "noise_target": "none"}, 3, marks=pytest.mark.slow, id="sdpo>dmpo"),  # fmt: skip
]


@pytest.mark.parametrize("first,second,k", SHARED)
def test_a_stage_on_shared_reference_logps_trains_bit_for_bit(merged, ds, items, tmp_path, first, second, k):
    its = items[k]
    plain_first = train(merged, ds, its, tmp_path / "a", **first)
    plain_second = train(merged, ds, its, tmp_path / "b", **second)
    cache = ReferenceCache(tmp_path / "ref")
    assert_same(train(merged, ds, its, tmp_path / "c", cache, **first), plain_first)
    assert (cache.hits, cache.misses) == (0, 3)  # 3 steps of one micro-batch each: computed and kept
    assert_same(train(merged, ds, its, tmp_path / "d", cache, **second), plain_second)
    assert (cache.hits, cache.misses) == (3, 3)  # every step of the second stage read the first's values
    # kept on disk: another process (a resumed comparison) reads them back, with the same result
    (kept,) = (tmp_path / "ref").glob("*.safetensors")
    again = ReferenceCache(tmp_path / "ref")
    assert_same(train(merged, ds, its, tmp_path / "e", again, **second), plain_second)
    assert (again.hits, again.misses, again.notes) == (3, 0, [])


def test_a_damaged_or_misshapen_cache_is_recomputed_not_trusted(merged, ds, items, tmp_path):
    dpo = {"method": "dpo", "noise_target": "none"}
    plain = train(merged, ds, items[1], tmp_path / "a", **dpo)
    cache = ReferenceCache(tmp_path / "ref")
    train(merged, ds, items[1], tmp_path / "b", cache, **dpo)
    (path,) = (tmp_path / "ref").glob("*.safetensors")
    table = load_file(str(path))
    values = next(k for k in table if not k.endswith(".rows"))
    table[values] = table[values][:-1]  # one value short: the shape check refuses it
    save_file(table, str(path), metadata={"format": FORMAT})
    short = ReferenceCache(tmp_path / "ref")
    assert_same(train(merged, ds, items[1], tmp_path / "c", short, **dpo), plain)
    assert short.misses == 1 and "wrong shape" in short.notes[0]
    path.write_bytes(b"\x80\x04 not a safetensors file")  # e.g. a pickle where the cache was
    damaged = ReferenceCache(tmp_path / "ref")
    assert_same(train(merged, ds, items[1], tmp_path / "d", damaged, **dpo), plain)
    assert damaged.misses == 3 and "was ignored" in damaged.notes[0]
    meta_ok = load_file(str(path))  # written again whole: 3 micro-batches' values and row lengths
    assert len(meta_ok) == 6 and all(torch.isfinite(v).all() for v in meta_ok.values())


def test_another_sft_model_or_pair_set_gets_its_own_table(tmp_path):
    cache = ReferenceCache(tmp_path)
    a = cache.scope("m@sft-1", "ctx", ["p1", "p2"])
    assert cache.scope("m@sft-2", "ctx", ["p1", "p2"]).name != a.name
    assert cache.scope("m@sft-1", "ctx", ["p1", "p3"]).name != a.name
    assert cache.scope("m@sft-1", "ctx2", ["p1", "p2"]).name != a.name
    assert cache.scope("m@sft-1", "ctx", ["p1", "p2"]).name == a.name
