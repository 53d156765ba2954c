"""pref.nodo_backward: what the backward pass of a NoDO step sees (method.md section 8).

- noisy (ours): the gradient of the noisy forward itself, through (B + eps_B)(A + eps_A).
- clean (the authors' run): their noise hooks are gone when LLaMA-Factory's reentrant gradient checkpointing
  re-runs each decoder layer in backward, so every layer is back-propagated as if it had no noise, at the
  layer inputs the noisy forward produced.

The clean definition is checked against an independent construction that needs no checkpointing: each decoder
layer returns clean + (noisy - clean).detach(), i.e. the noisy value with the noise-free layer's Jacobian.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from hanorec.config import LoraConfig, load_config
from hanorec.models import add_lora, build_tiny
from hanorec.noise import LoRADraw, LoRANoise
from hanorec.pairs import build_pairs
from hanorec.tasks import corpus_text
from hanorec.train import preference as P
from hanorec.train.loop import nodo_clean_backward

PRESETS = ("tiny-qwen2.5-vl", "tiny-llava")


@pytest.fixture(scope="module")
def demo(demo_hit3_train):
    return demo_hit3_train


def _bundle(ds, preset, b_scale: float):
    """A tiny model with a LoRA adapter whose B factors are b_scale x N(0, 1) (0: a fresh stage-2 adapter)."""
    b = build_tiny(preset, corpus_text(ds), hidden_size=64, seed=0)
    add_lora(b, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in b.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_scale)
    b.model.float().train()
    return b


def _cfg(backward: str):
    """DPO with LoRA noise, back-propagated as `backward` ("none": the same step without noise)."""
    noise = {"noise_target": "none"} if backward == "none" else {"noise_target": "lora", "nodo_backward": backward}
    return load_config(overrides={"pref": {"method": "dpo", "noise_sigma": 0.2, **noise}})


def _step(b, ds, examples, backward: str):
    """One preference step (forward in loss_fn, backward outside it, as the training loop does)."""
    cfg = _cfg(backward)
    batch = P.make_pref_collate(b, ds)([P.PrefItem(p) for p in build_pairs(examples, ds, seed=0)])
    noise = None if backward == "none" else LoRANoise(b.model, cfg.pref.noise_sigma)
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t)
    loss_fn = P.make_pref_loss(cfg, b, acc, noise)
    b.model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    loss, _ = loss_fn(b.model, batch)
    if backward == "clean":
        assert not noise._is_active  # the hooks are gone before backward, as the authors' context manager
    loss.backward()
    grads = {n: p.grad.clone() for n, p in b.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, noise


def _lora_grads(grads, factor):
    return {n: g for n, g in grads.items() if f"lora_{factor}" in n}


def _reentrant(b):
    b.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    b.model.enable_input_require_grads()


def test_clean_backward_needs_lora_noise_and_is_what_the_loop_checkpoints():
    assert nodo_clean_backward(_cfg("clean").pref) and not nodo_clean_backward(_cfg("noisy").pref)
    off = load_config(overrides={"pref": {"nodo_backward": "clean", "noise_target": "none"}})
    assert not nodo_clean_backward(off.pref)
    with pytest.raises(ValueError, match="nodo_backward"):
        load_config(overrides={"pref": {"nodo_backward": "clean", "noise_target": "logits"}})


@pytest.mark.parametrize("preset", PRESETS)
def test_at_b_zero_a_learns_only_through_the_noise_under_noisy(demo, preset):
    """The issue's step-0 case: a fresh stage-2 adapter has B = 0, so dL/dA = s B^T (...) = 0 without noise.
    noisy: A gets a gradient through eps_B; clean: none at all, and B's gradient is there in both."""
    ds, examples = demo
    b = _bundle(ds, preset, b_scale=0.0)
    _, noisy, _ = _step(b, ds, examples, "noisy")
    assert max(g.abs().max().item() for g in _lora_grads(noisy, "A").values()) > 0
    _reentrant(b)
    _, clean, _ = _step(b, ds, examples, "clean")
    assert _lora_grads(clean, "A") and all(torch.count_nonzero(g) == 0 for g in _lora_grads(clean, "A").values())
    assert max(g.abs().max().item() for g in _lora_grads(clean, "B").values()) > 0


def _straight_through_layers(model, noise: LoRANoise):
    """Make every decoder layer return clean + (noisy - clean).detach(): the noisy forward's value, the
    noise-free layer's gradient at the same input (the definition of the authors' backward)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert layers

    def wrap(layer):
        forward = layer.forward

        def st_forward(*args, **kwargs):
            if not noise._is_active:
                return forward(*args, **kwargs)
            draws = noise.last_draws
            noise.last_draws = {
                k: LoRADraw(torch.zeros_like(d.eps_A), torch.zeros_like(d.eps_B)) for k, d in draws.items()
            }
            try:
                clean = forward(*args, **kwargs)
            finally:
                noise.last_draws = draws
            with torch.no_grad():
                noisy = forward(*args, **kwargs)
            if isinstance(clean, torch.Tensor):
                return clean + (noisy - clean).detach()
            return (clean[0] + (noisy[0] - clean[0]).detach(), *clean[1:])

        layer.forward = st_forward

    for layer in layers:
        wrap(layer)
    return layers


@pytest.mark.parametrize("preset", PRESETS)
def test_clean_backward_is_the_noise_free_layer_gradient_at_the_noisy_inputs(demo, preset):
    ds, examples = demo
    b = _bundle(ds, preset, b_scale=0.05)
    _, noisy, _ = _step(b, ds, examples, "noisy")

    # the reference: no checkpointing, each layer straight-through (noise drawn up front, as clean does)
    cfg = _cfg("clean")
    batch = P.make_pref_collate(b, ds)([P.PrefItem(p) for p in build_pairs(examples, ds, seed=0)])
    noise = LoRANoise(b.model, cfg.pref.noise_sigma)
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t)
    layers = _straight_through_layers(b.model, noise)
    loss_fn = P.make_pref_loss(cfg, b, acc, noise)
    b.model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    ref_loss, _ = loss_fn(b.model, batch)
    ref_loss.backward()
    reference = {n: p.grad.clone() for n, p in b.model.named_parameters() if p.grad is not None}
    for layer in layers:
        del layer.forward  # back to the class's forward

    _reentrant(b)
    loss, clean, _ = _step(b, ds, examples, "clean")
    assert_close(loss, ref_loss)
    assert clean.keys() == reference.keys()
    for n in reference:
        assert_close(clean[n], reference[n], rtol=1e-4, atol=1e-7, msg=n)
    # and it is a different gradient from ours
    diff = max((clean[n] - noisy[n]).abs().max().item() for n in _lora_grads(noisy, "A"))
    assert diff > 1e-3  # about 0.2 on these tiny models, against float32 noise of 1e-5


def test_eager_draws_are_made_on_entry_and_reused(demo):
    ds, _ = demo
    b = _bundle(ds, "tiny-qwen2.5-vl", b_scale=0.05)
    noise = LoRANoise(b.model, 0.1)
    torch.manual_seed(3)
    with noise.active(eager=True):
        assert len(noise.last_draws) == len(noise.pairs)  # before any forward
        first = {k: d.eps_A.clone() for k, d in noise.last_draws.items()}
    torch.manual_seed(3)
    with noise.active(eager=True):
        assert all(torch.equal(first[k], d.eps_A) for k, d in noise.last_draws.items())


@pytest.mark.parametrize("preset", PRESETS)
def test_noisy_backward_is_the_gradient_at_the_perturbed_factors(demo, preset):
    """noisy: d loss / d A equals the gradient of a noise-free model whose factors are A + eps_A and B + eps_B
    (the draws of the step), taken at those perturbed factors."""
    ds, examples = demo
    b = _bundle(ds, preset, b_scale=0.05)
    _, noisy, noise = _step(b, ds, examples, "noisy")
    draws = noise.last_draws
    assert draws
    with torch.no_grad():
        for pair in noise.pairs:
            d = draws[(pair.name, pair.adapter)]
            pair.lora_A.weight += d.eps_A[0]
            pair.lora_B.weight += d.eps_B[0]
    _, shifted, _ = _step(b, ds, examples, "none")
    for n in _lora_grads(noisy, "A") | _lora_grads(noisy, "B"):
        assert_close(noisy[n], shifted[n], rtol=1e-3, atol=1e-5, msg=n)  # float32 sums in another order
