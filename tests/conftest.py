import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_ML = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "movielens-small-posters")


@pytest.fixture
def movielens_dir():
    path = os.path.abspath(SHARED_ML)
    if not os.path.isdir(path):
        pytest.fail(f"the shared MovieLens data is missing at {path}")
    return path
