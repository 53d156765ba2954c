"""DPO (Rafailov et al. 2023): the sigmoid loss on the policy's log-ratio margin over the reference's."""

from __future__ import annotations

from hanorec import losses as L
from hanorec.methods import register
from hanorec.methods.base import LossOutput, Method
from hanorec.methods.knobs import BETA, LABEL_SMOOTHING


def loss(b, pref, beta, state) -> LossOutput:
    out = L.dpo_loss(
        b.policy_chosen, b.policy_rejected[:, 0], b.ref_chosen, b.ref_rejected[:, 0], beta=beta,
        label_smoothing=pref.label_smoothing,
    )  # fmt: skip
    return LossOutput.of(out)


PAPER = "Rafailov et al. 2023, Direct Preference Optimization (arXiv 2305.18290)"
EQUATION = "-logsigmoid(beta * h), h = [logp(y_w) - ref(y_w)] - [logp(y_l) - ref(y_l)]"
METHOD = register(Method("dpo", "DPO", PAPER, EQUATION, loss, knobs=(BETA, LABEL_SMOOTHING), hars="addon",
                         variant={"noise_target": "none"}, in_paper_comparison=True))  # fmt: skip
