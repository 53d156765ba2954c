"""Worker for tests/test_distributed.py, run by `accelerate launch` in 2 CPU processes (gloo).

    python tests/distributed_worker.py eta   OUT_DIR
    python tests/distributed_worker.py train OUT_DIR SCORING [STEPS] [--batch=N] [--lora_dropout=P]
                                             [--stop_after=K] [--resume] [--model=PRESET]
                                             [--modules_to_save=a,b]

eta:   every process builds its own local preference logits h (a different batch per rank), calls
       hano_dpo_loss with gather=accelerator.gather, and writes what it saw to OUT_DIR/rank<k>.json.
train: STEPS (default 1) HaNo-DPO steps of train_preference on a tiny LLaVA (6 pairs, batch 3 per
       process unless --batch); every process writes a checksum of its trainable weights, whether they are
       sharded, and its per-step losses and eta to OUT_DIR/rank<k>.json. --stop_after=K ends the run with
       a checkpoint after K steps (the run's plan still has STEPS), --resume continues from the newest
       checkpoint of OUT_DIR/run. Run with plain `python` it is the one-process run on the same global batch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

BETA0 = 0.1
LOCAL_H = {  # (B,) per rank: [policy - ref](chosen) - [policy - ref](rejected)
    0: [1.0, 2.0, 6.0],
    1: [-4.0, 0.5, 10.0],
}
DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"


def eta_mode(out_dir: Path) -> None:
    from accelerate import Accelerator

    from hanorec import losses as L

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    h = torch.tensor(LOCAL_H[rank])  # (B,)
    zeros = torch.zeros_like(h)
    lam = torch.ones_like(h)
    out = L.hano_dpo_loss(h, zeros, zeros, zeros, lam, beta0=BETA0, gather=accelerator.gather)
    local = L.hano_dpo_loss(h, zeros, zeros, zeros, lam, beta0=BETA0)
    record = {
        "rank": rank,
        "world_size": accelerator.num_processes,
        "backend": str(accelerator.state.backend),
        "h": h.tolist(),
        "gathered_h": accelerator.gather(h).tolist(),
        "eta": float(out.eta),
        "local_eta": float(local.eta),
        "beta": out.beta.tolist(),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()


def train_mode(
    out_dir: Path, scoring: str, steps: int = 1, *, batch: int = 3, lora_dropout: float = 0.05,
    stop_after: int | None = None, resume: bool = False, model: str = "tiny-llava",
    modules_to_save: tuple[str, ...] = (),
) -> None:  # fmt: skip
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    from hanorec.config import load_config
    from hanorec.data import load_dataset, make_splits
    from hanorec.models import add_lora, build_tiny
    from hanorec.pairs import build_pairs
    from hanorec.tasks import TASK_SHAPES, build_examples, corpus_text
    from hanorec.train.preference import PrefItem, train_preference

    torch.set_num_threads(1)
    ds = load_dataset(DEMO)
    s = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=s["n_history"], n_target=s["n_target"])
    examples = build_examples("hit3", splits.train, ds, seed=0, shuffle=True, max_examples=6)
    run_dir = out_dir / "run"
    cfg = load_config(
        overrides={
            "seed": 0,
            "output_dir": str(run_dir),
            "model": {"name": model, "tiny_hidden_size": 64, "tiny_vocab_size": 400},
            "lora": {"r": 4, "alpha": 8, "dropout": lora_dropout, "modules_to_save": list(modules_to_save)},
            "pref": {
                "method": "hano_dpo",
                "max_steps": steps,
                "batch_size": batch,
                "grad_accum": 1,
                "log_every": 1,
                "progress_bar": False,
                "scoring": scoring,
                "disable_dropout": False,  # keep lora_dropout active: the tests check its masks across ranks
            },
        }
    )
    bundle = build_tiny(model, corpus_text(ds), hidden_size=64, vocab_size=400, seed=0)
    add_lora(bundle, cfg.lora)
    items = [PrefItem(p) for p in build_pairs(examples, ds, seed=0)]
    should_stop = None
    if stop_after is not None:
        done = iter(range(1, steps + 1))

        def should_stop():
            return next(done) >= stop_after

    result = train_preference(cfg, bundle, ds, items, run_dir, resume=resume, should_stop=should_stop)
    state = PartialState()
    from torch.distributed.tensor import DTensor

    trainable = [p for p in bundle.model.parameters() if p.requires_grad]
    sharded = any(isinstance(p, DTensor) for p in trainable)
    local = [p.to_local() if isinstance(p, DTensor) else p for p in trainable]
    weights = [(p.full_tensor() if isinstance(p, DTensor) else p).detach().double() for p in trainable]
    record = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "global_step": result.global_step,
        "distributed_type": str(AcceleratorState().distributed_type),
        "use_fsdp_env": os.environ.get("ACCELERATE_USE_FSDP", ""),
        "checksum": float(sum(w.sum() for w in weights)),
        "abs_checksum": float(sum(w.abs().sum() for w in weights)),
        "sharded": sharded,
        "numel": sum(w.numel() for w in weights),
        "local_numel": sum(p.numel() for p in local),
        "losses": [h["loss"] for h in result.history],
        "etas": [h["hardness/eta"] for h in result.history],
        "steps_logged": [h["step"] for h in result.history],
        "last_checkpoint": str(result.last_checkpoint),
    }
    (out_dir / f"rank{state.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "eta":
        eta_mode(out)
    elif mode == "train":
        flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "1") for a in sys.argv[5:])
        train_mode(
            out, sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 1,
            batch=int(flags.get("batch", 3)), lora_dropout=float(flags.get("lora_dropout", 0.05)),
            stop_after=int(flags["stop_after"]) if "stop_after" in flags else None, resume="resume" in flags,
            model=flags.get("model", "tiny-llava"),
            modules_to_save=tuple(m for m in flags.get("modules_to_save", "").split(",") if m),
        )  # fmt: skip
    else:
        raise SystemExit(f"unknown mode {mode!r}; use eta or train")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # leaving gloo's process group for interpreter shutdown to tear down aborts now and then
        # ("terminate called without an active exception"); end it while both processes are alive
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
