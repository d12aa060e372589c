"""The divergence lab: mass-covering SFT vs mode-seeking AIRL / GAIL on a task with a known expert.

    HF_HUB_OFFLINE=1 python benchmarks/divergence_lab.py --task modes      # 3 seeds, 2 cores: ~10 min
    python benchmarks/divergence_lab.py --task grammar --json grammar.json  # 3 seeds: 16 min
    python benchmarks/divergence_lab.py --task modes --task-args '{"weights": [0.2, 0.5, 0.3]}'
    python benchmarks/divergence_lab.py --quick --task grammar              # 1 seed, 5 methods
    python benchmarks/divergence_lab.py --task modes --num-train 4000       # few demonstrations: q over-fits
    python benchmarks/divergence_lab.py --task modes --hidden 16 --num-train 4000  # capacity-limited policy

For every seed:

1. **SFT start.** A small Llama (``--hidden``/``--layers``: deliberately capacity-limited) is
   trained by SFT on demonstrations of the built-in task (``--task modes``: copy / reverse / sort a
   string of letters, weights 0.6 / 0.3 / 0.1; ``--task grammar``: three phrasing families of
   instruction answers; ``--task-args`` sets the task's options; ``--num-train`` demonstrations,
   16,000 by default: with 4,000 the log-ratio discriminator over-fits them, README) for
   ``--start-steps`` steps and saved as a Hugging Face folder. At that point it still puts mass
   on invalid answers.
2. **Same number of policy updates** (``--steps`` batches of ``--batch-size``) from that folder,
   with the algorithms' real ``LightningModule``s under a ``lightning.Trainer``:

   - ``SFT``: more forward-KL (behaviour-cloning) steps;
   - ``AIRL`` / ``GAIL``: ``Adversarial(divergence="reverse_kl" / "js")`` with the ``classifier``
     discriminator (a fresh score head on the SFT start's backbone, ``--disc-init scratch`` for a
     fresh network; ``--disc-lr``, ``--disc-steps``);
   - ``AIRL-LR`` / ``GAIL-LR``: the same with the ``log_ratio`` discriminator
     ``h = a·(log q − log π) + b``, ``q`` a copy of the SFT start: ``--disc-prefit`` batches fit
     ``q`` by maximum likelihood alone (``--disc-prefit-lr``, cosine), then ``--disc-warmup``
     discriminator-only batches (``--disc-warmup-fit``), then ``--lr-disc-steps`` discriminator
     steps per batch at ``--lr-disc-lr`` with ``--disc-mle-weight`` × the NLL term;
   - ``SFT-long``: SFT for as many demonstration batches as a log-ratio run consumes (pre-fit +
     warm-up + ``--steps``): the compute control;
   - ``AIRL*`` / ``GAIL*``: the same RL (reward table, clip, KL, RLOO), but the logit is its exact
     optimum ``h* = log p_E − log π_θ``: what the *divergence* does with a perfect discriminator.

   RLOO with ``--num-samples`` samples per prompt and a KL to the SFT start of weight
   ``--kl-coef`` (k1, in the reward). The ``train s`` column says what each method cost; the
   log-ratio rows include their warm-up.
3. **Exact metrics** on ``--eval-prompts`` held-out prompts (``lightning_irl.metrics``):

   - forward KL ``KL(p_E ‖ π)``: exact, every expert answer teacher-forced (EOS included);
   - reverse KL ``KL(π ‖ p̃_E)`` (± its standard error in the JSON) from ``--eval-samples`` samples
     per prompt at temperature 1, to the expert smoothed with a random typist (ε = 1e-3): the
     definition of ``eval/reverse_kl``, a true divergence;
   - valid reverse KL ``KL(π(·|valid) ‖ p_E)``; invalid mass (share of samples with ``p_E = 0``,
     responses cut at the length cap included); per-mode mass; coverage (share of modes whose
     sampled mass is ≥ 0.5 × the expert's weight);
   - for the learned discriminators, their fidelity against ``h*`` on held-out demonstrations and
     the same samples (``metrics/discriminator.py``): ``gap_closed`` (share of the BCE gap from
     chance to the Bayes optimum closed), ``corr_exact``, ``auroc_invalid``; for the log-ratio
     rows also ``gap_closed_warmup``, measured when the warm-up ends.

The table gives mean ± std over seeds; ``--plot`` writes a PNG, ``--json`` one record per method
with the means and standard deviations of every column. The claim under test
(``docs/theory.md`` §6): AIRL and GAIL reach lower reverse KL and invalid mass than SFT; SFT keeps
lower forward KL and higher coverage. Results and what they say: README, *The divergence lab*.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("SFT start", "SFT", "SFT-long", "AIRL", "GAIL", "AIRL-LR", "GAIL-LR", "AIRL*", "GAIL*")
FIDELITY = ("gap_closed_warmup", "gap_closed", "corr_exact", "auroc_invalid")
METRICS = ("forward_kl", "reverse_kl", "valid_reverse_kl", "invalid_mass", "coverage", "mass_copy", "mass_reverse",
           "mass_sort")
ARROWS = {"forward_kl": "↓", "reverse_kl": "↓", "valid_reverse_kl": "↓", "invalid_mass": "↓", "coverage": "↑"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=["modes", "grammar"], default="modes")
    p.add_argument("--task-args", type=json.loads, default={},
                   help='options of the task as JSON, e.g. \'{"weights": [0.2, 0.3, 0.5]}\'')
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true",
                   help="a look in minutes: one seed, 128 evaluation prompts, SFT / AIRL-LR / GAIL-LR / AIRL* only")
    p.add_argument("--workers", type=int, default=2, help="seeds run in parallel processes (1 thread each)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--num-train", type=int, default=16000,
                   help="demonstrations per seed (every method trains on the same ones)")
    p.add_argument("--start-steps", type=int, default=None, help="SFT steps of the shared start (task default)")
    p.add_argument("--steps", type=int, default=200, help="policy updates per method after the start")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--lr", type=float, default=1e-3, help="policy lr of the continuations (SFT, AIRL, GAIL)")
    p.add_argument("--disc-lr", type=float, default=1e-3, help="classifier discriminator lr")
    p.add_argument("--disc-steps", type=int, default=1, help="classifier discriminator steps per batch")
    p.add_argument("--lr-disc-lr", type=float, default=1e-4, help="log-ratio discriminator (q) lr after the pre-fit")
    p.add_argument("--lr-disc-steps", type=int, default=4, help="log-ratio discriminator steps per batch")
    p.add_argument("--disc-prefit", type=int, default=1800,
                   help="log-ratio runs: batches fitting q by maximum likelihood alone first (no rollouts)")
    p.add_argument("--disc-prefit-lr", type=float, default=3e-3, help="log-ratio runs: peak lr of the pre-fit (cosine)")
    p.add_argument("--disc-warmup", type=int, default=200,
                   help="log-ratio runs: discriminator-only batches before the policy moves (extra to --steps)")
    p.add_argument("--disc-mle-weight", type=float, default=1.0,
                   help="log-ratio runs: weight of the demonstrations' NLL under q in the discriminator loss")
    p.add_argument("--disc-warmup-fit", choices=["bce", "mle"], default="bce",
                   help="log-ratio warm-up: q by BCE (+ NLL), or q by NLL only and b by BCE")
    p.add_argument("--disc-bias-lr", type=float, default=1e-2, help="log-ratio runs: learning rate of a and b")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--kl-coef", type=float, default=0.1)
    p.add_argument("--log-ratio-clip", type=float, default=5.0)
    p.add_argument("--discriminator-level", choices=["sequence", "token"], default="sequence")
    p.add_argument("--disc-init", choices=["start", "scratch"], default="start",
                   help="classifier discriminator backbone: the SFT start's weights, or a fresh network")
    p.add_argument("--eval-prompts", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="response cap (task default)")
    p.add_argument("--methods", nargs="+", default=list(METHODS[1:]))
    p.add_argument("--plot", default=None, help="PNG path (default benchmarks/divergence_lab_<task>.png)")
    p.add_argument("--json", default=None, help="write one record per method (means and stds) here")
    args = p.parse_args(argv)
    defaults = TASK_DEFAULTS[args.task]
    args.start_steps = args.start_steps or defaults["start_steps"]
    args.max_new_tokens = args.max_new_tokens or defaults["max_new_tokens"]
    args.max_length = defaults["max_length"]
    if args.quick:
        args.seeds = args.seeds[:1]
        args.eval_prompts = min(args.eval_prompts, 128)
        args.methods = [m for m in args.methods if m in ("SFT", "SFT-long", "AIRL-LR", "GAIL-LR", "AIRL*")]
    if args.plot is None:
        args.plot = f"benchmarks/divergence_lab_{args.task}.png"
    return args


TASK_DEFAULTS = {
    "modes": {"start_steps": 600, "max_new_tokens": 8, "max_length": 32},
    "grammar": {"start_steps": 600, "max_new_tokens": 24, "max_length": 64},
}


# ---- building blocks ---------------------------------------------------------------------------
def _quiet() -> None:
    import torch

    torch.set_num_threads(1)  # tiny models: one thread per process is much faster than two
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _llama(hidden: int, layers: int, seed: int, task: str, positions: int):
    from lightning_irl.models.spec import ModelSpec

    return ModelSpec(config=dict(model_type="llama", hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                 max_position_embeddings=positions), tokenizer=f"task:{task}", seed=seed)


def _fit(module, data, steps: int, callbacks=()) -> float:
    import lightning as L

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=list(callbacks))
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    module.last_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return seconds


def _padded(rows: List[List[int]], pad: int, left: bool = False):
    import torch

    width = max(map(len, rows))
    fill = [[pad] * (width - len(r)) for r in rows]
    ids = torch.tensor([f + r if left else r + f for r, f in zip(rows, fill)])
    mask = torch.tensor([[0] * len(f) + [1] * len(r) if left else [1] * len(r) + [0] * len(f)
                         for r, f in zip(rows, fill)])
    return ids, mask


def _teacher_forced(policy, tokenizer, pairs: List[Tuple[str, str]], chunk: int = 512):
    """(rows, log π(answer|prompt)) of (prompt, answer) pairs encoded as demonstrations are: the
    prompt with special tokens, the answer without, then EOS; rows are right-padded."""
    import torch

    from lightning_irl.objectives.logprobs import sequence_logprobs, token_logprobs

    rows, masks = [], []
    for prompt, answer in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        masks.append([0] * len(prompt_ids) + [1] * len(answer_ids))
    ids, attention = _padded(rows, tokenizer.pad_token_id)
    loss_mask = _padded(masks, 0)[0]
    with torch.no_grad():
        logp = torch.cat([sequence_logprobs(token_logprobs(policy, ids[i:i + chunk], attention[i:i + chunk]),
                                            loss_mask[i:i + chunk, 1:]) for i in range(0, len(rows), chunk)])
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}, logp


def evaluate(policy, tokenizer, task, prompts: List[str], samples: int, max_new_tokens: int,
             module=None, demos: Optional[List[Dict[str, str]]] = None) -> Dict[str, float]:
    """Exact forward KL; sampled reverse KL, invalid mass, per-mode mass and coverage; with an
    adversarial ``module`` and held-out ``demos``, its discriminator's fidelity."""
    import torch

    from lightning_irl.metrics.discriminator import fidelity
    from lightning_irl.metrics.evaluation import task_mode_names
    from lightning_irl.metrics.functional import estimate, forward_kl_terms, invalid, mode_coverage, \
        reverse_kl_terms, rollout_expert_logps, smoothed_expert_logp
    from lightning_irl.metrics.known_expert import ValidReverseKL
    from lightning_irl.objectives.logprobs import sequence_logprobs
    from lightning_irl.rollout import SamplingConfig, sample

    policy.eval()
    pad = tokenizer.pad_token_id
    # forward KL, exactly: every expert answer of every prompt, teacher-forced
    support = [(prompt, answer, weight) for prompt in prompts for answer, weight in task.support(prompt).items()]
    _, logp = _teacher_forced(policy, tokenizer, [(prompt, answer) for prompt, answer, _ in support])
    weights_t = torch.tensor([weight for _, _, weight in support])
    forward_kl = float((weights_t * forward_kl_terms(weights_t.log(), logp)).sum() / len(prompts))

    # samples at temperature 1
    prompt_ids, prompt_mask = _padded([tokenizer(p)["input_ids"] for p in prompts], pad, left=True)
    with torch.no_grad():
        rollout = sample(policy, tokenizer, prompt_ids, prompt_mask,
                         SamplingConfig(max_new_tokens=max_new_tokens, num_samples=samples), compute_logprobs=True)
    policy_logp = sequence_logprobs(rollout.logprobs, rollout.loss_mask[:, 1:])
    expert_logp_t, canonical_logp, lengths = rollout_expert_logps(task, tokenizer, prompts, rollout, samples)
    modes = []
    for i, (row, mask) in enumerate(zip(rollout.input_ids, rollout.loss_mask)):
        text, _ = response_text(tokenizer, row[mask.bool()].tolist())
        modes.append(task.mode_of(prompts[i // samples], text) if math.isfinite(expert_logp_t[i]) else None)
    names = task_mode_names(task)
    n = len(modes)
    mass = torch.tensor([sum(m == name for m in modes) / n for name in names])
    expert_mass = torch.tensor([statistics.fmean(task.mode_weights(p)[name] for p in prompts) for name in names])
    vocab = policy.get_output_embeddings().weight.shape[0]
    reverse_kl, reverse_kl_se = estimate(reverse_kl_terms(policy_logp, smoothed_expert_logp(canonical_logp, lengths,
                                                                                            vocab)))
    valid_kl = ValidReverseKL()
    valid_kl.update(policy_logp, expert_logp_t)
    out = {
        "forward_kl": forward_kl,
        "reverse_kl": reverse_kl,
        "reverse_kl_se": reverse_kl_se,
        "valid_reverse_kl": float(valid_kl.compute()),
        "invalid_mass": float(invalid(expert_logp_t).mean()),
        "coverage": float(mode_coverage(mass, expert_mass, 0.5)),
    }
    out.update({f"mass_{name}": float(m) for name, m in zip(names, mass)})

    if module is not None and demos:
        # the discriminator against the exact log-ratio h* = log p_E − log π, on held-out
        # demonstrations and on the samples above
        demo_rows_t, d_logp = _teacher_forced(policy, tokenizer, [(r["prompt"], r["response"]) for r in demos])
        with torch.no_grad():
            expert_h = module._sequence_disc_logits(demo_rows_t)
            policy_h = module._sequence_disc_logits({"input_ids": rollout.input_ids,
                                                     "attention_mask": rollout.attention_mask,
                                                     "loss_mask": rollout.loss_mask,
                                                     "policy_logps": rollout.logprobs})
        expert_exact = torch.tensor([task.log_prob(r["prompt"], r["response"]) for r in demos]) - d_logp
        result = fidelity(expert_h, expert_exact, policy_h, canonical_logp - policy_logp)
        out.update({"gap_closed": float(result["bayes_gap_closed"]), "bce_heldout": float(result["bce_heldout"]),
                    "bce_bayes": float(result["bce_bayes"]), "corr_exact": float(result["corr_exact"]),
                    "auroc_invalid": float(result["auroc_invalid"])})
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
    ``−logit_clip`` there), then the same divergence reward, clip, KL shaping and RLOO as the
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
            return RolloutScores(divergence_reward(self.divergence, h, self.disc.logit_clip), None, h)

    return ExactLogRatio(**kwargs)


class _WarmupProbe:
    """Grades the discriminator when its warm-up ends (a Lightning callback, built lazily)."""

    def __new__(cls, at: int, grade):
        import lightning as L
        import torch

        class Probe(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if trainer.global_step == at and not hasattr(module, "warmup_fidelity"):
                    with torch.random.fork_rng():
                        module.warmup_fidelity = grade(module)

        return Probe()


def run_seed(args: argparse.Namespace, seed: int) -> Dict[str, Dict[str, float]]:
    _quiet()
    import lightning as L

    from lightning_irl.algorithms import SFT, Adversarial, OptimizerSpec
    from lightning_irl.algorithms.adversarial import DiscriminatorTraining, PolicyUpdate
    from lightning_irl.data import DemonstrationDataModule
    from lightning_irl.data.tasks import get_task
    from lightning_irl.metrics.evaluation import EvalConfig
    from lightning_irl.models.spec import ModelSpec
    from lightning_irl.rollout import SamplingConfig

    task = get_task(args.task, **args.task_args)
    prompts = task.prompts(args.eval_prompts, seed=10_000 + seed)  # held out: the data use other seeds
    demos = task.records(args.eval_prompts, seed=20_000 + seed)  # held-out demonstrations
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    no_eval = EvalConfig(enabled=False)  # the lab measures exactly, below
    results: Dict[str, Dict[str, float]] = {}
    tokenizer_name = f"task:{args.task}"

    def data():
        return DemonstrationDataModule(task=args.task, task_args=args.task_args or None, num_train=args.num_train,
                                       num_val=0, batch_size=args.batch_size, task_seed=seed,
                                       max_length=args.max_length)

    def grade(module):
        return evaluate(module.policy, module.tokenizer, task, prompts, args.eval_samples, args.max_new_tokens,
                        module=module, demos=demos)

    def record(name, module, seconds):
        L.seed_everything(12_345 + seed, verbose=False)
        learned = isinstance(module, Adversarial) and not name.endswith("*")
        results[name] = evaluate(module.policy, module.tokenizer, task, prompts, args.eval_samples,
                                 args.max_new_tokens, module=module if learned else None, demos=demos)
        results[name]["seconds"] = seconds
        if hasattr(module, "warmup_fidelity"):
            results[name]["gap_closed_warmup"] = module.warmup_fidelity["gap_closed"]
        print(f"  seed {seed} {name:9s} {seconds:6.1f}s " +
              " ".join(f"{k}={v:.3f}" for k, v in results[name].items() if k != "seconds"), flush=True)
        logged = getattr(module, "last_metrics", {})
        if learned and "disc/loss" in logged:  # did the discriminator learn? (chance: log 4)
            print(f"  seed {seed} {name:9s} last step: " + " ".join(
                f"{k}={logged[k]:.3f}" for k in ("disc/loss", "disc/acc_expert", "disc/acc_policy", "disc/bias", "disc/scale",
                                                 "reward/std", "kl/ref") if k in logged), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        # 1. the shared SFT start, exported as a Hugging Face folder
        L.seed_everything(seed, verbose=False)
        start = SFT(policy=_llama(args.hidden, args.layers, seed, args.task, args.max_length),
                    sampling=sampling, evaluation=no_eval, export_dir=os.path.join(tmp, "start"),
                    optimizer=OptimizerSpec(lr=args.sft_lr, weight_decay=0.01, warmup_steps=20, schedule="cosine"))
        seconds = _fit(start, data(), args.start_steps)
        record("SFT start", start, seconds)
        folder = os.path.join(tmp, "start")
        assert os.path.exists(os.path.join(folder, "model.safetensors"))
        policy = ModelSpec(model_name_or_path=folder, tokenizer=tokenizer_name)
        continuation = OptimizerSpec(lr=args.lr, warmup_steps=10, schedule="cosine")

        # 2. same number of policy updates, several objectives
        for name in args.methods:
            L.seed_everything(1_000 + seed, verbose=False)
            steps, callbacks = args.steps, []
            if name == "SFT-long":  # as many demonstration batches as a log-ratio run consumes
                steps += args.disc_prefit + args.disc_warmup
            if name in ("SFT", "SFT-long"):
                module = SFT(policy=policy, optimizer=continuation, sampling=sampling, evaluation=no_eval, export=False)
            else:
                base = name.rstrip("*").replace("-LR", "")
                common = dict(policy=policy, divergence={"AIRL": "reverse_kl", "GAIL": "js"}[base],
                              policy_update=PolicyUpdate(kl_coef=args.kl_coef, kl_estimator="k1", kl_in="reward"),
                              optimizer=continuation, evaluation=no_eval, export=False,
                              sampling=dataclasses.replace(sampling, num_samples=args.num_samples))
                disc = dict(level=args.discriminator_level, logit_clip=args.log_ratio_clip)
                if name.endswith("*"):
                    module = exact_log_ratio_module(task, discriminator_training=DiscriminatorTraining(**disc),
                                                    **common)
                elif name.endswith("-LR"):
                    # q starts as the SFT start (discriminator=None: a copy of the policy)
                    training = DiscriminatorTraining(
                        form="log_ratio", prefit_steps=args.disc_prefit, warmup_steps=args.disc_warmup,
                        prefit_optimizer=OptimizerSpec(lr=args.disc_prefit_lr, weight_decay=0.01, warmup_steps=20,
                                                       schedule="cosine"),
                        mle_weight=args.disc_mle_weight,
                        steps=args.lr_disc_steps, warmup_fit=args.disc_warmup_fit, bias_lr=args.disc_bias_lr,
                        optimizer=OptimizerSpec(lr=args.lr_disc_lr, schedule="constant"), **disc)
                    module = Adversarial(discriminator_training=training, **common)
                    steps += args.disc_prefit + args.disc_warmup
                    if args.disc_prefit + args.disc_warmup:
                        callbacks.append(_WarmupProbe(args.disc_prefit + args.disc_warmup, grade))
                else:
                    discriminator = policy if args.disc_init == "start" else \
                        _llama(args.hidden, args.layers, 100 + seed, args.task, args.max_length)
                    training = DiscriminatorTraining(steps=args.disc_steps, **disc,
                                                     optimizer=OptimizerSpec(lr=args.disc_lr, schedule="constant"))
                    module = Adversarial(discriminator=discriminator, discriminator_training=training, **common)
            seconds = _fit(module, data(), steps, callbacks)
            record(name, module, seconds)
    return results


COLUMNS = METRICS + FIDELITY


def _summary(all_results: List[Dict[str, Dict[str, float]]], methods) -> Dict[str, Dict[str, tuple]]:
    table = {}
    for method in methods:
        table[method] = {}
        for metric in sorted({k for r in all_results if method in r for k in r[method]}):
            values = [r[method][metric] for r in all_results if method in r and metric in r[method]]
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            table[method][metric] = (mean, std)
    return table


def print_table(table, seeds, mode_names) -> None:
    metrics = [m for m in ("forward_kl", "reverse_kl", "valid_reverse_kl", "invalid_mass", "coverage")] + \
        [f"mass_{n}" for n in mode_names]
    header = ["method"] + [f"{m} {ARROWS.get(m, '')}".strip() for m in metrics] + ["train s"]
    print(f"\nmean ± std over seeds {seeds}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for method, row in table.items():
        cells = [f"{row[m][0]:.3f} ± {row[m][1]:.3f}" if m in row else "—" for m in metrics]
        print("| " + " | ".join([method] + cells + [f"{row['seconds'][0]:.0f}"]) + " |")
    learned = [m for m in table if any(f in table[m] for f in FIDELITY)]
    if learned:
        print("\ndiscriminator fidelity against the exact log-ratio (held-out demonstrations + fresh samples)")
        print("| method | " + " | ".join(FIDELITY) + " |")
        print("|---|" + "---|" * len(FIDELITY))
        for method in learned:
            row = table[method]
            print(f"| {method} | " + " | ".join(f"{row[f][0]:.3f} ± {row[f][1]:.3f}" if f in row else "—"
                                               for f in FIDELITY) + " |")


def plot(table, path: str, title: str, mode_names, expert_mass) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("forward_kl", "reverse_kl", "invalid_mass", "coverage")
    methods = list(table)
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(4 * (len(shown) + 1), 3.6))
    palette = {"SFT start": "#999999", "SFT": "#1f77b4", "SFT-long": "#17becf", "AIRL": "#d62728", "GAIL": "#2ca02c", "AIRL-LR": "#8c1010",
               "GAIL-LR": "#0b5d1e",
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
    for mode, color in zip(mode_names, ("#8c564b", "#e377c2", "#bcbd22", "#17becf")):
        values = [table[m][f"mass_{mode}"][0] for m in methods]
        ax.bar(range(len(methods)), values, bottom=bottom, color=color, label=mode)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.bar(range(len(methods)), [1 - b for b in bottom], bottom=bottom, color="#dddddd", label="invalid")
    level = 0.0
    for mass, color in zip(expert_mass[:-1], ("#8c564b", "#e377c2", "#bcbd22")):
        level += mass
        ax.axhline(level, color=color, ls=":", lw=1)
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_title("sampled mass per mode (dotted: expert)")
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
    from lightning_irl.data.tasks import get_task
    from lightning_irl.metrics.evaluation import task_mode_names

    task = get_task(args.task, **args.task_args)
    mode_names = task_mode_names(task)
    held_out = task.prompts(args.eval_prompts, seed=10_000)
    expert_mass = [statistics.fmean(task.mode_weights(p)[m] for p in held_out) for m in mode_names]
    print_table(table, args.seeds, mode_names)
    elapsed = time.perf_counter() - started
    print(f"\ntotal wall time {elapsed / 60:.1f} min")
    if args.json:
        records = [{"method": method, "task": args.task, "task_args": args.task_args, "seeds": args.seeds,
                    **{f"{k}_mean": v[0] for k, v in row.items()}, **{f"{k}_std": v[1] for k, v in row.items()}}
                   for method, row in table.items()]
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "records": records, "wall_minutes": elapsed / 60}, f, indent=1)
        print(f"json: {args.json}")
    if args.plot:
        title = (f"{args.task} task {args.task_args or ''}, Llama h={args.hidden} L={args.layers}; SFT start "
                 f"{args.start_steps} steps, then {args.steps} policy steps each (batch {args.batch_size}, "
                 f"k={args.num_samples}, β={args.kl_coef}; -LR: log-ratio discriminator, {args.disc_prefit} pre-fit + "
                 f"{args.disc_warmup} warm-up batches; SFT-long: as many SFT batches); seeds {args.seeds}; * = exact logit log p_E − log π")
        plot(table, args.plot, title, mode_names, expert_mass)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
