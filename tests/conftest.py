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

SHARED_ML = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "movielens-small-posters")


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


@pytest.fixture
def movielens_dir():
    path = os.path.abspath(SHARED_ML)
    if not os.path.isdir(path):
        pytest.fail(f"the shared MovieLens data is missing at {path}")
    return path
