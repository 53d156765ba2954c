"""Preference losses: DPO, S-DPO and HaNo-DPO (HaRS dynamic beta), as pure functions over tensors.

Every function takes per-example SUMMED completion log-probs, logp(y|x) = sum of the completion
tokens' log-probs, for the policy (theta) and the reference (ref, the SFT model), and returns
per-example losses and rewards. No model, no batch dicts, no I/O: the trainer computes the
log-probs and reduces ``losses.mean()``.

Gradients flow through the policy log-probs only. beta, eta (responsiveness) and lambda
(hardness) are always detached, and the rewards are detached because they are for logging.

Equations are those of docs/method.md: section 7 (HaRS) and section 9 (DPO, S-DPO).
Arithmetic runs in at least float32 (bf16/fp16 inputs are upcast), float64 inputs stay float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PreferenceLossOutput",
    "preference_logits",
    "dpo_loss",
    "sdpo_loss",
    "responsiveness",
    "dynamic_beta",
    "hano_dpo_loss",
]

BETA_FLOOR = 1e-6  # method.md section 7: beta_n = max(1e-6, beta0 * eta * lambda_n)
MEAN_FLOOR = 1e-8  # method.md section 7: if |m| <= 1e-8 use max(mean|g|, 1e-8)


@dataclass
class PreferenceLossOutput:
    """Per-example outputs of a preference loss.

    losses: (B,) per-example losses; the training loss is ``losses.mean()``.
    chosen_rewards: (B,) beta * (logp_theta(y_w) - logp_ref(y_w)), detached.
    rejected_rewards: (B,) for DPO / HaNo-DPO, (B, K) for S-DPO, detached.
    beta: (B,) the beta each example used, detached (constant for DPO / S-DPO).
    eta: HaNo-DPO responsiveness, a detached scalar (1.0 when responsiveness is off); None otherwise.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    beta: Tensor
    eta: Tensor | None = None


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"log-prob tensors must have the same shape, got {shapes}")


def _check_beta(beta) -> None:
    """beta is a positive float, or a tensor of positive per-example betas."""
    bad = bool((beta <= 0).any()) if isinstance(beta, Tensor) else beta <= 0
    if bad:
        raise ValueError(f"beta must be positive, got {beta}")


def _smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z): TRL's "sigmoid" DPO loss (cDPO when eps > 0)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    losses = -F.logsigmoid(logits) * (1.0 - label_smoothing)
    if label_smoothing > 0.0:
        losses = losses - F.logsigmoid(-logits) * label_smoothing
    return losses


def preference_logits(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> Tensor:
    """Preference logit h_n (method.md section 7).

    h_n = [logp_theta(y_w) - logp_ref(y_w)] - [logp_theta(y_l) - logp_ref(y_l)]   # (B,)
    """
    _check_same_shape(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
    )
    dtype = _compute_dtype(policy_chosen)
    chosen_logratios = policy_chosen.to(dtype) - ref_chosen.to(dtype)
    rejected_logratios = policy_rejected.to(dtype) - ref_rejected.to(dtype)
    return chosen_logratios - rejected_logratios


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float | Tensor = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """Plain DPO, TRL's "sigmoid" loss (method.md section 9, the DPO peer).

    loss_n = -(1 - eps) * logsigmoid(beta * h_n) - eps * logsigmoid(-beta * h_n),
    with h_n from :func:`preference_logits` and eps = label_smoothing (0 = standard DPO).
    All inputs are (B,) summed completion log-probs; beta is a float or a per-example (B,) tensor.
    """
    _check_beta(beta)
    h = preference_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    beta_t = torch.full_like(h, beta) if not isinstance(beta, Tensor) else beta.detach().to(h.dtype).expand_as(h)
    losses = _smoothed_sigmoid_loss(beta_t * h, label_smoothing)
    dtype = h.dtype
    chosen_rewards = beta_t * (policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype))
    rejected_rewards = beta_t * (policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype))
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        beta=beta_t,
    )


def sdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float | Tensor = 0.1,
) -> PreferenceLossOutput:
    """S-DPO, softmax DPO over K negatives (method.md section 9).

    r(y) = logp_theta(y) - logp_ref(y);
    loss_n = -logsigmoid(-logsumexp_j(beta * (r(l_j) - r(w)))), computed with logsumexp for stability.
    With K = 1 this is exactly DPO: -logsigmoid(-beta * (r(l) - r(w))) = -logsigmoid(beta * h).

    Shapes: chosen (B,), rejected (B, K). A 1-D rejected tensor (B,) is read as K = 1.
    """
    _check_beta(beta)
    if policy_rejected_logps.dim() == 1:
        policy_rejected_logps = policy_rejected_logps.unsqueeze(-1)
    if ref_rejected_logps.dim() == 1:
        ref_rejected_logps = ref_rejected_logps.unsqueeze(-1)
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, ref_chosen_logps=ref_chosen_logps)
    _check_same_shape(policy_rejected_logps=policy_rejected_logps, ref_rejected_logps=ref_rejected_logps)
    if policy_chosen_logps.dim() != 1 or policy_rejected_logps.shape[0] != policy_chosen_logps.shape[0]:
        raise ValueError(
            "S-DPO expects chosen log-probs of shape (B,) and rejected of shape (B, K), got "
            f"{tuple(policy_chosen_logps.shape)} and {tuple(policy_rejected_logps.shape)}"
        )
    dtype = _compute_dtype(policy_chosen_logps)
    chosen_logratios = policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype)  # (B,)
    rejected_logratios = policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype)  # (B, K)
    if isinstance(beta, Tensor):  # a per-example beta (B,), e.g. HaRS's
        beta_b = beta.detach().to(dtype)
        logits = beta_b.unsqueeze(-1) * (rejected_logratios - chosen_logratios.unsqueeze(-1))  # (B, K)
        losses = -F.logsigmoid(-torch.logsumexp(logits, dim=-1))  # (B,)
        return PreferenceLossOutput(
            losses=losses,
            chosen_rewards=(beta_b * chosen_logratios).detach(),
            rejected_rewards=(beta_b.unsqueeze(-1) * rejected_logratios).detach(),
            beta=beta_b.expand_as(chosen_logratios),
        )
    logits = beta * (rejected_logratios - chosen_logratios.unsqueeze(-1))  # (B, K)
    losses = -F.logsigmoid(-torch.logsumexp(logits, dim=-1))  # (B,)
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
        beta=torch.full_like(chosen_logratios, beta).detach(),
    )


@torch.no_grad()
def responsiveness(h_global: Tensor, beta0: float) -> Tensor:
    """Responsiveness eta of a (gathered) micro-batch (method.md section 7), a scalar without grad.

    g_n = beta0 * h_n; m = mean(g), and if |m| <= 1e-8 then m = max(mean|g|, 1e-8); u_n = g_n / m;
    drop the single smallest and the single largest u (only when there are more than 2 values);
    eta = sigmoid(mean of the kept u) / sigmoid(mean of all u).

    With fewer than 3 values nothing is dropped, so the kept u are all u and eta = 1 exactly
    (the method says eta "needs a batch of at least 3"); this function returns 1 in that case.
    """
    g = (beta0 * h_global.detach().to(_compute_dtype(h_global))).flatten()  # (N,)
    one = torch.ones((), dtype=g.dtype, device=g.device)
    if g.numel() < 3:
        return one
    m = g.mean()
    if m.abs() <= MEAN_FLOOR:
        m = g.abs().mean().clamp_min(MEAN_FLOOR)
    u = g / m  # (N,)
    kept = torch.sort(u).values[1:-1]  # (N-2,) one smallest and one largest dropped
    return torch.sigmoid(kept.mean()) / torch.sigmoid(u.mean())


def dynamic_beta(beta0: float, eta: Tensor | float, hardness_lambda: Tensor | float) -> Tensor:
    """Dynamic beta of HaRS (method.md section 7): beta_n = max(1e-6, beta0 * eta * lambda_n), detached.

    eta is the batch responsiveness (scalar); hardness_lambda is lambda_n per example (B,), computed
    offline as sigmoid(D_n) / sigmoid(mean D). A hard pair (lambda < 1) gets a smaller beta.
    """
    lam = torch.as_tensor(hardness_lambda).detach()
    if not lam.is_floating_point():
        lam = lam.float()
    eta_t = torch.as_tensor(eta, device=lam.device).detach()
    dtype = torch.promote_types(torch.promote_types(lam.dtype, eta_t.dtype), torch.float32)
    beta = beta0 * eta_t.to(dtype) * lam.to(dtype)
    return beta.clamp_min(BETA_FLOOR).detach()


def hano_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    hardness_lambda: Tensor | float,
    *,
    beta0: float = 0.1,
    label_smoothing: float = 0.0,
    use_responsiveness: bool = True,
    gather: Callable[[Tensor], Tensor] | None = None,
    chosen_nll: Tensor | None = None,
    sft_weight: float = 0.0,
) -> PreferenceLossOutput:
    """HaNo-DPO loss with the HaRS dynamic beta (method.md section 7).

    h_n    = [logp_theta(y_w) - logp_ref(y_w)] - [logp_theta(y_l) - logp_ref(y_l)]      (B,)
    eta    = responsiveness(gather(h.detach()), beta0)   (1 when use_responsiveness=False)
    beta_n = max(1e-6, beta0 * eta * lambda_n)            (detached)
    loss_n = -(1 - eps) * logsigmoid(beta_n h_n) - eps * logsigmoid(-beta_n h_n) + sft_weight * nll_n

    gather: maps the local (B,) h to the micro-batch gathered across processes (for example
        ``accelerator.gather``); it is a collective, so every process must call this loss each
        step. None means local only.
    chosen_nll: (B,) per-example mean-token NLL of y_w, required when sft_weight != 0.
    With lambda = 1 and eta = 1 this is exactly :func:`dpo_loss` with beta = beta0.
    """
    if beta0 <= 0:
        raise ValueError(f"beta0 must be positive, got {beta0}")
    h = preference_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    dtype = h.dtype
    if use_responsiveness:
        h_global = gather(h.detach()) if gather is not None else h.detach()
        eta = responsiveness(h_global, beta0).to(device=h.device, dtype=dtype)
    else:
        eta = torch.ones((), dtype=dtype, device=h.device)
    lam = torch.as_tensor(hardness_lambda, device=h.device).detach().to(dtype)
    if lam.dim() == 0:
        lam = lam.expand_as(h)
    if lam.shape != h.shape:
        raise ValueError(f"hardness_lambda must have shape {tuple(h.shape)}, got {tuple(lam.shape)}")
    beta = dynamic_beta(beta0, eta, lam)  # (B,)
    losses = _smoothed_sigmoid_loss(beta * h, label_smoothing)  # (B,)
    if sft_weight != 0.0:
        if chosen_nll is None:
            raise ValueError("sft_weight is non-zero but chosen_nll (mean-token NLL of y_w) was not given")
        _check_same_shape(chosen_nll=chosen_nll, losses=losses)
        losses = losses + sft_weight * chosen_nll.to(dtype)
    chosen_rewards = beta * (policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype))
    rejected_rewards = beta * (policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype))
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        beta=beta,
        eta=eta.detach(),
    )
