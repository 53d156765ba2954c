"""The frozen vision tower runs once per preference step, and nothing else changes.

hanorec.scoring.pack_shared_prefix packs a step's prompts and completions once and, the vision tower and
projector being frozen (LoRA is on the language model only), passes their image features to the reference
forward (adapter disabled) and the policy forward (NoDO LoRA noise) instead of the pixels. Training runs
must come back bit for bit, so everything here is torch.equal in fp32, not allclose: the log-probs of
both forwards with and without LoRA noise, the trainer's loss, its logged metrics and the gradients, for
every tiny family (M-RoPE positions, DeepStack features, bidirectional image attention included). The old path is the same code with packing
per forward (pack_shared_prefix returning None).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from hanorec import scoring
from hanorec.config import LoraConfig, load_config
from hanorec.data import load_dataset, make_splits
from hanorec.models import TINY_PRESETS, add_lora, build_tiny
from hanorec.noise import LoRANoise
from hanorec.pairs import build_pairs
from hanorec.scoring import multi_completion_logps, pack_shared_prefix, vision_is_frozen
from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text
from hanorec.train import preference as P

PRESETS = TINY_PRESETS  # every family


@pytest.fixture(scope="module")
def demo():
    ds = load_dataset("assets/demo")
    shape = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=shape["n_history"], n_target=shape["n_target"])
    return ds, build_examples("hit3", splits.train, ds, seed=0, shuffle=True, max_examples=3)


@pytest.fixture(scope="module")
def bundles(demo):
    ds, _ = demo
    out = {}
    for preset in PRESETS:
        b = build_tiny(preset, corpus_text(ds), hidden_size=64, seed=0)
        add_lora(b, LoraConfig(r=4, alpha=8, dropout=0.05), seed=0)  # dropout on: the RNG stream must match too
        with torch.no_grad():  # a trained-looking adapter, so the policy differs from the reference
            g = torch.Generator().manual_seed(1)
            for name, p in b.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        b.model.float().train()
        out[preset] = b
    return out


def _batch(bundle, demo, k):
    ds, examples = demo
    pairs = build_pairs(examples, ds, seed=0, k_negatives=k)
    return P.make_pref_collate(bundle, ds)([P.PrefItem(p, 1.0 + 0.01 * i) for i, p in enumerate(pairs)])


def _vision_calls(bundle, preset):
    """A counter of the vision tower's forwards (a list that grows by one per call) and its hook handle."""
    calls = []
    module = dict(bundle.model.named_modules())[f"base_model.model.model.{bundle.adapter.vision_modules[0]}"]
    return calls, module.register_forward_hook(lambda *a: calls.append(1))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_reference_and_policy_logps_are_bit_identical(bundles, demo, preset, sigma):
    b = bundles[preset]
    batch = _batch(b, demo, k=3)
    prompts, comps = batch["prompts"], batch["completions"]
    noise = LoRANoise(b.model, sigma)
    out = {}
    calls, handle = _vision_calls(b, preset)
    try:
        for way in ("per_forward", "once"):
            torch.manual_seed(7)  # LoRA dropout and the noise draw come from the global RNG in both ways
            calls.clear()
            packed = pack_shared_prefix(b.model, b, prompts, comps) if way == "once" else None
            assert (packed is not None) == (way == "once")
            ref = P.reference_logps(b.model, b, prompts, comps, "shared_prefix", packed=packed)
            with noise.active():
                pol, counts = multi_completion_logps(b.model, b, prompts, comps, packed=packed)
            pol = torch.stack(pol)
            pol.sum().backward()
            grads = {n: p.grad.clone() for n, p in b.model.named_parameters() if p.grad is not None}
            b.model.zero_grad(set_to_none=True)
            out[way] = (ref, pol.detach(), torch.stack(counts), grads, len(calls))
    finally:
        handle.remove()
    (ref0, pol0, n0, g0, calls0), (ref1, pol1, n1, g1, calls1) = out["per_forward"], out["once"]
    assert (calls0, calls1) == (2, 1)  # the vision tower ran in both forwards before, once now
    assert torch.equal(ref0, ref1) and torch.equal(pol0, pol1) and torch.equal(n0, n1)
    assert not torch.equal(ref0, pol0)  # the adapter (and the noise) make the policy differ
    assert g0.keys() == g1.keys() and g0
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(
    "pref",
    [
        {"method": "hano_dpo", "noise_target": "lora", "noise_sigma": 0.1},
        {"method": "sdpo", "k_negatives": 3, "noise_target": "lora", "noise_sigma": 0.1, "noise_draw": "example"},
        {"method": "dpo", "noise_target": "none"},
    ],
    ids=["hano_dpo", "sdpo_k3", "dpo"],
)
def test_trainer_step_is_bit_identical(bundles, demo, preset, pref, monkeypatch):
    """make_pref_loss (the trainer's step) before and after: the same loss, metrics and gradients."""
    b = bundles[preset]
    cfg = load_config(overrides={"pref": {"batch_size": 3, **pref}})
    batch = _batch(b, demo, k=cfg.pref.k_negatives)
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t)
    noise = LoRANoise(b.model, cfg.pref.noise_sigma) if cfg.pref.noise_target == "lora" else None
    out = {}
    calls, handle = _vision_calls(b, preset)
    try:
        for way in ("per_forward", "once"):
            with monkeypatch.context() as m:
                if way == "per_forward":
                    m.setattr(P, "pack_shared_prefix", lambda *a, **k: None)
                torch.manual_seed(11)
                calls.clear()
                loss, metrics = P.make_pref_loss(cfg, b, acc, noise)(b.model, batch)
                loss.backward()
            grads = {n: p.grad.clone() for n, p in b.model.named_parameters() if p.grad is not None}
            b.model.zero_grad(set_to_none=True)
            out[way] = (loss.detach(), metrics, grads, len(calls))
    finally:
        handle.remove()
    (l0, m0, g0, c0), (l1, m1, g1, c1) = out["per_forward"], out["once"]
    assert (c0, c1) == (2, 1)
    assert torch.equal(l0, l1) and m0 == m1
    assert g0.keys() == g1.keys() and g0 and all(torch.equal(g0[n], g1[n]) for n in g0)


def test_vision_is_frozen_only_when_nothing_there_trains(bundles, demo):
    b = bundles["tiny-llava"]
    assert vision_is_frozen(b.model)
    proj = b.model.base_model.model.model.multi_modal_projector
    proj.linear_1.weight.requires_grad_(True)
    try:
        assert not vision_is_frozen(b.model)  # a trained projector: features differ between forwards
    finally:
        proj.linear_1.weight.requires_grad_(False)
    plain = build_tiny("tiny-llava", corpus_text(demo[0]), hidden_size=64, seed=0)
    cfg = LoraConfig(r=4, alpha=8, modules_to_save=["multi_modal_projector"])
    add_lora(plain, cfg)
    assert not vision_is_frozen(plain.model)  # the adapter's own projector copy: the reference differs
    batch = _batch(plain, demo, k=1)
    packed = pack_shared_prefix(plain.model, plain, batch["prompts"], batch["completions"])
    assert "pixel_values" in packed["inputs"] and "mm_encoder_outputs" not in packed["inputs"]


def test_falls_back_where_packing_cannot_be_used(bundles, demo, monkeypatch):
    b = copy.copy(bundles["tiny-qwen2.5-vl"])
    batch = _batch(b, demo, k=1)
    with pytest.raises(ValueError, match="shared_prefix"):
        multi_completion_logps(b.model, b, batch["prompts"], batch["completions"], mode="naive", packed={})
    assert pack_shared_prefix(b.model, b, batch["prompts"], [[] for _ in batch["prompts"]]) is None
    monkeypatch.setattr(scoring, "_attn_implementation", lambda model: "flash_attention_2")
    assert pack_shared_prefix(b.model, b, batch["prompts"], batch["completions"]) is None
