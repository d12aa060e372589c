"""An adversarial (AIRL) training step of ``lightning_irl`` against TRL 1.16's ``RLOOTrainer``, per
generated token, *including* the discriminator's training (TRL scores with a frozen reward model;
we train ours every step: that is the point of the comparison).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/adversarial_vs_trl.py --json adv_vs_trl.json
    ... --form classifier                 # the classifier discriminator instead of the log-ratio form
    ... --precision bf16-mixed            # both sides under bf16 autocast
    ... --rounds 2 --steps 2 --warmup 1   # a smoke run (~1 min)

Shapes (both sides): ``--prompts`` 16 prompts per step x ``--num-samples`` 4 samples, at most
``--max-new-tokens`` 8 new tokens, temperature 1 (no top-p / top-k), KL coefficient 0.1 to a frozen
reference, one optimizer step of the policy per batch (RLOO), AdamW at lr 1e-5 with a cosine
schedule, gradient clipping at 1.0, no gradient checkpointing, no evaluation, saving or logging
backends. Policy: the Llama of ``--size`` (default 5M: ``_scale_common.SMALL_LLAMA``, 4096-word
vocabulary), built from its config with seed 0. Prompts: the first ``--prompts`` x steps prompts of a
synthetic set (4-20 words), the same strings for both sides.

lightning_irl (``ours``): ``Adversarial`` with ``divergence: reverse_kl`` (AIRL),
``policy_update: {loss: rloo, kl_coef: 0.1}``, ``discriminator_training: {form: --form, steps: 1,
optimizer.lr: 1e-4}``; the log-ratio discriminator's ``q`` is a copy of the policy, the classifier
is a sequence classifier of the policy's size; rollout log-probs from ``--logprobs-from`` (default
``auto``: the sampling pass, ``rollout.SamplingConfig``). Lightning ``Trainer`` on the CPU,
``precision`` ``--precision``, no logger, no checkpointing.

TRL (``trl``), exactly as run here (TRL 1.16.0; everything not listed is RLOOConfig's default)::

    RLOOConfig(output_dir=tmp, max_steps=warmup + steps, per_device_train_batch_size=prompts * k,
               gradient_accumulation_steps=1, num_generations=k, max_completion_length=8,
               temperature=1.0, top_p=1.0, top_k=0, beta=0.1, num_iterations=1,
               learning_rate=1e-5, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
               gradient_checkpointing=False, bf16=(precision == "bf16-mixed"), use_cpu=True,
               eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
               disable_tqdm=True, dataloader_num_workers=0, seed=round)
    RLOOTrainer(model=<the policy saved to a folder>, reward_funcs=<frozen reward model>, args=config,
                train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                reward_processing_classes=tokenizer)

``per_device_train_batch_size`` counts completions in TRL: 64 = 16 prompts x 4 samples, one
generation batch per optimizer step (``steps_per_generation = gradient_accumulation_steps = 1``).
The reward model is a ``LlamaForSequenceClassification`` (``num_labels=1``) of the discriminator's
size (the policy's), frozen; TRL re-tokenises prompt + completion text for it, as its users get.
The policy is passed as a folder (TRL loads its reference from the same folder); the optimizer is
TRL's default (``adamw_torch_fused`` with torch >= 2.8), ours ``torch.optim.AdamW``.

Metric: generated tokens (non-pad, EOS included: the tokens each side actually sampled, counted on
each side) per wall second and per process-CPU second, over ``--steps`` timed steps after
``--warmup`` steps in each of ``--rounds`` interleaved rounds (each round builds both sides afresh,
seeded alike, in an order that rotates); the ratio ours / trl is taken within a round
(``_bench.report``). Steps per second are reported too. A fresh random model rarely samples EOS
(about 1 in 4096 tokens), so both sides generate nearly ``prompts x k x max_new_tokens`` tokens a
step; counting them makes the comparison exact anyway. Final runs: ``--rounds 5 --steps 6`` or
more (>= 30 timed steps per side).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _scale_common  # noqa: E402
from _bench import Clock, Timing, report  # noqa: E402
from _scale_common import SMALL_LLAMA, VOCAB, make_dataset, quiet_trainer, set_threads  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_irl.algorithms import OptimizerSpec  # noqa: E402
from lightning_irl.algorithms.adversarial import Adversarial, DiscriminatorTraining, PolicyUpdate  # noqa: E402
from lightning_irl.data import DemonstrationDataModule  # noqa: E402
from lightning_irl.models.spec import ModelSpec  # noqa: E402
from lightning_irl.rollout import SamplingConfig  # noqa: E402

SIZES = getattr(_scale_common, "SIZES", {"5M": {"config": dict(SMALL_LLAMA), "vocab": VOCAB}})
POLICY_LR, DISC_LR = 1e-5, 1e-4


def size_config(size: str) -> Dict:
    config = dict(SIZES[size]["config"])
    config["max_position_embeddings"] = max(config.get("max_position_embeddings", 512), 128)
    return config


class OursClock(L.Callback):
    """Starts the clock at the end of warm-up step ``warmup`` and stops it after the last step."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total
        self.clock, self.timing, self.active, self.tokens = Clock(), None, False, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == self.warmup:
            self.active = True
            self.clock.start()
        elif batch_idx + 1 == self.total:
            self.timing = self.clock.stop(self.tokens)
            self.active = False


def run_ours(args, data: Dict, seed: int) -> Timing:
    L.seed_everything(seed, verbose=False)
    config = size_config(args.size)
    policy = ModelSpec(config=dict(config), tokenizer=data["tokenizer"], seed=0)
    discriminator = None if args.form == "log_ratio" else ModelSpec(config=dict(config), tokenizer=data["tokenizer"],
                                                                     seed=1)
    module = Adversarial(
        policy=policy, discriminator=discriminator, divergence="reverse_kl",
        discriminator_training=DiscriminatorTraining(form=args.form, steps=1, optimizer=OptimizerSpec(lr=DISC_LR)),
        policy_update=PolicyUpdate(loss="rloo", kl_coef=args.kl_coef),
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
                                logprobs_from=args.logprobs_from),
        optimizer=OptimizerSpec(lr=POLICY_LR), export=False)
    total = args.warmup + args.steps
    clock = OursClock(args.warmup, total)
    rollout = module.rollout

    def counted_rollout(*a, **kw):
        out = rollout(*a, **kw)
        if clock.active:
            clock.tokens += out.num_tokens()
        return out

    module.rollout = counted_rollout
    datamodule = DemonstrationDataModule(train_file=data["train_file"], batch_size=args.prompts, max_length=64,
                                         shuffle=False)
    trainer = quiet_trainer(max_steps=total, precision=args.precision, callbacks=[clock])
    trainer.fit(module, datamodule=datamodule)
    return clock.timing


def make_trl(args, data: Dict, seed: int):
    """A ready ``RLOOTrainer`` (built outside the clock) and the state its callback fills."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(data["tokenizer"])
    reward_model = ModelSpec(config=dict(size_config(args.size)), tokenizer=data["tokenizer"],
                             seed=1).build_sequence_classifier(tokenizer, num_labels=1)
    reward_model.requires_grad_(False).eval()
    total = args.warmup + args.steps
    state = {"clock": Clock(), "active": False, "tokens": 0, "timing": None}

    class TrlClock(TrainerCallback):
        def on_step_end(self, targs, tstate, control, **kwargs):
            if tstate.global_step == args.warmup:
                state["active"] = True
                state["clock"].start()
            elif tstate.global_step == total:
                state["timing"] = state["clock"].stop(state["tokens"])
                state["active"] = False

    config = RLOOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_rloo_"), max_steps=total,
        per_device_train_batch_size=args.prompts * args.num_samples, gradient_accumulation_steps=1,
        num_generations=args.num_samples, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=args.kl_coef, num_iterations=1,
        learning_rate=POLICY_LR, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False, bf16=args.precision == "bf16-mixed", use_cpu=True,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=seed)
    trainer = RLOOTrainer(model=data["policy_dir"], reward_funcs=reward_model, args=config,
                          train_dataset=Dataset.from_dict({"prompt": data["prompts"]}),
                          processing_class=tokenizer, reward_processing_classes=tokenizer,
                          callbacks=[TrlClock()])
    generate = trainer._generate

    def counted_generate(prompts):
        prompt_ids, completion_ids, completions = generate(prompts)
        if state["active"]:
            state["tokens"] += sum(len(ids) for ids in completion_ids)
        return prompt_ids, completion_ids, completions

    trainer._generate = counted_generate
    return trainer, state


def run_trl(args, data: Dict, seed: int) -> Timing:
    trainer, state = make_trl(args, data, seed)
    trainer.train()
    return state["timing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--form", default="log_ratio", choices=["log_ratio", "classifier"])
    parser.add_argument("--size", default="5M", choices=sorted(SIZES))
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--kl-coef", type=float, default=0.1)
    parser.add_argument("--logprobs-from", default="auto", choices=["auto", "forward", "generate"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round and side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the clock starts")
    parser.add_argument("--contenders", default="ours,trl", help="comma-separated subset of ours,trl")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see _scale_common.set_threads)")
    parser.add_argument("--json", default=None, help="write the rates and ratios here")
    args = parser.parse_args()
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning", "lightning.pytorch", "transformers", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)

    folder = tempfile.mkdtemp(prefix="adv_vs_trl_")
    steps_per_run = args.warmup + args.steps
    n = args.prompts * steps_per_run + 8
    ds = make_dataset(folder, n=n, min_len=8, max_len=40, prompt_share=0.5, vocab=SIZES[args.size].get("vocab", VOCAB))
    with open(ds["train_file"]) as handle:
        prompts = [json.loads(line)["prompt"] + " " for line in handle]
    data = {"train_file": ds["train_file"], "tokenizer": ds["tokenizer"], "prompts": prompts,
            "policy_dir": os.path.join(folder, "policy")}
    if "trl" in args.contenders:  # TRL loads the policy (and its reference) from a folder
        spec = ModelSpec(config=dict(size_config(args.size)), tokenizer=ds["tokenizer"], seed=0)
        tokenizer = spec.load_tokenizer()
        spec.build_causal_lm(tokenizer).save_pretrained(data["policy_dir"])
        tokenizer.save_pretrained(data["policy_dir"])

    runners = {}
    rounds_done = [0]
    if "ours" in args.contenders:
        runners["ours"] = lambda: run_ours(args, data, seed=rounds_done[0])
    if "trl" in args.contenders:
        runners["trl"] = lambda: run_trl(args, data, seed=rounds_done[0])

    results: List[Dict[str, Timing]] = []
    names = list(runners)
    for r in range(args.rounds):
        rounds_done[0] = r
        order = names[r % len(names):] + names[: r % len(names)]
        result = {name: runners[name]() for name in order}
        results.append({name: result[name] for name in names})
        print(f"round {r}: " + ", ".join(
            f"{name} {result[name].per_wall_second:.1f} tok/s wall ({result[name].per_cpu_second:.1f}/CPU-s, "
            f"{result[name].units / args.steps:.0f} tok/step)" for name in names), flush=True)

    settings = {**vars(args), "torch": torch.__version__, "trl": _version("trl"), "lightning": L.__version__,
                "threads": torch.get_num_threads()}
    title = (f"AIRL step ({args.form}) vs TRL RLOOTrainer, {args.size}, {args.prompts}x{args.num_samples} samples, "
             f"{args.max_new_tokens} new tokens, {args.precision}")
    tokens = report(title + ": generated tokens", results, "ours" if "ours" in runners else names[0],
                    "generated tokens", settings, targets={"trl": 1.0})
    steps = [{name: Timing(args.steps, t.wall, t.cpu) for name, t in r.items()} for r in results]
    per_step = report(title + ": steps", steps, "ours" if "ours" in runners else names[0], "steps", settings)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"generated_tokens": tokens, "steps": per_step}, handle, indent=1)
        print(f"  -> {args.json}")


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    main()
