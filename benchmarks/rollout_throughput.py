"""Rollout throughput: ``lightning_irl.rollout.sample`` vs calling ``model.generate`` directly.

Same model, same left-padded prompts, same sampling settings and seeds (so both draw the same
tokens), measured side by side in one run, interleaved repeat by repeat. Throughput is sampled
response tokens (up to and including EOS) per second. ``sample`` does more than ``generate``: it
builds masks, decodes texts and, by default, recomputes the per-token log-probabilities under the
policy in one extra forward pass (``logprobs_from="forward"``), or takes them from the raw logits
``generate`` already computed (``logprobs_from="generate"``); all three ratios are printed.

    python benchmarks/rollout_throughput.py                      # CPU, a small Llama
    python benchmarks/rollout_throughput.py --device cuda --hidden 512 --layers 8 --prompts 128
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lightning_irl.data.collate import pad_sequences  # noqa: E402
from lightning_irl.data.tasks import get_task  # noqa: E402
from lightning_irl.models.spec import ModelSpec  # noqa: E402
from lightning_irl.rollout import SamplingConfig, response_mask_from_ids, sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--task", default="grammar", help="built-in task giving prompts and tokenizer")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=4, help="k samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    heads = max(args.hidden // 64, 1)
    spec = ModelSpec(config={"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                             "num_hidden_layers": args.layers, "num_attention_heads": heads,
                             "num_key_value_heads": heads, "max_position_embeddings": 256},
                     tokenizer=f"task:{args.task}", seed=0)
    tok = spec.load_tokenizer()
    model = spec.build_causal_lm(tok).to(device).eval()
    task = get_task(args.task)
    rows = [tok(p)["input_ids"] for p in task.prompts(args.prompts, seed=0)]
    padded = pad_sequences(rows, tok.pad_token_id, left=True)
    ids, mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
    config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                            num_samples=args.num_samples)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def direct() -> int:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, max_new_tokens=args.new_tokens, num_return_sequences=args.num_samples,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
        return int(response_mask_from_ids(out[:, ids.size(1):], tok.eos_token_id).sum())

    def ours(logprobs: bool, source: str = "forward"):
        cfg = dataclasses.replace(config, logprobs_from=source)
        return lambda: sample(model, tok, ids, mask, cfg, compute_logprobs=logprobs).num_tokens()

    variants = {"generate": direct, "rollout (no log-probs)": ours(False), "rollout (+ log-probs)": ours(True),
                "rollout (log-probs from generate)": ours(True, "generate")}
    times = {name: [] for name in variants}
    tokens = {}
    names = list(variants)
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:  # rotate the order: no position bias
            fn = variants[name]
            torch.manual_seed(repeat)
            sync()
            start = time.perf_counter()
            n = fn()
            sync()
            if repeat:
                times[name].append(time.perf_counter() - start)
                tokens.setdefault(name, []).append(n)
    if tokens["generate"] != tokens["rollout (no log-probs)"]:
        print("note: the variants drew different numbers of tokens (nondeterministic kernels?)")

    print(f"device={device} threads={torch.get_num_threads()} model=llama h{args.hidden}x{args.layers} "
          f"vocab={len(tok)} prompts={args.prompts} k={args.num_samples} max_new_tokens={args.new_tokens} "
          f"repeats={args.repeats} (median)")
    rate = {}
    for name in variants:
        t = statistics.median(times[name])
        rate[name] = statistics.mean(tokens[name]) / t
        print(f"  {name:34s} {t * 1000:8.1f} ms   {rate[name]:10.0f} sampled tokens/s")
    base = rate["generate"]
    print(f"ratio rollout/generate without log-prob recomputation: {rate['rollout (no log-probs)'] / base:.3f}")
    print(f"ratio rollout/generate with log-prob recomputation:    {rate['rollout (+ log-probs)'] / base:.3f}")
    print(f"ratio rollout/generate, log-probs from generate logits: "
          f"{rate['rollout (log-probs from generate)'] / base:.3f}")


if __name__ == "__main__":
    main()
