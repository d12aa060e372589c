"""The root of every lightning_irl module: a tokenizer, the shared training engine, optimizer
plumbing, throughput, and the export at the end of ``fit``.

Three kinds of modules derive from it:

- ``algorithms.policy.PolicyModule``: trains a policy (SFT, adversarial IRL, SPIN, IQ-Learn,
  distillation); adds the policy, the frozen reference, rollouts, evaluation and ``predict``;
- ``algorithms.reward_model.RewardModel``: trains a sequence classifier;
- ``algorithms.reward_model.BestOfN``: predicts only.
"""

from __future__ import annotations

import dataclasses
from time import perf_counter
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Tuple

import lightning as L
import torch

from lightning_irl.algorithms.engine import Engine, OnNonFinite, attached_trainer
from lightning_irl.compat import logs_this_step
from lightning_irl.algorithms.export import Export, default_export_dir, export_all


#: The checkpoint entry that holds ``Engine.nonfinite_skipped``.
NONFINITE_SKIPPED_KEY = "lightning_irl_nonfinite_skipped"


@dataclass
class OptimizerSpec:
    """AdamW with warmup then a decay schedule (a transformers scheduler name).

    Args:
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay (not applied to biases and norms).
        betas: Adam betas.
        eps: Adam epsilon.
        warmup_steps: Linear warmup from 0 over this many optimizer steps.
        schedule: ``cosine``, ``linear``, ``constant_with_warmup``, ... (transformers get_scheduler).
        fused: torch's fused AdamW kernel (one kernel for all parameters). Default (None): on
            where torch has it for the parameters (plain CPU or CUDA tensors; not FSDP2's sharded
            DTensors) and the precision does not scale the loss (not ``16-mixed``, whose gradient
            scaler and norm clipping need the optimizer's gradients unscaled first), as
            transformers' Trainer does by default. On this project's 2-core CPU a
            step of the fused kernel took 0.16 ms vs 0.59 ms (84K parameters) and 21 ms vs 90 ms
            (30M) for the default per-parameter loop. Updates agree to float rounding.
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    fused: Optional[bool] = None


def fused_adamw_supported(params: List[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: floating plain tensors on the CPU or
    a CUDA device (a ``DTensor`` subclass, as FSDP2 shards, goes the foreach way)."""
    return bool(params) and all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point()
                                and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(params_module: torch.nn.Module, spec: OptimizerSpec, total_steps: int,
                    own_lr: Optional[Dict[str, float]] = None, precision: Optional[str] = None):
    """AdamW + schedule over the trainable parameters of ``params_module``. ``own_lr`` maps
    parameter names to a peak learning rate of their own (no weight decay, same schedule).
    ``precision`` (the trainer's) decides ``spec.fused=None``: fused unless unknown or 16-bit
    with loss scaling."""
    own_lr = own_lr or {}
    decay, no_decay, own = [], [], []
    for name, param in params_module.named_parameters():
        if not param.requires_grad:
            continue
        if name in own_lr:
            own.append({"params": [param], "weight_decay": 0.0, "lr": own_lr[name]})
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}, *own]
    trained = decay + no_decay + [p for g in own for p in g["params"]]
    if spec.fused is None:
        fused = precision is not None and not str(precision).startswith("16") and fused_adamw_supported(trained)
    else:
        fused = spec.fused
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr, betas=tuple(spec.betas),
                                  eps=spec.eps, fused=fused or None)
    # imported here: transformers.optimization pulls in transformers.trainer_utils, ~1.8 s of the
    # CLI's start-up that --help, validate, test and predict never need
    from transformers import get_scheduler

    scheduler = get_scheduler(spec.schedule, optimizer, num_warmup_steps=spec.warmup_steps,
                              num_training_steps=max(total_steps, 1))
    return optimizer, {"scheduler": scheduler, "interval": "step"}


def literal_choices(annotation) -> Optional[Tuple[Any, ...]]:
    """The values a ``Literal[...]`` (or ``Optional[Literal[...]]``) annotation allows, else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else ():
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg) + (None,)
    return None


def check_choices(owner, **values: Any) -> None:
    """Raise a ValueError naming the argument when a value is not one of its ``Literal`` choices.

    ``owner`` is the function or class whose annotations declare the choices. The command line
    (jsonargparse) enforces them already and lists them in ``--help``; this covers Python callers.
    """
    hints = typing.get_type_hints(owner)
    for name, value in values.items():
        allowed = literal_choices(hints.get(name))
        if allowed is not None and value not in allowed:
            raise ValueError(f"{name} must be one of {[a for a in allowed if a is not None]}, got {value!r}")


def check_fields(config) -> None:
    """``check_choices`` over every field of a dataclass instance (call it in ``__post_init__``)."""
    check_choices(type(config), **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """No gradients and eval mode (no dropout): references, opponents, teachers, scorers."""
    model.requires_grad_(False)
    return model.eval()


class IRLModule(L.LightningModule):
    """Base of every lightning_irl module (the CLI's ``--model`` accepts any subclass).

    Manual optimisation throughout: losses are normalised by their unit count over the *global*
    step (all micro-batches, all ranks), which needs the counts before the first backward, and
    adversarial methods step two optimizers anyway. ``self.engine`` does both
    (``algorithms/engine.py``).

    Args:
        tokenizer: The run's tokenizer (every model of the module reads its ids).
        optimizer: Optimizer and schedule of the trained model.
        micro_batch_size: Split each batch into micro-batches of this many rows and accumulate
            gradients (the gradient equals the full batch's). Lightning's
            ``accumulate_grad_batches`` is not used; raise ``data.batch_size`` instead.
        max_grad_norm: Clip the global gradient norm (None = no clipping).
        export_dir: Where ``fit`` writes the trained model(s) and the tokenizer in Hugging Face
            format (safetensors) when it ends. Default: ``export`` inside the run's checkpoint
            folder.
        export: Turn the export off with False.
        on_nonfinite: What a NaN or infinite loss term, reward, advantage, KL or gradient norm
            does (``algorithms/engine.py``): ``stop`` raises ``NonFiniteError`` at that step,
            before the optimizer applies the update (one line: the step, the component, the last
            good checkpoint); ``skip`` skips that optimizer step (the weights are left as they
            are), logs ``train/nonfinite_skipped`` and goes on.
        max_nonfinite_skips: With ``skip``, the run still stops (``NonFiniteError``) once more
            than this many optimizer steps were skipped.
    """

    def __init__(
        self,
        tokenizer,
        optimizer: OptimizerSpec = OptimizerSpec(),
        micro_batch_size: Optional[int] = None,
        max_grad_norm: Optional[float] = 1.0,
        export_dir: Optional[str] = None,
        export: bool = True,
        on_nonfinite: OnNonFinite = "stop",
        max_nonfinite_skips: int = 10,
    ) -> None:
        super().__init__()
        check_choices(IRLModule.__init__, on_nonfinite=on_nonfinite)
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 (or null: the whole batch), got {micro_batch_size}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or null: no clipping), got {max_grad_norm}")
        if max_nonfinite_skips < 0:
            raise ValueError(f"max_nonfinite_skips must be >= 0, got {max_nonfinite_skips}")
        self.automatic_optimization = False
        self.tokenizer = tokenizer
        self.optimizer_spec = optimizer
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.export_dir = export_dir
        self.export = export
        self.on_nonfinite = on_nonfinite
        self.max_nonfinite_skips = max_nonfinite_skips
        self.engine = Engine(self)
        self._window_tokens: Optional[torch.Tensor] = None
        self._clock: Optional[float] = None

    def on_fit_start(self) -> None:
        """Training mode (dropout on) for the models being trained when ``fit`` starts.

        Lightning (2.2+) no longer calls ``.train()`` when training starts (it only restores each
        module's mode after validation), and ``from_pretrained`` returns a model in eval mode: a
        policy or discriminator loaded from a folder (GPT-2, OPT: dropout 0.1) would otherwise
        train without its dropout, unlike the same network built from an inline config."""
        self.train()

    def train(self, mode: bool = True):
        """``.train()`` on the whole module (``on_fit_start``); models whose parameters are all
        frozen (reference, opponent, teacher, scoring policies) stay in eval mode."""
        super().train(mode)
        for child in self.children():
            params = list(child.parameters())
            if params and not any(p.requires_grad for p in params):
                child.eval()
        return self

    # ---- optimisation ------------------------------------------------------------------
    def total_steps(self) -> int:
        """Training batches of the run (the schedules' length); 1 without a trainer."""
        trainer = attached_trainer(self)
        try:
            return int(trainer.estimated_stepping_batches) if trainer is not None else 1
        except Exception:  # an infinite loader or no data yet
            return 1

    def step(self, optimizer, scheduler=None, counted: bool = True) -> None:
        """Clip (``max_grad_norm``), step and zero ``optimizer``; see ``Engine.step``."""
        self.engine.step(optimizer, scheduler, self.max_grad_norm, counted)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradient clipping (``max_grad_norm``) happens here, after 16-mixed has unscaled the
        gradients: see ``Engine.step``."""
        self.engine.clip_before_step(optimizer)

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """No checkpoint with non-finite weights is written (``Engine.check_weights`` raises
        ``NonFiniteError`` first); checkpoints carry the count of skipped non-finite steps
        (``on_nonfinite: skip``)."""
        self.engine.check_weights()
        checkpoint[NONFINITE_SKIPPED_KEY] = self.engine.nonfinite_skipped

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.engine.nonfinite_skipped = int(checkpoint.get(NONFINITE_SKIPPED_KEY, 0))

    def count_tokens(self, batch: Dict[str, Any]) -> None:
        """Count the batch's non-pad tokens for ``perf/tokens_per_sec``: at each step that is
        logged, the tokens of the steps since the last one over the time they took (the counts
        stay on the device in between: no host sync per step)."""
        now = perf_counter()
        trainer = attached_trainer(self)
        if (self._clock is not None and self._window_tokens is not None and now > self._clock
                and trainer is not None and logs_this_step(trainer)):
            self.log("perf/tokens_per_sec", float(self._window_tokens) / (now - self._clock) * self.engine.world,
                     on_step=True, on_epoch=False)
            self._window_tokens = None
        if self._window_tokens is None:
            self._clock = now
        tokens = batch["attention_mask"].sum()
        self._window_tokens = tokens if self._window_tokens is None else self._window_tokens + tokens

    def on_validation_start(self) -> None:
        self._window_tokens = None  # validation time is not training throughput

    # ---- export ------------------------------------------------------------------------
    def exports(self) -> List[Export]:
        """What ``fit`` exports when it ends (``algorithms/export.py``)."""
        return []

    def resolve_export_dir(self) -> Optional[str]:
        if not self.export:
            return None
        return self.export_dir or default_export_dir(self.trainer)

    def on_fit_end(self) -> None:
        path = self.resolve_export_dir()
        if path is not None:
            export_all(self.trainer, self.tokenizer, path, self.exports())


__all__ = ["IRLModule", "NONFINITE_SKIPPED_KEY", "OptimizerSpec", "build_optimizer", "check_choices", "check_fields",
           "freeze", "literal_choices"]
