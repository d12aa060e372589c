"""Where an adversarial (AIRL) training step spends its time: rollout / reference / discriminator /
rewards / policy, measured inside real ``lightning_irl`` steps.

    HF_HUB_OFFLINE=1 python benchmarks/adversarial_split.py              # ~1 min on 2 CPU cores
    HF_HUB_OFFLINE=1 python benchmarks/adversarial_split.py --lora       # LoRA policy, adapter-off reference

Policy and discriminator: the ~5M-parameter Llama of ``_scale_common.SMALL_LLAMA`` (the
discriminator a 2-layer version of it); synthetic prompts of 5-20 tokens, ``--num-samples``
responses per prompt of up to ``--max-new-tokens`` tokens, RLOO policy loss, one discriminator step.
The ``Adversarial`` module's own methods are wrapped with timers (nothing else changes):

- rollout:        ``rollout`` (``generate`` with a KV cache + a log-prob forward pass)
- reference:      ``_reference_logprobs`` (frozen reference, no grad)
- discriminator:  ``discriminator_backward`` + its optimizer step
- rewards:        ``score_rollout`` (discriminator forward on the rollouts)
- policy:         ``policy_backward`` + its optimizer step
- other:          the rest of ``training_step`` (advantages, logging) and Lightning's loop

Shares are of the summed wall time of ``--steps`` training steps after ``--warmup``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _scale_common import set_threads, SMALL_LLAMA, make_dataset, quiet_trainer  # noqa: E402

import lightning as L  # noqa: E402

from lightning_irl.algorithms import OptimizerSpec  # noqa: E402
from lightning_irl.algorithms.adversarial import Adversarial, DiscriminatorTraining  # noqa: E402
from lightning_irl.data import DemonstrationDataModule  # noqa: E402
from lightning_irl.models.spec import LoraSpec, ModelSpec  # noqa: E402
from lightning_irl.rollout import SamplingConfig  # noqa: E402


def instrument(module: Adversarial, totals: dict, active: list) -> None:
    def timed(name, fn, classify=None):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if active[0]:
                    totals[classify(*args) if classify else name] += time.perf_counter() - start
        return wrapper

    def which_optimizer(optimizer, *rest):
        disc = module.optimizers()[1]
        return "discriminator_step" if optimizer.optimizer is disc.optimizer else "policy_step"

    module.rollout = timed("rollout", module.rollout)
    module._reference_logprobs = timed("reference", module._reference_logprobs)
    module.discriminator_backward = timed("discriminator", module.discriminator_backward)
    module.score_rollout = timed("rewards", module.score_rollout)
    module.policy_backward = timed("policy", module.policy_backward)
    module.step = timed("step", module.step, classify=which_optimizer)


class StepClock(L.Callback):
    def __init__(self, warmup: int, totals: dict, active: list):
        self.warmup, self.totals, self.active = warmup, totals, active
        self.start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active[0] = batch_idx >= self.warmup
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.active[0]:
            self.totals["total"] += time.perf_counter() - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see _scale_common.set_threads)")
    args = parser.parse_args()
    set_threads(args.threads)

    ds = make_dataset(tempfile.mkdtemp(prefix="adv_bench_"), n=args.batch_size * (args.warmup + args.steps) + 8,
                      min_len=8, max_len=40, prompt_share=0.5)
    L.seed_everything(0)
    policy = ModelSpec(config=dict(SMALL_LLAMA), tokenizer=ds["tokenizer"], seed=0,
                       lora=LoraSpec(r=16, alpha=32) if args.lora else None)
    disc = ModelSpec(config={**SMALL_LLAMA, "num_hidden_layers": 2}, tokenizer=ds["tokenizer"], seed=1)
    module = Adversarial(policy=policy, discriminator=disc,
                         sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, num_samples=args.num_samples),
                         discriminator_training=DiscriminatorTraining(optimizer=OptimizerSpec(lr=1e-4)),
                         optimizer=OptimizerSpec(lr=1e-5), export=False)
    totals: dict = defaultdict(float)
    active = [False]
    instrument(module, totals, active)
    data = DemonstrationDataModule(train_file=ds["train_file"], batch_size=args.batch_size, max_length=64)
    trainer = quiet_trainer(max_steps=args.warmup + args.steps, precision=args.precision,
                            callbacks=[StepClock(args.warmup, totals, active)])
    trainer.fit(module, datamodule=data)

    total = totals.pop("total")
    parts = {
        "rollout (generate + log-probs)": totals["rollout"],
        "reference log-probs": totals["reference"],
        "discriminator (fwd+bwd+step)": totals["discriminator"] + totals["discriminator_step"],
        "rewards (disc forward)": totals["rewards"],
        "policy (fwd+bwd+step)": totals["policy"] + totals["policy_step"],
    }
    parts["other (advantages, logging, loop)"] = total - sum(parts.values())
    print(f"\nadversarial step split, {args.batch_size} prompts x {args.num_samples} samples, max_new_tokens "
          f"{args.max_new_tokens}, {'LoRA' if args.lora else 'full'} policy, precision {args.precision}, "
          f"{args.steps} steps after {args.warmup} warmup: {total / args.steps:.2f} s/step")
    for name, seconds in parts.items():
        print(f"  {name:36s} {seconds / args.steps:7.3f} s/step  {seconds / total:6.1%}")


if __name__ == "__main__":
    main()
