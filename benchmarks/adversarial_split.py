"""Where an adversarial (AIRL) training step spends its time: rollout / reference / discriminator /
rewards / policy, measured inside real ``lightning_irl`` steps.

    HF_HUB_OFFLINE=1 python benchmarks/adversarial_split.py              # ~1 min on 2 CPU cores
    HF_HUB_OFFLINE=1 python benchmarks/adversarial_split.py --lora       # LoRA policy, adapter-off reference
    HF_HUB_OFFLINE=1 python benchmarks/adversarial_split.py --form classifier --logprobs-from forward

Policy: the ~5M-parameter Llama of ``_scale_common.SMALL_LLAMA``; discriminator: ``--form``
``log_ratio`` (default, the shipped configs' form: ``q`` a copy of the policy) or ``classifier`` (a
sequence classifier of the policy's size, ``--disc-layers`` to shrink it); synthetic prompts of 4-20
tokens, ``--batch-size`` prompts x ``--num-samples`` responses of up to ``--max-new-tokens`` tokens
(defaults: the 16 x 4 x 8 of benchmarks/adversarial_vs_trl.py), RLOO policy loss with
``--kl-coef`` 0.1, one discriminator step. The ``Adversarial`` module's own methods are wrapped with
timers (nothing else changes; ``--no-shared-prefix``, ``--no-buckets``, ``--no-logits-to-keep`` and
``--logprobs-from forward`` switch the speed-ups of ``models.scoring`` / ``rollout`` off one by one, to
measure what each buys):

- rollout:        ``rollout`` (``generate`` with a KV cache; + a log-prob forward pass when
                  ``sampling.logprobs_from`` resolves to ``forward``, timed apart as "rollout log-prob pass")
- expert log pi:  ``_policy_logprobs`` (log-ratio form: the policy's log-probs of the demonstrations)
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
from lightning_irl import rollout as rollout_module  # noqa: E402
from lightning_irl.algorithms.adversarial import Adversarial, DiscriminatorTraining, PolicyUpdate  # noqa: E402
from lightning_irl.data import DemonstrationDataModule  # noqa: E402
from lightning_irl.models.spec import LoraSpec, ModelSpec  # noqa: E402
from lightning_irl.rollout import SamplingConfig  # noqa: E402


def instrument(module: Adversarial, totals: dict, cpu_totals: dict, active: list) -> None:
    def timed(name, fn, classify=None):
        def wrapper(*args, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if active[0]:
                    key = classify(*args) if classify else name
                    totals[key] += time.perf_counter() - start
                    cpu_totals[key] += time.process_time() - cpu
        return wrapper

    def which_optimizer(optimizer, *rest):
        disc = module.optimizers()[1]
        return "discriminator_step" if optimizer.optimizer is disc.optimizer else "policy_step"

    module.rollout = timed("rollout", module.rollout)
    module._policy_logprobs = timed("expert_logps", module._policy_logprobs)
    # the rollout's log-prob forward pass (when it runs), inside ``rollout``
    name = "response_token_logprobs" if hasattr(rollout_module, "response_token_logprobs") else "token_logprobs"
    setattr(rollout_module, name, timed("rollout_logps", getattr(rollout_module, name)))
    module._reference_logprobs = timed("reference", module._reference_logprobs)
    module.discriminator_backward = timed("discriminator", module.discriminator_backward)
    module.score_rollout = timed("rewards", module.score_rollout)
    module.policy_backward = timed("policy", module.policy_backward)
    module.step = timed("step", module.step, classify=which_optimizer)


class StepClock(L.Callback):
    def __init__(self, warmup: int, totals: dict, cpu_totals: dict, active: list):
        self.warmup, self.totals, self.cpu_totals, self.active = warmup, totals, cpu_totals, active
        self.start = self.cpu = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active[0] = batch_idx >= self.warmup
        self.start, self.cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.active[0]:
            self.totals["total"] += time.perf_counter() - self.start
            self.cpu_totals["total"] += time.process_time() - self.cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--kl-coef", type=float, default=0.1)
    parser.add_argument("--form", default="log_ratio", choices=["log_ratio", "classifier"])
    parser.add_argument("--disc-layers", type=int, default=None, help="classifier layers (default: the policy's)")
    parser.add_argument("--logprobs-from", default="auto", choices=["auto", "forward", "generate"])
    parser.add_argument("--no-buckets", action="store_true",
                        help="one model call per batch (models.scoring length buckets off): to measure what they buy")
    parser.add_argument("--no-shared-prefix", action="store_true",
                        help="every row runs its own prompt (models.scoring shared prefixes and generate's shared "
                             "prefill off): to measure what they buy")
    parser.add_argument("--no-logits-to-keep", action="store_true",
                        help="the LM head on every position (models.scoring): to measure what trimming it buys")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see _scale_common.set_threads)")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.no_buckets or args.no_logits_to_keep or args.no_shared_prefix:
        from lightning_irl.models import scoring

        if args.no_shared_prefix:
            scoring.shared_prefix_plan = lambda *a, **k: None
            rollout_module.shared_prompt_cache = lambda *a, **k: None

        if args.no_buckets:
            length_buckets = scoring.length_buckets
            scoring.length_buckets = lambda mask, enabled=True: length_buckets(mask, enabled=False)
        if args.no_logits_to_keep:
            scoring.accepts_logits_to_keep = lambda model: False

    ds = make_dataset(tempfile.mkdtemp(prefix="adv_bench_"), n=args.batch_size * (args.warmup + args.steps) + 8,
                      min_len=8, max_len=40, prompt_share=0.5)
    L.seed_everything(0)
    policy = ModelSpec(config=dict(SMALL_LLAMA), tokenizer=ds["tokenizer"], seed=0,
                       lora=LoraSpec(r=16, alpha=32) if args.lora else None)
    layers = args.disc_layers or SMALL_LLAMA["num_hidden_layers"]
    disc = None if args.form == "log_ratio" else ModelSpec(config={**SMALL_LLAMA, "num_hidden_layers": layers},
                                                            tokenizer=ds["tokenizer"], seed=1)
    module = Adversarial(policy=policy, discriminator=disc,
                         sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
                                                 logprobs_from=args.logprobs_from),
                         discriminator_training=DiscriminatorTraining(form=args.form, optimizer=OptimizerSpec(lr=1e-4)),
                         policy_update=PolicyUpdate(loss="rloo", kl_coef=args.kl_coef),
                         optimizer=OptimizerSpec(lr=1e-5), export=False)
    totals: dict = defaultdict(float)
    cpu_totals: dict = defaultdict(float)
    active = [False]
    instrument(module, totals, cpu_totals, active)
    data = DemonstrationDataModule(train_file=ds["train_file"], batch_size=args.batch_size, max_length=64)
    trainer = quiet_trainer(max_steps=args.warmup + args.steps, precision=args.precision,
                            callbacks=[StepClock(args.warmup, totals, cpu_totals, active)])
    trainer.fit(module, datamodule=data)

    def split(t: dict):
        total = t.pop("total")
        parts = {
            "rollout: generate": t["rollout"] - t["rollout_logps"],
            "rollout: log-prob pass": t["rollout_logps"],
            "expert log pi (log-ratio form)": t["expert_logps"],
            "reference log-probs": t["reference"],
            "discriminator (fwd+bwd+step)": t["discriminator"] + t["discriminator_step"],
            "rewards (disc forward)": t["rewards"],
            "policy (fwd+bwd+step)": t["policy"] + t["policy_step"],
        }
        parts["other (advantages, logging, loop)"] = total - sum(parts.values())
        return total, parts

    total, parts = split(totals)
    cpu_total, cpu_parts = split(cpu_totals)
    print(f"\nadversarial step split, {args.form} discriminator, {args.batch_size} prompts x {args.num_samples} "
          f"samples, max_new_tokens {args.max_new_tokens}, logprobs_from {args.logprobs_from}, "
          f"{'LoRA' if args.lora else 'full'} policy, precision {args.precision}, "
          f"{args.steps} steps after {args.warmup} warmup: {total / args.steps:.2f} s/step wall, "
          f"{cpu_total / args.steps:.2f} CPU-s/step")
    print(f"  {'':36s} {'wall s/step':>11s} {'share':>6s}  {'CPU s/step':>10s} {'share':>6s}")
    for name, seconds in parts.items():
        print(f"  {name:36s} {seconds / args.steps:11.3f} {seconds / total:6.1%}  "
              f"{cpu_parts[name] / args.steps:10.3f} {cpu_parts[name] / cpu_total:6.1%}")


if __name__ == "__main__":
    main()
