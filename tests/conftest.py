"""Shared fixtures: tiny models and tokenizers built offline; the Hub is never reached."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread per process avoids thread contention (and the CLI
# subprocesses and 2-process gloo runs that tests start inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_irl.models.spec import ModelSpec  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes", seed=0)


@pytest.fixture
def tokenizer(tiny_spec):
    return tiny_spec.load_tokenizer()
