"""How many torch threads a small model should use on CPU: training steps with 1 thread vs all
cores, side by side, by model size.

    OMP_NUM_THREADS unset: python benchmarks/threads.py [--rounds 5] [--json out.json]

Each round times ``--steps`` SFT-shaped steps (forward, backward, AdamW) of a Llama at each size
with 1 thread and with ``os.cpu_count()`` threads, in rotating order, inside one process; the
result is the ratio (time with all cores / time with 1 thread) per round, min/median/max, for wall
and process-CPU time. Below 1: more threads help. Run it once on an idle machine and once while
another CPU-bound job runs (``--load``: this script starts a busy-looping process per core but
one, for the duration), since that is where the default of torch (one thread per core) hurts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SIZES = {  # name: (hidden, intermediate, layers, heads, vocab, batch, seq)
    "84K": (64, 128, 2, 4, 32, 32, 16),      # the quickstart's model and batch
    "1M": (128, 344, 4, 4, 1024, 16, 64),
    "5M": (256, 688, 4, 4, 4096, 8, 128),
    "30M": (512, 1376, 8, 8, 8192, 8, 128),
}


def build(size: str):
    hidden, inter, layers, heads, vocab, batch, seq = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=seq)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, vocab, (batch, seq))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), ids


def time_steps(model, optimizer, ids, steps: int):
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def spin() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--load", action="store_true", help="keep cpu_count - 1 other cores busy")
    parser.add_argument("--json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    hogs = [mp.Process(target=spin, daemon=True) for _ in range(cores - 1)] if args.load else []
    for hog in hogs:
        hog.start()
    results = {}
    try:
        for size in args.sizes:
            model, optimizer, ids = build(size)
            params = sum(p.numel() for p in model.parameters())
            ratios = {"wall": [], "cpu": []}
            for round_ in range(args.rounds):
                times = {}
                for threads in ([1, cores] if round_ % 2 == 0 else [cores, 1]):
                    torch.set_num_threads(threads)
                    time_steps(model, optimizer, ids, 3)  # warm-up at this thread count
                    times[threads] = time_steps(model, optimizer, ids, args.steps)
                ratios["wall"].append(times[cores][0] / times[1][0])
                ratios["cpu"].append(times[cores][1] / times[1][1])
            summary = {k: {"min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in ratios.items()}
            results[size] = {"params": params, "threads": cores, **summary}
            print(f"{size:>4} ({params / 1e6:.2f}M params): time with {cores} threads / 1 thread  "
                  f"wall {summary['wall']['median']:.2f} ({summary['wall']['min']:.2f}-{summary['wall']['max']:.2f})  "
                  f"cpu {summary['cpu']['median']:.2f} ({summary['cpu']['min']:.2f}-{summary['cpu']['max']:.2f})",
                  flush=True)
    finally:
        for hog in hogs:
            hog.terminate()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"load": args.load, "rounds": args.rounds, "steps": args.steps, "results": results}, handle,
                      indent=1)


if __name__ == "__main__":
    main()
