"""Tests of hanorec.losses: hand-computed values for DPO, S-DPO, responsiveness and HaNo-DPO."""

import math

import pytest
import torch
from torch.testing import assert_close

from hanorec.losses import (
    PreferenceLossOutput,
    dpo_loss,
    dynamic_beta,
    hano_dpo_loss,
    preference_logits,
    responsiveness,
    sdpo_loss,
)


def softplus(x: float) -> float:
    """-logsigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def logps_with_h(h: list[float]):
    """Log-probs whose preference logits are h: policy_chosen = h, everything else 0."""
    pc = torch.tensor(h, dtype=torch.float32)
    zeros = torch.zeros_like(pc)
    return pc, zeros.clone(), zeros.clone(), zeros.clone()


def test_preference_logits():
    """h = (pc - rc) - (pr - rr): [(-1+2) - (-3+2), (-2+2) - (-1+2)] = [2, -1]."""
    h = preference_logits(t(-1, -2), t(-3, -1), t(-2, -2), t(-2, -2))
    assert_close(h, t(2, -1))


def test_dpo_loss_by_hand():
    """beta = 0.1, h = [2, -1]:
    losses = -logsigmoid(0.1 * h) = [log(1 + e^-0.2), log(1 + e^0.1)] = [0.598139, 0.744397];
    chosen rewards = 0.1 * (pc - rc) = [0.1, 0.0]; rejected rewards = 0.1 * (pr - rr) = [-0.1, 0.1].
    """
    out = dpo_loss(t(-1, -2), t(-3, -1), t(-2, -2), t(-2, -2), beta=0.1)
    assert isinstance(out, PreferenceLossOutput)
    assert_close(out.losses, t(softplus(-0.2), softplus(0.1)))
    assert_close(out.losses, t(0.598139, 0.744397), atol=1e-6, rtol=0)
    assert_close(out.chosen_rewards, t(0.1, 0.0))
    assert_close(out.rejected_rewards, t(-0.1, 0.1))
    assert_close(out.beta, t(0.1, 0.1))
    assert out.eta is None
    assert not out.chosen_rewards.requires_grad


def test_dpo_label_smoothing_by_hand():
    """eps = 0.2, beta * h = 0.2: 0.8 * log(1 + e^-0.2) + 0.2 * log(1 + e^0.2)
    = 0.8 * 0.598139 + 0.2 * 0.798139 = 0.638139."""
    out = dpo_loss(*logps_with_h([2.0]), beta=0.1, label_smoothing=0.2)
    assert_close(out.losses, t(0.8 * softplus(-0.2) + 0.2 * softplus(0.2)))
    assert_close(out.losses, t(0.638139), atol=1e-6, rtol=0)


def test_sdpo_by_hand():
    """beta = 0.5, r(w) = 1, r(l) = [0, -1]:
    beta * (r(l) - r(w)) = [-0.5, -1]; lse = log(e^-0.5 + e^-1) = -0.025923;
    loss = -logsigmoid(-lse) = log(1 + e^lse) = 0.680270.
    rewards: chosen 0.5 * 1 = 0.5, rejected 0.5 * [0, -1] = [0, -0.5]."""
    out = sdpo_loss(t(1.0), torch.tensor([[0.0, -1.0]]), t(0.0), torch.zeros(1, 2), beta=0.5)
    lse = math.log(math.exp(-0.5) + math.exp(-1.0))
    assert_close(out.losses, t(softplus(lse)))
    assert_close(out.losses, t(0.680270), atol=1e-6, rtol=0)
    assert_close(out.chosen_rewards, t(0.5))
    assert_close(out.rejected_rewards, torch.tensor([[0.0, -0.5]]))


def test_sdpo_with_one_negative_equals_dpo():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 5 for _ in range(4))
    dpo = dpo_loss(pc, pr, rc, rr, beta=0.1)
    sdpo = sdpo_loss(pc, pr.unsqueeze(-1), rc, rr.unsqueeze(-1), beta=0.1)
    assert_close(sdpo.losses, dpo.losses)
    assert_close(sdpo.rejected_rewards.squeeze(-1), dpo.rejected_rewards)
    sdpo_1d = sdpo_loss(pc, pr, rc, rr, beta=0.1)  # 1-D rejected is read as K = 1
    assert_close(sdpo_1d.losses, dpo.losses)


def test_sdpo_is_stable_for_large_margins():
    out = sdpo_loss(
        t(0.0, 0.0), torch.tensor([[5000.0, 4000.0], [-5000.0, -4000.0]]), t(0, 0), torch.zeros(2, 2)
    )
    assert torch.isfinite(out.losses).all()
    assert_close(out.losses, t(500.0, 0.0))  # beta 0.1 * 5000; second pair is trivially won


def test_responsiveness_drops_the_extremes():
    """beta0 = 0.1, h = [1, 2, 3, 10] (10 is the outlier):
    g = [0.1, 0.2, 0.3, 1.0], m = 0.4, u = [0.25, 0.5, 0.75, 2.5], mean(u) = 1;
    kept = [0.5, 0.75] (0.25 and 2.5 dropped), mean 0.625;
    eta = sigmoid(0.625) / sigmoid(1) = 0.651355 / 0.731059 = 0.890975."""
    eta = responsiveness(t(1, 2, 3, 10), beta0=0.1)
    assert eta.dim() == 0
    assert_close(eta, torch.tensor(sigmoid(0.625) / sigmoid(1.0)))
    assert_close(eta, torch.tensor(0.890975), atol=1e-6, rtol=0)


def test_responsiveness_near_zero_mean_branch():
    """beta0 = 0.1, h = [-3, 1, 1, 1]: g = [-0.3, 0.1, 0.1, 0.1], |mean g| <= 1e-8 so
    m = mean|g| = 0.15; u = [-2, 2/3, 2/3, 2/3], mean(u) = 0; kept = [2/3, 2/3] (one -2 and one 2/3
    dropped), mean 2/3; eta = sigmoid(2/3) / sigmoid(0) = 2 * 0.660756 = 1.321513."""
    eta = responsiveness(t(-3, 1, 1, 1), beta0=0.1)
    assert_close(eta, torch.tensor(2 * sigmoid(2 / 3)))
    # all-zero h: m = max(0, 1e-8), u = 0, eta = 1 (no division by zero)
    assert_close(responsiveness(torch.zeros(5), beta0=0.1), torch.tensor(1.0))


def test_responsiveness_small_batches_and_no_grad():
    """Fewer than 3 values: nothing is dropped, kept u = all u, so eta = 1."""
    for h in (t(), t(4.0), t(1.0, 7.0)):
        assert responsiveness(h, beta0=0.1).item() == 1.0
    h = t(1, 2, 3, 10).requires_grad_()
    assert not responsiveness(h, beta0=0.1).requires_grad


def test_dynamic_beta_orders_and_floors_and_detaches():
    """beta_n = max(1e-6, 0.1 * 0.9 * lambda_n); lambda = [0.5, 1.5, 0] -> [0.045, 0.135, 1e-6]."""
    lam = t(0.5, 1.5, 0.0).requires_grad_()
    beta = dynamic_beta(0.1, torch.tensor(0.9), lam)
    assert_close(beta, t(0.045, 0.135, 1e-6))
    assert beta[0] < beta[1]  # the harder pair (smaller lambda) gets the smaller beta
    assert not beta.requires_grad


def test_hano_dpo_with_unit_lambda_and_eta_is_dpo():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(5, generator=g) * 3 for _ in range(4))
    for eps in (0.0, 0.1):
        dpo = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=eps)
        hano = hano_dpo_loss(
            pc, pr, rc, rr, torch.ones(5), beta0=0.1, label_smoothing=eps, use_responsiveness=False
        )
        assert torch.equal(hano.losses, dpo.losses)
        assert torch.equal(hano.chosen_rewards, dpo.chosen_rewards)
        assert torch.equal(hano.rejected_rewards, dpo.rejected_rewards)
        assert torch.equal(hano.beta, dpo.beta)
        assert hano.eta.item() == 1.0
    # a batch of 2 has eta = 1 with responsiveness on, so it is DPO exactly too
    dpo = dpo_loss(pc[:2], pr[:2], rc[:2], rr[:2], beta=0.1)
    hano = hano_dpo_loss(pc[:2], pr[:2], rc[:2], rr[:2], 1.0, beta0=0.1)
    assert torch.equal(hano.losses, dpo.losses)


def test_hano_dpo_by_hand():
    """h = [1, 2, 3, 10], lambda = [1, 0.5, 2, 1], beta0 = 0.1: eta = 0.890975 (see the
    responsiveness test); beta_n = 0.1 * eta * lambda_n; loss_n = log(1 + exp(-beta_n * h_n));
    d loss_n / d logp_theta(y_w)_n = -beta_n * sigmoid(-beta_n h_n) (beta is a constant)."""
    pc, pr, rc, rr = logps_with_h([1.0, 2.0, 3.0, 10.0])
    pc.requires_grad_()
    lam = t(1.0, 0.5, 2.0, 1.0).requires_grad_()
    out = hano_dpo_loss(pc, pr, rc, rr, lam, beta0=0.1)
    eta = sigmoid(0.625) / sigmoid(1.0)
    betas = [0.1 * eta * x for x in (1.0, 0.5, 2.0, 1.0)]
    hs = (1.0, 2.0, 3.0, 10.0)
    assert_close(out.eta, torch.tensor(eta))
    assert_close(out.beta, torch.tensor(betas))
    assert_close(out.losses, torch.tensor([softplus(-b * h) for b, h in zip(betas, hs)]))
    assert_close(out.chosen_rewards, torch.tensor([b * h for b, h in zip(betas, hs)]))
    assert not out.beta.requires_grad and not out.eta.requires_grad
    out.losses.sum().backward()
    assert_close(pc.grad, torch.tensor([-b * sigmoid(-b * h) for b, h in zip(betas, hs)]))
    assert lam.grad is None  # no gradient through lambda / beta


def test_hano_dpo_uses_gather():
    """Local h = [1, 2, 3]: alone, u = [0.5, 1, 1.5], kept [1], eta = sigmoid(1)/sigmoid(1) = 1.
    A fake gather that appends another process's h = [10] gives the h = [1, 2, 3, 10] batch,
    eta = sigmoid(0.625) / sigmoid(1) = 0.890975, and beta = 0.1 * eta for the local examples."""
    seen = []

    def fake_gather(h):
        seen.append(h)
        return torch.cat([h, t(10.0)])

    args = logps_with_h([1.0, 2.0, 3.0])
    args[0].requires_grad_()
    local = hano_dpo_loss(*args, torch.ones(3), beta0=0.1)
    assert_close(local.eta, torch.tensor(1.0))
    gathered = hano_dpo_loss(*args, torch.ones(3), beta0=0.1, gather=fake_gather)
    assert len(seen) == 1 and not seen[0].requires_grad
    eta = sigmoid(0.625) / sigmoid(1.0)
    assert_close(gathered.eta, torch.tensor(eta))
    assert gathered.losses.shape == (3,)
    assert_close(gathered.beta, torch.full((3,), 0.1 * eta))


def test_hano_dpo_sft_term():
    """loss_n = DPO loss_n + 0.5 * nll_n with nll = [2, 4]: adds [1, 2]."""
    args = logps_with_h([1.0, -1.0])
    base = hano_dpo_loss(*args, torch.ones(2), beta0=0.1)
    with_sft = hano_dpo_loss(*args, torch.ones(2), beta0=0.1, chosen_nll=t(2.0, 4.0), sft_weight=0.5)
    assert_close(with_sft.losses, base.losses + t(1.0, 2.0))
    with pytest.raises(ValueError, match="chosen_nll"):
        hano_dpo_loss(*args, torch.ones(2), beta0=0.1, sft_weight=0.5)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(t(1, 2), t(1), t(1, 2), t(1, 2))
    with pytest.raises(ValueError, match="hardness_lambda"):
        hano_dpo_loss(*logps_with_h([1.0, 2.0]), t(1, 1, 1))
