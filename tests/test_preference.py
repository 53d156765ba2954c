"""Stage 2 on a tiny model: HaRS hardness end to end, and DPO / S-DPO / HaNo-DPO training.

The SFT model is a tiny LLaVA with a perturbed LoRA adapter saved to disk; stage 2 merges it into a
fresh base built from the same seed and trains a new LoRA on top (method.md sections 6-9).

Arithmetic checked here:
- reference log-probs (adapter disabled) = the SFT model's log-probs (adapter enabled, unmerged);
- at step 1 the new LoRA has B = 0, so without noise policy = reference, h = 0 and the loss is
  exactly log 2 (DPO, HaNo-DPO) or log(1 + K) (S-DPO: -logsigmoid(-log sum_j exp 0) = log(1 + K));
  with LoRA or logit noise h != 0 and the loss moves away from log 2;
- HaNo-DPO logs beta_mean = beta0 * eta * mean(lambda) (no floor is hit);
- lambda_n = sigmoid(D_n) / sigmoid(mean D): a larger D gives a larger lambda and a larger beta.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from torch.testing import assert_close

from hanorec import hardness as H
from hanorec import losses as L
from hanorec.config import load_config
from hanorec.data import make_splits
from hanorec.models import add_lora, build_tiny
from hanorec.noise import LoRANoise
from hanorec.pairs import build_pairs
from hanorec.scoring import multi_completion_logps
from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text
from hanorec.train.checkpoint import latest_checkpoint
from hanorec.train.loop import TrainingDiverged
from hanorec.train.preference import (
    PrefItem,
    make_pref_collate,
    merge_sft_adapter,
    precompute_reference,
    reference_logps,
    train_preference,
)

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"
N_ITEMS = 6  # batch 3 (eta needs >= 3 values) x 2 micro-batches = 2 optimizer steps
BATCH = 3
LOG2 = math.log(2.0)
METRIC_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "hardness/eta",
    "hardness/beta_mean",
    "hardness/lambda_mean",
    "noise/sigma",
)
# PREF_VARIANTS: DPO and S-DPO without noise, HaNo-DPO with the default LoRA noise
METHODS = {
    "dpo": {"method": "dpo", "noise_target": "none"},
    "sdpo": {"method": "sdpo", "k_negatives": 3, "noise_target": "none"},
    "hano_dpo": {"method": "hano_dpo", "noise_target": "lora", "noise_sigma": 0.05},
}


def make_cfg(out_dir, **pref):
    return load_config(
        overrides={
            "seed": 0,
            "output_dir": str(out_dir),
            "model": {"name": "tiny-llava", "tiny_hidden_size": 64, "tiny_layers": 2, "tiny_vocab_size": 400},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
            "pref": {
                "max_steps": 2,
                "batch_size": BATCH,
                "grad_accum": 1,
                "lr": 1e-3,
                "log_every": 1,
                "save_every": 0,
                "progress_bar": False,
                **pref,
            },
        }
    )


@pytest.fixture(scope="module")
def examples(ds):
    s = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=s["n_history"], n_target=s["n_target"])
    return build_examples("hit3", splits.train, ds, seed=0, shuffle=True, max_examples=N_ITEMS)


def fresh_bundle(cfg, ds):
    m = cfg.model
    return build_tiny(
        m.name, corpus_text(ds), hidden_size=m.tiny_hidden_size, layers=m.tiny_layers,
        vocab_size=m.tiny_vocab_size, seed=cfg.seed,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sft(ds, tmp_path_factory):
    """A 'trained' SFT adapter: LoRA with random B, saved with save_pretrained. Returns (dir, bundle)."""
    cfg = make_cfg(tmp_path_factory.mktemp("unused"))
    bundle = add_lora(fresh_bundle(cfg, ds), cfg.lora)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    bundle.model.eval()
    out = tmp_path_factory.mktemp("sft_adapter")
    bundle.model.save_pretrained(out)
    return out, bundle


@pytest.fixture(scope="module")
def merged(ds, sft, tmp_path_factory):
    """Stage 2's starting point: a fresh base from the same seed, SFT merged, a new LoRA on top."""
    cfg = make_cfg(tmp_path_factory.mktemp("unused"))
    torch.manual_seed(0)
    bundle = merge_sft_adapter(fresh_bundle(cfg, ds), cfg.lora, sft[0])
    bundle.model.train()
    return bundle


@pytest.fixture(scope="module")
def pairs(ds, examples):
    return build_pairs(examples, ds, seed=0)


@pytest.fixture(scope="module")
def hardness_run(merged, ds, pairs, tmp_path_factory):
    """pair_hardness once, with a spy on item_embeddings. Returns (output, embeddings, cache_dir)."""
    cache_dir = tmp_path_factory.mktemp("hardness_cache")
    seen = {}
    real = H.item_embeddings

    def spy(*args, **kwargs):
        seen["emb"] = real(*args, **kwargs)
        return seen["emb"]

    H.item_embeddings = spy
    try:
        out = H.pair_hardness(merged, ds, pairs, k=10, cache_dir=cache_dir, model_key="sft-test")
    finally:
        H.item_embeddings = real
    return out, seen["emb"], cache_dir


@pytest.fixture(scope="module")
def items(pairs, hardness_run):
    lam = hardness_run[0]["lambda"].tolist()
    return [PrefItem(p, float(x)) for p, x in zip(pairs, lam)]


@pytest.fixture(scope="module")
def sdpo_items(ds, examples):
    return [PrefItem(p) for p in build_pairs(examples, ds, seed=0, k_negatives=3)]


def trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def run(merged, ds, items, out_dir, **pref):
    """Train a copy of the merged bundle.

    Returns (bundle, trainable weights before, frozen weights before, TrainResult, metrics records).
    """
    cfg = make_cfg(out_dir, **pref)
    bundle = copy.deepcopy(merged)
    before, frozen = trainable_state(bundle.model), frozen_state(bundle.model)
    result = train_preference(cfg, bundle, ds, items, out_dir, resume=False)
    return bundle, before, frozen, result, read_metrics(out_dir)


@pytest.fixture(scope="module")
def runs(merged, ds, items, sdpo_items, tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            its = sdpo_items if name == "sdpo" else items
            cache[name] = run(merged, ds, its, tmp_path_factory.mktemp(name), **METHODS[name])
        return cache[name]

    return get


def _encode(bundle, ds, items):
    batch = make_pref_collate(bundle, ds)(list(items))
    return batch["prompts"], batch["completions"]


# ------------------------------------------------------------------------------------------------
# HaRS hardness, end to end on the demo
# ------------------------------------------------------------------------------------------------
def test_pair_hardness_on_demo(hardness_run, pairs):
    """lambda and D have one entry per pair; D_n is recomputed here from the item embeddings with a
    dense similarity matrix: top-10 neighbours (self excluded), softmax, L2 distance, mean per pair."""
    out, (ids, emb), _ = hardness_run
    lam, dist = out["lambda"], out["distance"]
    assert lam.shape == dist.shape == (len(pairs),)
    assert ids == sorted(ids) and len(ids) == emb.shape[0] == 300
    assert_close(emb.norm(dim=1), torch.ones(len(ids)))

    sims = emb @ emb.T  # (N, N)
    sims.fill_diagonal_(float("-inf"))
    profiles = torch.softmax(sims.topk(10, dim=1).values, dim=1)  # (N, 10)
    row = {i: r for r, i in enumerate(ids)}
    expected = torch.stack(
        [
            torch.stack(
                [
                    (profiles[row[w]] - profiles[row[lo]]).norm()
                    for w, lo in zip(p.positive_item_ids, p.negative_item_ids)
                ]
            ).mean()
            for p in pairs
        ]
    )
    assert_close(dist, expected)
    assert bool((dist > 0).all()), "positives and negatives are different items: their profiles differ"

    # lambda_n = sigmoid(D_n) / sigmoid(mean D): above 1 exactly when D_n is above the mean, ordered like D
    assert_close(lam, torch.sigmoid(dist) / torch.sigmoid(dist.mean()))
    assert torch.equal(lam > 1, dist > dist.mean())
    assert torch.equal(torch.argsort(lam), torch.argsort(dist))
    # a pair whose D is the training-set mean gets lambda = 1 exactly
    with_mean = H.hardness_lambda(torch.cat([dist, dist.mean()[None]]))
    assert_close(with_mean[-1], torch.tensor(1.0))


def test_pair_hardness_cache_is_reused(hardness_run, merged, ds, pairs, monkeypatch):
    out, _, cache_dir = hardness_run
    assert len(list(Path(cache_dir).glob("*.safetensors"))) == 1
    assert len(list(Path(cache_dir).glob("*.json"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("item embeddings were recomputed")

    monkeypatch.setattr(H, "item_embeddings", boom)
    again = H.pair_hardness(merged, ds, pairs, k=10, cache_dir=cache_dir, model_key="sft-test")
    assert torch.equal(again["lambda"], out["lambda"])
    assert torch.equal(again["distance"], out["distance"])
    # another set of pairs, another K or another model is a miss
    for kwargs in (
        {"pairs": pairs[:-1], "k": 10, "model_key": "sft-test"},
        {"pairs": pairs, "k": 5, "model_key": "sft-test"},
        {"pairs": pairs, "k": 10, "model_key": "another-sft"},
    ):
        H._INDEXES.clear()  # forget the in-memory item index, so a disk-cache miss must re-embed
        with pytest.raises(AssertionError, match="recomputed"):
            H.pair_hardness(merged, ds, cache_dir=cache_dir, **kwargs)


def test_smaller_distance_gets_smaller_beta(hardness_run):
    """With the same eta (and the same h), beta_n = beta0 * eta * lambda_n follows D_n."""
    dist = hardness_run[0]["distance"]
    lam = H.hardness_lambda(dist)
    eta = L.responsiveness(torch.tensor([0.5, -1.0, 2.0, 0.3]), 0.1)
    assert not math.isclose(float(eta), 1.0)
    beta = L.dynamic_beta(0.1, eta, lam)
    for i in range(len(dist)):
        for j in range(len(dist)):
            if dist[i] < dist[j] - 1e-6:
                assert beta[i] < beta[j], (i, j)
    # the same through the loss: equal h for every pair, so only lambda differs
    h = torch.full_like(dist, 0.5)
    zero = torch.zeros_like(dist)
    out = L.hano_dpo_loss(h, zero, zero, zero, lam, beta0=0.1)
    assert_close(out.eta, torch.tensor(1.0))  # all g_n equal -> u_n = 1 -> eta = 1
    assert_close(out.beta, 0.1 * lam)
    assert torch.equal(torch.argsort(out.beta), torch.argsort(dist))
    # a hand-made pair of distances
    two = H.hardness_lambda(torch.tensor([0.1, 0.3, 0.2, 0.25]))
    b = L.dynamic_beta(0.1, torch.tensor(0.8), two)
    assert b[0] < b[1] and two[0] < 1 < two[1]


# ------------------------------------------------------------------------------------------------
# The reference: merged SFT, adapter disabled, clean
# ------------------------------------------------------------------------------------------------
def test_reference_is_the_merged_sft_model_and_ignores_noise(merged, sft, ds, items):
    sft_bundle = sft[1]
    prompts, comps = _encode(merged, ds, items[:BATCH])
    sft_prompts, sft_comps = _encode(sft_bundle, ds, items[:BATCH])
    assert [p.input_ids for p in prompts] == [p.input_ids for p in sft_prompts]
    assert comps == sft_comps
    sums, _ = multi_completion_logps(sft_bundle.model, sft_bundle, sft_prompts, sft_comps)
    expected = torch.stack(sums).detach()  # (B, 2): the SFT model, adapter enabled, not merged

    model = merged.model
    assert model.training
    ref = reference_logps(model, merged, prompts, comps, "shared_prefix")
    assert_close(ref, expected, atol=1e-4, rtol=1e-5)
    base_bundle = fresh_bundle(make_cfg("unused"), ds)  # the base without the SFT adapter differs
    base_sums, _ = multi_completion_logps(base_bundle.model.eval(), base_bundle, prompts, comps)
    assert (torch.stack(base_sums) - expected).abs().max() > 0.1
    # the fresh stage-2 LoRA starts at B = 0: policy = reference
    pol, _ = multi_completion_logps(model, merged, prompts, comps)
    assert_close(torch.stack(pol).detach(), ref, atol=1e-5, rtol=0)

    noise = LoRANoise(model, sigma=0.1)
    with noise.active():
        ref_noisy = reference_logps(model, merged, prompts, comps, "shared_prefix")
        pol_noisy, _ = multi_completion_logps(model, merged, prompts, comps)
    assert torch.equal(ref_noisy, ref)
    assert (torch.stack(pol_noisy).detach() - ref).abs().max() > 1e-3


def test_merge_with_modules_to_save(ds, items, tmp_path):
    """Tiny presets train embed_tokens / lm_head in full beside LoRA: the merged reference must carry
    the SFT copies of those modules too, and stay put when stage 2 trains its own copies."""
    cfg = make_cfg(tmp_path)
    lora = dataclasses.replace(cfg.lora, dropout=0.0, modules_to_save=["embed_tokens", "lm_head"])
    sft_bundle = add_lora(fresh_bundle(cfg, ds), lora)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in sft_bundle.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    sft_bundle.model.eval().save_pretrained(tmp_path / "sft")
    stage2 = merge_sft_adapter(fresh_bundle(cfg, ds), lora, tmp_path / "sft")
    trainable = [n for n, p in stage2.model.named_parameters() if p.requires_grad]
    assert any("lm_head.modules_to_save" in n for n in trainable)

    prompts, comps = _encode(stage2, ds, items[:2])
    expected, _ = multi_completion_logps(sft_bundle.model, sft_bundle, prompts, comps)
    expected = torch.stack(expected).detach()
    ref = reference_logps(stage2.model, stage2, prompts, comps, "shared_prefix")
    assert_close(ref, expected, atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # what training does to the stage-2 copies
        for p in stage2.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    assert torch.equal(reference_logps(stage2.model, stage2, prompts, comps, "shared_prefix"), ref)


def test_precompute_ref_matches_on_the_fly(merged, ds, items):
    on_the_fly = []
    for start in range(0, len(items), BATCH):
        prompts, comps = _encode(merged, ds, items[start : start + BATCH])
        on_the_fly.append(reference_logps(merged.model, merged, prompts, comps, "shared_prefix"))
    on_the_fly = torch.cat(on_the_fly)  # (N, 2)
    for mode in ("shared_prefix", "naive"):
        pre = precompute_reference(merged, ds, items, mode, batch_size=4)
        assert merged.model.training  # restored
        assert [p.pair for p in pre] == [p.pair for p in items]
        assert [p.hardness_lambda for p in pre] == [p.hardness_lambda for p in items]
        got = torch.tensor([p.ref_logps for p in pre])
        assert_close(got, on_the_fly, atol=1e-4 if mode == "naive" else 1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Training: every method runs, logs TRL-style metrics and moves every trainable parameter
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_logs(runs, merged, sft, ds, items, method):
    bundle, before, frozen, result, records = runs(method)
    assert result.global_step == 2 and result.last_checkpoint is not None
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["stage"] == method
        missing = [k for k in METRIC_KEYS if k not in r]
        assert not missing, f"{method} did not log {missing}"
        assert all(math.isfinite(r[k]) for k in METRIC_KEYS), r
        assert 0.0 <= r["rewards/accuracies"] <= 1.0
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
        assert r["logps/chosen"] < 0 and r["logps/rejected"] < 0

    # every trainable parameter (the new LoRA only) moved; the merged base did not
    after = trainable_state(bundle.model)
    assert before and all("lora_" in n for n in before)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"{method}: {len(unchanged)} trainable tensors did not change, e.g. {unchanged[:3]}"
    frozen_after = frozen_state(bundle.model)
    assert all(torch.equal(frozen[n], frozen_after[n]) for n in frozen)

    first = records[0]
    if method == "dpo":  # no noise, B = 0 at step 1: policy = reference, loss = log 2
        assert first["loss"] == pytest.approx(LOG2, abs=1e-5)
        assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    elif method == "sdpo":  # K = 3 rejected: loss = log(1 + K)
        assert first["loss"] == pytest.approx(math.log(4.0), abs=1e-5)
    else:  # LoRA noise makes h != 0 at step 1
        assert abs(first["loss"] - LOG2) > 1e-4
    for r in records:
        if method == "hano_dpo":
            assert r["noise/sigma"] == 0.05
            assert r["hardness/beta_mean"] == pytest.approx(
                0.1 * r["hardness/eta"] * r["hardness/lambda_mean"], rel=1e-5
            )
            assert r["hardness/lambda_mean"] != 1.0  # lambdas from pair_hardness, not the default
        else:
            assert r["noise/sigma"] == 0.0
            assert r["hardness/eta"] == 1.0 and r["hardness/lambda_mean"] == 1.0
            assert r["hardness/beta_mean"] == pytest.approx(0.1)
    if method == "hano_dpo":
        assert any(r["hardness/eta"] != pytest.approx(1.0, abs=1e-4) for r in records)
        batch_means = [sum(x.hardness_lambda for x in batch) / BATCH for batch in _all_batches(items)]
        for r in records:  # the mean lambda of the batch the step trained on
            assert min(abs(r["hardness/lambda_mean"] - m) for m in batch_means) < 1e-6

    # the reference is still the SFT model after training (the base weights are frozen)
    prompts, comps = _encode(bundle, ds, items[:BATCH])
    sft_bundle = sft[1]
    expected, _ = multi_completion_logps(sft_bundle.model, sft_bundle, prompts, comps)
    ref = reference_logps(bundle.model, bundle, prompts, comps, "shared_prefix")
    assert_close(ref, torch.stack(expected).detach(), atol=1e-4, rtol=1e-5)


def _all_batches(items):
    """Every batch the seeded epoch order can make (the loop permutes the items per epoch)."""
    from hanorec.train.loop import epoch_order

    order = epoch_order(len(items), 0, 0)
    return [[items[i] for i in order[s : s + BATCH]] for s in range(0, len(items), BATCH)]


def test_precompute_ref_training_matches_on_the_fly(runs, merged, ds, items, tmp_path):
    """Same seed, same data: precomputed reference log-probs give the same steps as on-the-fly ones."""
    bundle_a, _, _, _, rec_a = runs("dpo")
    bundle_b, _, _, _, rec_b = run(merged, ds, items, tmp_path, precompute_ref=True, **METHODS["dpo"])
    for ra, rb in zip(rec_a, rec_b):
        for k in METRIC_KEYS:
            assert rb[k] == pytest.approx(ra[k], abs=1e-5), k
    a, b = trainable_state(bundle_a.model), trainable_state(bundle_b.model)
    for n in a:
        assert_close(b[n], a[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("target", ["logits", "none"])
def test_noise_targets_run(merged, ds, items, tmp_path, target):
    """HaNo-DPO, one step: logit noise makes h != 0 at step 1 (loss != log 2), no noise gives log 2."""
    _, before, _, result, records = run(
        merged, ds, items[:BATCH], tmp_path, method="hano_dpo", noise_target=target, noise_sigma=0.5,
        max_steps=1,
    )  # fmt: skip
    assert result.global_step == 1
    (r,) = records
    assert all(math.isfinite(r[k]) for k in METRIC_KEYS)
    if target == "logits":
        assert r["noise/sigma"] == 0.5
        assert abs(r["loss"] - LOG2) > 1e-4
    else:
        assert r["noise/sigma"] == 0.0
        assert r["loss"] == pytest.approx(LOG2, abs=1e-5)
        assert r["hardness/eta"] == pytest.approx(1.0)  # h = 0 for all: u_n = 0 / 1e-8 -> eta = 1


def test_relative_noise_scale_reaches_the_lora_noise(merged, ds, items, tmp_path, monkeypatch):
    """pref.noise_scale (an extension beyond the paper) is what training's LoRANoise draws with."""
    import hanorec.train.preference as P

    made = []

    class Recording(P.LoRANoise):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(P, "LoRANoise", Recording)
    *_, result, (r,) = run(merged, ds, items[:BATCH], tmp_path, method="hano_dpo", noise_target="lora",
                           noise_sigma=0.5, noise_scale="relative", max_steps=1)  # fmt: skip
    assert [n.scale for n in made] == ["relative"] and made[0].sigma == 0.5
    assert result.global_step == 1 and math.isfinite(r["loss"])


def test_nan_loss_stops_with_the_last_good_checkpoint(merged, ds, items, tmp_path, monkeypatch):
    """Step 1 trains and is checkpointed, the loss of step 2 is NaN: TrainingDiverged names step 2
    and the step-1 checkpoint, which is complete and holds the weights the model still has."""
    real = L.dpo_loss
    calls = []

    def nan_from_second_call(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        return dataclasses.replace(out, losses=out.losses * float("nan")) if len(calls) >= 2 else out

    monkeypatch.setattr(L, "dpo_loss", nan_from_second_call)
    cfg = make_cfg(tmp_path, method="dpo", noise_target="none", max_steps=3, save_every=1)
    bundle = copy.deepcopy(merged)
    with pytest.raises(TrainingDiverged) as err:
        train_preference(cfg, bundle, ds, items, tmp_path, resume=False)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step-000001"
    msg = str(err.value)
    assert "step 2" in msg and str(ckpt) in msg, msg
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt", "config.yaml", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 1
    saved = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    current = get_peft_model_state_dict(bundle.model)
    assert saved.keys() == current.keys()
    assert all(torch.equal(saved[k], current[k]) for k in saved)  # step 2 never updated the weights
    assert not all(torch.equal(v, torch.zeros_like(v)) for k, v in saved.items() if "lora_B" in k)
    assert len(read_metrics(tmp_path)) == 1


# ------------------------------------------------------------------------------------------------
# The documented pipeline: run_sft -> run_preference (build_preference_items, pair_hardness)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["random", "embedding"])
def test_run_preference_pipeline(tmp_path, sampling):
    from hanorec.pipeline import prepare_data, run_preference, run_sft

    cfg = load_config(
        overrides={
            "seed": 0,
            "output_dir": str(tmp_path),
            "model": {"name": "tiny-llava", "tiny_hidden_size": 64, "tiny_vocab_size": 400},
            "lora": {"r": 4, "alpha": 8},
            "task": {"name": "hit3", "max_train_examples": 2 * BATCH, "max_eval_examples": 2},
            "sft": {"max_steps": 1, "batch_size": BATCH, "grad_accum": 1, "progress_bar": False},
            "pref": {
                "method": "hano_dpo",
                "max_steps": 1,
                "batch_size": BATCH,
                "grad_accum": 1,
                "log_every": 1,
                "progress_bar": False,
                "negative_sampling": sampling,
            },
        }
    )
    data = prepare_data(cfg)
    run_sft(cfg, data)
    bundle, result = run_preference(cfg, data)
    assert result.global_step == 1
    (r,) = read_metrics(tmp_path / "hano_dpo")
    assert all(math.isfinite(r[k]) for k in METRIC_KEYS)
    (cached,) = (tmp_path / "hardness_cache").glob("*.safetensors")
    lam = load_file(str(cached))["lambda"]
    assert lam.shape == (2 * BATCH,) and not torch.allclose(lam, torch.ones_like(lam), atol=1e-6, rtol=0)
    assert "sft_checkpoint" in bundle.meta


@pytest.mark.parametrize("scoring", ["shared_prefix", "naive"])
def test_nodo_draw_is_shared_by_the_micro_batch_or_per_example(merged, ds, items, tmp_path, monkeypatch, scoring):
    """The same pair twice in one micro-batch: with noise_draw=micro_batch both copies see one perturbation
    (identical policy log-probs), with noise_draw=example each copy gets its own (different log-probs);
    in both, an example's chosen and rejected rows share their draw (checked by the hooks' group ids)."""
    from accelerate import Accelerator

    from hanorec.train import preference as P

    captured = []
    real = P.multi_completion_logps

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        captured.append(torch.stack(out[0]).detach())
        return out

    monkeypatch.setattr(P, "multi_completion_logps", spy)
    groups_seen = []
    real_active = LoRANoise.active

    def active_spy(self, group_ids=None, *a, **k):
        groups_seen.append(None if group_ids is None else group_ids.tolist())
        return real_active(self, group_ids, *a, **k)

    monkeypatch.setattr(LoRANoise, "active", active_spy)
    bundle = copy.deepcopy(merged)
    bundle.model.train()
    for m in bundle.model.modules():  # LoRA dropout would make the two copies differ by itself
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = make_pref_collate(bundle, ds)([items[0], items[0]])
    k1 = len(batch["completions"][0])  # chosen + rejected rows of one example
    for draw, same in (("micro_batch", True), ("example", False)):
        cfg = make_cfg(tmp_path, method="hano_dpo", noise_target="lora", noise_sigma=0.2, noise_draw=draw, scoring=scoring)
        loss_fn = P.make_pref_loss(cfg, bundle, Accelerator(cpu=True), LoRANoise(bundle.model, 0.2))
        captured.clear(), groups_seen.clear()
        loss_fn(bundle.model, batch)
        policy = captured[-1]  # (2, 1+K): the reference is scored first, without noise
        assert torch.equal(policy[0], policy[1]) is same, draw
        if draw == "micro_batch":
            assert groups_seen == [None]
        else:
            expected = [0, 1] if scoring == "shared_prefix" else [0] * k1 + [1] * k1
            assert groups_seen == [expected]


def test_short_micro_batches_are_dropped_and_refused(merged, ds, items, tmp_path, monkeypatch):
    """As the authors' trainer: preference training drops each epoch's last partial micro-batch (so eta's
    trimmed mean always has the full batch), the plan says so, and HaNo-DPO refuses a micro-batch under 3."""
    from hanorec.config import ConfigError
    from hanorec.train import preference as P
    from hanorec.train.loop import plan_steps

    cfg = make_cfg(tmp_path, method="hano_dpo", max_steps=None, epochs=1)
    plan = plan_steps(7, cfg.pref, 1, drop_last=True)
    assert (plan.micro_per_epoch, plan.steps_per_epoch, plan.dropped_per_epoch) == (2, 2, 1)
    assert "last partial micro-batch" in plan.describe("hano_dpo")
    assert plan_steps(7, cfg.pref, 1).micro_per_epoch == 3  # SFT keeps it
    sizes = []
    real = P.make_pref_collate

    def spy_collate(bundle, ds_):
        collate = real(bundle, ds_)

        def wrapped(batch_items):
            sizes.append(len(batch_items))
            return collate(batch_items)

        return wrapped

    monkeypatch.setattr(P, "make_pref_collate", spy_collate)
    result = P.train_preference(cfg, copy.deepcopy(merged), ds, items[:7], tmp_path / "run", resume=False)
    assert result.global_step == 2 and sizes == [3, 3]
    with pytest.raises(ConfigError, match="at least 3 pairs"):
        make_cfg(tmp_path, method="hano_dpo", batch_size=2)
    make_cfg(tmp_path, method="hano_dpo", batch_size=2, responsiveness=False)  # no trimmed mean: allowed
    make_cfg(tmp_path, method="dpo", noise_target="none", batch_size=2)


# ------------------------------------------------------------------------------------------------
# The KL to the reference and held-out pair accuracy (kl/reference, eval/pair_accuracy)
# ------------------------------------------------------------------------------------------------
def test_completion_kl_by_hand():
    """Policy 3:1 over (chosen, rejected), reference 1:1: KL = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.130812; adding a
    constant to a prompt's completions changes nothing (renormalised); equal models give exactly 0."""
    from hanorec.train.preference import completion_kl

    pol = torch.tensor([[math.log(0.75), math.log(0.25)], [-3.0, -5.0]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.5), math.log(0.5)], [-3.0, -5.0]], dtype=torch.float64)
    kl = completion_kl(pol, ref)
    assert kl[0].item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-12)
    assert kl[0].item() == pytest.approx(0.130812, abs=1e-6)
    assert kl[1].item() == 0.0
    assert completion_kl(pol - 7.0, ref + 2.0)[0].item() == pytest.approx(kl[0].item(), abs=1e-12)


def test_pair_accuracy_by_hand():
    """Log-ratio margins +2, -1, 0 (a tie, half right): accuracy 0.5; S-DPO rows compare every rejected."""
    from hanorec.train.preference import pair_accuracy

    ref = torch.zeros(3, 2)
    pol = torch.tensor([[-1.0, -3.0], [-2.0, -1.0], [-4.0, -4.0]])
    acc, kl = pair_accuracy(pol, ref)
    assert acc == 0.5 and kl > 0
    assert pair_accuracy(ref, ref) == (0.5, 0.0)  # the policy at step 0 is the reference
    acc2, _ = pair_accuracy(torch.tensor([[-1.0, -2.0, 0.0, -3.0]]), torch.zeros(1, 4))
    assert acc2 == pytest.approx(2 / 3)  # chosen beats 2 of its 3 rejected completions


def test_step_metrics_log_the_kl_only_when_there_is_a_reference():
    from hanorec import logkeys as K
    from hanorec.methods.base import LossOutput
    from hanorec.train.preference import step_metrics

    out = LossOutput(losses=torch.zeros(2), chosen_rewards=torch.tensor([0.2, 0.0]),
                     rejected_rewards=torch.tensor([0.1, 0.3]), beta=torch.full((2,), 0.1))  # fmt: skip
    pol_c, pol_r = torch.tensor([-1.0, -2.0]), torch.tensor([[-3.0], [-1.0]])
    with_kl = step_metrics(out, pol_c, pol_r, None, 0.0, kl=0.25)
    assert with_kl[K.KL_REFERENCE] == 0.25 and with_kl[K.REWARD_ACCURACY] == 0.5
    assert K.KL_REFERENCE not in step_metrics(out, pol_c, pol_r, None, 0.0)
    assert K.KL_REFERENCE == "kl/reference" and K.EVAL_PAIR_ACCURACY == "eval/pair_accuracy"


def _eval_run(merged, ds, items, out_dir, steps, should_stop=None, **pref):
    cfg = make_cfg(out_dir, max_steps=steps, eval_every=2, **METHODS["dpo"], **pref)
    bundle = copy.deepcopy(merged)
    result = train_preference(cfg, bundle, ds, items, out_dir, resume=True, should_stop=should_stop,
                              eval_items=items[:4])  # fmt: skip
    return bundle, result, read_metrics(out_dir)


def test_held_out_pairs_logged_at_step_0_every_n_steps_and_the_end(merged, ds, items, tmp_path):
    """DPO without noise: at step 0 and step 1 the policy is the reference, so eval/pair_accuracy = 0.5 and
    both KLs are 0; later rows are rows of their own at steps 2, 4 and the last (5)."""
    from hanorec import logkeys as K

    _, result, rows = _eval_run(merged, ds, items, tmp_path, steps=5)
    assert result.global_step == 5
    evals = [r for r in rows if K.EVAL_PAIR_ACCURACY in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    assert evals[0][K.EVAL_PAIR_ACCURACY] == 0.5 and evals[0][K.EVAL_KL_REFERENCE] == 0.0
    assert all(0.0 <= r[K.EVAL_PAIR_ACCURACY] <= 1.0 and r[K.EVAL_KL_REFERENCE] >= 0 for r in evals)
    assert any(r[K.EVAL_KL_REFERENCE] > 0 for r in evals[1:])  # training moved the policy off the reference
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert steps[0][K.KL_REFERENCE] == pytest.approx(0.0, abs=1e-9)
    assert all(r[K.KL_REFERENCE] >= 0 for r in steps) and any(r[K.KL_REFERENCE] > 0 for r in steps[1:])
    assert not any(K.EVAL_PAIR_ACCURACY in r for r in steps)


def test_held_out_evaluation_keeps_training_and_resume_bit_identical(merged, ds, items, tmp_path):
    """The same weights and logged values (i) with and without held-out evaluation, and (ii) uninterrupted or
    stopped at step 3 and resumed; the eval rows are logged once each."""
    from hanorec import logkeys as K

    def same(rows_a, rows_b, keys):
        strip = [[{k: r[k] for k in keys if k in r} for r in rows] for rows in (rows_a, rows_b)]
        assert strip[0] == strip[1]

    plain_cfg = make_cfg(tmp_path / "plain", max_steps=5, **METHODS["dpo"])
    plain = copy.deepcopy(merged)
    train_preference(plain_cfg, plain, ds, items, tmp_path / "plain", resume=False)
    a, _, rows_a = _eval_run(merged, ds, items, tmp_path / "a", steps=5)
    wa, wp = trainable_state(a.model), trainable_state(plain.model)
    assert all(torch.equal(wa[n], wp[n]) for n in wa)
    same([r for r in rows_a if "loss" in r], read_metrics(tmp_path / "plain"), ("step", "loss", "lr"))

    _, stopped, _ = _eval_run(merged, ds, items, tmp_path / "b", steps=5, should_stop=lambda: True)
    assert stopped.global_step == 1 and stopped.stopped_early
    b, result, rows_b = _eval_run(merged, ds, items, tmp_path / "b", steps=5)
    assert result.global_step == 5
    wb = trainable_state(b.model)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    keys = ("step", "loss", "lr", K.KL_REFERENCE, K.EVAL_PAIR_ACCURACY, K.EVAL_KL_REFERENCE, *METRIC_KEYS)
    same(rows_a, rows_b, keys)
