"""SPIN / IRFT and IQ-Learn next to SFT, from the same SFT start, on the `modes` task (known expert).

    HF_HUB_OFFLINE=1 python benchmarks/implicit_vs_sft.py

(about 70 s of CPU time with the defaults; 6 min wall when measured on 2 cores shared with other jobs)

1. Train a tiny Llama with SFT for ``--start-steps`` steps and export it (the common start), or
   take ``--start <exported folder>``.
2. From that folder (``policy.model_name_or_path``), continue ``--steps`` optimizer steps with each
   method, same data order, learning rate and schedule: SFT, SPIN with ``--spin-iterations``
   iterations, IQ-Learn at each ``--lams`` value.
3. Score every model against the task's exact expert on held-out prompts:
   - forward KL  = E_{y~p_E}[log p_E − log π]       exact: the expert's support is enumerated;
   - reverse KL  = KL(π ‖ p̃_E) = E_{y~π}[log π − log p̃_E], Monte Carlo over policy samples, with its
     standard error (``reverse_kl_se``). p̃_E = (1 − ε)·p_E + ε·V^(−L) is the expert smoothed with a
     random typist (ε = ``lightning_irl.metrics.SMOOTHING``, V the model's output size, L the
     response's tokens): a true divergence, the same definition as ``eval/reverse_kl``;
   - invalid     = share of policy samples with p_E = 0 (samples cut by the length cap included);
   - coverage    = share of the expert's modes whose sampled mass ≥ 0.5 × the expert's weight;
   - and the sampled mass of each mode (copy / reverse / sort; expert 0.6 / 0.3 / 0.1).
   Samples are drawn at temperature 1 (top-p 1, top-k 0): the policy itself.

The forward KL, invalid mass and modes are computed here from ``task.log_prob`` / ``task.mode_of``
directly; the reverse KL uses ``lightning_irl.metrics.functional`` (``rollout_expert_logps``,
``smoothed_expert_logp``) so that it is exactly the logged ``eval/reverse_kl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_irl.algorithms import SFT, SPIN, IQLearn, OptimizerSpec  # noqa: E402
from lightning_irl.data import DemonstrationDataModule  # noqa: E402
from lightning_irl.data.collate import DemonstrationCollator  # noqa: E402
from lightning_irl.data.encode import encode_records  # noqa: E402
from lightning_irl.data.tasks import get_task  # noqa: E402
from lightning_irl.metrics import SMOOTHING  # noqa: E402
from lightning_irl.metrics.functional import (  # noqa: E402
    estimate,
    reverse_kl_terms,
    rollout_expert_logps,
    smoothed_expert_logp,
)
from lightning_irl.models.spec import ModelSpec  # noqa: E402
from lightning_irl.objectives.logprobs import sequence_logprobs, token_logprobs  # noqa: E402
from lightning_irl.rollout import SamplingConfig, sample  # noqa: E402

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 32}


def train(module, steps: int, args) -> float:
    L.seed_everything(args.seed)
    data = DemonstrationDataModule(task="modes", num_train=args.num_train, num_val=8, batch_size=args.batch_size,
                                   max_length=32)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision="32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, data)
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model, tokenizer, task, prompts: List[str], k: int, max_new_tokens: int, seed: int) -> Dict[str, float]:
    model.eval()
    collate = DemonstrationCollator(tokenizer.pad_token_id)
    # forward KL, exact: every response of the expert's support, weighted by p_E
    records = [{"prompt": p, "response": r} for p in prompts for r in task.support(p)]
    examples, _ = encode_records(records, tokenizer, max_length=64)
    forward = 0.0
    for start in range(0, len(examples), 512):
        batch = collate(examples[start : start + 512])
        logps = sequence_logprobs(token_logprobs(model, batch["input_ids"], batch["attention_mask"]),
                                  batch["loss_mask"][:, 1:])
        for prompt, response, logp in zip(batch["prompt"], batch["response"], logps.tolist()):
            p_e = task.support(prompt)[response]
            forward += p_e * (math.log(p_e) - logp)
    forward /= len(prompts)

    # reverse KL, invalid mass, mode masses: k samples per prompt from π at temperature 1
    torch.manual_seed(seed)
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_samples=k)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    terms: List[torch.Tensor] = []
    invalid, total = 0, 0
    modes: Dict[str, int] = {}
    prompt_examples, _ = encode_records([{"prompt": p, "response": "a"} for p in prompts], tokenizer, max_length=64)
    for start in range(0, len(prompt_examples), 256):
        batch = collate(prompt_examples[start : start + 256])
        rollout = sample(model, tokenizer, batch["prompt_input_ids"], batch["prompt_attention_mask"], config)
        logps = sequence_logprobs(rollout.logprobs, rollout.loss_mask[:, 1:])
        # string level (invalid mass, modes): −inf also for responses cut by the cap or with special
        # tokens inside; token level (the reverse KL): the canonical spelling only
        string_logp, token_logp, lengths = rollout_expert_logps(task, tokenizer, batch["prompt"], rollout, k)
        smoothed = smoothed_expert_logp(token_logp, lengths, vocab_size, SMOOTHING)
        terms.append(reverse_kl_terms(logps.cpu(), smoothed))
        for i, (response, log_pe) in enumerate(zip(rollout.responses, string_logp.tolist())):
            mode = task.mode_of(batch["prompt"][i // k], response) if math.isfinite(log_pe) else None
            invalid += not math.isfinite(log_pe)
            if mode is not None:
                modes[mode] = modes.get(mode, 0) + 1
            total += 1
    reverse, reverse_se = estimate(torch.cat(terms))
    weights = task.mode_weights(prompts[0])
    masses = {m: modes.get(m, 0) / total for m in weights}
    coverage = sum(masses[m] >= 0.5 * w for m, w in weights.items()) / len(weights)
    return {"forward_kl": forward, "reverse_kl": reverse, "reverse_kl_se": reverse_se, "invalid": invalid / total,
            "coverage": coverage, **{f"mass_{m}": v for m, v in masses.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--start", help="exported SFT folder to start from (default: train one)")
    parser.add_argument("--start-steps", type=int, default=400, help="SFT steps of the common start")
    parser.add_argument("--steps", type=int, default=300, help="steps of each continuation")
    parser.add_argument("--lr", type=float, default=1e-4, help="continuation learning rate (constant)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--spin-iterations", type=int, default=2)
    parser.add_argument("--spin-betas", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--lams", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=16, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models gain little from more)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    task = get_task("modes")
    prompts = task.prompts(args.eval_prompts, seed=987_654)  # not the train/val/test seeds
    workdir = tempfile.mkdtemp(prefix="implicit_vs_sft_")
    results, seconds = {}, {}
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)

    start_dir = args.start
    if start_dir is None:
        start_dir = os.path.join(workdir, "start")
        module = SFT(ModelSpec(config=dict(TINY), tokenizer="task:modes", seed=args.seed),
                     optimizer=OptimizerSpec(lr=3e-3, weight_decay=0.01, warmup_steps=20, schedule="cosine"),
                     export_dir=start_dir, sampling=sampling)
        seconds["start (SFT)"] = train(module, args.start_steps, args)
    start_spec = ModelSpec(model_name_or_path=start_dir)

    def evaluate_module(name, module):
        results[name] = evaluate(module.policy, module.tokenizer, task, prompts, args.eval_samples, 8, args.seed)
        print(f"{name:24s} " + "  ".join(f"{k}={v:.4f}" for k, v in results[name].items()), flush=True)

    start = SFT(start_spec, export=False)
    start.configure_model()
    evaluate_module("start (SFT)", start)

    continuation = dict(optimizer=OptimizerSpec(lr=args.lr, schedule="constant"), export=False, sampling=sampling)
    methods = {f"SFT +{args.steps}": lambda: SFT(start_spec, **continuation)}
    for beta in args.spin_betas:
        methods[f"SPIN T={args.spin_iterations} β={beta}"] = \
            lambda beta=beta: SPIN(start_spec, kl_coef=beta, iterations=args.spin_iterations, **continuation)
    for lam in args.lams:
        methods[f"IQ-Learn λ={lam}"] = lambda lam=lam: IQLearn(start_spec, lam=lam, **continuation)
    for name, build in methods.items():
        module = build()
        seconds[name] = train(module, args.steps, args)
        evaluate_module(name, module)

    columns = ["forward_kl", "reverse_kl", "reverse_kl_se", "invalid", "coverage", "mass_copy", "mass_reverse",
               "mass_sort"]
    print(f"\nmodes task; {args.eval_prompts} held-out prompts x {args.eval_samples} samples; start = SFT "
          f"{args.start_steps if args.start is None else args.start}; continuations {args.steps} steps at lr {args.lr}")
    print("| method | " + " | ".join(columns) + " | train s |")
    print("|---" * (len(columns) + 2) + "|")
    print(f"| expert | 0 | ≤ {-math.log1p(-SMOOTHING):.3f} (smoothing) | 0 | 0 | 1 | 0.6 | 0.3 | 0.1 | |")
    for name, row in results.items():
        cells = " | ".join(f"{row[c]:.3f}" for c in columns)
        print(f"| {name} | {cells} | {seconds.get(name, 0):.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "train_seconds": seconds}, f, indent=2)


if __name__ == "__main__":
    main()
