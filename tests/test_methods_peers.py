"""DMPO, DynamicPO and mDPO (docs/method.md section 9): hand-computed values, parity with transcriptions of
their authors' loss code, mDPO's extra forward row through the training step, and a bit-exact resume.

The transcriptions (``authors_*`` below) follow the structure of the authors' public code, in our words:
DynamicPO's ``preference_loss`` (trainer/dynamicpo_trainer.py, filter modes "DMPO" and
"DMPO_hard_negative_dynamic_beta_fixed_margin"; rejected log-probs as a dict rejected1..K of (B,) tensors,
a Python loop per example) and mDPO's ``dpo_loss`` (mdpo_trainer.py). DynamicPO's scikit-learn KMeans is
replaced in the transcription by a brute force over every assignment of the K log-probs to 3 clusters (the
least within-cluster sum of squares), an oracle independent of our sorted-split rule; where scikit-learn is
installed, a further test checks KMeans itself agrees with our rule.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from hanorec import methods
from hanorec.config import load_config
from hanorec.methods.dmpo import dmpo_loss
from hanorec.methods.dynamicpo import dynamic_betas, dynamicpo_loss, top_cluster
from hanorec.methods.mdpo import mdpo_loss


def softplus(x: float) -> float:  # -logsigmoid(-x)
    return math.log1p(math.exp(x))


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# ---- DMPO ------------------------------------------------------------------------------------------
def test_dmpo_by_hand():
    # r_w = 1, r_l = (2, -4): logit = 0.1 * 1 - 0.1 * mean(2, -4) = 0.2; second example all zero: log 2
    out = dmpo_loss(t([1.0, 0.0]), t([[2.0, -4.0], [0.0, 0.0]]), t([0.0, 0.0]), t([[0.0, 0.0], [0.0, 0.0]]), beta=0.1)
    assert out.losses.tolist() == pytest.approx([softplus(-0.2), math.log(2)], rel=1e-12)
    assert out.rejected_rewards.flatten().tolist() == pytest.approx([0.2, -0.4, 0.0, 0.0])
    # the reference enters through r = logp - ref: shifting a rejected answer's ref by 6 moves the mean by 3
    shifted = dmpo_loss(t([1.0]), t([[2.0, -4.0]]), t([0.0]), t([[6.0, 0.0]]), beta=0.1)
    assert shifted.losses.item() == pytest.approx(softplus(-0.5), rel=1e-12)


def test_dmpo_with_one_negative_is_dpo_and_takes_a_per_pair_beta():
    from hanorec import losses as L

    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4))
    assert_close(dmpo_loss(pc, pr, rc, rr, beta=0.3).losses, L.dpo_loss(pc, pr, rc, rr, beta=0.3).losses)
    beta = t([0.1, 0.2, 0.3, 0.4, 0.5])
    assert_close(dmpo_loss(pc, pr, rc, rr, beta=beta).losses, L.dpo_loss(pc, pr, rc, rr, beta=beta).losses)


def authors_dmpo(pc, pr: dict, rc, rr: dict, beta):
    """DynamicPO's preference_loss, filter mode 'DMPO' (the reference model enabled)."""
    chosen_logratios = pc - rc
    rejected_logratios = {key: pr[key] - rr[key] for key in pr}
    k = len(rejected_logratios)
    return -F.logsigmoid(beta * chosen_logratios - sum(beta * rejected_logratios[key] for key in rejected_logratios) / k)


def test_dmpo_matches_the_authors_formula():
    g = torch.Generator().manual_seed(1)
    pc, rc = torch.randn(6, generator=g) * 5, torch.randn(6, generator=g) * 5
    pr, rr = torch.randn(6, 4, generator=g) * 5, torch.randn(6, 4, generator=g) * 5
    want = authors_dmpo(pc, {f"rejected{j + 1}": pr[:, j] for j in range(4)}, rc,
                        {f"rejected{j + 1}": rr[:, j] for j in range(4)}, 0.7)  # fmt: skip
    assert_close(dmpo_loss(pc, pr, rc, rr, beta=0.7).losses, want, rtol=1e-6, atol=1e-6)


# ---- DynamicPO -------------------------------------------------------------------------------------
def test_dynamicpo_by_hand():
    beta0 = 0.1
    # example 0: p_w = -5, negatives -4 (on the boundary: -4 >= -5), -6, -8 (the rest, mean -7):
    #   d_wb = -1, d_bd = 3, beta = 0.1 (1 + 0.5 tanh((-1 - 3 - 2) / 4)); logit = beta (r_w - r_b) = -beta
    # example 1: p_w = 0, negatives -1, -1.2, -5, -9, none >= 0: the 3-means of {-9, -5, -1.2, -1} is
    #   {-9} {-5} {-1.2, -1} (sum of squares 0.02; the other splits 7.22 and 8), so the boundary is
    #   {-1, -1.2}, the rest {-5, -9} (mean -7); K = 4 with a padding negative copy of -9 in example 0
    pc = t([-5.0, 0.0])
    pr = t([[-4.0, -6.0, -8.0, -8.0], [-1.0, -1.2, -5.0, -9.0]])
    z1, z2 = torch.zeros_like(pc), torch.zeros_like(pr)
    out, boundary, by_cluster = dynamicpo_loss(pc, pr, z1, z2, beta0=beta0)
    assert boundary.tolist() == [[True, False, False, False], [True, True, False, False]]
    assert by_cluster.tolist() == [False, True]
    b0 = beta0 * (1 + 0.5 * math.tanh((-1 - (-4 + 22 / 3) - 2) / (abs(-4 + 22 / 3) + 1)))  # rest mean -22/3
    b1 = beta0 * (1 + 0.5 * math.tanh((1 - 6 - 2) / 7))
    b2 = beta0 * (1 + 0.5 * math.tanh((1.2 - 5.8 - 2) / 7))
    want = [softplus(b0 * 1.0), softplus(-(b1 * 1.0 + b2 * 1.2) / 2)]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-12)
    assert out.beta.tolist() == pytest.approx([b0, (b1 + b2) / 2], rel=1e-12)
    # three negatives, as the module docstring's first example reads: rest mean -7
    out3, _, _ = dynamicpo_loss(pc[:1], pr[:1, :3], z1[:1], z2[:1, :3], beta0=beta0)
    assert out3.losses.item() == pytest.approx(softplus(beta0 * (1 + 0.5 * math.tanh(-1.5))), rel=1e-12)


def test_dynamicpo_uses_the_policy_for_selection_and_the_reference_in_the_logit():
    pc, pr = t([-5.0]), t([[-4.0, -6.0, -8.0]])
    out_a, ba, _ = dynamicpo_loss(pc, pr, t([0.0]), t([[0.0, 0.0, 0.0]]), beta0=0.1)
    out_b, bb, _ = dynamicpo_loss(pc, pr, t([0.0]), t([[3.0, 0.0, 0.0]]), beta0=0.1)
    assert torch.equal(ba, bb)  # the reference does not move the boundary
    beta = dynamic_betas(pc, pr, beta0=0.1)[0][0, 0].item()
    assert out_b.losses.item() == pytest.approx(softplus(-beta * (-5.0 - (-4.0 - 3.0))), rel=1e-12)


def test_dynamicpo_gradient_flows_through_the_boundary_negatives_only():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([[-4.0, -6.0, -8.0]], requires_grad=True)
    out, _, _ = dynamicpo_loss(pc, pr, torch.zeros(1), torch.zeros(1, 3), beta0=0.1)
    out.losses.sum().backward()
    assert pr.grad[0, 0] != 0 and pr.grad[0, 1] == 0 and pr.grad[0, 2] == 0 and pc.grad[0] != 0


def brute_force_top(values: list[float]) -> set[int]:
    """The top cluster of the 3-partition of least within-cluster sum of squares (every assignment)."""
    best, top = math.inf, None
    for labels in itertools.product(range(3), repeat=len(values)):
        if len(set(labels)) < 3:
            continue
        groups = [[v for v, lab in zip(values, labels) if lab == c] for c in range(3)]
        cost = sum(sum((v - sum(g) / len(g)) ** 2 for v in g) for g in groups)
        if cost < best - 1e-12:
            means = [sum(g) / len(g) for g in groups]
            best, top = cost, {i for i, lab in enumerate(labels) if lab == max(range(3), key=means.__getitem__)}
    return top


def test_the_sorted_split_rule_is_the_exact_three_means():
    rng = random.Random(0)
    for _ in range(150):
        k = rng.randint(3, 7)
        values = [rng.gauss(-20, 6) for _ in range(k)]
        got = set(torch.nonzero(top_cluster(t([values]))[0]).flatten().tolist())
        assert got == brute_force_top(values), values


def test_the_sorted_split_rule_matches_scikit_learn_kmeans_wherever_kmeans_finds_the_optimum():
    """The authors call KMeans(n_clusters=3, random_state=42). Lloyd's iterations can stop in a local optimum;
    wherever KMeans reaches the least within-cluster sum of squares, its top cluster is ours, and it never finds a
    partition better than ours (ours is the exact optimum)."""
    import numpy as np
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    agree = 0
    for _ in range(60):
        k = int(rng.integers(3, 9))
        rewards = rng.normal(-20, 6, size=k)
        fit = KMeans(n_clusters=3, random_state=42).fit(rewards.reshape(-1, 1))
        high = int(np.argmax([rewards[fit.labels_ == i].mean() for i in range(3)]))
        want = set(np.where(fit.labels_ == high)[0].tolist())
        ours = set(torch.nonzero(top_cluster(t([rewards.tolist()]))[0]).flatten().tolist())
        best = min(  # the least sum of squares over every contiguous split of the sorted values
            sum(float(((g - g.mean()) ** 2).sum()) for g in np.split(np.sort(rewards), [a, b]))
            for a in range(1, k - 1) for b in range(a + 1, k)
        )
        assert fit.inertia_ >= best - 1e-9  # KMeans never beats the exact 3-means
        if fit.inertia_ <= best + 1e-9:
            assert ours == want, rewards.tolist()
            agree += 1
    assert agree >= 30  # 41 of the 60 draws here: in the other 19, KMeans (one init) stopped in a local optimum


def authors_dynamicpo(pc, pr: dict, rc, rr: dict, beta: float):
    """DynamicPO's preference_loss, filter mode 'DMPO_hard_negative_dynamic_beta_fixed_margin', with the
    reference enabled; KMeans(3) replaced by the brute-force 3-means (see the module docstring)."""
    chosen_logratios = pc - rc
    rejected_logratios = {key: pr[key] - rr[key] for key in pr}
    n = len(pc)
    batch_rejected = {i: [rejected_logratios[key][i] for key in rejected_logratios] for i in range(n)}
    batch_policy = {i: [pr[key][i] for key in pr] for i in range(n)}
    borderline_samples, policy_borderline, policy_disc_means = [], [], []
    for i in range(n):
        border = [j for j, v in enumerate(batch_policy[i]) if v >= pc[i]]
        if not border:
            border = sorted(brute_force_top([float(v) for v in batch_policy[i]]))
        disc = [j for j in range(len(batch_policy[i])) if j not in border] or border
        borderline_samples.append([batch_rejected[i][j] for j in border])
        policy_borderline.append([batch_policy[i][j] for j in border])
        policy_disc_means.append(sum(batch_policy[i][j] for j in disc) / len(disc))
    losses = []
    for i in range(n):
        betas = []
        for idx in range(len(borderline_samples[i])):
            pos_to_border = pc[i] - policy_borderline[i][idx]
            border_to_disc = policy_borderline[i][idx] - policy_disc_means[i]
            adjustment = torch.tanh((pos_to_border - border_to_disc - 2.0) / (abs(border_to_disc) + abs(pos_to_border)))
            betas.append(float(beta * (1 + adjustment * 0.5)))
        k = len(borderline_samples[i])
        terms = [betas[idx] * chosen_logratios[i] / k - betas[idx] * neg / k for idx, neg in enumerate(borderline_samples[i])]
        losses.append(-F.logsigmoid(sum(terms)))
    return torch.stack(losses)


def test_dynamicpo_matches_the_authors_loss():
    g = torch.Generator().manual_seed(3)
    for k in (3, 5):
        pc = torch.randn(8, generator=g, dtype=torch.float64) * 4 - 20
        pr = torch.randn(8, k, generator=g, dtype=torch.float64) * 4 - 22  # some above p_w, some rows none
        rc, rr = pc + torch.randn(8, generator=g, dtype=torch.float64), pr + torch.randn(8, k, generator=g, dtype=torch.float64)
        keys = [f"rejected{j + 1}" for j in range(k)]
        want = authors_dynamicpo(pc, dict(zip(keys, pr.T)), rc, dict(zip(keys, rr.T)), 1.0)
        out, boundary, by_cluster = dynamicpo_loss(pc, pr, rc, rr, beta0=1.0)
        assert 0 < int(by_cluster.sum()) < 8  # both rules are exercised
        assert_close(out.losses, want, rtol=1e-10, atol=1e-12)


# ---- mDPO ------------------------------------------------------------------------------------------
def test_mdpo_by_hand():
    # h = (-2 + 2.5) - (-3 + 2.5) = 1; image term (-2 + 4) - (-2.5 + 3) = 1.5; anchor r_w = 0.5
    args = t([-2.0]), t([-3.0]), t([-4.0]), t([-2.5]), t([-2.5]), t([-3.0])
    out, image_h, anchor = mdpo_loss(*args, beta=0.1)
    assert out.losses.item() == pytest.approx(softplus(-0.1) + softplus(-0.15) + softplus(-0.05), rel=1e-12)
    assert image_h.item() == pytest.approx(1.5) and anchor.item() == pytest.approx(0.5)
    out_d, _, _ = mdpo_loss(*args, beta=0.1, delta=0.02)
    assert out_d.losses.item() == pytest.approx(softplus(-0.1) + softplus(-0.15) + softplus(-0.03), rel=1e-12)


def authors_mdpo(pc, pr, p0, rc, rr, r0, beta):
    """mDPO's dpo_loss (mdpo_trainer.py, reference_free False)."""
    logits = (pc - pr) - (rc - rr)
    image_conditional_logits = (pc - p0) - (rc - r0)
    anchor_logits = pc - rc
    return -F.logsigmoid(beta * logits) - F.logsigmoid(beta * image_conditional_logits) - F.logsigmoid(beta * anchor_logits)


def test_mdpo_matches_the_authors_loss():
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(7, generator=g) * 10 - 30 for _ in range(6)]
    out, _, _ = mdpo_loss(*xs, beta=0.2)
    assert_close(out.losses, authors_mdpo(*xs, 0.2), rtol=1e-6, atol=1e-6)


def test_mdpo_refuses_a_batch_without_the_imageless_rows():
    b = methods.LossBatch(t([0.0]), t([[0.0]]), t([0.0]), t([[0.0]]), t([1.0]), t([[1.0]]), t([1.0]))
    with pytest.raises(ValueError, match="images blanked"):
        methods.get("mdpo").loss(b, load_config(overrides=["--pref.method=mdpo"]).pref, 0.1, None)


# ---- the registry ----------------------------------------------------------------------------------
def test_the_three_rows_their_needs_and_knob_checks():
    rows = {r["name"]: r for r in methods.table()}
    assert rows["DMPO"]["needs"] == "reference model, K rejected" and "2405.16127" in rows["DMPO"]["paper"]
    assert rows["DynamicPO"]["settings"] == "k_negatives=3, noise_target=none"
    assert "chosen without images" in rows["mDPO"]["needs"] and "2406.11839" in rows["mDPO"]["paper"]
    assert methods.get("mdpo").needs_imageless and not methods.get("dmpo").needs_imageless
    cfg = load_config(overrides=["--pref.method=dynamicpo", "--pref.k_negatives=5"])
    assert cfg.pref.options == {"beta_scale": 0.5, "margin": 2.0}
    from hanorec.config import ConfigError

    for bad, msg in (("--pref.options.beta_scale=1", "must be in [0, 1) for dynamicpo"),
                     ("--pref.options.margin=-1", "must be >= 0 for dynamicpo")):  # fmt: skip
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            load_config(overrides=["--pref.method=dynamicpo", bad])
    with pytest.raises(ConfigError, match="k_negatives = 3 needs a method that takes K rejected"):
        load_config(overrides=["--pref.method=mdpo", "--pref.k_negatives=3"])
    assert load_config(overrides=["--pref.method=dmpo", "--pref.hars=true"]).pref.hars
    with pytest.raises(ConfigError, match="dynamicpo has no beta that HaRS could scale"):
        load_config(overrides=["--pref.method=dynamicpo", "--pref.hars=true"])


# ---- mDPO's extra row through the training step ---------------------------------------------------
@pytest.fixture(scope="module")
def policy(ds):
    """A tiny LLaVA with a LoRA whose B is random: the policy differs from its reference (adapter off)."""
    from hanorec.models import add_lora, build_tiny
    from hanorec.tasks import corpus_text

    cfg = load_config(overrides=["--model.name=tiny-llava", "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0"])
    bundle = add_lora(build_tiny("tiny-llava", corpus_text(ds), hidden_size=64, vocab_size=400, seed=0), cfg.lora)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    bundle.model.float().eval()
    return bundle


@pytest.fixture(scope="module")
def items(ds):
    from hanorec.data import make_splits
    from hanorec.pairs import build_pairs
    from hanorec.tasks import TASK_SHAPES, build_examples
    from hanorec.train.preference import PrefItem

    s = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=s["n_history"], n_target=s["n_target"])
    examples = build_examples("hit3", splits.train, ds, seed=0, max_examples=3)
    return [PrefItem(p) for p in build_pairs(examples, ds, seed=0)]


@pytest.mark.parametrize("scoring", ["shared_prefix", "naive"])
def test_mdpo_step_scores_the_imageless_rows_with_the_policy_and_the_reference(policy, ds, items, scoring):
    from hanorec.scoring import naive_logps
    from hanorec.train.preference import (
        imageless_prompt,
        make_pref_collate,
        make_pref_loss,
        precompute_reference,
    )

    cfg = load_config(overrides=["--pref.method=mdpo", "--pref.noise_target=none", f"--pref.scoring={scoring}"])
    batch = make_pref_collate(policy, ds)(items)
    assert all(p.n_images > 0 for p in batch["prompts"])
    blank = [imageless_prompt(p) for p in batch["prompts"]]
    assert all(b.input_ids == p.input_ids and not b.pixel_values.any() for b, p in zip(blank, batch["prompts"]))
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x)
    with torch.no_grad():
        loss, metrics = make_pref_loss(cfg, policy, accelerator, noise=None)(policy.model, batch)
        # the same numbers, one (prompt, completion) row at a time, the images blanked by hand
        prompts = batch["prompts"] + blank
        comps = batch["completions"] + [[c[0]] for c in batch["completions"]]
        pol = [s.double() for s in naive_logps(policy.model, policy, prompts, comps)[0]]
        with policy.model.disable_adapter():
            ref = [s.double() for s in naive_logps(policy.model, policy, prompts, comps)[0]]
    n = len(items)
    stack = lambda rows, j: torch.stack([r[j] for r in rows])  # noqa: E731
    want, image_h, _ = mdpo_loss(stack(pol[:n], 0), stack(pol[:n], 1), stack(pol[n:], 0), stack(ref[:n], 0),
                                 stack(ref[:n], 1), stack(ref[n:], 0), beta=cfg.pref.beta)  # fmt: skip
    assert (stack(pol[:n], 0) - stack(pol[n:], 0)).abs().min() > 1e-4  # blanking the images changes the score
    assert loss.item() == pytest.approx(want.losses.mean().item(), rel=1e-4)
    assert metrics["mdpo/image_margin"] == pytest.approx(cfg.pref.beta * image_h.mean().item(), rel=1e-3, abs=1e-6)
    # a precomputed reference stores the imageless chosen last and gives the same loss
    pre = precompute_reference(policy, ds, items, scoring, imageless=True)
    assert all(len(p.ref_logps) == 3 for p in pre)
    with torch.no_grad():
        loss_pre, _ = make_pref_loss(cfg, policy, accelerator, noise=None)(policy.model, make_pref_collate(policy, ds)(pre))
    assert loss_pre.item() == pytest.approx(loss.item(), rel=1e-5)


# ---- training and resume -----------------------------------------------------------------------------
from test_methods import TINY, sft_run, tiny_cfg  # noqa: E402,F401  (the tiny LLaVA preset and its SFT run, defined once)

ROWS = {"dmpo": ["--pref.k_negatives=3"], "dynamicpo": ["--pref.k_negatives=3"], "mdpo": []}


@pytest.mark.slow  # three methods x (4 + 2 + 2 steps): about 40 s of CPU
@pytest.mark.parametrize("name", list(ROWS))
def test_each_resumes_bit_exact(sft_run, tmp_path, name):  # noqa: F811 (the fixture imported above)
    from hanorec import runs
    from hanorec.pipeline import run_preference

    root, data = sft_run
    args = [f"--pref.method={name}", f"--pref.sft_run={root}", *ROWS[name]]
    bundle_a, res_a = run_preference(tiny_cfg(tmp_path / "a", *args), data)
    stopped = tiny_cfg(tmp_path / "b", *args)
    steps = []
    run_preference(stopped, data, on_log=lambda r: steps.append(r) if "loss" in r else None,
                   train_should_stop=lambda: len(steps) >= 2)  # fmt: skip
    assert (tmp_path / "b" / name / "checkpoints" / "step-000002").is_dir()
    bundle_b, res_b = run_preference(stopped, data)  # resumes from step 2
    assert res_a.global_step == res_b.global_step == 4
    wa = {k: v for k, v in bundle_a.model.state_dict().items() if "lora" in k}
    wb = {k: v for k, v in bundle_b.model.state_dict().items() if "lora" in k}
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(bool(v.abs().sum() > 0) for k, v in wa.items() if "lora_B" in k)  # training moved the weights
    la, lb = runs.read_metrics(tmp_path / "a", name), runs.read_metrics(tmp_path / "b", name)
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and all(math.isfinite(r["loss"]) for r in la)
    assert runs.run_info(tmp_path / "a").label(name) == methods.get(name).label


@pytest.mark.slow  # SFT one step, then each method one step, evaluated: about 30 s of CPU
def test_each_trains_from_the_cli(tmp_path, capsys):
    """`python -m hanorec run` (SFT) then `pref --pref.method=NAME` for each, on the demo data."""
    from hanorec import cli, runs

    args = [a for a in TINY if not a.startswith(("--pref.max_steps", "--pref.save_every"))]
    args += ["--pref.max_steps=1", "--task.max_train_examples=4", f"--output_dir={tmp_path}"]
    assert cli.main(["run", *args]) == 0, capsys.readouterr().out[-2000:]
    for name in ROWS:
        assert cli.main(["pref", *args, f"--pref.method={name}", *ROWS[name]]) == 0, capsys.readouterr().out[-2000:]
        logged = runs.read_metrics(tmp_path, name)
        assert [r["step"] for r in logged] == [1] and math.isfinite(logged[0]["loss"])
        assert json.loads((tmp_path / name / "results.json").read_text())


# ---- the app: the Train tab offers them (its stage list is the registry's) --------------------------
def test_the_train_tab_offers_each_with_its_knobs():
    from app.tabs import train as T
    from hanorec.jobs import stages

    assert {"DMPO", "DynamicPO", "mDPO"} <= set(stages())
    text, beta, sigma, noise_target, k_neg, addons, *options = T.method_view("DynamicPO")
    assert "2605.00327" in text and k_neg["visible"] and addons["choices"] == ["NoDO"]
    assert {f for f, o in zip(T.option_fields(), options) if o["visible"]} == {"dynamicpo.beta_scale", "dynamicpo.margin"}
    text, beta, sigma, noise_target, k_neg, addons, *options = T.method_view("mDPO")
    assert "2406.11839" in text and not k_neg["visible"]
    assert {f for f, o in zip(T.option_fields(), options) if o["visible"]} == {"mdpo.delta"}
    assert T.method_view("DMPO")[5]["choices"] == ["HaRS", "NoDO"]
    over = T.form_overrides("d", "tiny-llava", "DynamicPO", "hit3", k_negatives=4, options={"dynamicpo.margin": 1.0})
    assert over["pref"]["k_negatives"] == 4 and over["pref"]["options"] == {"margin": 1.0}
    assert "noise_target" not in over["pref"]  # the row's own (none) stands


@pytest.mark.slow  # three app jobs (SFT 2 steps, then the method 2 steps): 60-130 s
def test_each_trains_from_the_app(tmp_path):
    from test_app_train import DEMO, FORM, make_ctx, poll_until

    from app.tabs import train as T
    from hanorec import runs

    runs_dir = (tmp_path / "runs").resolve()
    runs_dir.mkdir()
    ctx = make_ctx(runs_dir)
    try:
        for label, name in (("DMPO", "dmpo"), ("DynamicPO", "dynamicpo"), ("mDPO", "mdpo")):
            fields = {"dataset": str(DEMO), "backbone": "tiny-llava", "stage": label, "task": "hit3",
                      "sft_from": T.FROM_SCRATCH, **FORM, "max_steps": 2, "name": f"app-{name}"}  # fmt: skip
            T.launch_form(ctx, fields)
            poll_until(ctx, f"app-{name}", ["finished"], timeout=300)
            rows = runs.read_metrics(runs_dir / f"app-{name}", name)
            logged = [r for r in rows if "loss" in r]  # training steps; the preset's held-out rows come beside them
            assert [r["step"] for r in logged] == [1, 2] and all(math.isfinite(r["loss"]) for r in logged)
            assert [r["step"] for r in rows if "eval/pair_accuracy" in r] == [0, 2]  # the lesson preset's held-out pairs
            assert runs.run_info(runs_dir / f"app-{name}").label(name) == label
    finally:
        ctx.jobs.close()


def test_compare_and_the_compare_tab_offer_the_three_rows(tmp_path, capsys):
    from app.tabs.compare import knob_note
    from hanorec import cli, report
    from hanorec.jobs import comparison_request

    assert {"DMPO", "DynamicPO", "mDPO"} <= set(report.preference_methods())  # the Compare tab's checkboxes
    note = knob_note(["DynamicPO", "mDPO"])
    assert "--pref.options.beta_scale=0.5 (dynamicpo)" in note and "--pref.options.delta=0.0 (mdpo)" in note
    over, args, _ = comparison_request(dataset="assets/demo", task="hit3", methods=["DMPO", "DynamicPO", "mDPO"],
                                       seeds="0")  # fmt: skip
    assert args[-1] == "--variants=DMPO,DynamicPO,mDPO"
    # the CLI's `compare` accepts them (an unknown row fails before any training, with the offered rows)
    assert cli.main(["compare", f"--output_dir={tmp_path}", "--variants=DMPO,XPO"]) == 2
    out = capsys.readouterr()
    assert "XPO" in out.out + out.err and "mDPO" in out.out + out.err


@pytest.mark.parametrize("scoring", ["shared_prefix", "naive"])
def test_mdpo_with_nodo_per_example_draws_noises_the_imageless_row_with_its_example(policy, ds, items, scoring):
    """pref.noise_draw=example: an example's imageless row takes the example's own draw (one group id per
    example, the imageless rows included), so the step runs and the noise moves the loss."""
    from hanorec.noise import LoRANoise
    from hanorec.train.preference import make_pref_collate, make_pref_loss

    over = ["--pref.method=mdpo", f"--pref.scoring={scoring}", "--pref.noise_draw=example", "--pref.noise_sigma=0.5"]
    cfg = load_config(overrides=over)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x)
    batch = make_pref_collate(policy, ds)(items)
    seen = []
    noise = LoRANoise(policy.model, 0.5)
    real = noise.active

    def spy(group_ids=None, **kw):
        seen.append(group_ids)
        return real(group_ids=group_ids, **kw)

    noise.active = spy
    torch.manual_seed(0)
    policy.model.train()  # NoDO acts on training forwards only (lora dropout is 0 here)
    try:
        with torch.no_grad():
            noisy, _ = make_pref_loss(cfg, policy, accelerator, noise)(policy.model, batch)
            clean, _ = make_pref_loss(cfg, policy, accelerator, None)(policy.model, batch)
    finally:
        policy.model.eval()
    n = len(items)
    want = torch.cat([torch.arange(n), torch.arange(n)])
    if scoring == "naive":  # one row per completion: 2 per example, then 1 per imageless row
        want = torch.cat([torch.arange(n).repeat_interleave(2), torch.arange(n)])
    assert torch.equal(seen[0].cpu(), want)
    assert math.isfinite(noisy.item()) and noisy.item() != clean.item()
