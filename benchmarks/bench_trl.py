"""Our preference trainer against TRL's DPOTrainer (issue 10 item 2).

The same tiny model (tiny-llava preset, same seed, fp32), the same LoRA (r 8, alpha 32, no dropout, the
language model's q/k/v/o/gate/up/down projections), the same hit3 examples with their images dropped
(TRL's DPOTrainer takes text here; tests/test_trl_parity.py does the same), batch 4, AdamW at the same
learning rate, one process, CPU. The reference is the policy with its adapter disabled on both sides.

Sides, each a real training run through its own trainer:
- TRL: ``DPOTrainer`` (loss_type sigmoid, precompute_ref_log_probs off): chosen and rejected rows
  concatenated, prompt repeated in both, a second forward for the reference.
- ours, DPO and HaNo-DPO: ``hanorec.train.preference.train_preference`` (shared-prefix scoring by
  default; HaNo-DPO adds HaRS lambda, eta and NoDO LoRA noise); also DPO with ``scoring=naive`` to split
  the difference into "shared prefix" and "everything else".

A step's time is the interval between consecutive calls of the trainer's loss function (so it holds
batch collation, both forwards, backward, optimizer and the trainer's own bookkeeping); medians over the
steps after the first ``--warmup`` of each run, over ``--rounds`` rounds that alternate the sides.
Before timing, the losses are checked equal: TRL's ``compute_loss`` on a batch its own collator built,
and our loss function (both scoring modes) on the token ids read back from that batch, with the LoRA B
factors perturbed so the policy differs from the reference.

``--profile``: torch.profiler over a few steps of TRL and of our DPO: where the time goes.

    python benchmarks/bench_trl.py [--rounds 2] [--steps 8] [--warmup 2] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import tempfile
import time
import warnings
from dataclasses import replace
from types import SimpleNamespace

import torch
from common import check_equal, demo_examples, header, tiny_bundle

from hanorec.config import load_config
from hanorec.models import EncodedPrompt, lora_target_regex
from hanorec.pairs import build_pairs
from hanorec.train.preference import PrefItem, make_pref_loss, train_preference

BATCH = 4
LR = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def text_only(examples):
    return [replace(e, prompt=e.prompt.replace("<image> ", ""), image_items=()) for e in examples]


def trl_trainer(ds, examples, pairs, out_dir, steps, seed):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    bundle = tiny_bundle("tiny-llava", ds, seed=seed)
    data = Dataset.from_dict(
        {
            "prompt": [bundle.chat_text(e.prompt) for e in examples],
            "chosen": [p.chosen for p in pairs],
            "rejected": [p.rejected[0] for p in pairs],
        }
    )
    args = DPOConfig(
        output_dir=str(out_dir),
        beta=0.1,
        loss_type=["sigmoid"],
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        max_steps=steps,
        max_length=None,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        precompute_ref_log_probs=False,
        save_strategy="no",
        logging_steps=5,
        disable_tqdm=True,
        seed=seed,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.0, target_modules=lora_target_regex(TARGETS), task_type="CAUSAL_LM"
    )
    return bundle, DPOTrainer(
        model=bundle.model, args=args, train_dataset=data, processing_class=bundle.tokenizer, peft_config=peft_config
    )


def our_cfg(method: str, scoring: str, steps: int, out_dir, seed: int):
    noise = "lora" if method == "hano_dpo" else "none"
    return load_config(
        overrides={
            "seed": seed,
            "output_dir": str(out_dir),
            "lora": {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
            "pref": {
                "method": method,
                "scoring": scoring,
                "noise_target": noise,
                "noise_sigma": 0.05,
                "batch_size": BATCH,
                "grad_accum": 1,
                "lr": LR,
                "max_steps": steps,
                "save_every": 0,
                "progress_bar": False,
                "max_grad_norm": 1.0,
            },
        }
    )


class StepClock:
    """Wraps a loss function; records the time of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *a, **k):
        self.calls.append(time.perf_counter())
        return self.fn(*a, **k)

    def intervals(self, warmup: int) -> list[float]:
        c = self.calls[warmup:]
        return [b - a for a, b in zip(c, c[1:])]


def reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def run_trl(ds, examples, pairs, steps, warmup, seed, around=contextlib.nullcontext) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        _, trainer = trl_trainer(ds, examples, pairs, tmp, steps, seed)
        clock = StepClock(trainer.compute_loss)
        trainer.compute_loss = clock
        with around():
            trainer.train()
    reset_accelerate()
    return clock.intervals(warmup)


def run_ours(ds, items, method, scoring, steps, warmup, seed, around=contextlib.nullcontext) -> list[float]:
    from hanorec import train as _  # noqa: F401
    from hanorec.models import add_lora
    from hanorec.train import preference

    with tempfile.TemporaryDirectory() as tmp:
        cfg = our_cfg(method, scoring, steps, tmp, seed)
        bundle = tiny_bundle("tiny-llava", ds, seed=seed)
        add_lora(bundle, cfg.lora)
        clock = None
        original = preference.make_pref_loss

        def timed_make(*a, **k):
            nonlocal clock
            clock = StepClock(original(*a, **k))
            return clock

        preference.make_pref_loss = timed_make
        try:
            with around():
                train_preference(cfg, bundle, ds, items, tmp, resume=False)
        finally:
            preference.make_pref_loss = original
    reset_accelerate()
    return clock.intervals(warmup)


def check_losses(ds, examples, pairs, seed) -> float:
    """TRL's loss on its own batch equals ours on the same token ids (both scoring modes)."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle, trainer = trl_trainer(ds, examples[:BATCH], pairs[:BATCH], tmp, 1, seed)
        g = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
        trainer.model.eval()
        with torch.no_grad():
            trl_loss = float(trainer.compute_loss(trainer.model, batch))
        ids, cm = batch["input_ids"], batch["completion_mask"]
        n = ids.shape[0] // 2  # chosen rows, then rejected rows
        prompts, comps = [], []
        for i in range(n):
            start = int(cm[i].nonzero()[0])
            prompts.append(EncodedPrompt(ids[i, :start].tolist(), None))
            comps.append([ids[r][cm[r].bool()].tolist() for r in (i, n + i)])
        bundle.model = trainer.model
        acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t)
        diffs = []
        for scoring in ("naive", "shared_prefix"):
            cfg = load_config(overrides={"pref": {"method": "dpo", "beta": 0.1, "noise_target": "none", "scoring": scoring}})
            loss_fn = make_pref_loss(cfg, bundle, acc, None)
            with torch.no_grad():
                ours, _ = loss_fn(trainer.model, {"prompts": prompts, "completions": comps, "lambda": torch.ones(n), "ref": None})
            diffs.append(check_equal(f"TRL vs ours ({scoring}) loss", torch.tensor(trl_loss), ours, atol=1e-5))
        if abs(trl_loss - math.log(2)) < 1e-3:
            raise AssertionError("the check is trivial: the policy equals the reference")
    reset_accelerate()
    print(f"loss check: TRL {trl_loss:.6f}, ours equal within {max(diffs):.1e} (naive and shared_prefix)")
    return max(diffs)


def profile_side(name, run) -> None:
    """run(around) trains a few steps inside the context `around`: the profiler covers training only."""
    from torch.profiler import ProfilerActivity, profile

    box = {}

    @contextlib.contextmanager
    def around():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            yield
            box["wall"] = time.perf_counter() - t0
        box["prof"] = prof

    run(around)
    wall, avgs = box["wall"], box["prof"].key_averages()
    top = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [e for e in avgs if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in ops) / 1e6
    mm = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::addmm", "aten::mm", "aten::bmm")) / 1e6
    attn = sum(e.self_cpu_time_total for e in ops if "attention" in e.key) / 1e6
    print(
        f"  {name}: {wall:.2f}s in train(); aten ops {total:.2f}s ({100 * total / wall:.0f}%): matmuls {mm:.2f}s, "
        f"attention {attn:.2f}s, other ops {total - mm - attn:.2f}s; outside aten ops (Python, data, trainer) "
        f"{wall - total:.2f}s"
    )
    print("    top by self time: " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e6:.2f}s" for e in top[:8]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first --warmup not timed)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    header("preference step: ours against TRL DPOTrainer (tiny-llava, LoRA, text-only hit3, batch 4)", args)
    ds, examples = demo_examples("hit3", BATCH * args.steps, seed=args.seed, split="train")
    examples = text_only(examples)
    pairs = build_pairs(examples, ds, seed=args.seed, k_negatives=1)
    items = [PrefItem(p) for p in pairs]
    check_losses(ds, examples, pairs, args.seed)
    sides = {
        "TRL DPOTrainer": lambda: run_trl(ds, examples, pairs, args.steps, args.warmup, args.seed),
        "ours DPO (naive scoring)": lambda: run_ours(ds, items, "dpo", "naive", args.steps, args.warmup, args.seed),
        "ours DPO": lambda: run_ours(ds, items, "dpo", "shared_prefix", args.steps, args.warmup, args.seed),
        "ours HaNo-DPO": lambda: run_ours(ds, items, "hano_dpo", "shared_prefix", args.steps, args.warmup, args.seed),
    }
    times = {k: [] for k in sides}
    for _ in range(args.rounds):
        for k, fn in sides.items():
            times[k] += fn()
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["TRL DPOTrainer"]
    for k, t in med.items():
        print(f"{k:26s} {t:.3f} s/step = {1 / t:.2f} steps/s (n={len(times[k])}): x{base / t:.2f} TRL's speed")
    if args.profile:
        print("profile of 4 training steps per side (inside the trainer's train call):")
        profile_side("TRL DPOTrainer", lambda a: run_trl(ds, examples, pairs, 4, 0, args.seed, a))
        profile_side("ours DPO (naive scoring)", lambda a: run_ours(ds, items, "dpo", "naive", 4, 0, args.seed, a))
        profile_side("ours DPO", lambda a: run_ours(ds, items, "dpo", "shared_prefix", 4, 0, args.seed, a))
    return {"median_s": med, "ratio": {k: base / t for k, t in med.items()}}


if __name__ == "__main__":
    main()
