"""Scoring: completion log-probs, and shared-prefix scoring agreeing with the naive path.

Every tiny preset (one per family), fp32: log-probs, gradients of the LoRA parameters, LoRA / logit noise and the
ranking scores must match the naive (prompt repeated per completion) path within 1e-4.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hanorec import scoring
from hanorec.backbones import Backbone, for_preset
from hanorec.config import LoraConfig
from hanorec.data import load_dataset, make_splits
from hanorec.models import TINY_PRESETS, add_lora, build_tiny
from hanorec.noise import LoRANoise, NoiseSpec, add_logit_noise
from hanorec.scoring import (
    completion_logps,
    multi_completion_logps,
    naive_logps,
    score_options,
    shared_prefix_logps,
)
from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text, render

PRESETS = TINY_PRESETS  # every family
# The noise-at-inference combinations (target x mode x seed) check the family-independent noise machinery;
# for the families beside the paper's two they run with the slow tests (CI time), the rest of NoDO at
# inference (test_noise_layouts_agree_at_inference) in the default suite.
NOISE_PRESETS = [p if p in ("tiny-qwen2.5-vl", "tiny-llava") else pytest.param(p, marks=pytest.mark.slow) for p in PRESETS]
TOL = 1e-4


@pytest.fixture(scope="module")
def demo():
    ds = load_dataset("assets/demo")
    shape = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=shape["n_history"], n_target=shape["n_target"])
    examples = build_examples("hit3", splits.test, ds, seed=0, max_examples=3)
    return ds, examples


@pytest.fixture(scope="module")
def bundles(demo):
    ds, _ = demo
    texts = corpus_text(ds)
    out = {}
    for preset in PRESETS:
        b = build_tiny(preset, texts, hidden_size=64, seed=0)
        b.model.float().eval()
        out[preset] = b
    return out


def _inputs(bundle, demo):
    """3 prompts with 3 images each; 1, 3 and 5 completions of different lengths (EOS or not, one empty)."""
    ds, examples = demo
    prompts, comps = [], []
    for k, e in enumerate(examples):
        r = render(e, ds)
        prompts.append(bundle.encode_prompt(r.text, r.images))
        n = 1 + 2 * k
        comps.append([bundle.encode_completion(o, eos=j % 2 == 0) for j, o in enumerate(e.options[:n])])
    comps[2][3] = comps[2][3][:1]  # a one-token completion
    comps[2].append([])  # an empty completion: log-prob 0, 0 tokens
    return prompts, comps


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _lora_bundle(bundles, preset):
    b = copy.deepcopy(bundles[preset])
    torch.manual_seed(1)
    add_lora(b, LoraConfig(dropout=0.0))
    with torch.no_grad():  # B starts at zero: make the adapters do something
        for name, p in b.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    b.model.train()
    return b


def test_completion_logps_matches_manual_sum():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 1, -100], [-100, 2, 2, 6, 0]])
    sums, counts = completion_logps(logits, labels)
    logp = F.log_softmax(logits, dim=-1)
    want0 = logp[0, 1, 3] + logp[0, 2, 1]
    want1 = logp[1, 0, 2] + logp[1, 1, 2] + logp[1, 2, 6] + logp[1, 3, 0]
    assert torch.allclose(sums, torch.stack([want0, want1]), atol=1e-6)
    assert counts.tolist() == [2, 4]
    doubled, _ = completion_logps(logits, labels, logits_transform=lambda z: 2 * z)
    logp2 = F.log_softmax(2 * logits, dim=-1)
    assert torch.allclose(doubled[0], logp2[0, 1, 3] + logp2[0, 2, 1], atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_shared_prefix_matches_naive(bundles, demo, preset):
    b = bundles[preset]
    prompts, comps = _inputs(b, demo)
    with torch.no_grad():
        naive, naive_n = naive_logps(b.model, b, prompts, comps)
        shared, shared_n = shared_prefix_logps(b.model, b, prompts, comps)
    assert [len(s) for s in shared] == [len(c) for c in comps]
    assert _max_diff(naive, shared) < TOL
    assert all(torch.equal(x, y) for x, y in zip(naive_n, shared_n))
    assert shared_n[2][-1] == 0 and shared[2][-1] == 0
    assert all(bool((s < 0).all()) for s in shared[:2])


@pytest.mark.parametrize("preset", PRESETS)
def test_shared_prefix_eager_attention(bundles, demo, preset):
    b = copy.deepcopy(bundles[preset])
    for cfg in (b.model.config, b.model.config.get_text_config()):
        cfg._attn_implementation = "eager"
    prompts, comps = _inputs(b, demo)
    with torch.no_grad():
        naive, _ = naive_logps(b.model, b, prompts, comps)
        shared, _ = shared_prefix_logps(b.model, b, prompts, comps)
    assert _max_diff(naive, shared) < TOL


@pytest.mark.parametrize("preset", [p for p in PRESETS if for_preset(p).mrope])
def test_mrope_positions_are_checked(bundles, demo, monkeypatch, preset):
    """Negative control: plain 1-D positions after an M-RoPE prompt with images must NOT pass the test."""
    b = bundles[preset]
    prompts, comps = _inputs(b, demo)
    original = scoring._prompt_positions

    def one_d(model, bundle, batch, prompt_mask, lengths):
        positions, _ = original(model, bundle, batch, prompt_mask, lengths)
        return positions, lengths.clone()

    with torch.no_grad():
        naive, _ = naive_logps(b.model, b, prompts, comps)
        monkeypatch.setattr(scoring, "_prompt_positions", one_d)
        wrong, _ = shared_prefix_logps(b.model, b, prompts, comps)
    assert _max_diff(naive, wrong) > TOL


@pytest.mark.parametrize("preset", [p for p in PRESETS if type(for_preset(p)).packed_mask is not Backbone.packed_mask])
def test_family_attention_is_checked(bundles, demo, monkeypatch, preset):
    """Negative control: a family whose forward attends other than causally (Gemma 3: bidirectional within an
    image, sliding layers) must NOT pass the test with the plain causal packed mask."""
    b = bundles[preset]
    prompts, comps = _inputs(b, demo)
    with torch.no_grad():
        naive, _ = naive_logps(b.model, b, prompts, comps)
        monkeypatch.setattr(type(b.adapter), "packed_mask", Backbone.packed_mask)
        wrong, _ = shared_prefix_logps(b.model, b, prompts, comps)
    assert _max_diff(naive, wrong) > TOL


@pytest.mark.parametrize("preset", PRESETS)
def test_shared_prefix_gradients_match(bundles, demo, preset):
    b = _lora_bundle(bundles, preset)
    prompts, comps = _inputs(b, demo)
    weights = torch.linspace(-1.0, 1.0, sum(len(c) for c in comps))
    lora = {n: p for n, p in b.model.named_parameters() if p.requires_grad and "lora_" in n}
    assert lora
    grads, losses = {}, {}
    for mode in ("naive", "shared_prefix"):
        b.model.zero_grad()
        sums, _ = multi_completion_logps(b.model, b, prompts, comps, mode=mode)
        loss = (torch.cat(sums) * weights).sum()
        loss.backward()
        losses[mode] = loss.item()
        grads[mode] = {n: p.grad.clone() for n, p in lora.items()}
    assert abs(losses["naive"] - losses["shared_prefix"]) < TOL
    worst = max((grads["naive"][n] - grads["shared_prefix"][n]).abs().max().item() for n in lora)
    assert worst < TOL
    assert max(g.abs().max().item() for g in grads["naive"].values()) > 1e-3  # not trivially zero


@pytest.mark.parametrize("preset", PRESETS)
def test_noise_layouts_match(bundles, demo, preset):
    """LoRA noise: naive rows use one group id per completion, shared-prefix rows one per prompt;
    with the same generator both see the same draws. Logit noise lines up token by token too."""
    b = _lora_bundle(bundles, preset)
    prompts, comps = _inputs(b, demo)
    noise = LoRANoise(b.model, sigma=0.1)
    per_prompt = torch.arange(len(prompts))
    per_row = per_prompt.repeat_interleave(torch.tensor([len(c) for c in comps]))
    out = {}
    with torch.no_grad():
        with noise.active(group_ids=per_row, generator=torch.Generator().manual_seed(3)):
            out["naive"], _ = naive_logps(b.model, b, prompts, comps)
        with noise.active(group_ids=per_prompt, generator=torch.Generator().manual_seed(3)):
            out["shared"], _ = shared_prefix_logps(b.model, b, prompts, comps)
        clean, _ = shared_prefix_logps(b.model, b, prompts, comps)
        assert _max_diff(out["naive"], out["shared"]) < TOL
        assert _max_diff(out["naive"], clean) > 1e-3

        def logit_noise(seed):
            g = torch.Generator().manual_seed(seed)
            return lambda z: add_logit_noise(z, 0.5, generator=g)

        a, _ = naive_logps(b.model, b, prompts, comps, logits_transform=logit_noise(4))
        s, _ = shared_prefix_logps(b.model, b, prompts, comps, logits_transform=logit_noise(4))
    assert _max_diff(a, s) < TOL
    assert _max_diff(a, clean) > 1e-3


def test_gradient_checkpointing(bundles, demo):
    b = _lora_bundle(bundles, "tiny-qwen2.5-vl")
    prompts, comps = _inputs(b, demo)
    with torch.no_grad():
        want, _ = naive_logps(b.model, b, prompts, comps)
    b.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got, _ = shared_prefix_logps(b.model, b, prompts, comps)
    torch.cat(got).sum().backward()
    assert _max_diff(want, [g.detach() for g in got]) < TOL


@pytest.mark.parametrize("preset", PRESETS)
def test_score_options_modes_agree(bundles, demo, preset):
    ds, examples = demo
    b = bundles[preset]
    b.model.train()
    prompts = [b.encode_prompt(render(e, ds).text, render(e, ds).images) for e in examples]
    options = [e.options for e in examples]
    naive = score_options(b, prompts, options, mode="naive", batch_size=5)
    shared = score_options(
        b, prompts, options, batch_size=8
    )  # default mode: shared prefix, 1 prompt per forward
    packed = score_options(
        b, prompts, options, mode="shared_prefix", batch_size=64
    )  # all prompts in one forward
    assert b.model.training  # mode restored
    b.model.eval()
    assert [s.shape for s in shared] == [(7,)] * len(examples)
    assert _max_diff(naive, shared) < TOL and _max_diff(naive, packed) < TOL


def test_fallback_and_bad_mode(bundles, demo, monkeypatch):
    b = bundles["tiny-llava"]
    prompts, comps = _inputs(b, demo)
    with pytest.raises(ValueError, match="scoring mode"):
        multi_completion_logps(b.model, b, prompts, comps, mode="packed")
    monkeypatch.setattr(scoring, "_attn_implementation", lambda model: "flash_attention_2")
    monkeypatch.setattr(scoring, "_FALLBACK_WARNED", set())
    with torch.no_grad(), pytest.warns(UserWarning, match="falling back"):
        got, _ = shared_prefix_logps(b.model, b, prompts, comps)
    with torch.no_grad():
        want, _ = naive_logps(b.model, b, prompts, comps)
    assert _max_diff(want, got) == 0


# ------------------------------------------------------------------------------------------------
# Noise at inference: score_options(..., noise=NoiseSpec(...))
# ------------------------------------------------------------------------------------------------
def _lab_inputs(b, demo):
    ds, examples = demo
    prompts = [b.encode_prompt(render(e, ds).text, render(e, ds).images) for e in examples[:2]]
    return prompts, [e.options for e in examples[:2]]


@pytest.mark.parametrize("preset", NOISE_PRESETS)
@pytest.mark.parametrize("target", ["lora", "logits"])
@pytest.mark.parametrize("mode", scoring.SCORING_MODES)
def test_noise_sigma_zero_is_clean_bit_for_bit(bundles, demo, preset, target, mode):
    """sigma = 0: every draw's scores equal the clean scores exactly (torch.equal, not allclose)."""
    b = _lora_bundle(bundles, preset)
    prompts, options = _lab_inputs(b, demo)
    clean = score_options(b, prompts, options, mode=mode)
    noisy = score_options(
        b, prompts, options, mode=mode, noise=NoiseSpec(target, 0.0, draws=3, draws_per_forward=2)
    )
    for c, n in zip(clean, noisy):
        assert n.shape == (3, len(c))
        assert torch.equal(n, c.expand(3, -1))


@pytest.mark.parametrize("preset", NOISE_PRESETS)
@pytest.mark.parametrize("target", ["lora", "logits"])
def test_noise_moves_scores_and_seed_reproduces(bundles, demo, preset, target):
    b = _lora_bundle(bundles, preset)
    prompts, options = _lab_inputs(b, demo)
    clean = score_options(b, prompts, options)
    spec = NoiseSpec(target, 0.1, draws=5, seed=7, draws_per_forward=2)
    first = score_options(b, prompts, options, noise=spec)
    again = score_options(b, prompts, options, noise=spec)
    other = score_options(
        b, prompts, options, noise=NoiseSpec(target, 0.1, draws=5, seed=8, draws_per_forward=2)
    )
    for c, f, a, o in zip(clean, first, again, other):
        assert f.shape == (5, len(c))
        assert torch.equal(f, a)  # same seed -> same draws
        assert (f - c).abs().max() > 1e-3  # sigma > 0 moves the scores
        assert (f[1:] - f[:1]).abs().max() > 1e-4  # draws differ from each other
        assert (f - o).abs().max() > 1e-4  # another seed, other draws
    assert b.model.training  # the caller's mode is restored


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("target", ["lora", "logits"])
def test_noise_layouts_agree_at_inference(bundles, demo, preset, target):
    """The same draws reach every option both ways: shared-prefix rows (one group id per prompt copy)
    and naive rows (one per copy and option) give the same noisy scores; so do 1 and 3 draws per forward
    for logit noise (whose draws do not depend on the batching)."""
    b = _lora_bundle(bundles, preset)
    prompts, options = _lab_inputs(b, demo)
    spec = NoiseSpec(target, 0.1, draws=4, seed=3, draws_per_forward=3)
    shared = score_options(b, prompts, options, noise=spec)
    naive = score_options(b, prompts, options, mode="naive", batch_size=5, noise=spec)
    assert _max_diff(shared, naive) < TOL
    if target == "logits":
        one = score_options(
            b, prompts, options, noise=NoiseSpec(target, 0.1, draws=4, seed=3, draws_per_forward=1)
        )
        assert _max_diff(shared, one) == 0


def test_lora_noise_at_inference_is_the_perturbed_adapter(bundles, demo):
    """One draw of LoRA noise at inference equals the clean scores of a copy whose factors were
    replaced by A + eps_A, B + eps_B (the draw the context recorded): scale (B + eps_B)(A + eps_A) x."""
    b = _lora_bundle(bundles, "tiny-llava")
    prompts, options = _lab_inputs(b, demo)
    noise = LoRANoise(b.model, 0.2)
    b.model.eval()
    encoded = [[b.encode_completion(o, eos=False) for o in opts] for opts in options]
    with torch.no_grad(), noise.active(generator=torch.Generator().manual_seed(5), inference=True):
        noisy, _ = shared_prefix_logps(b.model, b, prompts, encoded)
        draws = dict(noise.last_draws)
    assert len(draws) == len(noise.pairs)
    moved = copy.deepcopy(b)
    with torch.no_grad():
        for pair in LoRANoise(moved.model, 0.2).pairs:
            d = draws[(pair.name, pair.adapter)]
            pair.lora_A.weight += d.eps_A[0]
            pair.lora_B.weight += d.eps_B[0]
    want = score_options(moved, prompts, options)
    assert _max_diff([n.float() for n in noisy], want) < TOL
    assert _max_diff(want, score_options(b, prompts, options)) > 1e-3


def test_training_forwards_unchanged_by_inference_noise(bundles, demo):
    """Training-time NoDO behaves exactly as before around a noisy scoring call: the same generator gives
    the same training-mode logits before and after, eval forwards stay clean without inference=True,
    and no hook is left behind."""
    b = _lora_bundle(bundles, "tiny-llava")
    prompts, comps = _inputs(b, demo)
    noise = LoRANoise(b.model, 0.1)

    def train_forward():
        b.model.train()
        with torch.no_grad(), noise.active(generator=torch.Generator().manual_seed(11)):
            return naive_logps(b.model, b, prompts, comps)[0]

    before = train_forward()
    options = _lab_inputs(b, demo)[1]
    score_options(b, prompts[:2], options, noise=NoiseSpec("lora", 0.3, draws=3))
    after = train_forward()
    assert _max_diff(before, after) == 0
    b.model.eval()
    with torch.no_grad():
        clean, _ = naive_logps(b.model, b, prompts, comps)
        with noise.active(generator=torch.Generator().manual_seed(11)):
            still_clean, _ = naive_logps(b.model, b, prompts, comps)
    assert _max_diff(clean, still_clean) == 0
    assert _max_diff(before, clean) > 1e-3
    assert all(len(p.lora_A._forward_hooks) + len(p.lora_B._forward_hooks) == 0 for p in noise.pairs)


def test_lora_noise_needs_an_adapter(bundles, demo):
    b = bundles["tiny-llava"]
    prompts, options = _lab_inputs(b, demo)
    with pytest.raises(ValueError, match="no LoRA layer"):
        score_options(b, prompts, options, noise=NoiseSpec("lora", 0.1, draws=2))


def test_sigma_sweep_grows_from_zero(bundles, demo):
    """sigma 0 changes nothing (KL 0, no rank change); with logit noise a larger sigma moves the
    distribution further (LoRA noise on an untrained tiny model saturates, so only sigma > 0 is checked)."""
    b = _lora_bundle(bundles, "tiny-llava")
    prompts, options = _lab_inputs(b, demo)
    table = scoring.sigma_sweep(b, prompts[0], options[0], target="logits", sigmas=[0.0, 0.05, 0.5], draws=10)
    assert list(table["sigma"]) == [0.0, 0.05, 0.5]
    assert table["kl_mean"][0] == 0 and table["top1_change_rate"][0] == 0 and table["mean_abs_shift"][0] == 0
    assert 0 < table["kl_mean"][1] < table["kl_mean"][2]
    assert table["mean_abs_shift"][1] < table["mean_abs_shift"][2]
    lora = scoring.sigma_sweep(b, prompts[0], options[0], target="lora", sigmas=[0.0, 0.05], draws=4)
    assert lora["kl_mean"][0] == 0 < lora["kl_mean"][1]


def test_concurrent_callers_never_see_each_others_noise(bundles, demo):
    """The app serves several sessions on one model: clean scoring in one thread while another scores under
    LoRA noise (hooks on the shared modules) must give exactly the clean scores, and both must finish."""
    import threading

    b = _lora_bundle(bundles, "tiny-qwen2.5-vl")
    prompts, options = _lab_inputs(b, demo)
    clean = score_options(b, prompts, options)
    spec = NoiseSpec("lora", 0.1, draws=8, seed=3, draws_per_forward=4)
    alone = score_options(b, prompts, options, noise=spec)
    results, errors = {"clean": [], "noisy": []}, []

    def worker(kind):
        try:
            for _ in range(4):
                out = score_options(b, prompts, options, noise=spec if kind == "noisy" else None)
                results[kind].append(out)
        except Exception as e:  # collected: an exception in a thread would otherwise pass silently
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("clean", "noisy", "clean", "noisy")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results["clean"]) == 8 and len(results["noisy"]) == 8
    for out in results["clean"]:
        assert all(torch.equal(o, c) for o, c in zip(out, clean))
    for out in results["noisy"]:
        assert all(torch.equal(o, a) for o, a in zip(out, alone))
