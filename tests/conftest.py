import os
import signal

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# Tiny models: one intra-op thread is as fast as two on a free machine, and two spin-wait badly (8-15x
# slower) whenever anything else runs on the two cores.
torch.set_num_threads(1)

DEMO = os.path.join(os.path.dirname(__file__), "..", "assets", "demo")


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """The CLI installs SIGINT/SIGTERM handlers (checkpoint and stop); give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.fixture(scope="session")
def ds():
    """The bundled demo dataset (read-only; shared by every test that needs it)."""
    from hanorec.data import load_dataset

    return load_dataset(DEMO)


def shared_path(*parts: str) -> str:
    """A path under ../shared beside the clone, or skip (fail under CI=true) when it is absent.

    A user's clone has no ../shared folder, so tests that read it skip with the reason; CI sets CI=true and
    must run them, so there a missing folder is a failure.
    """
    path = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", *parts))
    if not os.path.exists(path):
        reason = f"needs data outside the repository, not present at {path}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (required when CI=true)")
        pytest.skip(reason)
    return path


@pytest.fixture
def movielens_dir():
    """The shared MovieLens-with-posters copy (skipped without it, required under CI=true)."""
    return shared_path("data", "movielens-small-posters")


def tiny_sft_overrides(out, steps: int, max_train_examples: int = 64, **sft) -> dict:
    """A few SFT steps of a tiny LLaVA on 40 demo users, saved only at the end (checkpoint tests, chunked
    training); sft keys override the defaults."""
    return {
        "seed": 0,
        "output_dir": str(out),
        "data": {"path": os.path.abspath(DEMO), "max_users": 40},
        "task": {"max_train_examples": max_train_examples, "max_eval_examples": 12},
        "model": {"name": "tiny-llava", "tiny_hidden_size": 64, "tiny_vocab_size": 400},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
        "sft": {
            "max_steps": steps, "batch_size": 2, "grad_accum": 2, "lr": 1e-3, "log_every": 1,
            "save_every": 0, "save_every_minutes": 0, "progress_bar": False, **sft,
        },
        "eval": {"baselines": []},
    }  # fmt: skip


@pytest.fixture(scope="module")
def demo_hit3_train():
    """The demo dataset and its first 3 (shuffled) hit3 training examples, for one preference micro-batch."""
    from hanorec.data import load_dataset, make_splits
    from hanorec.tasks import TASK_SHAPES, build_examples

    ds = load_dataset(DEMO)
    shape = TASK_SHAPES["hit3"]
    splits = make_splits(ds, n_history=shape["n_history"], n_target=shape["n_target"])
    return ds, build_examples("hit3", splits.train, ds, seed=0, shuffle=True, max_examples=3)
