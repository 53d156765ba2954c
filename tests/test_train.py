"""SFT on a tiny model: every trainable weight moves, an interrupted run resumes to the same weights,
checkpoints hold everything needed, a NaN loss stops with a clear message."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hanorec.config import load_config
from hanorec.data import make_splits
from hanorec.models import add_lora, build_tiny
from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text
from hanorec.train.checkpoint import checkpoint_dirs, latest_checkpoint
from hanorec.train.loop import TrainingDiverged, cosine_with_warmup, epoch_order, train_loop
from hanorec.train.sft import ExampleTooLong, make_sft_collate, sft_loss, train_sft

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"
N_EXAMPLES = 16  # batch 2 x grad_accum 2 -> 4 optimizer steps per epoch
TOTAL_STEPS = 6  # crosses one epoch boundary
STOP_AT = 3  # mid-epoch
STEPS_PER_EPOCH = 4


def make_cfg(out_dir, **sft):
    return load_config(
        overrides={
            "seed": 0,
            "output_dir": str(out_dir),
            # tiny-llava: the loop is family-agnostic and this preset is the cheaper one on CPU
            "model": {"name": "tiny-llava", "tiny_hidden_size": 64, "tiny_layers": 2, "tiny_vocab_size": 400},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
            "sft": {
                "max_steps": TOTAL_STEPS,
                "batch_size": 2,
                "grad_accum": 2,
                "lr": 1e-3,
                "warmup_ratio": 0.2,
                "log_every": 1,
                "save_every": 0,
                "progress_bar": False,
                **sft,
            },
        }
    )


@pytest.fixture(scope="module")
def train_examples(ds):
    s = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=s["n_history"], n_target=s["n_target"])
    return build_examples("hit3", splits.train, ds, seed=0, shuffle=True, max_examples=N_EXAMPLES)


def fresh_bundle(cfg, ds):
    """What a new process does: build the base model from the seed, wrap it with a new LoRA."""
    m = cfg.model
    bundle = build_tiny(
        m.name, corpus_text(ds), hidden_size=m.tiny_hidden_size, layers=m.tiny_layers,
        vocab_size=m.tiny_vocab_size, seed=cfg.seed,
    )  # fmt: skip
    return add_lora(bundle, cfg.lora)


def trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def run_a(ds, train_examples, tmp_path_factory):
    """An uninterrupted run of TOTAL_STEPS steps; returns (cfg, bundle, result, weights before)."""
    out = tmp_path_factory.mktemp("run_a")
    cfg = make_cfg(out)
    bundle = fresh_bundle(cfg, ds)
    before = trainable_state(bundle.model)
    logged = []
    result = train_sft(cfg, bundle, ds, train_examples, out, on_log=logged.append)
    return cfg, bundle, result, before, logged


def test_every_trainable_parameter_changes(run_a):
    _, bundle, result, before, _ = run_a
    assert result.global_step == TOTAL_STEPS == result.total_steps and not result.stopped_early
    after = trainable_state(bundle.model)
    assert before.keys() == after.keys() and len(before) > 0
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"parameters that did not train: {unchanged[:5]}"
    assert all("lora_" in n for n in before)


def test_metrics_log_and_history(run_a):
    cfg, _, result, _, logged = run_a
    lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))  # log_every=1
    assert all(r["stage"] == "sft" for r in records)
    for r in records:
        assert {"loss", "lr", "epoch", "answer_tokens", "elapsed_s"} <= r.keys()
        assert r["loss"] > 0 and r["answer_tokens"] > 0
    assert logged == result.history and len(logged) == TOTAL_STEPS
    # warm-up (1 step) then cosine decay: the lr peaks at step 1 and decreases after it
    lrs = [r["lr"] for r in records]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]
    assert records[3]["epoch"] == pytest.approx(1.0) and records[4]["epoch"] > 1.0


def test_final_checkpoint_contents(run_a):
    cfg, bundle, result, _, _ = run_a
    ckpt = result.last_checkpoint
    assert ckpt == latest_checkpoint(cfg.output_dir)
    assert ckpt.name == f"step-{TOTAL_STEPS:06d}"
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt", "config.yaml", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    assert (ckpt / "adapter" / "adapter_config.json").is_file()
    weights = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    # the saved adapter is the trained one
    params = {n.replace(".default", ""): p for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert len(weights) == len(params)
    for k, v in weights.items():
        torch.testing.assert_close(v, params[k].detach(), rtol=0, atol=0)
    # the checkpoint carries the resolved config: it reloads to the same RunConfig
    saved = load_config(overrides=yaml.safe_load((ckpt / "config.yaml").read_text()))
    assert saved == cfg
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == TOTAL_STEPS and state["stage"] == "sft"
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    assert {"python", "numpy", "torch"} <= rng.keys()
    opt = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert len(opt["state"]) == len(params)  # AdamW moments for every trainable tensor
    assert torch.load(ckpt / "scheduler.pt", weights_only=False)["last_epoch"] == TOTAL_STEPS
    # keep_checkpoints=2: the epoch-end checkpoint (step 4) and the final one
    assert [p.name for p in checkpoint_dirs(cfg.output_dir)] == ["step-000004", "step-000006"]


@pytest.mark.parametrize("stop_at", [STOP_AT, STEPS_PER_EPOCH], ids=["mid-epoch", "epoch-end"])
def test_interrupted_run_resumes_to_the_same_weights(run_a, ds, train_examples, tmp_path, stop_at):
    """Run B stops after `stop_at` steps (checkpoint), a fresh bundle resumes it: same losses, same weights as A."""
    cfg_a, bundle_a, result_a, _, _ = run_a
    out = tmp_path / "run_b"
    cfg = make_cfg(out, save_every=1, keep_checkpoints=2)  # checkpoint cadence must not change training

    polls = []

    def stop_after():
        polls.append(1)
        return len(polls) >= stop_at

    first = fresh_bundle(cfg, ds)
    r1 = train_sft(cfg, first, ds, train_examples, out, should_stop=stop_after)
    assert r1.stopped_early and r1.global_step == stop_at
    assert r1.last_checkpoint.name == f"step-{stop_at:06d}"
    state = json.loads((r1.last_checkpoint / "trainer_state.json").read_text())
    assert state == {"global_step": stop_at, "epoch": 0, "micro_in_epoch": 2 * stop_at, "stage": "sft"}
    names = [p.name for p in checkpoint_dirs(out)]
    assert names == [f"step-{stop_at - 1:06d}", f"step-{stop_at:06d}"]  # keep_checkpoints=2
    # the interrupted run followed the uninterrupted one exactly up to the stop
    losses_b = [h["loss"] for h in r1.history]
    losses_a = [h["loss"] for h in result_a.history]
    torch.testing.assert_close(losses_b, losses_a[:stop_at])

    second = fresh_bundle(cfg, ds)  # a new process: new base model, new (untrained) LoRA
    r2 = train_sft(cfg, second, ds, train_examples, out)
    assert r2.global_step == TOTAL_STEPS and not r2.stopped_early
    assert [h["step"] for h in r2.history] == list(range(stop_at + 1, TOTAL_STEPS + 1))
    torch.testing.assert_close([h["loss"] for h in r2.history], losses_a[stop_at:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close([h["lr"] for h in r2.history], [h["lr"] for h in result_a.history][stop_at:])

    final_a, final_b = trainable_state(bundle_a.model), trainable_state(second.model)
    assert final_a.keys() == final_b.keys()
    for n in final_a:
        torch.testing.assert_close(final_b[n], final_a[n], rtol=1e-5, atol=1e-6, msg=n)
    # both final checkpoints hold the same adapter
    wa = load_file(str(result_a.last_checkpoint / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(r2.last_checkpoint / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [p.name for p in checkpoint_dirs(out)] == ["step-000005", "step-000006"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    # metrics.jsonl holds both parts of the run, every step once
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TOTAL_STEPS + 1))


def test_finished_run_is_not_trained_again(run_a, ds, train_examples):
    cfg, bundle_a, result_a, _, _ = run_a
    again = fresh_bundle(cfg, ds)
    r = train_sft(cfg, again, ds, train_examples, cfg.output_dir)
    assert r.global_step == TOTAL_STEPS and r.history == []
    a, b = trainable_state(bundle_a.model), trainable_state(again.model)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=0)


def test_nan_loss_raises_training_diverged(ds, train_examples, tmp_path):
    cfg = make_cfg(tmp_path, max_steps=4, save_every=1, grad_accum=1)
    bundle = fresh_bundle(cfg, ds)
    calls = []

    def loss_fn(model, batch):
        loss, metrics = sft_loss(model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), metrics

    with pytest.raises(TrainingDiverged) as info:
        train_loop(
            model=bundle.model,
            items=train_examples[:8],
            collate=make_sft_collate(bundle, ds, cfg.model.max_length),
            loss_fn=loss_fn,
            train_cfg=cfg.sft,
            seed=cfg.seed,
            output_dir=tmp_path,
            config_yaml=yaml.safe_dump(cfg.to_dict()),
        )
    msg = str(info.value)
    assert "nan" in msg and "step 3" in msg
    assert "step-000002" in msg, "the message names the last good checkpoint"
    assert "learning rate" in msg
    # the last good checkpoint is still there, nothing newer was written
    assert latest_checkpoint(tmp_path).name == "step-000002"


def test_nan_before_any_checkpoint(tmp_path):
    """Any model works with the loop; a NaN at the first step says no checkpoint exists yet."""
    cfg = make_cfg(tmp_path, max_steps=2, grad_accum=1)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(TrainingDiverged, match="step 1.*no checkpoint was written yet"):
        train_loop(
            model=model,
            items=[torch.ones(2)] * 4,
            collate=torch.stack,
            loss_fn=lambda m, x: (m(x).sum() * float("inf") * 0, {}),
            train_cfg=cfg.sft,
            seed=0,
            output_dir=tmp_path,
            config_yaml="",
        )


def test_no_trainable_parameters(tmp_path):
    cfg = make_cfg(tmp_path)
    model = torch.nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_loop(
            model=model, items=[torch.ones(2)], collate=torch.stack, loss_fn=None,
            train_cfg=cfg.sft, seed=0, output_dir=tmp_path, config_yaml="",
        )  # fmt: skip


def test_too_long_example_is_reported(ds, train_examples):
    cfg = make_cfg("unused")
    bundle = fresh_bundle(cfg, ds)
    collate = make_sft_collate(bundle, ds, max_length=50)
    ex = train_examples[0]
    with pytest.raises(ExampleTooLong, match=f"user {ex.user}.*max_length=50"):
        collate([ex])


def test_epoch_order_and_schedule():
    assert sorted(epoch_order(10, 0, 0)) == list(range(10))
    assert epoch_order(10, 0, 0) == epoch_order(10, 0, 0)
    assert epoch_order(10, 0, 0) != epoch_order(10, 0, 1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup=2, total=6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # warm-up 1/2, 2/2, then cosine from 1 down: 0.5 * (1 + cos(pi * k / 4)) for k = 1..3
    import math

    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(0, 4)]
    torch.testing.assert_close(lrs, expected)


def test_example_lengths_match_the_encoding_and_too_long_ones_are_skipped(ds, train_examples, tmp_path):
    from hanorec.tasks import render
    from hanorec.train.loop import EmptyTrainingSet
    from hanorec.train.sft import drop_too_long, example_lengths

    cfg = make_cfg(tmp_path)
    for preset in ("tiny-llava", "tiny-qwen2.5-vl"):
        bundle = build_tiny(preset, corpus_text(ds), hidden_size=64, vocab_size=400)
        exact = []
        for ex in train_examples[:6]:
            r = render(ex, ds)
            exact.append(len(bundle.encode_prompt(r.text, r.images).input_ids) + len(bundle.encode_completion(ex.answer)))
        assert example_lengths(bundle, ds, train_examples[:6]) == exact, preset
    cut = sorted(exact)[2]
    kept, skipped = drop_too_long(bundle, ds, train_examples[:6], cut)
    assert skipped == sum(n > cut for n in exact) > 0 and len(kept) == 6 - skipped
    with pytest.raises(EmptyTrainingSet, match="max_length=10 "):
        drop_too_long(bundle, ds, train_examples[:6], 10)
    # through SFT: the run trains on what fits and reports how many it left out
    bundle = fresh_bundle(cfg, ds)
    lengths = example_lengths(bundle, ds, train_examples)
    cut = sorted(lengths)[len(lengths) // 2]
    cfg = make_cfg(tmp_path, max_steps=1)
    cfg.model.max_length = cut
    result = train_sft(cfg, bundle, ds, train_examples, tmp_path)
    assert result.skipped_examples == sum(n > cut for n in lengths) > 0 and result.global_step == 1
