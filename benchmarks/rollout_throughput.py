"""Rollout throughput: ``lightning_irl.rollout.sample`` vs calling ``model.generate`` directly, and
how far the sampling pass's log-probs are from a forward pass's (``--deltas``).

Throughput: same model, same left-padded prompts, same sampling settings and seeds (so all draw
the same tokens), measured side by side in one process, interleaved round by round
(as ``_bench.run_rounds``). Throughput is sampled response tokens (up to and including EOS) per
second. ``sample`` does more than ``generate``: it builds masks, decodes texts and takes per-token
log-probabilities, either recomputed in one extra forward pass (``logprobs_from="forward"``),
taken from the raw logits ``generate`` already computed (``"generate"``), or ``"auto"`` (the
default: the sampling pass, after a one-time check, ``rollout.SamplingConfig``).

    python benchmarks/rollout_throughput.py                      # CPU, a small Llama
    python benchmarks/rollout_throughput.py --device cuda --hidden 512 --layers 8 --prompts 128
    python benchmarks/rollout_throughput.py --deltas             # max |generate - forward| per model / precision

``--deltas``: for a Llama and a GPT-2 (hidden 32 and 256, dropout off) under float32, bf16 autocast
and bf16 weights, 64 rollouts (16 prompts x 4) of 16 new tokens: the max and mean |Δ| per
response token between the two sources, the max per sequence, and each source's max distance to
the float32 forward (reduced precision only). These are the numbers in ``SamplingConfig``'s
docstring.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _bench import Clock, Timing, report  # noqa: E402

from lightning_irl.data.collate import pad_sequences  # noqa: E402
from lightning_irl.data.tasks import get_task  # noqa: E402
from lightning_irl.models.spec import ModelSpec  # noqa: E402
from lightning_irl.objectives.logprobs import token_logprobs  # noqa: E402
from lightning_irl.rollout import SamplingConfig, response_mask_from_ids, sample  # noqa: E402

DELTA_MODELS = {
    "llama-32": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
    "llama-256": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512},
    "gpt2-32": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "gpt2-256": {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 512,
                 "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
}


def deltas(task_name: str, json_path=None) -> None:
    task = get_task(task_name)
    out = []
    print(f"{'model':10s} {'precision':10s} {'tokens':>6s} {'max|d|':>9s} {'mean|d|':>9s} {'seq max':>9s} "
          f"{'gen-fp32':>9s} {'fwd-fp32':>9s}")
    for name, config in DELTA_MODELS.items():
        spec = ModelSpec(config=dict(config), tokenizer=f"task:{task_name}", seed=0)
        tok = spec.load_tokenizer()
        base = spec.build_causal_lm(tok).eval()
        padded = pad_sequences([tok(p)["input_ids"] for p in task.prompts(16, seed=0)], tok.pad_token_id, left=True)
        ids, mask = padded["input_ids"], padded["attention_mask"]
        for precision in ("fp32", "bf16-autocast", "bf16-weights"):
            model = copy.deepcopy(base).to(torch.bfloat16) if precision == "bf16-weights" else base
            context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16-autocast" \
                else contextlib.nullcontext
            rollouts = {}
            for source in ("forward", "generate"):
                torch.manual_seed(3)
                with context():
                    rollouts[source] = sample(model, tok, ids, mask, SamplingConfig(max_new_tokens=16, num_samples=4,
                                                                                    logprobs_from=source))
            forward, generate = rollouts["forward"], rollouts["generate"]
            assert torch.equal(forward.input_ids, generate.input_ids)
            m = forward.loss_mask[:, 1:].bool()
            d = (generate.logprobs - forward.logprobs).abs()
            row = {"model": name, "precision": precision, "tokens": int(m.sum()), "max": float(d[m].max()),
                   "mean": float(d[m].mean()), "sequence_max": float((d * m).sum(-1).max()),
                   "signed_mean": float((generate.logprobs - forward.logprobs)[m].mean())}
            if precision != "fp32":
                with torch.no_grad():
                    exact = token_logprobs(base, forward.input_ids, forward.attention_mask)
                row["generate_vs_fp32"] = float((generate.logprobs - exact)[m].abs().max())
                row["forward_vs_fp32"] = float((forward.logprobs - exact)[m].abs().max())
            out.append(row)
            print(f"{name:10s} {precision:14s} {row['tokens']:6d} {row['max']:9.2e} {row['mean']:9.2e} "
                  f"{row['sequence_max']:9.2e} {row.get('generate_vs_fp32', float('nan')):9.2e} "
                  f"{row.get('forward_vs_fp32', float('nan')):9.2e}")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(out, handle, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--task", default="grammar", help="built-in task giving prompts and tokenizer")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=4, help="k samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--deltas", action="store_true", help="measure generate-vs-forward log-prob deltas instead")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deltas:
        deltas(args.task, args.json)
        return

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

    variants = {"generate": direct, "rollout (no log-probs)": ours(False), "rollout (forward)": ours(True),
                "rollout (generate)": ours(True, "generate"), "rollout (auto)": ours(True, "auto")}
    seed = [0]

    def timed(fn):
        def run() -> Timing:
            torch.manual_seed(seed[0])
            fn()  # warm-up (and, for auto, its one-time check)
            torch.manual_seed(seed[0] + 1)
            clock = Clock()
            sync()
            clock.start()
            n = fn()
            sync()
            return clock.stop(n)
        return run

    runners = {name: timed(fn) for name, fn in variants.items()}
    names = list(runners)
    results = []
    for r in range(args.rounds):  # interleaved, the order rotating (as _bench.run_rounds), a new seed each round
        seed[0] = 2 * r
        order = names[r % len(names):] + names[: r % len(names)]
        result = {name: runners[name]() for name in order}
        results.append({name: result[name] for name in names})
    print(f"device={device} threads={torch.get_num_threads()} model=llama h{args.hidden}x{args.layers} "
          f"vocab={len(tok)} prompts={args.prompts} k={args.num_samples} max_new_tokens={args.new_tokens}")
    # ratios against bare generate: report() divides "ours" by every other runner, so invert for each variant
    for name in variants:
        if name == "generate":
            continue
        report(f"{name} vs generate", [{name: r[name], "generate": r["generate"]} for r in results], name,
               "sampled tokens", vars(args),
               json_path=(args.json.replace(".json", f"_{name.split('(')[-1].rstrip(')').replace(' ', '_')}.json")
                          if args.json else None))


if __name__ == "__main__":
    main()
