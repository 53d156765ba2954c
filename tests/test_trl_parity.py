"""Our DPO equals TRL's DPOTrainer (loss_type "sigmoid") on the same tiny model and batch.

TRL builds the batch: its own tokenization of a 2-example prompt/chosen/rejected dataset (EOS added to
the completions) and its own collator, giving input_ids = [chosen rows; rejected rows] and a
completion_mask. We read the prompt and completion token ids back from those tensors and score them
with hanorec.scoring (one row per (prompt, completion), like TRL) and hanorec.losses.dpo_loss:

    logp(y|x) = sum of the completion tokens' log-probs                      (TRL: logps.sum(dim=1))
    loss      = mean_n -logsigmoid(beta * ([logp(y_w) - ref(y_w)] - [logp(y_l) - ref(y_l)]))
    rewards   = beta * (logp - ref); accuracies = mean(chosen > rejected); margins = chosen - rejected

The reference differs from the policy (perturbed copy, or the policy's perturbed LoRA disabled), so the
loss is not trivially log 2.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("datasets", reason="the datasets package (a TRL dependency) is not installed")
trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from hanorec import losses as L  # noqa: E402
from hanorec.config import load_config  # noqa: E402
from hanorec.data import make_splits  # noqa: E402
from hanorec.models import EncodedPrompt, ModelBundle, build_tiny  # noqa: E402
from hanorec.scoring import naive_logps  # noqa: E402
from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text  # noqa: E402
from hanorec.train.preference import make_pref_loss  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"
BETA = 0.1
TOL = 1e-5
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_clean_accelerate_state():
    """One thread for tiny matmuls; afterwards drop the (cpu) accelerate state TRL's Trainer created."""
    from accelerate.state import AcceleratorState

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def preference_data(ds):
    """Two text-only hit3 prompts (image placeholders dropped), chosen = the answer, rejected = a negative."""
    s = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=s["n_history"], n_target=s["n_target"])
    return build_examples("hit3", splits.train, ds, seed=0, max_examples=2)


def fresh_bundle(ds) -> ModelBundle:
    b = build_tiny("tiny-llava", corpus_text(ds), hidden_size=64, vocab_size=400, seed=0)
    b.model.float().eval()
    return b


def trl_dataset(bundle, examples) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [bundle.chat_text(e.prompt.replace("<image> ", "")) for e in examples],
            "chosen": [e.answer for e in examples],
            "rejected": [e.options[e.candidates.index(e.negatives[0])] for e in examples],
        }
    )


def trl_args(tmp_path, loss_type: str = "sigmoid", **kw) -> DPOConfig:
    kw.setdefault("beta", BETA)
    return DPOConfig(
        output_dir=str(tmp_path),
        loss_type=[loss_type],
        **kw,
        per_device_train_batch_size=2,
        max_length=None,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        precompute_ref_log_probs=False,
    )


def trl_batch(trainer) -> dict:
    """A batch made by TRL's own collator from its own tokenized dataset."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


def ids_from_trl_batch(batch) -> tuple[list[EncodedPrompt], list[list[list[int]]]]:
    """Prompt ids and [chosen ids, rejected ids] per example, read back from TRL's tensors."""
    ids, cm, am = batch["input_ids"], batch["completion_mask"], batch["attention_mask"]
    n = ids.shape[0] // 2  # rows: chosen of every example, then rejected of every example
    prompts, completions = [], []
    for i in range(n):
        start = int(cm[i].nonzero()[0])
        assert int(cm[n + i].nonzero()[0]) == start
        assert torch.equal(ids[i, :start], ids[n + i, :start])  # the same prompt in both rows
        comp = []
        for row in (i, n + i):
            c = ids[row][cm[row].bool()]
            assert bool(am[row][cm[row].bool()].all())
            assert int(cm[row].nonzero()[-1]) + 1 == int(am[row].sum())  # the completion ends the row
            comp.append(c.tolist())
        prompts.append(EncodedPrompt(ids[i, :start].tolist(), None))
        completions.append(comp)
    return prompts, completions


def trl_loss_and_metrics(trainer, batch) -> tuple[float, dict]:
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    return float(loss), metrics


def our_loss_fn(bundle, **pref):
    cfg = load_config(overrides={"pref": {"method": "dpo", "beta": BETA, "noise_target": "none", **pref}})
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t)
    return make_pref_loss(cfg, bundle, accelerator, noise=None)


def _pref_batch(prompts, completions, ref=None) -> dict:
    return {
        "prompts": prompts,
        "completions": completions,
        "lambda": torch.ones(len(prompts)),
        "ref": ref,
    }


def trainer_with_ref_model(ds, examples, args):
    """(bundle, policy, reference, TRL DPOTrainer): the reference is a perturbed copy of the policy."""
    bundle = fresh_bundle(ds)
    policy = bundle.model
    ref_model = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=trl_dataset(bundle, examples),
                         processing_class=bundle.tokenizer)  # fmt: skip
    return bundle, policy, ref_model, trainer


def test_dpo_loss_matches_trl_with_explicit_ref_model(ds, preference_data, tmp_path):
    bundle, policy, ref_model, trainer = trainer_with_ref_model(ds, preference_data, trl_args(tmp_path))
    batch = trl_batch(trainer)
    trl_loss, trl_metrics = trl_loss_and_metrics(trainer, batch)
    assert abs(trl_loss - math.log(2)) > 1e-3, "the reference must differ from the policy"

    prompts, completions = ids_from_trl_batch(batch)
    eos = bundle.eos_token_id
    assert all(c[-1] == eos for cs in completions for c in cs)  # TRL appended EOS, as our encode does
    with torch.no_grad():
        pol, _ = naive_logps(policy, bundle, prompts, completions)
        ref, _ = naive_logps(ref_model, bundle, prompts, completions)
    pol, ref = torch.stack(pol), torch.stack(ref)  # (B, 2): chosen, rejected
    out = L.dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=BETA)
    assert_close(out.losses.mean(), torch.tensor(trl_loss), atol=TOL, rtol=0)
    ours = {
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean().item(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean().item(),
    }
    for k in TRL_METRICS:
        assert ours[k] == pytest.approx(trl_metrics[k], abs=TOL), k
    assert pol[:, 0].mean().item() == pytest.approx(trl_metrics["logps/chosen"], rel=1e-5)
    assert pol[:, 1].mean().item() == pytest.approx(trl_metrics["logps/rejected"], rel=1e-5)

    # the training loss function (reference log-probs precomputed from the same ref model)
    loss_fn = our_loss_fn(bundle, scoring="naive")
    with torch.no_grad():
        loss, metrics = loss_fn(policy, _pref_batch(prompts, completions, ref=ref))
    assert_close(loss, torch.tensor(trl_loss), atol=TOL, rtol=0)
    for k in (*TRL_METRICS, "logps/chosen", "logps/rejected"):
        assert metrics[k] == pytest.approx(trl_metrics[k], abs=TOL, rel=1e-5), k


def test_dpo_with_disabled_adapter_reference_matches_trl_peft(ds, preference_data, tmp_path):
    """TRL trains a new adapter against the model with adapters disabled; so do we (reference_logps)."""
    bundle = fresh_bundle(ds)
    peft_config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    trainer = DPOTrainer(
        model=bundle.model,
        args=trl_args(tmp_path),
        train_dataset=trl_dataset(bundle, preference_data),
        processing_class=bundle.tokenizer,
        peft_config=peft_config,
    )
    assert trainer.ref_model is None
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    batch = trl_batch(trainer)
    trl_loss, trl_metrics = trl_loss_and_metrics(trainer, batch)
    assert abs(trl_loss - math.log(2)) > 1e-3

    bundle.model = trainer.model  # the PeftModel TRL built
    prompts, completions = ids_from_trl_batch(batch)
    for scoring in ("naive", "shared_prefix"):
        loss_fn = our_loss_fn(bundle, scoring=scoring)
        with torch.no_grad():
            loss, metrics = loss_fn(trainer.model, _pref_batch(prompts, completions))
        assert_close(loss, torch.tensor(trl_loss), atol=TOL, rtol=0)
        for k in TRL_METRICS:
            assert metrics[k] == pytest.approx(trl_metrics[k], abs=TOL), (scoring, k)


# ---- the baselines TRL implements ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("loss_type", "trl_kw", "pref"),
    [
        # beta = 1 (target margin 1/2): with beta 0.1 the loss is ~25, where float32 leaves 1e-5 of rounding
        ("ipo", {"beta": 1.0}, {"method": "ipo", "beta": 1.0}),
        ("robust", {"label_smoothing": 0.2}, {"method": "rdpo", "options": {"epsilon": 0.2}}),
    ],
)
def test_ipo_and_rdpo_match_trl_dpo_trainer(ds, preference_data, tmp_path, loss_type, trl_kw, pref):
    """TRL's DPOTrainer with loss_type ipo / robust on its own batch; our training loss function (the
    registry's ipo / rdpo) on the same token ids, reference log-probs from the same reference model."""
    args = trl_args(tmp_path, loss_type, **trl_kw)
    bundle, policy, ref_model, trainer = trainer_with_ref_model(ds, preference_data, args)
    batch = trl_batch(trainer)
    trl_loss, trl_metrics = trl_loss_and_metrics(trainer, batch)
    prompts, completions = ids_from_trl_batch(batch)
    with torch.no_grad():
        ref, _ = naive_logps(ref_model, bundle, prompts, completions)
        loss, metrics = our_loss_fn(bundle, scoring="naive", **pref)(policy, _pref_batch(prompts, completions,
                                                                                        ref=torch.stack(ref)))  # fmt: skip
    assert trl_loss > 1e-4
    assert_close(loss, torch.tensor(trl_loss), atol=TOL, rtol=0)
    # the rewards are beta x a difference of sums of float32 log-probs (~ -50) added in another order: their
    # rounding scales with beta (1e-5 at beta 0.1, as the DPO test above)
    scale = trainer.beta / BETA
    for k in TRL_METRICS:
        assert metrics[k] == pytest.approx(trl_metrics[k], abs=TOL * scale), k


def _cpo_loss(loss_type: str, beta: float, chosen, rejected, *, label_smoothing=0.0, gamma=0.5):
    """TRL's CPOTrainer.cpo_loss on given log-probs (its arithmetic only: no model, no trainer)."""
    from trl.experimental.cpo import CPOTrainer

    owner = SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                            simpo_gamma=gamma, accelerator=SimpleNamespace(device=torch.device("cpu")))  # fmt: skip
    return CPOTrainer.cpo_loss(owner, chosen, rejected)


def _random_logps(n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-(torch.rand(n, generator=g) * 20 + 1) for _ in range(4))
    lengths_c = torch.randint(1, 12, (n,), generator=g).float()
    lengths_r = torch.randint(1, 12, (n,), generator=g).float()
    return pc, pr, rc, rr, lengths_c, lengths_r


def test_simpo_matches_trl_cpo_trainer():
    """SimPO = TRL CPOTrainer(loss_type="simpo", cpo_alpha=0), which takes average log-probs (its
    average_log_prob=True for simpo): same losses and rewards."""
    from hanorec.methods.simpo import simpo_loss

    pc, pr, _, _, nc, nr = _random_logps()
    for beta, gamma in ((0.1, 0.5), (2.0, 1.0)):
        ours = simpo_loss(pc, pr, nc, nr, beta=beta, gamma=gamma)
        losses, chosen, rejected = _cpo_loss("simpo", beta, pc / nc, pr / nr, gamma=gamma)
        assert_close(ours.losses, losses, atol=TOL, rtol=0)
        assert_close(ours.chosen_rewards, chosen, atol=TOL, rtol=0)
        assert_close(ours.rejected_rewards, rejected, atol=TOL, rtol=0)


def test_cdpo_matches_trls_label_smoothed_sigmoid():
    """cDPO's loss is TRL's label-smoothed sigmoid loss (CPOTrainer loss_type="sigmoid", the form DPOTrainer
    used before 1.x) applied to the DPO logit h: passing the log-ratios as its log-probs gives h."""
    from hanorec.methods.cdpo import METHOD as CDPO

    pc, pr, rc, rr, nc, nr = _random_logps()
    pref = load_config(overrides=["--pref.method=cdpo", "--pref.options.epsilon=0.3"]).pref
    from hanorec.methods import LossBatch

    b = LossBatch(pc, pr.unsqueeze(1), rc, rr.unsqueeze(1), nc, nr.unsqueeze(1), torch.ones(6))
    ours = CDPO.loss(b, pref, BETA, None)
    losses, _, _ = _cpo_loss("sigmoid", BETA, pc - rc, pr - rr, label_smoothing=0.3)
    assert_close(ours.losses, losses, atol=TOL, rtol=0)
