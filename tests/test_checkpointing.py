"""Gradient checkpointing under NoDO LoRA noise gives the gradients of a run without it.

With checkpointing, backward re-runs each decoder layer's forward. The preference step keeps its NoDO
context open until its backward has finished (hanorec.train.preference._close_after_backward), so the
re-run sees the step's noise draw, and LoRANoise replays its draws from the global RNG there, so LoRA
dropout gets its original masks too. Checked on the trainer's own step (make_pref_loss, backward outside
it as in the training loop) for both tiny families, LoRA dropout on, and through train_preference with
pref.gradient_checkpointing.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from hanorec.config import LoraConfig, load_config
from hanorec.data import load_dataset, make_splits
from hanorec.models import TINY_PRESETS, add_lora, build_tiny
from hanorec.noise import LoRANoise
from hanorec.pairs import build_pairs
from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text
from hanorec.train import preference as P

PRESETS = TINY_PRESETS  # every family


@pytest.fixture(scope="module")
def demo():
    ds = load_dataset("assets/demo")
    shape = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=shape["n_history"], n_target=shape["n_target"])
    return ds, build_examples("hit3", splits.train, ds, seed=0, shuffle=True, max_examples=6)


def _bundle(ds, preset):
    b = build_tiny(preset, corpus_text(ds), hidden_size=64, seed=0)
    add_lora(b, LoraConfig(r=4, alpha=8, dropout=0.1), seed=0)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so the noise on A reaches the output
        g = torch.Generator().manual_seed(1)
        for name, p in b.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    b.model.float().train()
    return b


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("scoring", ["shared_prefix", "naive"])
def test_checkpointed_step_has_the_same_gradients_under_lora_noise(demo, preset, scoring):
    ds, examples = demo
    b = _bundle(ds, preset)
    cfg = load_config(
        overrides={"pref": {"method": "hano_dpo", "batch_size": 3, "noise_target": "lora", "noise_sigma": 0.2,
                            "scoring": scoring}}
    )  # fmt: skip
    batch = P.make_pref_collate(b, ds)([P.PrefItem(p) for p in build_pairs(examples[:3], ds, seed=0)])
    noise = LoRANoise(b.model, cfg.pref.noise_sigma)
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t)
    out = {}
    for checkpointing in (False, True):
        if checkpointing:
            b.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss_fn = P.make_pref_loss(cfg, b, acc, noise)
        torch.manual_seed(5)
        loss, _ = loss_fn(b.model, batch)
        assert noise._is_active  # open until backward ...
        loss.backward()
        assert not noise._is_active and not noise._hooks  # ... and closed by it
        out[checkpointing] = (loss.detach(), _grads(b.model))
        b.model.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = out[False], out[True]
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    # the noise matters here: a clean step's gradients differ clearly
    clean = P.make_pref_loss(load_config(overrides={"pref": {"batch_size": 3, "noise_target": "none"}}), b, acc, None)
    torch.manual_seed(5)
    clean(b.model, batch)[0].backward()
    assert max((g0[n] - p.grad).abs().max().item() for n, p in b.model.named_parameters() if n in g0) > 1e-4


def test_a_step_without_backward_does_not_leave_the_noise_on(demo):
    ds, examples = demo
    b = _bundle(ds, "tiny-llava")
    cfg = load_config(overrides={"pref": {"method": "dpo", "batch_size": 3, "noise_sigma": 0.2}})
    batch = P.make_pref_collate(b, ds)([P.PrefItem(p) for p in build_pairs(examples[:3], ds, seed=0)])
    noise = LoRANoise(b.model, 0.2)
    loss_fn = P.make_pref_loss(cfg, b, SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t), noise)
    loss_fn(b.model, batch)  # e.g. a non-finite loss: the loop stops before backward
    assert noise._is_active
    loss, _ = loss_fn(b.model, batch)  # the next step closes it first, then opens its own
    loss.backward()
    loss_fn(b.model, batch)
    loss_fn.close_noise()
    assert not noise._is_active and not noise._hooks
    with torch.no_grad():  # no graph, no backward to wait for
        loss_fn(b.model, batch)
    assert not noise._is_active


def test_train_preference_with_gradient_checkpointing(demo, tmp_path):
    """Two optimizer steps of HaNo-DPO with NoDO, with and without pref.gradient_checkpointing: the same losses
    and LoRA weights (fp32 rounding)."""
    ds, examples = demo
    items = [P.PrefItem(p, 1.0) for p in build_pairs(examples, ds, seed=0)]
    base = _bundle(ds, "tiny-llava")
    runs = {}
    for checkpointing in (False, True):
        cfg = load_config(
            overrides={
                "seed": 0,
                "pref": {"max_steps": 2, "batch_size": 3, "grad_accum": 1, "lr": 1e-3, "log_every": 1,
                         "save_every_minutes": 0, "progress_bar": False, "noise_sigma": 0.2,
                         "gradient_checkpointing": checkpointing,
                         "disable_dropout": False},  # LoRA dropout on: its masks must be replayed too
            }
        )  # fmt: skip
        b = copy.deepcopy(base)
        torch.manual_seed(0)
        result = P.train_preference(cfg, b, ds, items, tmp_path / str(checkpointing), resume=False)
        assert b.model.base_model.model.model.language_model.gradient_checkpointing == checkpointing
        weights = {n: p.detach().clone() for n, p in b.model.named_parameters() if p.requires_grad}
        runs[checkpointing] = ([r["loss"] for r in result.history], weights)
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for n, w in runs[False][1].items():
        assert_close(runs[True][1][n], w, rtol=1e-4, atol=1e-6, msg=n)
    assert any(not torch.equal(w, base_w) for (n, w), base_w in zip(runs[False][1].items(), [
        p for p in base.model.parameters() if p.requires_grad]))  # fmt: skip
