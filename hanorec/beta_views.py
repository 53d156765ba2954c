"""Who sets beta? The per-pair beta that three dynamic-beta methods would give the same preference pairs.

For one preference run's training pairs, scored once with the trained policy and its reference (the policy
with its adapter disabled), side by side (docs/method.md sections 7 and 9):

- **HaRS** (HaNo-DPO): ``beta_n = max(1e-6, beta0 * eta * lambda_n)``, lambda_n from the SFT model's item
  embeddings (the pair's hardness, fixed before training) and eta per micro-batch from the margins h;
- **beta-DPO**: one beta per micro-batch, ``beta0 (1 + alpha (mean M - M0))`` with M = beta0 h and M0 the
  moving average of earlier micro-batches (hanorec/methods/beta_dpo.py), and whether its filter keeps the pair;
- **DynamicPO**: one beta per boundary negative from the policy's own log-probs
  (hanorec/methods/dynamicpo.py); a pair's beta is their mean.

The micro-batches are the pairs in order, ``batch_size`` at a time (training shuffles them, so eta and the
beta-DPO beta are what a batch of these pairs gives, not a replay of the run's own batches). Each beta is
shown against the pair's reward margin ``beta0 * h`` (h = r(y_w) - mean_j r(y_l_j), r = logp - ref: the same
x axis for every method) and, in a dataset with a teaching scenario, against whether the rejected answer
holds a planted false negative: an item of the first target's (colour, genre) cluster, as the scenario
plants them (hanorec/tasks.py; an item drawn from that cluster by chance is marked too).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from hanorec import losses as L

PAIR_COLUMNS = [
    "pair", "user", "h", "reward_margin", "lambda", "eta", "beta_hars", "beta_dpo_batch", "beta_dpo_kept",
    "beta_dynamicpo", "dynamicpo_boundary", "false_negatives",
]  # fmt: skip
NEGATIVE_COLUMNS = ["pair", "negative", "logp_chosen", "logp_rejected", "reward_margin", "boundary", "beta_dynamicpo",
                    "false_negative"]  # fmt: skip


def planted_false_negatives(pair, ds) -> list[bool] | None:
    """Per rejected answer of ``pair``: whether it holds an item of the first target's (colour, genre) cluster
    (what the false-negatives scenario plants); None when the items carry no colour and genre."""
    from hanorec.explore import taste_cluster

    key = taste_cluster(ds, pair.example.targets[0])
    if key is None:
        return None
    m = len(pair.negative_item_ids) // len(pair.rejected)  # aligned item ids per rejected answer
    return [
        any(taste_cluster(ds, i) == key for i in pair.negative_item_ids[j * m : (j + 1) * m]) for j in range(len(pair.rejected))
    ]


def betas_side_by_side(
    policy: torch.Tensor,
    reference: torch.Tensor,
    lambdas: Sequence[float],
    *,
    beta0: float = 0.1,
    batch_size: int = 4,
    alpha: float = 0.5,
    rho: float = 0.8,
    momentum: float = 0.9,
    beta_scale: float = 0.5,
    margin: float = 2.0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per pair, per rejected answer) tables from summed log-probs policy, reference (N, 1+K): column 0 the
    chosen answer, then the K rejected ones; lambdas (N,) HaRS's hardness weights (1s: hardness off).

    Per pair: h, reward_margin = beta0 h, lambda, eta and beta_hars (HaRS), beta_dpo_batch and beta_dpo_kept
    (beta-DPO over the first rejected answer, as its loss reads), beta_dynamicpo (the mean over its boundary
    negatives) and dynamicpo_boundary (how many). Per rejected answer: its reward margin beta0 (r_w - r_j),
    whether it is on DynamicPO's boundary, and its DynamicPO beta (beta0 off the boundary)."""
    from hanorec.methods.beta_dpo import beta_dpo_loss
    from hanorec.methods.dynamicpo import dynamic_betas

    pol, ref = policy.detach().double(), reference.detach().double()
    if pol.dim() != 2 or pol.shape != ref.shape or pol.shape[1] < 2:
        raise ValueError(f"policy and reference log-probs must both be (N, 1+K), got {tuple(pol.shape)} and "
                         f"{tuple(ref.shape)}")  # fmt: skip
    n = pol.shape[0]
    lam = torch.as_tensor(list(lambdas), dtype=torch.float64)
    if lam.shape != (n,):
        raise ValueError(f"{len(lam)} lambdas for {n} pairs")
    r = pol - ref
    h = r[:, 0] - r[:, 1:].mean(-1)
    eta, beta_hars, beta_b, kept = (torch.zeros(n, dtype=torch.float64) for _ in range(4))
    state = {"margin_mean": None, "margin_std": None}
    for start in range(0, n, batch_size):
        s = slice(start, min(start + batch_size, n))
        e = L.responsiveness(h[s], beta0) if s.stop - s.start >= 3 else torch.tensor(1.0, dtype=torch.float64)
        eta[s] = e
        beta_hars[s] = L.dynamic_beta(beta0, e, lam[s]).double()
        out, keep, state = beta_dpo_loss(pol[s, 0], pol[s, 1], ref[s, 0], ref[s, 1], state, beta0=beta0, alpha=alpha,
                                         rho=rho, momentum=momentum)  # fmt: skip
        beta_b[s], kept[s] = out.beta, keep.double()
    beta_j, boundary, _ = dynamic_betas(pol[:, 0], pol[:, 1:], beta0=beta0, scale=beta_scale, margin=margin)
    beta_dyn = (beta_j * boundary).sum(-1) / boundary.sum(-1)
    pairs = pd.DataFrame({
        "pair": range(n), "h": h.numpy(), "reward_margin": (beta0 * h).numpy(), "lambda": lam.numpy(),
        "eta": eta.numpy(), "beta_hars": beta_hars.numpy(), "beta_dpo_batch": beta_b.numpy(),
        "beta_dpo_kept": kept.bool().numpy(), "beta_dynamicpo": beta_dyn.numpy(),
        "dynamicpo_boundary": boundary.sum(-1).numpy(),
    })  # fmt: skip
    k = pol.shape[1] - 1
    negatives = pd.DataFrame({
        "pair": [i for i in range(n) for _ in range(k)], "negative": [j for _ in range(n) for j in range(k)],
        "logp_chosen": pol[:, :1].expand(n, k).flatten().numpy(), "logp_rejected": pol[:, 1:].flatten().numpy(),
        "reward_margin": (beta0 * (r[:, :1] - r[:, 1:])).flatten().numpy(), "boundary": boundary.flatten().numpy(),
        "beta_dynamicpo": beta_j.flatten().numpy(),
    })  # fmt: skip
    return pairs, negatives


@torch.no_grad()
def score_pairs(bundle, ds, pairs: Sequence, *, mode: str = "shared_prefix", batch_size: int = 8, progress=None):
    """(policy, reference) summed log-probs (N, 1+K) of every pair's chosen and rejected answers: the bundle's
    model as it is, then with its adapter disabled. ``progress(done, total)`` after each batch."""
    from hanorec.scoring import multi_completion_logps
    from hanorec.tasks import render
    from hanorec.train.preference import _adapter_disabled

    model = bundle.model
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    pol, ref = [], []
    with bundle.lock:  # eval mode and a disabled adapter: no concurrent caller sees them
        was = model.training
        model.eval()
        try:
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                prompts, comps = [], []
                for p in chunk:
                    rendered = render(p.example, ds)
                    prompts.append(bundle.encode_prompt(rendered.text, rendered.images))
                    comps.append([bundle.encode_completion(c) for c in (p.chosen, *p.rejected)])
                a, _ = multi_completion_logps(model, bundle, prompts, comps, mode=mode, dtype=dtype, device=device)
                with _adapter_disabled(model):
                    b, _ = multi_completion_logps(model, bundle, prompts, comps, mode=mode, dtype=dtype, device=device)
                pol += [x.double().cpu() for x in a]
                ref += [x.double().cpu() for x in b]
                if progress is not None:
                    progress(min(start + batch_size, len(pairs)), len(pairs))
        finally:
            model.train(was)
    return torch.stack(pol), torch.stack(ref)


def who_sets_beta(bundle, ds, pairs: Sequence, lambdas: Sequence[float], *, beta0: float = 0.1, batch_size: int = 4,
                  mode: str = "shared_prefix", progress=None, **knobs) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """:func:`betas_side_by_side` for ``pairs`` scored with ``bundle`` (a trained preference stage), with each
    pair's user and its planted false negatives (counts per pair, flags per rejected answer; None without a
    colour and genre on the items). knobs: alpha, rho, momentum (beta-DPO), beta_scale, margin (DynamicPO)."""
    if not pairs:
        raise ValueError("who_sets_beta needs at least one preference pair")
    policy, reference = score_pairs(bundle, ds, pairs, mode=mode, progress=progress)
    table, negatives = betas_side_by_side(policy, reference, lambdas, beta0=beta0, batch_size=batch_size, **knobs)
    planted = [planted_false_negatives(p, ds) for p in pairs]
    table.insert(1, "user", [p.example.user for p in pairs])
    table["false_negatives"] = [None if f is None else sum(f) for f in planted]
    negatives["false_negative"] = [None if f is None else f[j] for f in planted for j in range(len(f or pairs[0].rejected))]
    return table[PAIR_COLUMNS], negatives[NEGATIVE_COLUMNS]


def for_run(run_dir: str | Path, stage: str, *, max_pairs: int | None = 64, k_negatives: int | None = None,
            data_path: str | Path | None = None, progress=None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:  # fmt: skip
    """:func:`who_sets_beta` on a run's preference stage: its own data, pairs (the first ``max_pairs``; K =
    ``k_negatives`` rejected answers, the run's own by default) and beta0, HaRS's lambda from the run's SFT
    model (its item embeddings, at the run's pref.hardness_k). data_path: another dataset folder to draw the
    pairs from, e.g. the run's data remade with a teaching scenario (``make_demo(..., false_negatives=0.3)``
    with the same seed has the same items and users). Returns (per pair, per rejected answer, info: label,
    beta0, K, batch_size, the data's path and the scenario planted in it)."""
    import dataclasses

    from hanorec import methods, runs
    from hanorec.explore import training_pairs
    from hanorec.hardness import ItemIndex, pairs_table
    from hanorec.pipeline import prepare_data

    run = Path(run_dir)
    if stage == runs.SFT_STAGE:
        raise ValueError(f"{stage} is not a preference stage of {run}; choose one of its DPO-like stages")
    cfg = runs.read_config(run, stage)
    if cfg is None:
        raise ValueError(f"no configuration found for stage {stage} of {run}")
    if max_pairs is not None:
        cfg.pref = dataclasses.replace(cfg.pref, max_pairs=min(int(max_pairs), cfg.pref.max_pairs))
    if data_path is not None:
        if not Path(data_path).is_dir():
            raise ValueError(f"data_path {data_path} is not a dataset folder")
        cfg.data = dataclasses.replace(cfg.data, path=str(data_path))
    k = cfg.pref.k_negatives if k_negatives is None else int(k_negatives)
    if k < 1:
        raise ValueError(f"k_negatives = {k_negatives} must be at least 1")
    data = prepare_data(cfg)
    sft = runs.load_stage(run, runs.SFT_STAGE)
    index = ItemIndex.from_model(sft, data.dataset)
    pairs = training_pairs(cfg, data, index.ids, index.embeddings, k_negatives=k)
    lam = pairs_table(pairs, index, k=min(cfg.pref.hardness_k, len(index.ids) - 1))["lambda"].tolist()
    del sft
    bundle = runs.load_stage(run, stage)
    table, negatives = who_sets_beta(bundle, data.dataset, pairs, lam, beta0=cfg.pref.beta,
                                     batch_size=cfg.pref.batch_size, mode=cfg.pref.scoring, progress=progress)  # fmt: skip
    info = {"label": methods.label_of(cfg.pref), "beta0": cfg.pref.beta, "k_negatives": k,
            "batch_size": cfg.pref.batch_size, "data": str(cfg.data.path), "scenario": dict(data.dataset.scenario)}  # fmt: skip
    return table, negatives, info


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per method: beta's mean and range, its rank (Spearman) correlation with the reward margin (NaN when
    beta is constant) and, where false negatives are marked, its mean on pairs with one against pairs without."""
    rows = []
    marked = table["false_negatives"].notna().all() if len(table) else False
    for name, col in (("HaRS", "beta_hars"), ("beta-DPO", "beta_dpo_batch"), ("DynamicPO", "beta_dynamicpo")):
        b = table[col].astype(float)
        row = {"method": name, "beta mean": b.mean(), "beta min": b.min(), "beta max": b.max(),
               "rank corr. with margin": b.rank().corr(table["reward_margin"].astype(float).rank())}  # fmt: skip
        if marked:
            fn = table["false_negatives"].astype(float) > 0
            row["beta mean, false negative"] = b[fn].mean() if fn.any() else float("nan")
            row["beta mean, none"] = b[~fn].mean() if (~fn).any() else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)
