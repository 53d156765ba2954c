"""HaRS as an add-on (pref.hars=true): the dynamic beta of method.md section 7 for a base loss other than
HaNo-DPO, beyond the paper.

    h_n    = r(y_w) - mean_k r(y_l_k),  r(y) = logp(y) - ref(y)   (K = 1: the DPO logit)
    eta    = responsiveness(gather(h), beta0)                       (1 when pref.responsiveness is off)
    beta_n = max(1e-6, beta0 * eta * lambda_n)                      (lambda_n = 1 when pref.hardness is off)
"""

from __future__ import annotations

import torch
from torch import Tensor

from hanorec import losses as L


def hars_beta(b, pref) -> tuple[Tensor, Tensor]:
    """(beta_n (B,), eta) for a hanorec.methods.LossBatch, both detached."""
    dtype = L._compute_dtype(b.policy_chosen)
    chosen = b.policy_chosen.to(dtype) - b.ref_chosen.to(dtype)
    rejected = (b.policy_rejected.to(dtype) - b.ref_rejected.to(dtype)).mean(-1)
    h = (chosen - rejected).detach()
    if pref.responsiveness:
        eta = L.responsiveness(b.gather(h), pref.beta).to(device=h.device, dtype=dtype)
    else:
        eta = torch.ones((), dtype=dtype, device=h.device)
    lam = b.hardness_lambda.to(dtype) if pref.hardness else torch.ones_like(h)
    return L.dynamic_beta(pref.beta, eta, lam).to(dtype), eta
