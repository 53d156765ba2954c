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
    return LossOutput(out.losses, out.chosen_rewards, out.rejected_rewards, out.beta, eta=out.eta)


METHOD = register(
    Method(
        name="hano_dpo",
        label="HaNo-DPO",
        paper="Wang et al. 2025, HaNoRec (arXiv 2511.18740)",
        equation="-logsigmoid(beta_n * h), beta_n = max(1e-6, beta0 * eta * lambda_n); NoDO noise on the policy",
        loss_fn=loss,
        knobs=(BETA, LABEL_SMOOTHING, HARDNESS, RESPONSIVENESS, SFT_WEIGHT),
        hars="builtin",
        ablations={
            "w/o HaRS": {"hardness": False, "responsiveness": False},
            "w/o NoDO": {"noise_target": "none"},
        },
        in_paper_comparison=True,
    )
)
