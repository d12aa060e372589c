"""The divergence lab: mass-covering SFT vs mode-seeking AIRL / GAIL on a task with a known expert.

    HF_HUB_OFFLINE=1 python benchmarks/divergence_lab.py            # 3 seeds, CPU, ~10-15 minutes
    python benchmarks/divergence_lab.py --seeds 0 --steps 100       # a quick look

For every seed:

1. **SFT start.** A small Llama (``--hidden``/``--layers``: deliberately capacity-limited) is
   trained by SFT on demonstrations of the built-in ``modes`` task (each prompt is answered by
   copying it with probability 0.6, reversing it 0.3, sorting it 0.1) for ``--start-steps`` steps
   and saved as a Hugging Face folder, as ``lightning_irl fit --config configs/quickstart.yaml``
   would export it. At that point it still puts mass on answers that mix modes (invalid).
2. **Same budget, three objectives**, each from that folder for ``--steps`` training batches of
   ``--batch-size`` demonstrations/prompts (the algorithms' real ``LightningModule``s under a
   ``lightning.Trainer``):

   - ``SFT``: more forward-KL (behaviour-cloning) steps;
   - ``AIRL``: ``Adversarial(divergence="reverse_kl")``;
   - ``GAIL``: ``Adversarial(divergence="js")``;

   - ``AIRL*`` / ``GAIL*``: the same module and RL (reward table, clip, KL, RLOO), but the
     discriminator's logit is replaced by its exact optimum ``h* = log p_E − log π_θ`` computed
     from the task: what the *divergence* does when the discriminator is perfect.

   The adversarial runs use a sequence-level discriminator initialised from the SFT start's
   backbone (fresh score head; ``--disc-init scratch`` for a fresh network), RLOO with
   ``--num-samples`` samples per prompt and a KL to the SFT start of weight ``--kl-coef`` (k1,
   in the reward). "Same budget" = same number of training batches of the same size; the
   adversarial steps cost more compute (rollouts, discriminator), the ``train s`` column says
   how much.
3. **Exact metrics** against the task's expert on ``--eval-prompts`` held-out prompts
   (``lightning_irl.metrics.functional``):

   - forward KL ``KL(p_E ‖ π)``: *exact*, the sum over the ≤ 3 expert answers of each prompt of
     ``p_E (log p_E − log π)``, with ``log π`` by teacher forcing (EOS included);
   - reverse KL ``KL(π ‖ p_E)``: from ``--eval-samples`` samples per prompt at temperature 1,
     ``E_π[log π − max(log p_E, log 1e-6)]`` (floor ``log 1e-6``: outside the support
     ``log p_E = −∞``; responses cut at the length cap count as outside);
     The floored value can dip below 0 when the policy samples invalid responses it gives
     ``π < 1e-6`` (the term ``log π − log 1e-6`` is then negative): read it with the next two;
   - valid reverse KL ``KL(π(·|valid) ‖ p_E)`` (``metrics.known_expert.ValidReverseKL``): the
     reverse KL of the policy conditioned on staying in the support, a true KL without a floor;
   - invalid mass: share of samples with ``p_E = 0``;
   - mode mass: share of samples in each mode; coverage: share of the 3 modes whose sampled mass
     is ≥ 0.5 × the expert's weight.

The table gives mean ± std over seeds; a PNG (``--plot``) shows each metric per method.
The claim under test (THEORY.md §6): AIRL and GAIL reach lower reverse KL and invalid mass than
SFT; SFT keeps lower forward KL and higher coverage.

What it showed (3 seeds, see the README): with the exact log-ratio (``AIRL*``, ``GAIL*``) the
claim holds, AIRL collapsing onto the dominant mode. With a *learned* discriminator of the
policy's size it does not, in this budget: the classifier stays near chance (``disc/loss ≈ log 4``;
offline, 2,500 steps reach 1.37 against a Bayes-optimal 1.17), so its rewards are noise and the
KL keeps the policy at its start. Checking whether a response is a copy, reversal or sorting of
the prompt is harder to learn from one bit per sequence than to imitate token by token.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("SFT start", "SFT", "AIRL", "GAIL", "AIRL*", "GAIL*")
METRICS = ("forward_kl", "reverse_kl", "valid_reverse_kl", "invalid_mass", "coverage", "mass_copy", "mass_reverse",
           "mass_sort")
ARROWS = {"forward_kl": "↓", "reverse_kl": "↓", "valid_reverse_kl": "↓", "invalid_mass": "↓", "coverage": "↑"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2, help="seeds run in parallel processes (1 thread each)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--start-steps", type=int, default=600, help="SFT steps of the shared start")
    p.add_argument("--steps", type=int, default=200, help="training batches per method after the start")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--lr", type=float, default=1e-3, help="policy lr of the continuations (SFT, AIRL, GAIL)")
    p.add_argument("--disc-lr", type=float, default=1e-3)
    p.add_argument("--disc-steps", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--kl-coef", type=float, default=0.1)
    p.add_argument("--log-ratio-clip", type=float, default=5.0)
    p.add_argument("--discriminator-level", choices=["sequence", "token"], default="sequence")
    p.add_argument("--disc-init", choices=["start", "scratch"], default="start",
                   help="discriminator backbone: the SFT start's weights, or a fresh network")
    p.add_argument("--eval-prompts", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=list(METHODS[1:]))
    p.add_argument("--plot", default="benchmarks/divergence_lab.png")
    return p.parse_args(argv)


# ---- building blocks ---------------------------------------------------------------------------
def _quiet() -> None:
    import torch

    torch.set_num_threads(1)  # tiny models: one thread per process is much faster than two
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _llama(hidden: int, layers: int, seed: int):
    from lightning_irl.models.spec import ModelSpec

    return ModelSpec(config=dict(model_type="llama", hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                 max_position_embeddings=32), tokenizer="task:modes", seed=seed)


def _fit(module, data, steps: int) -> float:
    import lightning as L

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    module.last_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return seconds


def evaluate(policy, tokenizer, task, prompts: List[str], samples: int, max_new_tokens: int) -> Dict[str, float]:
    """Exact forward KL; sampled reverse KL, invalid mass, per-mode mass and coverage."""
    import torch

    from lightning_irl.metrics.functional import LOG_FLOOR, forward_kl_terms, invalid, mode_coverage, \
        reverse_kl_terms
    from lightning_irl.metrics.known_expert import ValidReverseKL
    from lightning_irl.objectives.logprobs import sequence_logprobs, token_logprobs
    from lightning_irl.rollout import SamplingConfig, sample

    policy.eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    # forward KL, exactly: every expert answer of every prompt, teacher-forced
    rows, masks, weights = [], [], []
    for prompt in prompts:
        prompt_ids = tokenizer(prompt)["input_ids"]
        for answer, weight in task.support(prompt).items():
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
            rows.append(prompt_ids + answer_ids)
            masks.append([0] * len(prompt_ids) + [1] * len(answer_ids))
            weights.append(weight)
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    weights_t = torch.tensor(weights)
    with torch.no_grad():
        logp = sequence_logprobs(token_logprobs(policy, ids, attention), loss_mask[:, 1:])
    forward_kl = float((weights_t * forward_kl_terms(weights_t.log(), logp)).sum() / len(prompts))

    # samples at temperature 1
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    prompt_ids = torch.tensor([[pad] * (width - len(r)) + r for r in encoded])
    prompt_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in encoded])
    with torch.no_grad():
        rollout = sample(policy, tokenizer, prompt_ids, prompt_mask,
                         SamplingConfig(max_new_tokens=max_new_tokens, num_samples=samples), compute_logprobs=True)
    policy_logp = sequence_logprobs(rollout.logprobs, rollout.loss_mask[:, 1:])
    expert_logp, modes = [], []
    for i, (ids, mask) in enumerate(zip(rollout.input_ids, rollout.loss_mask)):
        prompt = prompts[i // samples]
        text, finished = response_text(tokenizer, ids[mask.bool()].tolist())
        expert_logp.append(task.log_prob(prompt, text) if finished else -math.inf)
        modes.append(task.mode_of(prompt, text) if finished else None)
    expert_logp_t = torch.tensor(expert_logp)
    names = ("copy", "reverse", "sort")
    n = len(modes)
    mass = torch.tensor([sum(m == name for m in modes) / n for name in names])
    expert_mass = torch.tensor([task.weights[name] for name in names])
    valid_kl = ValidReverseKL()
    valid_kl.update(policy_logp, expert_logp_t)
    out = {
        "forward_kl": forward_kl,
        "reverse_kl": float(reverse_kl_terms(policy_logp, expert_logp_t, LOG_FLOOR).mean()),
        "valid_reverse_kl": float(valid_kl.compute()),
        "invalid_mass": float(invalid(expert_logp_t).mean()),
        "coverage": float(mode_coverage(mass, expert_mass, 0.5)),
    }
    out.update({f"mass_{name}": float(m) for name, m in zip(names, mass)})
    return out


def response_text(tokenizer, response_ids) -> Tuple[str, bool]:
    """(text, finished) of one response's token ids (EOS included when it finished).

    Special tokens *inside* the response are kept (``<pad>``, ``<unk>`` decode as themselves),
    so they make it invalid. ``Rollout.responses`` drops them (``skip_special_tokens``), which
    would score "h <pad> a e" as the valid copy "h a e": a policy trained against an exact
    string-level reward found exactly that spelling (low π, so a huge ``log p_E − log π``).
    """
    ids = list(response_ids)
    finished = bool(ids) and ids[-1] == tokenizer.eos_token_id
    if finished:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False), finished


def exact_log_ratio_module(task, **kwargs):
    """``Adversarial`` whose discriminator is replaced by the exact optimum of its logit,
    ``h* = log p_E(y|x) − log π_θ(y|x)`` (``−∞`` outside the expert's support, so the clip makes it
    ``−log_ratio_clip`` there), then the same divergence reward, clip, KL shaping and RLOO as the
    learned runs. It isolates what the divergence does from how well a discriminator is learned.
    (Flooring ``log p_E`` instead, as the reverse-KL *metric* does, would be exploitable: an
    invalid response with ``π < 1e-6`` would get a positive ``h``.)"""
    import torch

    from lightning_irl.algorithms import Adversarial
    from lightning_irl.algorithms.adversarial import RolloutScores
    from lightning_irl.objectives.divergences import divergence_reward
    from lightning_irl.objectives.logprobs import sequence_logprobs, token_logprobs

    class ExactLogRatio(Adversarial):
        def discriminator_backward(self, expert, policy):  # nothing to learn
            zero = torch.zeros(1, device=self.device)
            return zero[0], zero[0], zero, zero

        @torch.no_grad()
        def score_rollout(self, rows):
            tokenizer = self.tokenizer
            logp = sequence_logprobs(token_logprobs(self.policy, rows["input_ids"], rows["attention_mask"]),
                                     rows["loss_mask"][:, 1:])
            expert = []
            for ids, attention, response in zip(rows["input_ids"], rows["attention_mask"], rows["loss_mask"]):
                prompt = tokenizer.decode(ids[attention.bool() & ~response.bool()].tolist(), skip_special_tokens=True)
                text, finished = response_text(tokenizer, ids[response.bool()].tolist())
                expert.append(task.log_prob(prompt, text) if finished else -math.inf)
            h = torch.tensor(expert, device=logp.device) - logp  # −inf outside the support, clipped below
            return RolloutScores(divergence_reward(self.divergence, h, self.log_ratio_clip), None, h)

    return ExactLogRatio(**kwargs)


def run_seed(args: argparse.Namespace, seed: int) -> Dict[str, Dict[str, float]]:
    _quiet()
    import lightning as L

    from lightning_irl.algorithms import SFT, Adversarial, OptimizerSpec
    from lightning_irl.data import DemonstrationDataModule
    from lightning_irl.data.tasks import get_task
    from lightning_irl.metrics.evaluation import EvalConfig
    from lightning_irl.models.spec import ModelSpec
    from lightning_irl.rollout import SamplingConfig

    task = get_task("modes")
    prompts = task.prompts(args.eval_prompts, seed=10_000 + seed)  # held out: the data use other seeds
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    no_eval = EvalConfig(enabled=False)  # the lab measures exactly, below
    results: Dict[str, Dict[str, float]] = {}

    def data():
        return DemonstrationDataModule(task="modes", num_train=args.num_train, num_val=0,
                                       batch_size=args.batch_size, task_seed=seed, max_length=32)

    def record(name, module, seconds):
        L.seed_everything(12_345 + seed, verbose=False)
        results[name] = evaluate(module.policy, module.tokenizer, task, prompts, args.eval_samples,
                                 args.max_new_tokens)
        results[name]["seconds"] = seconds
        print(f"  seed {seed} {name:9s} {seconds:6.1f}s " +
              " ".join(f"{k}={v:.3f}" for k, v in results[name].items() if k != "seconds"), flush=True)
        logged = getattr(module, "last_metrics", {})
        if name in ("AIRL", "GAIL") and "disc/loss" in logged:  # did the discriminator learn? (chance: log 4)
            print(f"  seed {seed} {name:9s} last step: " + " ".join(
                f"{k}={logged[k]:.3f}" for k in ("disc/loss", "disc/acc_expert", "disc/acc_policy", "reward/std",
                                                 "kl/ref") if k in logged), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        # 1. the shared SFT start, exported as a Hugging Face folder
        L.seed_everything(seed, verbose=False)
        start = SFT(policy=_llama(args.hidden, args.layers, seed), sampling=sampling, evaluation=no_eval,
                    export_dir=os.path.join(tmp, "start"),
                    optimizer=OptimizerSpec(lr=args.sft_lr, weight_decay=0.01, warmup_steps=20, schedule="cosine"))
        seconds = _fit(start, data(), args.start_steps)
        record("SFT start", start, seconds)
        folder = os.path.join(tmp, "start")
        assert os.path.exists(os.path.join(folder, "model.safetensors"))
        policy = ModelSpec(model_name_or_path=folder, tokenizer="task:modes")
        continuation = OptimizerSpec(lr=args.lr, warmup_steps=10, schedule="cosine")

        # 2. same budget, three objectives
        for name in args.methods:
            L.seed_everything(1_000 + seed, verbose=False)
            if name == "SFT":
                module = SFT(policy=policy, optimizer=continuation, sampling=sampling, evaluation=no_eval, export=False)
            else:
                discriminator = policy if args.disc_init == "start" else _llama(args.hidden, args.layers, 100 + seed)
                build = Adversarial if not name.endswith("*") else \
                    (lambda **kwargs: exact_log_ratio_module(task, **kwargs))
                module = build(
                    policy=policy, discriminator=discriminator,
                    divergence={"AIRL": "reverse_kl", "GAIL": "js"}[name.rstrip("*")],
                    discriminator_level=args.discriminator_level,
                    num_samples=args.num_samples, kl_coef=args.kl_coef, kl_estimator="k1", kl_in="reward",
                    log_ratio_clip=args.log_ratio_clip, disc_steps=args.disc_steps,
                    disc_optimizer=OptimizerSpec(lr=args.disc_lr, warmup_steps=0, schedule="constant"),
                    optimizer=continuation, sampling=sampling, evaluation=no_eval, export=False)
            seconds = _fit(module, data(), args.steps)
            record(name, module, seconds)
    return results


def _summary(all_results: List[Dict[str, Dict[str, float]]], methods) -> Dict[str, Dict[str, tuple]]:
    table = {}
    for method in methods:
        table[method] = {}
        for metric in METRICS + ("seconds",):
            values = [r[method][metric] for r in all_results if method in r]
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            table[method][metric] = (mean, std)
    return table


def print_table(table, seeds) -> None:
    header = ["method"] + [f"{m} {ARROWS.get(m, '')}".strip() for m in METRICS] + ["train s"]
    print(f"\nmean ± std over seeds {seeds}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for method, row in table.items():
        cells = [f"{row[m][0]:.3f} ± {row[m][1]:.3f}" for m in METRICS] + [f"{row['seconds'][0]:.0f}"]
        print("| " + " | ".join([method] + cells) + " |")


def plot(table, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("forward_kl", "reverse_kl", "invalid_mass", "coverage")
    methods = list(table)
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(4 * (len(shown) + 1), 3.6))
    palette = {"SFT start": "#999999", "SFT": "#1f77b4", "AIRL": "#d62728", "GAIL": "#2ca02c",
               "AIRL*": "#ff9896", "GAIL*": "#98df8a"}
    colors = [palette.get(m, "#333333") for m in methods]
    for ax, metric in zip(axes, shown):
        means = [table[m][metric][0] for m in methods]
        stds = [table[m][metric][1] for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, color=colors, capsize=4)
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        ax.set_title(f"{metric} {ARROWS.get(metric, '')}")
    ax = axes[-1]
    bottom = [0.0] * len(methods)
    for mode, color in (("copy", "#8c564b"), ("reverse", "#e377c2"), ("sort", "#bcbd22")):
        values = [table[m][f"mass_{mode}"][0] for m in methods]
        ax.bar(range(len(methods)), values, bottom=bottom, color=color, label=mode)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.bar(range(len(methods)), [1 - b for b in bottom], bottom=bottom, color="#dddddd", label="invalid")
    ax.axhline(0.6, color="#8c564b", ls=":", lw=1)
    ax.axhline(0.9, color="#e377c2", ls=":", lw=1)
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_title("sampled mass per mode (expert 0.6/0.3/0.1)")
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    print(f"divergence lab: {vars(args)}", flush=True)
    workers = max(1, min(args.workers, len(args.seeds)))
    if workers == 1:
        results = [run_seed(args, seed) for seed in args.seeds]
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.starmap(run_seed, [(args, seed) for seed in args.seeds])
    methods = [m for m in METHODS if m == "SFT start" or m in args.methods]
    table = _summary(results, methods)
    print_table(table, args.seeds)
    elapsed = time.perf_counter() - started
    print(f"\ntotal wall time {elapsed / 60:.1f} min")
    if args.plot:
        title = (f"modes task, Llama h={args.hidden} L={args.layers}; SFT start {args.start_steps} steps, then "
                 f"{args.steps} steps each (batch {args.batch_size}, k={args.num_samples}, β={args.kl_coef}); "
                 f"seeds {args.seeds}; * = exact discriminator logit log p_E − log π")
        plot(table, args.plot, title)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
