"""A few training steps of a tiny model under a given strategy; rank 0 writes what happened.

Run as a script (multi-process strategies relaunch this file once per rank):

    python tests/scale/scale_worker.py --strategy ddp --devices 2 --batch-size 4 --steps 4 --out run.pt

``--out`` gets ``{"losses": [...], "state": {name: tensor}, ...}`` (the policy's full state after
the last step, gathered from shards under FSDP2) via ``torch.save``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


class Record(L.Callback):
    def __init__(self, key: str, before: str = "") -> None:
        self.key, self.before = key, before  # ``before``: the metric of batches that do not log ``key``
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        value = trainer.callback_metrics.get(self.key, trainer.callback_metrics.get(self.before))
        self.losses.append(float(value) if value is not None else float("nan"))


class MultinodeProbe(L.Callback):
    """What one rank of a console-script run saw (tests/scale/test_multinode.py adds it with
    ``--trainer.callbacks+=scale_worker.MultinodeProbe`` and ``tests/scale`` on ``PYTHONPATH``).

    At the end of training each rank writes ``probe_rank<global rank>.json`` into the working
    directory: how Lightning placed it (cluster environment, node / local / global rank, world
    size, strategy), the policy's parameter types (``DTensor`` when sharded), and per training
    step the unpadded token rows of its batch and the logged ``key``.
    """

    def __init__(self, key: str = "train/loss") -> None:
        self.key = key
        self.rows = []
        self.losses = []
        self.placement = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.placement = {
            "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
            "strategy": type(trainer.strategy).__name__,
            "global_rank": trainer.global_rank, "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank, "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
            "param_types": sorted({type(p).__name__ for p in pl_module.policy.parameters()}),
        }
        sampler = getattr(trainer.datamodule, "train_sampler", None)
        if sampler is not None:  # the data module's ResumableSampler: whose share of which order
            self.placement["sampler"] = {"seed": sampler.seed, "rank": sampler.rank,
                                         "num_replicas": sampler.num_replicas}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        mask = batch["attention_mask"].bool()
        self.rows.append([row[keep].tolist() for row, keep in zip(batch["input_ids"], mask)])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        value = trainer.callback_metrics.get(self.key)
        self.losses.append(float(value) if value is not None else float("nan"))

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        with open(f"probe_rank{trainer.global_rank}.json", "w") as f:
            json.dump({**self.placement, "global_step": trainer.global_step, "rows": self.rows,
                       "losses": self.losses}, f)


def full_state(module, model=None) -> dict:
    """The full state dict of ``model`` (default: the policy); collective under FSDP2."""
    from torch.distributed.tensor import DTensor

    model = module.policy if model is None else model
    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp2"])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--algorithm", default="sft", choices=["sft", "adversarial"])
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--r1-gamma", type=float, default=0.0, help="adversarial: R1 penalty weight")
    parser.add_argument("--disc-form", default="classifier", choices=["classifier", "log_ratio"],
                        help="adversarial: discriminator form (log_ratio: q = a copy of the policy, 1 warm-up step)")
    parser.add_argument("--prefit", type=int, default=0, help="log_ratio: pre-fit batches of q (before the warm-up)")
    parser.add_argument("--export", default=None, help="export folder (fit's HF export)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from lightning_irl.algorithms import OptimizerSpec
    from lightning_irl.data import DemonstrationDataModule
    from lightning_irl.models.spec import LoraSpec, ModelSpec
    from lightning_irl.rollout import SamplingConfig

    L.seed_everything(0)
    spec = ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes", seed=0,
                     gradient_checkpointing=args.gradient_checkpointing,
                     lora=LoraSpec(r=4, alpha=8) if args.lora else None)
    common = dict(optimizer=OptimizerSpec(lr=1e-2, schedule="constant_with_warmup"),
                  micro_batch_size=args.micro_batch_size, export=args.export is not None,
                  export_dir=args.export)
    if args.algorithm == "sft":
        from lightning_irl.algorithms import SFT

        module = SFT(policy=spec, **common)
        key = "train/loss"
    else:
        from lightning_irl.algorithms.adversarial import Adversarial, DiscriminatorTraining

        network = ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes", seed=1)
        disc = DiscriminatorTraining(r1_gamma=args.r1_gamma)
        if args.disc_form == "log_ratio":
            network, disc = None, DiscriminatorTraining(form="log_ratio", prefit_steps=args.prefit, warmup_steps=1,
                                                        mle_weight=1.0)
        module = Adversarial(policy=spec, discriminator=network, discriminator_training=disc,
                             sampling=SamplingConfig(max_new_tokens=6, num_samples=2), **common)
        key = "disc/loss"
    data = DemonstrationDataModule(task="modes", num_train=args.steps * args.batch_size * args.devices, num_val=0,
                                   batch_size=args.batch_size, max_length=32, shuffle=False)
    if args.strategy == "fsdp2":
        from lightning_irl.strategies import FSDP2Strategy

        strategy = FSDP2Strategy()
    elif args.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(find_unused_parameters=args.algorithm != "sft")
    else:
        strategy = "auto"
    record = Record(key, before="disc/prefit_nll")
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=args.devices, precision=args.precision,
                        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[record], default_root_dir=os.path.dirname(os.path.abspath(args.out)))
    trainer.fit(module, datamodule=data)
    state = full_state(module)
    disc_state = full_state(module, module.discriminator) if args.algorithm == "adversarial" else None
    if args.lora and args.export:
        # The merged export of a (possibly sharded) LoRA policy from its gathered state dict.
        from lightning_irl.models.lora import merge_lora_state_dict

        if trainer.is_global_zero:
            merged = merge_lora_state_dict(module.policy, state)
            module.policy.get_base_model().save_pretrained(args.export + "_merged", state_dict=merged)
            module.tokenizer.save_pretrained(args.export + "_merged")
        trainer.strategy.barrier("merged")
    if trainer.is_global_zero:
        torch.save({"losses": record.losses, "state": state, "disc_state": disc_state, "world_size": trainer.world_size,
                    "global_step": trainer.global_step,
                    "param_types": sorted({type(p).__name__ for p in module.policy.parameters()})}, args.out)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    finally:
        # as lightning_irl.cli.main does: exiting with gloo's threads still up aborts now and then
        # ("terminate called without an active exception", status -6), seen in CI after an FSDP2 run
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
