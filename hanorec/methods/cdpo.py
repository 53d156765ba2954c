"""cDPO, conservative DPO (Mitchell 2023): the DPO sigmoid loss with label smoothing eps, read as the
probability that a pair's labels are flipped."""

from __future__ import annotations

from hanorec import losses as L
from hanorec.methods import register
from hanorec.methods.base import LossOutput, Method
from hanorec.methods.knobs import BETA, epsilon


def loss(b, pref, beta, state) -> LossOutput:
    eps = METHOD.option(pref, "epsilon")
    out = L.dpo_loss(
        b.policy_chosen, b.policy_rejected[:, 0], b.ref_chosen, b.ref_rejected[:, 0], beta=beta, label_smoothing=eps
    )
    return LossOutput.of(out)


PAPER = "Mitchell 2023, A note on DPO with noisy preferences (cDPO); TRL's label_smoothing"
EQUATION = "-(1 - eps) logsigmoid(beta * h) - eps logsigmoid(-beta * h)"
EPSILON = epsilon(0.1, "eps: the assumed probability that a pair's preference label is flipped.")
METHOD = register(Method("cdpo", "cDPO", PAPER, EQUATION, loss, knobs=(BETA, EPSILON), hars="addon",
                         variant={"noise_target": "none"}))  # fmt: skip
