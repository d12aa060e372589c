"""Peak memory and time of one SFT forward + backward: the output head on every position vs on the
response tokens only (``objectives.logprobs.masked_token_logprobs``, what SFT runs).

    OMP_NUM_THREADS=1 python benchmarks/head_memory.py                 # fp32 and bf16-mixed, ~1 min
    python benchmarks/head_memory.py --vocab 151936 --length 1024      # a Qwen-sized vocabulary

A Llama built from its config (``--vocab``, hidden 256, 2 layers), a batch of ``--batch`` rows of
``--length`` tokens whose first ``--prompt-share`` are prompt. Each (path, precision) runs in a
fresh process, so the peak resident-set growth over its first step is that path's alone (weights,
gradients and activations; the model's own size is the same on both sides). Then the median of
``--steps`` more steps' wall time. Both paths compute the same loss (tests/models/test_masked_logprobs.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PATHS = ("full", "masked")


def one(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_irl.objectives.logprobs import masked_token_nll_sum, token_logprobs, token_nll_sum

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.length)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(3, args.vocab, (args.batch, args.length))
    attention = torch.ones_like(ids)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, int(args.prompt_share * args.length):] = 1
    scored = loss_mask[:, 1:]
    bf16 = args.precision == "bf16-mixed"

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if args.path == "full":
                loss = token_nll_sum(token_logprobs(model, ids, attention), scored)
            else:
                loss = masked_token_nll_sum(model, ids, attention, scored)
        (loss / scored.sum()).backward()
        return float(loss)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    loss = step()
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"path": args.path, "precision": args.precision, "peak_mib": peak_mib, "step_s": statistics.median(times),
            "loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--prompt-share", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    p.add_argument("--json", default=None)
    p.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # one child process
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.path:
        print(json.dumps(one(args)))
        return
    rows = []
    for precision in args.precisions:
        for path in PATHS:
            command = [sys.executable, __file__, "--path", path, "--precision", precision, "--vocab", str(args.vocab),
                       "--batch", str(args.batch), "--length", str(args.length), "--prompt-share",
                       str(args.prompt_share), "--steps", str(args.steps)]
            out = subprocess.run(command, capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"vocabulary {args.vocab}, batch {args.batch} x {args.length} tokens, {args.prompt_share:.0%} prompt; "
          "peak RSS growth over the first step, median step time")
    print("| precision | head on | peak MiB | step s | loss |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {'every position' if r['path'] == 'full' else 'response tokens'} | "
              f"{r['peak_mib']:.0f} | {r['step_s']:.2f} | {r['loss']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
