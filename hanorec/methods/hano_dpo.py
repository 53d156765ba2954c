"""HaNo-DPO (Wang et al. 2025, HaNoRec): DPO with the HaRS dynamic beta, trained under NoDO noise."""

from __future__ import annotations

import torch

from hanorec import losses as L
from hanorec.methods import register
from hanorec.methods.base import LossOutput, Method
from hanorec.methods.knobs import BETA, HARDNESS, LABEL_SMOOTHING, RESPONSIVENESS, SFT_WEIGHT


def loss(b, pref, beta, state) -> LossOutput:
    lam = b.hardness_lambda if pref.hardness else torch.ones_like(b.policy_chosen)
    out = L.hano_dpo_loss(
        b.policy_chosen,
        b.policy_rejected[:, 0],
        b.ref_chosen,
        b.ref_rejected[:, 0],
        lam,
        beta0=pref.beta,
        label_smoothing=pref.label_smoothing,
        use_responsiveness=pref.responsiveness,
        gather=b.gather,
        chosen_nll=-b.policy_chosen / b.chosen_lengths.clamp(min=1),
        sft_weight=pref.sft_weight,
    )
    return LossOutput.of(out)


PAPER = "Wang et al. 2025, HaNoRec (arXiv 2511.18740)"
EQUATION = "-logsigmoid(beta_n * h), beta_n = max(1e-6, beta0 * eta * lambda_n); NoDO noise on the policy"
ABLATIONS = {"w/o HaRS": {"hardness": False, "responsiveness": False}, "w/o NoDO": {"noise_target": "none"}}
METHOD = register(Method("hano_dpo", "HaNo-DPO", PAPER, EQUATION, loss, hars="builtin", ablations=ABLATIONS,
                         knobs=(BETA, LABEL_SMOOTHING, HARDNESS, RESPONSIVENESS, SFT_WEIGHT), in_paper_comparison=True))  # fmt: skip
