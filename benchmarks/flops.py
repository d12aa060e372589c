"""Achieved FLOP/s of a ``lightning_irl`` SFT step as a share of this machine's dense matmul peak.

    HF_HUB_OFFLINE=1 python benchmarks/flops.py                      # ~1 min on 2 CPU cores
    HF_HUB_OFFLINE=1 python benchmarks/flops.py --precision bf16-mixed

1. Peak: the best of ``--peak-repeats`` timings of an n x n @ n x n matmul (2 n^3 FLOPs) in the
   step's compute dtype (float32, or bfloat16 for bf16-mixed), measured before *and* after the
   training run (the higher one is used: the machine is shared, the peak is the best it did).
2. FLOPs per step: ``torch.utils.flop_counter.FlopCounterMode`` around one forward + backward of
   the same model on a batch of the same shape (all examples have exactly ``--length`` tokens, so
   every step does the same work); the analytic 6 x params x tokens is printed next to it.
3. Achieved: FLOPs per step x steps / wall time of ``--steps`` SFT steps after ``--warmup``
   (data loading, optimizer, clipping and hooks included).

Printed: achieved / peak. The optimizer's and elementwise FLOPs are not counted (they are small
next to the matmuls), so this is a matmul-utilisation figure, like MFU on GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _scale_common import set_threads, SMALL_LLAMA, StepTimer, make_dataset, quiet_trainer  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lightning_irl.algorithms import SFT, OptimizerSpec  # noqa: E402
from lightning_irl.data import DemonstrationDataModule  # noqa: E402
from lightning_irl.data.collate import DemonstrationCollator  # noqa: E402
from lightning_irl.models.spec import ModelSpec  # noqa: E402
from lightning_irl.objectives.logprobs import token_logprobs, token_nll_sum  # noqa: E402


def matmul_peak(n: int, dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "bf16-true"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--matmul-n", type=int, default=1024)
    parser.add_argument("--peak-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see _scale_common.set_threads)")
    args = parser.parse_args()
    set_threads(args.threads)
    dtype = torch.float32 if args.precision == "32-true" else torch.bfloat16

    ds = make_dataset(tempfile.mkdtemp(prefix="flops_bench_"), n=args.batch_size * (args.warmup + args.steps),
                      min_len=args.length, max_len=args.length)
    peak_before = matmul_peak(args.matmul_n, dtype, args.peak_repeats)

    spec = ModelSpec(config=dict(SMALL_LLAMA), tokenizer=ds["tokenizer"], seed=0)
    module = SFT(policy=spec, optimizer=OptimizerSpec(lr=1e-4, schedule="constant_with_warmup"), export=False)
    data = DemonstrationDataModule(train_file=ds["train_file"], batch_size=args.batch_size, max_length=args.length,
                                   shuffle=False)

    # FLOPs of one step's forward + backward, counted on a copy of the model on one batch
    tokenizer = spec.load_tokenizer()
    data.set_tokenizer(tokenizer)
    data.setup("fit")
    batch = DemonstrationCollator(tokenizer.pad_token_id)(data.datasets["train"][: args.batch_size])
    assert batch["attention_mask"].all(), "every example must have exactly --length tokens"
    model = spec.build_causal_lm(tokenizer)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    counter = FlopCounterMode(display=False)
    with counter, autocast:
        token_nll_sum(token_logprobs(model, batch["input_ids"], batch["attention_mask"]),
                      batch["loss_mask"][:, 1:]).backward()
    step_flops = counter.get_total_flops()
    params = sum(p.numel() for p in model.parameters())
    tokens = int(batch["attention_mask"].sum())
    del model

    L.seed_everything(0)
    timer = StepTimer(args.warmup)
    trainer = quiet_trainer(max_steps=args.warmup + args.steps, precision=args.precision, callbacks=[timer])
    data_fresh = DemonstrationDataModule(train_file=ds["train_file"], batch_size=args.batch_size,
                                         max_length=args.length, shuffle=False)
    trainer.fit(module, datamodule=data_fresh)
    elapsed = timer.end - timer.start
    achieved = step_flops * timer.steps / elapsed
    peak_after = matmul_peak(args.matmul_n, dtype, args.peak_repeats)
    peak = max(peak_before, peak_after)

    print(f"\nmodel {params / 1e6:.1f}M params, batch {args.batch_size} x {args.length} tokens, precision "
          f"{args.precision}, torch threads {torch.get_num_threads()}")
    print(f"  dense matmul peak ({args.matmul_n}^3, {str(dtype).split('.')[-1]}): before {peak_before / 1e9:.1f}, "
          f"after {peak_after / 1e9:.1f} GFLOP/s -> peak {peak / 1e9:.1f} GFLOP/s")
    print(f"  FLOPs per SFT step (counted, fwd+bwd): {step_flops / 1e9:.2f} GFLOP "
          f"(analytic 6 x params x tokens = {6 * params * tokens / 1e9:.2f} GFLOP)")
    print(f"  SFT: {timer.steps} steps in {elapsed:.2f} s = {elapsed / timer.steps * 1000:.0f} ms/step, "
          f"{timer.tokens_per_sec:.0f} tokens/s")
    print(f"  achieved {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.1%} of the measured matmul peak")


if __name__ == "__main__":
    main()
