"""beta-DPO (Wu et al. 2024, arXiv 2407.08639): a batch-level beta from the reward margin's moving average,
and a Gaussian filter that trains on the pairs whose margin lies near that average.

The closest prior art to HaRS's eta: both scale beta by how the current batch separates its pairs. Our
reading of the paper, step by step (docs/method.md section 9):

    M_n     = beta0 * h_n                                   (reward margin, no gradient; gathered)
    M0, s0  = moving averages of the batch's mean and std of M  (the first batch sets them)
    w_n     = exp(-(M_n - M0)^2 / (2 s0^2))                 (the Gaussian weight around M0)
    keep    = the ceil(rho * B) pairs with the largest w_n  (ties: the earlier pair)
    beta    = max(1e-6, beta0 * (1 + alpha * (mean(M) - M0)))
    loss    = mean over kept n of -logsigmoid(beta * h_n)
    then M0 <- m M0 + (1 - m) mean(M), s0 <- m s0 + (1 - m) std(M)

M0 and s0 use the previous batches only (so the first step's beta is beta0). The paper samples the kept
pairs at random in proportion to w_n; we keep the top ceil(rho * B), which needs no random draw. M0 and s0
are the method's state: they are saved in every checkpoint (as float64), so a resumed run continues with
the same moving averages and reaches the same weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hanorec import losses as L
from hanorec.methods import register
from hanorec.methods.base import Knob, LossOutput, Method, in_range
from hanorec.methods.knobs import BETA


def init_state() -> dict:
    return {"margin_mean": None, "margin_std": None}


def beta_dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                  state: dict, *, beta0: float, alpha: float, rho: float, momentum: float,
                  gather=None) -> tuple[L.PreferenceLossOutput, Tensor, dict]:  # fmt: skip
    """(output, keep mask (B,) bool, the new state); see the module docstring. Inputs (B,); state is read,
    not modified."""
    if beta0 <= 0:
        raise ValueError(f"beta0 must be positive, got {beta0}")
    h = L.preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)  # (B,)
    margin = beta0 * h.detach()
    margin_all = (gather(margin) if gather is not None else margin).double().flatten()
    batch_mean = float(margin_all.mean())
    batch_std = float(margin_all.std(unbiased=False)) if margin_all.numel() > 1 else 0.0
    m0 = batch_mean if state.get("margin_mean") is None else float(state["margin_mean"])
    s0 = batch_std if state.get("margin_std") is None else float(state["margin_std"])
    if s0 > 1e-8:
        weight = torch.exp(-((margin.double() - m0) ** 2) / (2.0 * s0 * s0))
    else:
        weight = torch.ones_like(margin, dtype=torch.float64)
    n_keep = max(1, math.ceil(rho * margin.numel()))
    order = torch.sort(-weight, stable=True).indices[:n_keep]
    keep = torch.zeros_like(margin, dtype=torch.bool)
    keep[order] = True
    beta = max(L.BETA_FLOOR, beta0 * (1.0 + alpha * (batch_mean - m0)))
    out = L.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)
    new_state = {
        "margin_mean": momentum * m0 + (1.0 - momentum) * batch_mean,
        "margin_std": momentum * s0 + (1.0 - momentum) * batch_std,
    }
    return out, keep, new_state


def loss(b, pref, beta, state) -> LossOutput:
    out, keep, new = beta_dpo_loss(
        b.policy_chosen, b.policy_rejected[:, 0], b.ref_chosen, b.ref_rejected[:, 0], state, beta0=pref.beta,
        alpha=METHOD.option(pref, "alpha"), rho=METHOD.option(pref, "rho"),
        momentum=METHOD.option(pref, "momentum"), gather=b.gather,
    )  # fmt: skip
    logged = {"beta_dpo/margin_mean": state["margin_mean"] if state.get("margin_mean") is not None else new["margin_mean"],
              "beta_dpo/kept": float(keep.float().mean())}  # fmt: skip
    state.update(new)
    total = out.losses[keep].mean()
    return LossOutput.of(out, logged=logged, loss=total)


METHOD = register(
    Method(
        name="beta_dpo",
        label="beta-DPO",
        paper="Wu et al. 2024, beta-DPO: Direct Preference Optimization with Dynamic beta (arXiv 2407.08639)",
        equation="mean over kept pairs of -logsigmoid(beta_b * h), beta_b = beta0 (1 + alpha (mean M - M0)), "
        "M = beta0 h, M0 its moving average",
        loss_fn=loss,
        knobs=(
            BETA,
            Knob("alpha", 0.5, "alpha: how strongly the batch's mean margin above its moving average raises beta.",
                 check=lambda v: None if v >= 0 else "must be >= 0", label="alpha (beta scaling)"),
            Knob("rho", 0.8, "rho: the share of each micro-batch kept by the Gaussian filter.",
                 check=in_range(0.0, 1.0, lo_open=True, hi_open=False), label="rho (kept share)"),
            Knob("momentum", 0.9, "m: the moving averages' momentum.", check=in_range(0.0, 1.0),
                 label="momentum"),
        ),  # fmt: skip
        stateful=True,
        init_state=init_state,
        variant={"noise_target": "none"},
    )
)
