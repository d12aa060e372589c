"""Padding: random batches vs length grouping vs packing — pad share and SFT tokens/s, side by side.

    HF_HUB_OFFLINE=1 python benchmarks/packing.py                   # ~10 min on 2 CPU cores

Same model and data as ``sft_throughput.py`` (lengths log-uniform in 16-256 tokens, so random
batches are mostly padding). Variants, all ``lightning_irl`` SFT with the same examples per step
count and batch size:

- ``random``:  shuffled batches, padded to the longest example (the default);
- ``grouped``: ``data.group_by_length`` (similar lengths in a batch, batches in random order);
- ``packed``:  ``data.packing`` with ``pack_length = max_length`` (rows of several examples,
  position ids restarting per example, block-causal attention);
- ``packed_grouped``: both.

Packed rows carry ``position_ids`` (``PackedDemonstrationCollator``); the shipped SFT loss
(``PolicyModule.nll_sum``) forwards them, so every variant times the shipped path.

Reported: pad share of the [rows x width] cells actually computed, non-pad tokens/s, and each
variant's tokens/s relative to ``random`` (median over ``--repeats`` rounds, rotating order).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _scale_common import set_threads, SMALL_LLAMA, StepTimer, make_dataset, median, quiet_trainer  # noqa: E402

import lightning as L  # noqa: E402

from lightning_irl.algorithms import SFT, OptimizerSpec  # noqa: E402
from lightning_irl.data import DemonstrationDataModule  # noqa: E402
from lightning_irl.models.spec import ModelSpec  # noqa: E402


VARIANTS = {
    "random": dict(),
    "grouped": dict(group_by_length=True),
    "packed": dict(packing=True),
    "packed_grouped": dict(packing=True, group_by_length=True),
}


def run(ds, name: str, args) -> Dict[str, float]:
    L.seed_everything(0)
    module = SFT(policy=ModelSpec(config=dict(SMALL_LLAMA), tokenizer=ds["tokenizer"], seed=0),
                       optimizer=OptimizerSpec(lr=1e-4, schedule="constant_with_warmup"), export=False)
    data = DemonstrationDataModule(train_file=ds["train_file"], batch_size=args.batch_size,
                                   max_length=args.max_length, **VARIANTS[name])
    timer = StepTimer(args.warmup)
    trainer = quiet_trainer(max_steps=args.warmup + args.steps, precision=args.precision, callbacks=[timer])
    trainer.fit(module, datamodule=data)
    return {"tokens_per_sec": timer.tokens_per_sec, "pad_share": timer.pad_share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see _scale_common.set_threads)")
    args = parser.parse_args()
    set_threads(args.threads)
    ds = make_dataset(tempfile.mkdtemp(prefix="packing_bench_"), n=2000, max_len=args.max_length)
    names = list(VARIANTS)
    rounds: List[Dict[str, Dict[str, float]]] = []
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        result = {name: run(ds, name, args) for name in order}
        rounds.append(result)
        print(f"round {r}: " + ", ".join(f"{n} {result[n]['tokens_per_sec']:.0f} tok/s "
                                          f"(pad {result[n]['pad_share']:.0%})" for n in names), flush=True)
    print(f"\nSFT, batch {args.batch_size} examples/step, max_length {args.max_length}, precision {args.precision}, "
          f"{args.steps} steps after {args.warmup} warmup, {args.repeats} rounds")
    print(f"  {'variant':16s} {'pad share':>9s} {'tokens/s':>9s} {'vs random':>9s}")
    for name in names:
        pad = median([r[name]["pad_share"] for r in rounds])
        tps = median([r[name]["tokens_per_sec"] for r in rounds])
        ratio = median([r[name]["tokens_per_sec"] / r["random"]["tokens_per_sec"] for r in rounds])
        print(f"  {name:16s} {pad:9.1%} {tps:9.0f} {ratio:9.2f}x")


if __name__ == "__main__":
    main()
