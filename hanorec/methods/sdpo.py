"""S-DPO (Chen et al. 2024): softmax DPO over K rejected completions."""

from __future__ import annotations

from hanorec import losses as L
from hanorec.methods import register
from hanorec.methods.base import LossOutput, Method
from hanorec.methods.knobs import BETA, K_NEGATIVES


def loss(b, pref, beta, state) -> LossOutput:
    out = L.sdpo_loss(b.policy_chosen, b.policy_rejected, b.ref_chosen, b.ref_rejected, beta=beta)
    return LossOutput.of(out)


PAPER = "Chen et al. 2024, On Softmax Direct Preference Optimization for Recommendation (arXiv 2406.09215)"
EQUATION = "-logsigmoid(-logsumexp_j beta * (r(y_l_j) - r(y_w))), r(y) = logp(y) - ref(y)"
# its own row trains with K = 3 rejected answers, as the paper's comparison
METHOD = register(Method("sdpo", "S-DPO", PAPER, EQUATION, loss, knobs=(BETA, K_NEGATIVES), k_rejected=True,
                         hars="addon", variant={"k_negatives": 3, "noise_target": "none"}, in_paper_comparison=True))  # fmt: skip
