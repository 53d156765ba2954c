"""DynamicPO (Hu et al. 2026, arXiv 2605.00327): DMPO over each example's boundary negatives, each with its
own beta from the policy's own log-probs. Our reading of the authors' trainer (their filter mode
"DMPO_hard_negative_dynamic_beta_fixed_margin"), per example with policy log-probs p_w (chosen) and p_j
(its K rejected answers), no gradient through the selection or the betas:

    boundary B  = {j : p_j >= p_w}; when empty, the top cluster of a 3-means clustering of the p_j
    rest     D  = the other negatives (all of them when B holds every negative)
    d_wb     = p_w - p_j,  d_bd = p_j - mean_{i in D} p_i                          (j in B)
    beta_j   = beta0 * (1 + s * tanh((d_wb - d_bd - m) / (|d_bd| + |d_wb|)))       (s 0.5, m 2)
    loss     = -logsigmoid(sum_{j in B} beta_j * (r(y_w) - r(y_l_j)) / |B|),  r(y) = logp(y) - ref(y)

The clustering: the authors run scikit-learn's KMeans (3 clusters, random_state 42) on the K log-probs and
keep the cluster with the largest mean. We replace it by the exact 1-D 3-means in torch: in one dimension
an optimal k-means partition is contiguous in sorted order, so trying every pair of split points of the
sorted log-probs (K choose 2 of them at most) finds the partition of least within-cluster sum of squares,
which is what KMeans converges to whenever its Lloyd iterations reach the optimum (for the small K of a
recommendation prompt they do: tested on random draws against an independent brute force, and against
scikit-learn where it is installed). With K <= 3 every negative is its own cluster and the top one is the
largest (KMeans itself refuses K < 3). Ties: negatives equal to the top cluster's smallest value join it.
A zero denominator (p_j = p_w = mean of D) reads as tanh(-inf): beta0 (1 - s) (the authors' code gives NaN).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from hanorec import losses as L
from hanorec.methods import register
from hanorec.methods.base import Knob, LossOutput, Method, in_range
from hanorec.methods.knobs import BETA, K_NEGATIVES


def top_cluster(values: Tensor) -> Tensor:
    """(B, K) bool: per row, the members of the highest cluster of the exact 1-D 3-means of ``values``."""
    x = values.detach().double()
    k = x.shape[-1]
    s, _ = torch.sort(x, dim=-1)  # ascending
    if k <= 3:
        return x >= s[:, -1:]
    c1 = torch.cat([torch.zeros_like(s[:, :1]), s.cumsum(-1)], -1)  # prefix sums (B, K+1)
    c2 = torch.cat([torch.zeros_like(s[:, :1]), (s * s).cumsum(-1)], -1)

    def sse(i: int, j: int) -> Tensor:  # within-cluster sum of squares of sorted positions [i, j)
        return (c2[:, j] - c2[:, i]) - (c1[:, j] - c1[:, i]) ** 2 / (j - i)

    splits = list(itertools.combinations(range(1, k), 2))  # (a, b): clusters [0, a), [a, b), [b, K)
    cost = torch.stack([sse(0, a) + sse(a, b) + sse(b, k) for a, b in splits], -1)  # (B, n splits)
    best = torch.tensor([b for _, b in splits], device=x.device)[cost.argmin(-1)]  # first least cost
    threshold = s.gather(-1, best.unsqueeze(-1))
    return x >= threshold


@torch.no_grad()
def dynamic_betas(policy_chosen: Tensor, policy_rejected: Tensor, *, beta0: float, scale: float = 0.5,
                  margin: float = 2.0) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(beta (B, K), boundary mask (B, K) bool, cluster rule used (B,) bool) from the policy's summed
    log-probs of the chosen (B,) and the K rejected answers (B, K); beta is beta0 outside the boundary."""
    p_w = policy_chosen.detach().double().unsqueeze(-1)
    p = policy_rejected.detach().double()
    boundary = p >= p_w
    by_cluster = ~boundary.any(-1)
    boundary = torch.where(by_cluster.unsqueeze(-1), top_cluster(p), boundary)
    rest = ~boundary
    rest = torch.where(rest.any(-1, keepdim=True), rest, boundary)  # every negative on the boundary: all
    mean_rest = (p * rest).sum(-1, keepdim=True) / rest.sum(-1, keepdim=True)
    d_wb, d_bd = p_w - p, p - mean_rest
    denom = (d_bd.abs() + d_wb.abs()).clamp_min(1e-300)
    beta = beta0 * (1.0 + scale * torch.tanh((d_wb - d_bd - margin) / denom))
    beta = torch.where(boundary, beta, torch.full_like(beta, beta0))
    return beta, boundary, by_cluster


def dynamicpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
                   beta0: float, scale: float = 0.5, margin: float = 2.0):  # fmt: skip
    """(hanorec.losses.PreferenceLossOutput, boundary mask (B, K), cluster rule used (B,)); see the module
    docstring. beta in the output is each example's mean beta over its boundary negatives."""
    L._check_beta(beta0)
    if policy_rejected.dim() == 1:
        policy_rejected, ref_rejected = policy_rejected.unsqueeze(-1), ref_rejected.unsqueeze(-1)
    L._check_same_shape(policy_rejected=policy_rejected, ref_rejected=ref_rejected)
    dtype = L._compute_dtype(policy_chosen)
    beta, boundary, by_cluster = dynamic_betas(policy_chosen, policy_rejected, beta0=beta0, scale=scale,
                                               margin=margin)  # fmt: skip
    beta, keep = beta.to(dtype), boundary.to(dtype)
    chosen = policy_chosen.to(dtype) - ref_chosen.to(dtype)  # (B,)
    rejected = policy_rejected.to(dtype) - ref_rejected.to(dtype)  # (B, K)
    n = keep.sum(-1)
    logits = (keep * beta * (chosen.unsqueeze(-1) - rejected)).sum(-1) / n
    beta_pair = (keep * beta).sum(-1) / n
    out = L.PreferenceLossOutput(
        losses=-F.logsigmoid(logits),
        chosen_rewards=(beta_pair * chosen).detach(),
        rejected_rewards=(beta_pair.unsqueeze(-1) * rejected).detach(),
        beta=beta_pair.detach(),
    )
    return out, boundary, by_cluster


def loss(b, pref, beta, state) -> LossOutput:
    out, boundary, by_cluster = dynamicpo_loss(
        b.policy_chosen, b.policy_rejected, b.ref_chosen, b.ref_rejected, beta0=pref.beta,
        scale=METHOD.option(pref, "beta_scale"), margin=METHOD.option(pref, "margin"),
    )  # fmt: skip
    logged = {"dynamicpo/boundary_share": float(boundary.float().mean()),
              "dynamicpo/cluster_rule": float(by_cluster.float().mean())}  # fmt: skip
    return LossOutput.of(out, logged=logged)


METHOD = register(
    Method(
        name="dynamicpo",
        label="DynamicPO",
        paper="Hu et al. 2026, DynamicPO: Dynamic Preference Optimization for Recommendation (arXiv 2605.00327)",
        equation="-logsigmoid(mean_{j in B} beta_j (r(y_w) - r(y_l_j))), B = {p_j >= p_w} or the top 3-means "
        "cluster, beta_j = beta0 (1 + s tanh((d_wb - d_bd - m) / (|d_wb| + |d_bd|)))",
        loss_fn=loss,
        knobs=(
            BETA,
            K_NEGATIVES,
            Knob("beta_scale", 0.5, "s: how far a boundary negative's beta moves from beta0 (beta0 (1 +- s)).",
                 check=in_range(0.0, 1.0), label="s (beta scale)"),
            Knob("margin", 2.0, "m: the fixed margin subtracted inside the tanh (the authors' 2.0).",
                 check=lambda v: None if v >= 0 else "must be >= 0", label="m (fixed margin)"),
        ),  # fmt: skip
        k_rejected=True,
        variant={"k_negatives": 3, "noise_target": "none"},
    )
)
