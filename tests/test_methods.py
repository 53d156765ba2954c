"""The method registry (hanorec.methods) and the five baselines' losses, checked against values worked out
by hand from their equations (docs/method.md section 9).

Log-probs are chosen so that the preference logit h = [logp(y_w) - ref(y_w)] - [logp(y_l) - ref(y_l)] is
what the test names: policy_chosen = h, everything else 0.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from hanorec import methods
from hanorec.config import ConfigError, load_config
from hanorec.methods.beta_dpo import beta_dpo_loss
from hanorec.methods.ipo import ipo_loss
from hanorec.methods.rdpo import rdpo_loss
from hanorec.methods.simpo import simpo_loss


def logps_with_h(h):
    pc = torch.tensor(h, dtype=torch.float32)
    z = torch.zeros_like(pc)
    return pc, z.clone(), z.clone(), z.clone()


def softplus(x: float) -> float:  # -logsigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def batch(h, lengths=None, lam=None) -> methods.LossBatch:
    pc, pr, rc, rr = logps_with_h(h)
    n = torch.ones(len(h)) if lengths is None else torch.tensor(lengths, dtype=torch.float32)
    return methods.LossBatch(pc, pr.unsqueeze(1), rc, rr.unsqueeze(1), n, n.unsqueeze(1),
                             torch.ones(len(h)) if lam is None else torch.tensor(lam))  # fmt: skip


# ---- the registry ------------------------------------------------------------------------------------
def test_the_table_lists_every_method_and_ablation():
    rows = methods.table()
    names = [r["name"] for r in rows]
    assert len(rows) >= 13
    for label in ("DPO", "S-DPO", "HaNo-DPO", "HaNo-DPO w/o HaRS", "HaNo-DPO w/o NoDO", "beta-DPO", "cDPO", "rDPO",
                  "IPO", "SimPO", "DMPO", "DynamicPO", "mDPO"):  # fmt: skip
        assert label in names
    simpo = next(r for r in rows if r["name"] == "SimPO")
    assert "reference" not in simpo["needs"] and "2405.14734" in simpo["paper"]
    assert "state across batches" in next(r for r in rows if r["name"] == "beta-DPO")["needs"]
    assert list(methods.paper_variants()) == ["DPO", "S-DPO", "HaNo-DPO", "HaNo-DPO w/o HaRS", "HaNo-DPO w/o NoDO"]


def test_the_methods_command_and_config_help_read_the_registry(capsys):
    from hanorec import cli
    from hanorec.config import describe

    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    n = int(out.split()[0])  # 13 built in (a test module may have registered more)
    assert n >= 13 and out.count("    loss:  ") == n == len(methods.variants())
    assert "--pref.method=simpo" in out and "arXiv 2407.08639" in out
    help_text = describe()
    assert "--pref.options.gamma=0.5 (simpo)" in help_text and "--pref.options.rho=0.8 (beta_dpo)" in help_text


def test_config_checks_come_from_the_registry():
    cfg = load_config(overrides=["--pref.method=simpo", "--pref.options.gamma=1.5"])
    assert cfg.pref.options == {"gamma": 1.5}
    assert load_config(overrides=["--pref.method=beta_dpo"]).pref.options == {"alpha": 0.5, "rho": 0.8, "momentum": 0.9}
    bad = {
        "--pref.method=nope": "pref.method = 'nope' is not a registered preference method",
        "--pref.options.gamma=1": "pref.options.gamma = '1' is not a knob of hano_dpo",
        "--pref.options.epsilon=0.5": "pref.options.epsilon = 0.5 must be in [0, 0.5) for cdpo",
        "--pref.options.epsilon=x": "pref.options.epsilon = 'x' is not a valid float",
        "--pref.options.rho=0": "pref.options.rho = 0.0 must be in (0, 1]",
        "--pref.hars=true": "ipo has no beta that HaRS could scale",
        "--pref.k_negatives=3": "k_negatives = 3 needs a method that takes K rejected completions",
    }
    method = {"--pref.options.epsilon=0.5": "cdpo", "--pref.options.epsilon=x": "rdpo", "--pref.hars=true": "ipo",
              "--pref.options.rho=0": "beta_dpo", "--pref.k_negatives=3": "dpo", "--pref.options.gamma=1": "hano_dpo"}  # fmt: skip
    for arg, msg in bad.items():
        over = [arg] if arg.startswith("--pref.method") else [f"--pref.method={method[arg]}", arg]
        with pytest.raises(ConfigError) as e:
            load_config(overrides=over)
        assert msg in str(e.value), (arg, str(e.value))


def test_labels_name_rows_and_add_ons_beyond_the_paper():
    row = methods.variant_of("HaNo-DPO w/o NoDO")
    assert methods.label_of(row) == "HaNo-DPO w/o NoDO"
    assert methods.label_of({"method": "ipo", "noise_target": "lora", "noise_sigma": 0.1}) == "IPO + NoDO (beyond the paper)"
    assert methods.label_of({"method": "sdpo", "hars": True, "noise_target": "none", "k_negatives": 3}) == (
        "S-DPO + HaRS (beyond the paper)"
    )
    assert methods.label_of({"method": "simpo", "noise_target": "none"}) == "SimPO"


def test_hars_add_on_scales_the_base_losss_beta():
    """HaRS on S-DPO: beta_n = beta0 * eta * lambda_n, with eta from h_n = r_w - mean_k r_l_k."""
    from hanorec.methods.hars import hars_beta

    cfg = load_config(overrides=["--pref.method=sdpo", "--pref.hars=true", "--pref.k_negatives=2"]).pref
    h = [0.5, 1.0, 2.0, 4.0]
    b = batch(h, lam=[0.5, 1.0, 1.5, 2.0])
    b.policy_rejected = torch.zeros(4, 2)
    b.ref_rejected = torch.zeros(4, 2)
    beta, eta = hars_beta(b, cfg)
    u = [x / (sum(h) / 4) for x in h]  # g / mean(g), beta0 cancels
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    eta_hand = sig(sum(sorted(u)[1:-1]) / 2) / sig(sum(u) / 4)
    assert eta.item() == pytest.approx(eta_hand, rel=1e-6)
    assert_close(beta, torch.tensor([0.1 * eta_hand * x for x in (0.5, 1.0, 1.5, 2.0)]), rtol=1e-6, atol=0)
    out = methods.get("sdpo").loss(b, cfg, beta, None)
    want = [softplus(math.log(2) + math.log(math.exp(-bn * x))) for bn, x in zip(beta.tolist(), h)]
    assert_close(out.losses, torch.tensor(want), rtol=1e-5, atol=0)


# ---- the baselines, by hand ------------------------------------------------------------------------------
def test_cdpo_by_hand():
    pref = load_config(overrides=["--pref.method=cdpo", "--pref.options.epsilon=0.1"]).pref
    out = methods.get("cdpo").loss(batch([2.0]), pref, 0.1, None)
    z = 0.2
    assert out.losses.item() == pytest.approx(0.9 * softplus(-z) + 0.1 * softplus(z), rel=1e-6)  # 0.618139
    assert out.losses.item() == pytest.approx(0.618139, abs=1e-6)


def test_cdpo_in_a_comparison_trains_with_its_default_epsilon():
    """The comparison's cDPO row (its variant's pref overrides, no pref.options given) uses eps = 0.1: its loss
    and its gradient differ from DPO's; at margin 0 the gradient is exactly (1 - 2 eps) = 0.8 times DPO's."""
    import dataclasses

    from hanorec.pipeline import _with

    cfg = load_config()
    rows = {}
    for label in ("DPO", "cDPO"):
        pref = _with(cfg, pref=methods.variant_of(label)).pref
        h = torch.tensor([0.0, 2.0], requires_grad=True)
        b = dataclasses.replace(batch([0.0, 2.0]), policy_chosen=h)
        out = methods.get(pref.method).loss(b, pref, 0.1, None)
        out.losses.sum().backward()
        rows[label] = (out.losses.detach(), h.grad.clone())
    assert rows["cDPO"][0][1].item() == pytest.approx(0.9 * softplus(-0.2) + 0.1 * softplus(0.2), rel=1e-6)
    assert rows["cDPO"][0][1].item() != pytest.approx(rows["DPO"][0][1].item(), rel=1e-3)
    assert rows["cDPO"][1][0].item() == pytest.approx(0.8 * rows["DPO"][1][0].item(), rel=1e-6)
    assert rows["cDPO"][1][1].item() != pytest.approx(0.8 * rows["DPO"][1][1].item(), rel=1e-3)


def test_rdpo_by_hand():
    out = rdpo_loss(*logps_with_h([2.0, -1.0]), beta=0.1, epsilon=0.1)
    want = [(0.9 * softplus(-z) - 0.1 * softplus(z)) / 0.8 for z in (0.2, -0.1)]
    assert_close(out.losses, torch.tensor(want), rtol=1e-6, atol=0)
    assert out.losses[0].item() == pytest.approx(0.573139, abs=1e-6)
    plain = rdpo_loss(*logps_with_h([2.0]), beta=0.1, epsilon=0.0)
    assert plain.losses.item() == pytest.approx(softplus(-0.2), rel=1e-6)  # eps = 0: DPO


def test_ipo_by_hand():
    # r_w = 1 over 4 tokens, r_l = -1 over 2 tokens: delta = 0.25 + 0.5 = 0.75; target 1 / (2 * 0.5) = 1
    out = ipo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1), torch.tensor([4.0]),
                   torch.tensor([2.0]), beta=0.5)  # fmt: skip
    assert out.losses.item() == pytest.approx(0.0625, abs=1e-7)
    assert out.chosen_rewards.item() == pytest.approx(0.5) and out.rejected_rewards.item() == pytest.approx(-0.5)


def test_simpo_by_hand():
    # average log-probs -1 (chosen, 4 tokens) and -3 (rejected, 2 tokens): beta * 2 - gamma = 3.5
    out = simpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([4.0]), torch.tensor([2.0]), beta=2.0,
                     gamma=0.5)  # fmt: skip
    assert out.losses.item() == pytest.approx(softplus(-3.5), rel=1e-6)
    assert out.losses.item() == pytest.approx(0.029750, abs=1e-6)


def test_beta_dpo_by_hand():
    h = [1.0, 2.0, 3.0, 10.0]  # margins M = 0.1 h = 0.1, 0.2, 0.3, 1.0
    kw = dict(beta0=0.1, alpha=0.5, rho=0.75, momentum=0.9)
    # first batch: M0 = mean = 0.4 and s0 = std = sqrt(0.125); the pair farthest from M0 (M = 1.0) is dropped
    out, keep, state = beta_dpo_loss(*logps_with_h(h), {"margin_mean": None, "margin_std": None}, **kw)
    assert keep.tolist() == [True, True, True, False]
    assert out.beta[0].item() == pytest.approx(0.1)  # 0.1 * (1 + 0.5 * (0.4 - 0.4))
    assert state["margin_mean"] == pytest.approx(0.4) and state["margin_std"] == pytest.approx(math.sqrt(0.125))
    assert out.losses[keep].mean().item() == pytest.approx(sum(softplus(-0.1 * x) for x in h[:3]) / 3, rel=1e-6)
    # later: M0 = 0.2, s0 = 0.1 from earlier batches: beta = 0.1 * (1 + 0.5 * (0.4 - 0.2)) = 0.11
    out, keep, state = beta_dpo_loss(*logps_with_h(h), {"margin_mean": 0.2, "margin_std": 0.1}, **kw)
    assert keep.tolist() == [True, True, True, False]
    assert out.beta[0].item() == pytest.approx(0.11, rel=1e-6)
    assert out.losses[keep].mean().item() == pytest.approx(sum(softplus(-0.11 * x) for x in h[:3]) / 3, rel=1e-6)
    assert state["margin_mean"] == pytest.approx(0.9 * 0.2 + 0.1 * 0.4)
    assert state["margin_std"] == pytest.approx(0.9 * 0.1 + 0.1 * math.sqrt(0.125))


def test_beta_dpo_method_updates_its_state_and_trains_on_the_kept_pairs():
    pref = load_config(overrides=["--pref.method=beta_dpo", "--pref.options.rho=0.5"]).pref
    m = methods.get("beta_dpo")
    state = m.init_state()
    pc, pr, rc, rr = logps_with_h([1.0, 2.0, 3.0, 10.0])
    pc.requires_grad_(True)
    b = batch([1.0, 2.0, 3.0, 10.0])
    b.policy_chosen = pc
    out = m.loss(b, pref, pref.beta, state)
    out.total().backward()
    assert state["margin_mean"] == pytest.approx(0.4)
    assert (pc.grad != 0).sum() == 2  # rho = 0.5 of 4 pairs: two carry gradient
    assert out.logged["beta_dpo/kept"] == 0.5


# ---- training: beta-DPO's resume --------------------------------------
TINY = (
    "--seed=0 --model.name=tiny-llava --model.tiny_hidden_size=64 --model.tiny_vocab_size=400 --lora.r=4 "
    "--lora.alpha=8 --task.max_train_examples=16 --task.max_eval_examples=2 --sft.max_steps=1 --sft.batch_size=4 "
    "--sft.progress_bar=false --pref.max_steps=4 --pref.batch_size=4 --pref.log_every=1 --pref.save_every=1 "
    "--pref.progress_bar=false --pref.noise_target=none"
).split()


def tiny_cfg(tmp_path, *pref: str):
    """A tiny LLaVA on 16 demo examples: SFT 1 step, preference 4 steps of 4 pairs, a checkpoint every step."""
    return load_config(overrides=[*TINY, f"--output_dir={tmp_path}", *pref])


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    from hanorec.pipeline import prepare_data, run_sft

    root = tmp_path_factory.mktemp("sft")
    cfg = tiny_cfg(root)
    data = prepare_data(cfg)
    run_sft(cfg, data)
    return root, data


def test_beta_dpo_resumes_bit_exact_with_its_moving_average_in_the_checkpoint(sft_run, tmp_path):
    from hanorec.pipeline import run_preference

    root, data = sft_run
    straight = tiny_cfg(tmp_path / "a", "--pref.method=beta_dpo", f"--pref.sft_run={root}")
    bundle_a, res_a = run_preference(straight, data)
    stopped = tiny_cfg(tmp_path / "b", "--pref.method=beta_dpo", f"--pref.sft_run={root}")
    steps = []
    run_preference(stopped, data, on_log=lambda r: steps.append(r) if "loss" in r else None,
                   train_should_stop=lambda: len(steps) >= 2)  # fmt: skip
    ckpt = tmp_path / "b" / "beta_dpo" / "checkpoints" / "step-000002"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["method_state"]
    assert saved["margin_mean"] is not None and math.isfinite(saved["margin_mean"])
    bundle_b, res_b = run_preference(stopped, data)  # resumes from step 2
    assert res_a.global_step == res_b.global_step == 4
    wa = {k: v for k, v in bundle_a.model.state_dict().items() if "lora" in k}
    wb = {k: v for k, v in bundle_b.model.state_dict().items() if "lora" in k}
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    last = lambda run: json.loads((run / "beta_dpo" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())  # noqa: E731
    assert last(tmp_path / "a")["method_state"] == last(tmp_path / "b")["method_state"]


@pytest.mark.slow  # five short trainings: about 25 s of CPU time
@pytest.mark.parametrize("name", ["beta_dpo", "cdpo", "rdpo", "ipo", "simpo"])
def test_each_baseline_trains_two_steps_and_is_labelled(sft_run, tmp_path, name):
    """Two optimizer steps of each new method from the same SFT model, through the pipeline the CLI's `pref`
    runs; finite logged values, weights that moved, and the run listed under the method's label."""
    from hanorec import runs
    from hanorec.pipeline import run_preference

    root, data = sft_run
    cfg = tiny_cfg(tmp_path, f"--pref.method={name}", f"--pref.sft_run={root}", "--pref.max_steps=2")
    bundle, result = run_preference(cfg, data)
    assert result.global_step == 2
    logged = runs.read_metrics(tmp_path, name)
    assert [r["step"] for r in logged] == [1, 2] and all(math.isfinite(r["loss"]) for r in logged)
    lora_b = [v for k, v in bundle.model.state_dict().items() if "lora_B" in k]
    assert any(bool(v.abs().sum() > 0) for v in lora_b)  # B starts at 0: two steps moved it
    assert runs.run_info(tmp_path).label(name) == methods.get(name).label  # noise_target=none: no add-on
    assert runs.stage_label(None, name, tmp_path) == methods.get(name).label
