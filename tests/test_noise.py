"""Tests of hanorec.noise (NoDO) on a tiny Llama with LoRA built from config, nothing downloaded."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from hanorec.noise import NOISE_TARGETS, LoRANoise, add_logit_noise

SIGMA = 0.1


def tiny_lora_llama(**lora_kwargs):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    base = LlamaForCausalLM(config)
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    lora.update(lora_kwargs)
    model = get_peft_model(base, LoraConfig(**lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)  # peft initialises B to 0; make the adapter matter
    model.train()
    return model


@pytest.fixture
def model():
    return tiny_lora_llama()


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    return model(input_ids=ids).logits


def lora_hooks(noise):
    return [len(p.lora_A._forward_hooks) + len(p.lora_B._forward_hooks) for p in noise.pairs]


def test_noise_targets_and_layers_found(model):
    assert NOISE_TARGETS == ("lora", "logits", "none")
    noise = LoRANoise(model, SIGMA)
    assert len(noise.pairs) == 4  # 2 layers x (q_proj, v_proj)
    assert noise.metrics() == {"noise/sigma": SIGMA}
    assert sum(lora_hooks(noise)) == 0  # hooks exist only inside active()


def test_sigma_zero_equals_no_noise(model, ids):
    clean = logits(model, ids)
    with LoRANoise(model, 0.0).active():
        noisy = logits(model, ids)
    assert torch.equal(clean, noisy)


def test_draw_shared_within_and_fresh_between_contexts(model, ids):
    noise = LoRANoise(model, SIGMA)
    clean = logits(model, ids)
    with noise.active():
        first = logits(model, ids)
        again = logits(model, ids)  # e.g. the rejected forward of the same step
        draws_1 = {k: (d.eps_A.clone(), d.eps_B.clone()) for k, d in noise.last_draws.items()}
        assert sum(lora_hooks(noise)) == 2 * len(noise.pairs)
    with noise.active():
        second = logits(model, ids)
    assert torch.equal(first, again)
    assert not torch.allclose(first, clean, atol=1e-4)
    assert not torch.allclose(first, second, atol=1e-4)
    assert len(draws_1) == 4
    for key, (eps_A, eps_B) in draws_1.items():
        assert eps_A.shape == (1, 4, 32) and eps_B.shape == (1, 32, 4)
        assert not torch.equal(eps_A, noise.last_draws[key].eps_A)
    assert sum(lora_hooks(noise)) == 0


def test_no_noise_for_reference_or_eval(model, ids):
    noise = LoRANoise(model, SIGMA)
    with model.disable_adapter():
        ref_clean = logits(model, ids)
    model.eval()
    eval_clean = logits(model, ids)
    model.train()
    with noise.active():
        with model.disable_adapter():
            ref_noisy = logits(model, ids)
        model.eval()
        eval_noisy = logits(model, ids)
        model.train()
        assert noise.last_draws == {}  # neither forward drew noise
    assert torch.equal(ref_clean, ref_noisy)
    assert torch.equal(eval_clean, eval_noisy)


def test_weights_untouched_and_gradients_flow_through_perturbed_product(model, ids):
    noise = LoRANoise(model, SIGMA)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits(model, ids).square().mean().backward()
    clean_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with noise.active():
        logits(model, ids).square().mean().backward()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[-2] for n, _ in trainable} == {"default"}
    assert any("lora_A" in n for n, _ in trainable) and any("lora_B" in n for n, _ in trainable)
    for name, param in trainable:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert not torch.allclose(param.grad, clean_grads[name]), name


def test_hooks_removed_when_the_forward_raises(model, ids):
    noise = LoRANoise(model, SIGMA)

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = model.base_model.model.lm_head.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"), noise.active():
            logits(model, ids)  # LoRA hooks fire, then lm_head raises
    finally:
        handle.remove()
    assert len(noise.last_draws) == 4
    assert sum(lora_hooks(noise)) == 0
    assert not noise._is_active


@pytest.mark.parametrize("group_ids", [None, [0, 1]])
def test_manual_recomputation_of_one_lora_linear(model, ids, group_ids):
    """q_proj of layer 0: y = W x + scale * (B + eps_B[g]) (A + eps_A[g]) x, per row's group g."""
    noise = LoRANoise(model, SIGMA)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    captured = {}

    def capture(module, args, output):
        captured["x"], captured["y"] = args[0].detach(), output.detach()

    handle = layer.register_forward_hook(capture)
    try:
        gids = None if group_ids is None else torch.tensor(group_ids)
        with noise.active(group_ids=gids):
            logits(model, ids)
    finally:
        handle.remove()
    key = next(k for k in noise.last_draws if k[0].endswith("layers.0.self_attn.q_proj"))
    draw = noise.last_draws[key]
    x, y = captured["x"], captured["y"]  # (2, 7, 32)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    rows = [0, 0] if group_ids is None else group_ids
    for i, g in enumerate(rows):
        A_noisy, B_noisy = A + draw.eps_A[g], B + draw.eps_B[g]
        expected = layer.base_layer(x[i]) + layer.scaling["default"] * (x[i] @ A_noisy.T @ B_noisy.T)
        assert_close(y[i], expected, atol=1e-5, rtol=1e-5)


def test_group_ids_give_independent_draws(model):
    same_rows = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(2)).repeat(2, 1)
    noise = LoRANoise(model, SIGMA)
    with noise.active(group_ids=torch.tensor([0, 1])):
        out = logits(model, same_rows)
        draw = next(iter(noise.last_draws.values()))
        assert draw.eps_A.shape[0] == 2 and not torch.equal(draw.eps_A[0], draw.eps_A[1])
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    with noise.active(group_ids=torch.tensor([0, 0])):
        out = logits(model, same_rows)
    assert torch.equal(out[0], out[1])
    with pytest.raises(ValueError, match="group_ids"), noise.active(group_ids=torch.tensor([0, 1, 2])):
        logits(model, same_rows)


def test_generator_makes_draws_reproducible(model, ids):
    noise = LoRANoise(model, SIGMA)
    outs = []
    for _ in range(2):
        with noise.active(generator=torch.Generator().manual_seed(123)):
            outs.append(logits(model, ids))
    assert torch.equal(outs[0], outs[1])


def test_lora_variants_are_refused():
    with pytest.raises(NotImplementedError, match="plain LoRA"):
        LoRANoise(tiny_lora_llama(use_dora=True), SIGMA)
    with pytest.raises(ValueError, match="sigma"):
        LoRANoise(tiny_lora_llama(), -0.1)


def test_add_logit_noise():
    z = torch.randn(4, 50, 64, requires_grad=True)
    assert add_logit_noise(z, 0.0) is z
    a = add_logit_noise(z, 0.5, generator=torch.Generator().manual_seed(0))
    b = add_logit_noise(z, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    eps = (a - z).detach()
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 0.5) < 0.02
    a.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_gradient_checkpointing_reuses_the_draw_when_backward_is_inside(model, ids):
    """Checkpointing re-runs the forward during backward; inside the context it reuses the same draw."""

    def noisy_grads():
        model.zero_grad()
        with LoRANoise(model, SIGMA).active(generator=torch.Generator().manual_seed(7)):
            logits(model, ids).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = noisy_grads()
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    assert model.base_model.model.model.gradient_checkpointing
    checkpointed = noisy_grads()
    for name, grad in plain.items():
        assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Noise at inference: spec, summaries, LoRA scale
# ------------------------------------------------------------------------------------------------
def test_noise_spec_validation():
    from hanorec.noise import NoiseSpec

    for bad, match in [
        (dict(target="none", sigma=0.1), "target"),
        (dict(target="lora", sigma=-1.0), "sigma"),
        (dict(target="logits", sigma=0.1, draws=0), "draws"),
        (dict(target="logits", sigma=0.1, draws_per_forward=0), "draws_per_forward"),
    ]:
        with pytest.raises(ValueError, match=match):
            NoiseSpec(**bad)
    g1 = NoiseSpec("lora", 0.1, seed=3).make_generator()
    g2 = NoiseSpec("lora", 0.1, seed=3).make_generator()
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))
    assert NoiseSpec("lora", 0.1, seed=None).make_generator() is None


def test_noise_summary_hand_numbers():
    """clean = (0, 1, 2, 3); draw 0 = clean (nothing changes); draw 1 swaps candidates 0 and 3.

    top-1: clean 3, draws (3, 0) -> change rate 1/2. top-3 sets: clean {1,2,3}; draw 1 {0,1,2} -> 1/2.
    KL(p_1 || p_clean) = sum p_1 (log p_1 - log p_clean) with p = softmax; draw 0 gives 0.
    shift = noisy - clean: candidate 0 moves by (0, 3), mean 1.5, std (n-1) 2.1213.
    """
    from hanorec.noise import noise_summary

    clean = torch.tensor([0.0, 1.0, 2.0, 3.0])
    noisy = torch.stack([clean, torch.tensor([3.0, 1.0, 2.0, 0.0])])
    s = noise_summary(clean, noisy, ["a", "b", "c", "d"])
    assert s.top1_change_rate == 0.5 and s.top3_change_rate == 0.5 and s.draws == 2
    p0, p1 = torch.softmax(clean.double(), 0), torch.softmax(noisy[1].double(), 0)
    want_kl = float((p1 * (p1.log() - p0.log())).sum())
    assert s.kl[0] == 0 and abs(float(s.kl[1]) - want_kl) < 1e-6 and abs(s.kl_mean - want_kl / 2) < 1e-6
    t = s.per_candidate.set_index("option")
    assert t.loc["a", "shift_mean"] == 1.5 and abs(t.loc["a", "shift_std"] - 2.1213203) < 1e-6
    assert t.loc["b", "shift_mean"] == 0 and t.loc["b", "noisy_std"] == 0
    assert list(t["top1_rate"]) == [0.5, 0.0, 0.0, 0.5]
    assert abs(t["p_clean"].sum() - 1) < 1e-9
    assert s.as_dict()["mean_abs_shift"] == 0.75
    with pytest.raises(ValueError, match="draws, 4"):
        noise_summary(clean, torch.zeros(2, 3))


def test_noise_summary_fewer_than_three_candidates():
    from hanorec.noise import noise_summary

    s = noise_summary(torch.tensor([0.0, 1.0]), torch.tensor([[1.0, 0.0]]))
    assert s.top1_change_rate == 1.0 and s.top3_change_rate == 0.0  # top-3 of 2 = both, always
    assert s.as_dict()["kl_std"] == 0.0


def test_lora_factor_scale(model):
    """RMS over every entry of every lora_A (resp. lora_B): set A = 0.5 and B = 2 everywhere -> 0.5, 2."""
    from hanorec.noise import lora_factor_scale

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.fill_(0.5)
            elif "lora_B" in name:
                p.fill_(-2.0)
    s = lora_factor_scale(model)
    assert s.n_pairs == 4 and len(s.per_pair) == 4
    assert abs(s.a_rms - 0.5) < 1e-6 and abs(s.b_rms - 2.0) < 1e-6 and s.a_std < 1e-6
    assert s.per_pair["A_shape"].iloc[0] == (4, 32)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora_factor_scale(
            LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=16,
                    hidden_size=8,
                    intermediate_size=8,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                )
            )
        )


def test_set_group_ids_routes_rows_to_the_context_draws(model, ids):
    """Two identical rows: with group ids (0, 1) they get different draws; after set_group_ids((1, 1))
    both use draw 1 of the same context, so they agree, and row 1 is unchanged."""
    same = ids[:1].repeat(2, 1)
    noise = LoRANoise(model, SIGMA)
    with pytest.raises(RuntimeError, match="open"):
        noise.set_group_ids(torch.tensor([0]))
    with noise.active(group_ids=torch.tensor([0, 1])):
        split = logits(model, same)
        with pytest.raises(ValueError, match=r"\[0, 2\)"):
            noise.set_group_ids(torch.tensor([0, 2]))
        noise.set_group_ids(torch.tensor([1, 1]))
        joined = logits(model, same)
    assert not torch.allclose(split[0], split[1], atol=1e-4)
    assert torch.equal(joined[0], joined[1]) and torch.equal(joined[1], split[1])
    LoRANoise(model, 0.0).set_group_ids(torch.tensor([5]))  # sigma 0: nothing to route


def _draws_after_one_forward(model, ids, noise, seed):
    with noise.active(generator=torch.Generator().manual_seed(seed)):
        logits(model, ids)
    return noise.last_draws


def test_absolute_scale_is_sigma_times_the_generators_normals_as_before(model, ids):
    """The paper's absolute sigma: eps = sigma * N(0, 1), drawn A then B per pair in forward order, exactly the
    draws made before noise_scale existed; scale="absolute" is the default and changes nothing."""
    default = _draws_after_one_forward(model, ids, LoRANoise(model, SIGMA), 7)
    explicit = _draws_after_one_forward(model, ids, LoRANoise(model, SIGMA, scale="absolute"), 7)
    g = torch.Generator().manual_seed(7)
    for pair in LoRANoise(model, SIGMA).pairs:
        key = (pair.name, pair.adapter)
        want_A = torch.randn((1, *pair.lora_A.weight.shape), generator=g) * SIGMA
        want_B = torch.randn((1, *pair.lora_B.weight.shape), generator=g) * SIGMA
        for draws in (default, explicit):
            assert torch.equal(draws[key].eps_A, want_A) and torch.equal(draws[key].eps_B, want_B)


def test_relative_scale_follows_each_factors_rms(model, ids):
    """Extension beyond the paper: eps of each factor has std sigma * RMS(factor). Scaling every A by 3 and
    every B by 0.5 scales the relative draws by exactly those factors (same normals), and the relative draw is
    the absolute one times the factor's RMS; the draws' empirical std is sigma * RMS."""
    torch.manual_seed(0)
    big = tiny_lora_llama(r=16, target_modules=["q_proj", "v_proj", "k_proj", "o_proj"])
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    absolute = _draws_after_one_forward(big, ids, LoRANoise(big, SIGMA), 3)
    relative = _draws_after_one_forward(big, ids, LoRANoise(big, SIGMA, scale="relative"), 3)
    pairs = LoRANoise(big, SIGMA).pairs
    rms = {(p.name, p.adapter): (p.lora_A.weight.pow(2).mean().sqrt(), p.lora_B.weight.pow(2).mean().sqrt())
           for p in pairs}  # fmt: skip
    for key, (rms_A, rms_B) in rms.items():
        assert_close(relative[key].eps_A, absolute[key].eps_A * rms_A)
        assert_close(relative[key].eps_B, absolute[key].eps_B * rms_B)
    all_A = torch.cat([relative[k].eps_A.flatten() / (SIGMA * rms[k][0]) for k in rms])
    assert abs(all_A.std().item() - 1.0) < 0.05  # thousands of entries: the std is sigma * RMS(A)
    with torch.no_grad():
        for p in pairs:
            p.lora_A.weight.mul_(3.0)
            p.lora_B.weight.mul_(0.5)
    scaled = _draws_after_one_forward(big, ids, LoRANoise(big, SIGMA, scale="relative"), 3)
    for key in rms:
        assert_close(scaled[key].eps_A, 3.0 * relative[key].eps_A)
        assert_close(scaled[key].eps_B, 0.5 * relative[key].eps_B)
    scaled_abs = _draws_after_one_forward(big, ids, LoRANoise(big, SIGMA), 3)
    for key in rms:  # absolute sigma ignores the factors' size
        assert torch.equal(scaled_abs[key].eps_A, absolute[key].eps_A)


def test_relative_scale_leaves_a_zero_factor_clean_and_is_refused_for_logit_noise(ids):
    import dataclasses

    from hanorec.config import ConfigError, PrefConfig, load_config

    fresh = tiny_lora_llama()
    with torch.no_grad():
        for name, param in fresh.named_parameters():
            if "lora_B" in name:
                param.zero_()  # a fresh adapter: B = 0
    draws = _draws_after_one_forward(fresh, ids, LoRANoise(fresh, SIGMA, scale="relative"), 0)
    assert all(not d.eps_B.any() and d.eps_A.abs().sum() > 0 for d in draws.values())
    with pytest.raises(ValueError, match="scale"):
        LoRANoise(fresh, SIGMA, scale="proportional")
    help_text = next(f for f in dataclasses.fields(PrefConfig) if f.name == "noise_scale").metadata["help"]
    assert "extension beyond the paper" in help_text
    assert load_config().pref.noise_scale == "absolute"
    assert load_config(overrides=["--pref.noise_scale=relative"]).pref.noise_scale == "relative"
    with pytest.raises(ConfigError, match="noise_target"):
        load_config(overrides=["--pref.noise_scale=relative", "--pref.noise_target=logits"])


def test_rows_in_draw_order_and_shuffled_rows_get_their_own_draws(model, ids):
    """Rows that use draws 0..N-1 in order take the batched path without indexing; any other mapping
    indexes the draws per row. Both give each row exactly its draw (row 1 of [1, 0] is row 0 of [0, 1])."""
    noise = LoRANoise(model, SIGMA)
    both = ids[:1].repeat(2, 1)
    with noise.active(group_ids=torch.tensor([0, 1]), generator=torch.Generator().manual_seed(4)):
        in_order = logits(model, both)
        noise.set_group_ids(torch.tensor([1, 0]))
        swapped = logits(model, both)
    assert torch.equal(in_order[0], swapped[1]) and torch.equal(in_order[1], swapped[0])
    assert not torch.allclose(in_order[0], in_order[1], atol=1e-4)


def test_an_inference_context_perturbs_only_its_own_threads_forwards(model, ids):
    """Noise at inference is per thread: while one thread scores under noise, another scores the same
    model clean (the app serves several sessions at once); training contexts perturb every forward."""
    import threading

    model.eval()
    clean = logits(model, ids)
    noise = LoRANoise(model, SIGMA)
    opened, scored, seen = threading.Event(), threading.Event(), {}

    def other_thread():
        opened.wait(10)
        seen["other"] = logits(model, ids)
        scored.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with noise.active(inference=True, generator=torch.Generator().manual_seed(0)):
        noisy = logits(model, ids)
        opened.set()
        assert scored.wait(10)
        again = logits(model, ids)
    t.join(10)
    assert torch.equal(seen["other"], clean)
    assert not torch.allclose(noisy, clean, atol=1e-4) and torch.equal(noisy, again)
    model.train()
    with noise.active():
        t = threading.Thread(target=lambda: seen.update(train=logits(model, ids)))
        t.start()
        t.join(10)
    assert not torch.allclose(seen["train"], logits(model, ids), atol=1e-4)


@pytest.mark.parametrize("inference", [True, False])
def test_a_hook_called_after_its_context_closed_perturbs_nothing(model, ids, inference):
    """A forward reads a module's hooks when it calls them, so another thread's forward that picked up this
    context's hook may call it after the context closed, or while the same object opens its next context
    (LoRA draws come in chunks of 64): the hook must hand that forward its own output back. (It used to take
    the closed context for a training one, perturb the other forward with this object's draws and RNG, and
    fail on the row count when the next chunk had other rows.)"""
    model.eval()
    noise = LoRANoise(model, SIGMA)
    pair = noise.pairs[0]
    with noise.active(group_ids=torch.arange(2), generator=torch.Generator().manual_seed(0), inference=inference):
        a_hook = next(iter(pair.lora_A._forward_hooks.values()))
    x = torch.randn(2, 7, pair.lora_A.in_features)
    out = pair.lora_A(x)
    assert a_hook(pair.lora_A, (x,), out) is None  # closed: nothing added, nothing drawn
    assert not noise.last_draws
    model.train()
