"""DMPO (Bai et al. 2024, arXiv 2405.16127): the mean of K rejected completions inside one sigmoid.

    r(y)   = logp(y) - ref(y)
    loss_n = -logsigmoid(beta * r(y_w) - (beta / K) * sum_j r(y_l_j))   (K = 1: DPO)

The other multi-negative standard beside S-DPO (which puts a logsumexp over the negatives where DMPO puts
their mean); DynamicPO applies it over its boundary negatives. A per-example beta (HaRS's, pref.hars=true)
scales the whole logit, whose h_n = r(y_w) - mean_j r(y_l_j) is the one HaRS's eta already reads.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from hanorec import losses as L
from hanorec.methods import register
from hanorec.methods.base import LossOutput, Method
from hanorec.methods.knobs import BETA, K_NEGATIVES


def dmpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
              beta: float | Tensor = 0.1) -> L.PreferenceLossOutput:  # fmt: skip
    """DMPO per example. chosen (B,), rejected (B, K) (a 1-D rejected is K = 1); beta a float or (B,)."""
    L._check_beta(beta)
    if policy_rejected.dim() == 1:
        policy_rejected, ref_rejected = policy_rejected.unsqueeze(-1), ref_rejected.unsqueeze(-1)
    L._check_same_shape(policy_rejected=policy_rejected, ref_rejected=ref_rejected)
    L._check_same_shape(policy_chosen=policy_chosen, ref_chosen=ref_chosen)
    if policy_chosen.dim() != 1 or policy_rejected.shape[0] != policy_chosen.shape[0]:
        raise ValueError(
            "DMPO expects chosen log-probs of shape (B,) and rejected of shape (B, K), got "
            f"{tuple(policy_chosen.shape)} and {tuple(policy_rejected.shape)}"
        )
    dtype = L._compute_dtype(policy_chosen)
    chosen = policy_chosen.to(dtype) - ref_chosen.to(dtype)  # (B,)
    rejected = policy_rejected.to(dtype) - ref_rejected.to(dtype)  # (B, K)
    beta_b = beta.detach().to(dtype) if isinstance(beta, Tensor) else chosen.new_full(chosen.shape, float(beta))
    losses = -F.logsigmoid(beta_b * chosen - beta_b * rejected.mean(-1))
    return L.PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta_b * chosen).detach(),
        rejected_rewards=(beta_b.unsqueeze(-1) * rejected).detach(),
        beta=beta_b.expand_as(chosen).detach(),
    )


def loss(b, pref, beta, state) -> LossOutput:
    return LossOutput.of(dmpo_loss(b.policy_chosen, b.policy_rejected, b.ref_chosen, b.ref_rejected, beta=beta))


PAPER = "Bai et al. 2024, Direct Multi-Turn Preference Optimization for Language Agents (arXiv 2405.16127)"
EQUATION = "-logsigmoid(beta * r(y_w) - (beta / K) * sum_j r(y_l_j)), r(y) = logp(y) - ref(y)"
# its own row trains with K = 3 rejected answers, as S-DPO's
METHOD = register(Method("dmpo", "DMPO", PAPER, EQUATION, loss, knobs=(BETA, K_NEGATIVES), k_rejected=True,
                         hars="addon", variant={"k_negatives": 3, "noise_target": "none"}))  # fmt: skip
