"""IPO (Azar et al. 2023): a squared loss pulling the length-normalised log-ratio margin to 1 / (2 beta)."""

from __future__ import annotations

from torch import Tensor

from hanorec import losses as L
from hanorec.methods import register
from hanorec.methods.base import LossOutput, Method
from hanorec.methods.knobs import BETA


def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             chosen_lengths: Tensor, rejected_lengths: Tensor, *, beta: float) -> L.PreferenceLossOutput:  # fmt: skip
    """loss_n = (r_w / |y_w| - r_l / |y_l| - 1 / (2 beta))^2, r(y) = logp(y) - ref(y), |y| its token count
    (at least 1), as TRL's loss_type="ipo" (which normalises by length, as the IPO authors confirmed).

    All inputs (B,). The logged rewards are beta * r(y), as TRL logs them."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    dtype = L._compute_dtype(policy_chosen)
    r_w = policy_chosen.to(dtype) - ref_chosen.to(dtype)
    r_l = policy_rejected.to(dtype) - ref_rejected.to(dtype)
    delta = r_w / chosen_lengths.to(dtype).clamp(min=1.0) - r_l / rejected_lengths.to(dtype).clamp(min=1.0)
    losses = (delta - 1.0 / (2.0 * beta)) ** 2
    return L.PreferenceLossOutput(losses, (beta * r_w).detach(), (beta * r_l).detach(), r_w.new_full(r_w.shape, beta))


def loss(b, pref, beta, state) -> LossOutput:
    out = ipo_loss(b.policy_chosen, b.policy_rejected[:, 0], b.ref_chosen, b.ref_rejected[:, 0],
                   b.chosen_lengths, b.rejected_lengths[:, 0], beta=beta)  # fmt: skip
    return LossOutput.of(out)


PAPER = ("Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences "
         "(arXiv 2310.12036); TRL loss_type='ipo'")  # fmt: skip
EQUATION = "(r_w / |y_w| - r_l / |y_l| - 1 / (2 beta))^2, r = logp - ref"
METHOD = register(Method("ipo", "IPO", PAPER, EQUATION, loss, knobs=(BETA,), variant={"noise_target": "none"}))
