"""rDPO, robust DPO (Chowdhury et al. 2024): an unbiased DPO loss under labels flipped with rate eps."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from hanorec import losses as L
from hanorec.methods import register
from hanorec.methods.base import LossOutput, Method
from hanorec.methods.knobs import BETA, epsilon


def rdpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
              beta: float | Tensor, epsilon: float) -> L.PreferenceLossOutput:  # fmt: skip
    """loss_n = [-(1 - eps) logsigmoid(beta h_n) + eps logsigmoid(-beta h_n)] / (1 - 2 eps)  (TRL "robust").

    All inputs (B,); beta a float or a per-example (B,) tensor; eps in [0, 0.5)."""
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"epsilon must be in [0, 0.5), got {epsilon}")
    base = L.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)  # rewards, beta
    h = L.preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    z = base.beta * h
    losses = (-(1.0 - epsilon) * F.logsigmoid(z) + epsilon * F.logsigmoid(-z)) / (1.0 - 2.0 * epsilon)
    return L.PreferenceLossOutput(losses, base.chosen_rewards, base.rejected_rewards, base.beta)


def loss(b, pref, beta, state) -> LossOutput:
    out = rdpo_loss(b.policy_chosen, b.policy_rejected[:, 0], b.ref_chosen, b.ref_rejected[:, 0], beta=beta,
                    epsilon=METHOD.option(pref, "epsilon"))  # fmt: skip
    return LossOutput.of(out)


PAPER = "Chowdhury et al. 2024, Provably Robust DPO (arXiv 2403.00409); TRL loss_type='robust'"
EQUATION = "[-(1 - eps) logsigmoid(beta * h) + eps logsigmoid(-beta * h)] / (1 - 2 eps)"
# the flip rate eps is rDPO's own knob, beside the shared beta
METHOD = register(Method("rdpo", "rDPO", PAPER, EQUATION, loss, hars="addon", variant={"noise_target": "none"},
                         knobs=(BETA, epsilon(0.1, "eps: the label flip rate the loss corrects for."))))  # fmt: skip
