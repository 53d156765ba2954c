"""SimPO (Meng et al. 2024): reference-free, length-normalised DPO with a target margin gamma."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from hanorec import losses as L
from hanorec.methods import register
from hanorec.methods.base import Knob, LossOutput, Method
from hanorec.methods.knobs import BETA


def simpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
               *, beta: float, gamma: float) -> L.PreferenceLossOutput:  # fmt: skip
    """loss_n = -logsigmoid(beta * (logp(y_w) / |y_w| - logp(y_l) / |y_l|) - gamma): no reference model.

    As TRL's CPOTrainer with loss_type="simpo", cpo_alpha=0 (which writes it as
    -logsigmoid(beta * (avg_w - avg_l - gamma / beta))). The rewards are beta * the average log-probs."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    dtype = L._compute_dtype(policy_chosen)
    avg_w = policy_chosen.to(dtype) / chosen_lengths.to(dtype).clamp(min=1.0)
    avg_l = policy_rejected.to(dtype) / rejected_lengths.to(dtype).clamp(min=1.0)
    losses = -F.logsigmoid(beta * (avg_w - avg_l - gamma / beta))
    return L.PreferenceLossOutput(losses, (beta * avg_w).detach(), (beta * avg_l).detach(),
                                  avg_w.new_full(avg_w.shape, beta))  # fmt: skip


def loss(b, pref, beta, state) -> LossOutput:
    out = simpo_loss(b.policy_chosen, b.policy_rejected[:, 0], b.chosen_lengths, b.rejected_lengths[:, 0],
                     beta=beta, gamma=METHOD.option(pref, "gamma"))  # fmt: skip
    return LossOutput.of(out)


PAPER = ("Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward "
         "(arXiv 2405.14734); TRL CPOTrainer loss_type='simpo', cpo_alpha=0")  # fmt: skip
EQUATION = "-logsigmoid(beta * (logp(y_w) / |y_w| - logp(y_l) / |y_l|) - gamma), no reference"
GAMMA = Knob("gamma", 0.5, "gamma: the target reward margin (TRL's simpo_gamma).", label="gamma (margin)",
             check=lambda v: None if v >= 0 else "must be >= 0")  # fmt: skip
METHOD = register(Method("simpo", "SimPO", PAPER, EQUATION, loss, knobs=(BETA, GAMMA), needs_reference=False,
                         variant={"noise_target": "none"}))  # fmt: skip
