"""Shared pieces of the scaling benchmarks: a synthetic demonstration set with a real vocabulary
size and varied lengths, the model configs, and timing callbacks. Not a benchmark itself."""

from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Any, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_irl.tokenizers import word_level_tokenizer  # noqa: E402

VOCAB = 4096

# ~5M parameters with a 4096-word vocabulary: compute-bound steps of 0.1-1 s on 2 CPU cores.
SMALL_LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512}


def make_dataset(folder: str, n: int, min_len: int = 16, max_len: int = 256, seed: int = 0,
                 prompt_share: float = 0.3, vocab: int = VOCAB) -> Dict[str, Any]:
    """Write ``train.jsonl`` and a word-level tokenizer (``vocab`` ids) into ``folder``.

    Total lengths are log-uniform in [min_len, max_len] tokens (EOS included), split into a prompt
    (``prompt_share``) and a response: a spread like instruction data, where padding matters.
    """
    os.makedirs(folder, exist_ok=True)
    words = [f"w{i}" for i in range(vocab - 3)]
    tokenizer = word_level_tokenizer(words)
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    rng = random.Random(seed)
    lengths = []
    with open(os.path.join(folder, "train.jsonl"), "w") as f:
        for _ in range(n):
            total = int(round(math.exp(rng.uniform(math.log(min_len), math.log(max_len)))))
            prompt_len = max(1, int(total * prompt_share))
            response_len = max(1, total - prompt_len - 1)
            prompt = " ".join(rng.choice(words) for _ in range(prompt_len))
            response = " ".join(rng.choice(words) for _ in range(response_len))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
            lengths.append(prompt_len + response_len + 1)
    return {"train_file": os.path.join(folder, "train.jsonl"), "tokenizer": os.path.join(folder, "tokenizer"),
            "lengths": lengths}


class StepTimer(L.Callback):
    """Wall time, CPU time and non-pad tokens of every training step after ``warmup`` steps.

    Time runs from the end of step ``warmup`` to the end of the last step, so it includes data
    loading, the optimizer and every hook: what a user waits for.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: Optional[float] = None
        self.end: Optional[float] = None
        self.cpu_start: Optional[float] = None
        self.cpu_end: Optional[float] = None
        self.tokens = 0
        self.cells = 0
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now, cpu = time.perf_counter(), time.process_time()
        if batch_idx + 1 == self.warmup:
            self.start, self.cpu_start = now, cpu
        elif batch_idx + 1 > self.warmup:
            self.tokens += int(batch["attention_mask"].sum())
            self.cells += batch["attention_mask"].numel()
            self.steps += 1
            self.end, self.cpu_end = now, cpu

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / (self.end - self.start)

    @property
    def tokens_per_cpu_sec(self) -> float:
        """Tokens per second of this process's CPU time (all threads): steadier than wall time on
        a shared machine, since time spent descheduled does not count."""
        return self.tokens / (self.cpu_end - self.cpu_start)

    @property
    def pad_share(self) -> float:
        return 1.0 - self.tokens / max(self.cells, 1)


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    num_sanity_val_steps=0)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def median(values: List[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads. Default 1 in every benchmark: on a shared machine, two
    OpenMP threads that wait on each other at every op turn another process's load into
    10x swings; one thread per process keeps the side-by-side ratios steady."""
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


# ---- model sizes of the SFT / AIRL comparisons (sft_throughput.py, scaling.py, gpu_check.py) -----------------
# Llama shapes, built from a config (seed 0) with a synthetic word-level vocabulary of ``vocab`` ids
# (``make_dataset(vocab=...)``). ``batch_size`` is the batch at 128 tokens (``batch_size_for`` scales it
# with the sequence length so a batch holds about the same number of token cells): steps of
# roughly 0.05-1 s on one CPU thread. Parameter counts include the (untied) embedding and LM head.
def _llama(hidden: int, intermediate: int, layers: int, heads: int) -> Dict[str, Any]:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": 512}


SIZES: Dict[str, Dict[str, Any]] = {
    # the quickstart's shape (configs/quickstart.yaml), vocabulary of 32 like the `modes` task: 86K
    "84K": {"config": _llama(64, 128, 2, 4), "vocab": 32, "batch_size": 16},
    "1M": {"config": _llama(128, 344, 4, 4), "vocab": 1024, "batch_size": 8},            # 1.05M
    "5M": {"config": dict(SMALL_LLAMA), "vocab": VOCAB, "batch_size": 8},                # 5.26M
    "30M": {"config": _llama(512, 1024, 8, 8), "vocab": 8192, "batch_size": 2},          # 29.4M
}


def batch_size_for(size: str, max_length: int) -> int:
    """The size's batch at 128 tokens, scaled by 128 / ``max_length`` (at least 1)."""
    return max(1, SIZES[size]["batch_size"] * 128 // max_length)


def min_length_for(max_length: int) -> int:
    """Shortest example of the synthetic data at ``max_length``: lengths are log-uniform in
    [max_length / 4, max_length], so the sequence length of a run is what its name says."""
    return max(8, max_length // 4)


def size_config(size: str, max_length: int = 512) -> Dict[str, Any]:
    """The model config of ``size`` (a copy), with room for ``max_length`` positions."""
    config = dict(SIZES[size]["config"])
    config["max_position_embeddings"] = max(config.get("max_position_embeddings", 512), max_length)
    return config


def count_params(config: Dict[str, Any], vocab: int) -> int:
    """Parameters of a Llama ``config`` with ``vocab`` ids (untied embedding and head), computed."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * per_layer + 2 * vocab * h + h


def thread_info() -> str:
    """``torch threads N (OMP_NUM_THREADS=...)``: what a benchmark prints in its header."""
    return f"torch threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
