"""The training engine every method shares: globally-normalised gradient accumulation and
optimizer steps, through public Lightning API only.

A method's ``training_step`` builds its loss as *sums over loss units* (response tokens,
sequences, pairs, ...) and hands them to ``Engine.backward``. The engine

1. counts each term's units over the whole step — every micro-batch on every rank — before the
   first backward,
2. cuts the rows into micro-batches (``micro_batches``) and calls the loss on each,
3. backpropagates ``Σ_terms weight · sum · world / global units`` per micro-batch (DDP averages
   gradients over ranks, hence ``· world``), so the accumulated gradient is that of one batch
   holding every row of the step, whatever ``micro_batch_size`` and the number of ranks are,
4. returns each term's (and statistic's) share of the global mean on this rank: summed over
   ranks (``self.log(..., sync_dist=True, reduce_fx="sum")``) it is the global mean.

``Engine.step`` clips and steps an optimizer. ``counted=False`` steps it without advancing
``trainer.global_step`` (Lightning counts ``LightningOptimizer.step`` calls in manual
optimisation): inner steps such as discriminator or PPO-minibatch updates go through the
strategy's public ``optimizer_step`` — the same precision-plugin and strategy work, uncounted —
so ``trainer.max_steps`` counts training batches whatever the inner loops do.

The non-finite guard: every loss term ``backward`` computes, every tensor a method hands to
``check_finite`` (rewards, advantages, KL, ...) and the gradient norm of the stepped optimizer's
parameters are checked at each optimizer step, in ``on_before_optimizer_step`` — after 16-mixed
has unscaled the gradients, before the update. The flags are kept on the device (no host sync)
until then and reduced over ranks (max), so every rank takes the same decision. The module's
``on_nonfinite`` says what happens: ``stop`` raises ``NonFiniteError`` (one line: the step,
the component, the last good checkpoint) before the update, so the weights and optimizer states
stay as they were; ``skip`` drops the gradients, so the optimizer leaves every parameter as it is
(no update, no weight decay, no moment update), counts the skip (``train/nonfinite_skipped``)
and stops like ``stop`` once more than ``max_nonfinite_skips`` steps were skipped. Under a
GradScaler (16-mixed) infinite gradients are the scaler's business (it skips such steps and
lowers its scale): only the loss terms and the checked tensors are guarded there.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Tuple, Union

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy

from lightning_irl.callbacks.checkpoint import local_path

#: The aligned per-token row tensors of a batch of sequences (demonstrations or rollouts).
ROW_KEYS = ("input_ids", "attention_mask", "loss_mask", "position_ids")

Units = Callable[[Mapping[str, torch.Tensor]], Union[torch.Tensor, int, float]]
Sums = Union[torch.Tensor, Mapping[str, torch.Tensor]]

OnNonFinite = Literal["stop", "skip"]

#: How a loss term of ``Engine.backward`` is named in a ``NonFiniteError`` (``backward``'s
#: ``names`` overrides it; a term named ``loss`` reads "<module class> loss", others "<name> term").
TERM_NAMES = {"nll": "NLL", "kl": "KL term", "policy": "policy loss", "bce": "discriminator loss",
              "mle": "discriminator MLE term", "r1": "R1 penalty", "spin": "SPIN loss"}

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A loss term, a checked tensor (reward, advantage, KL) or a gradient norm was NaN or
    infinite: the run stopped before the optimizer applied that step's update (see the module
    docstring). The message is one line naming the step (``trainer.global_step``), the component
    and the last good checkpoint; ``step`` and ``component`` hold the first two."""

    def __init__(self, message: str, step: Optional[int] = None, component: Optional[str] = None) -> None:
        super().__init__(message)
        self.step, self.component = step, component

    def __reduce__(self):  # keeps step and component through pickling (spawned ranks)
        return type(self), (str(self), self.step, self.component)


def nonfinite_code(value: torch.Tensor) -> torch.Tensor:
    """0 when every element of ``value`` is finite, 1 when one is infinite, 2 when one is NaN, as
    a 0-d float tensor on ``value``'s device, without a host sync."""
    value = value.detach()
    if hasattr(value, "to_local"):  # a DTensor: this rank's shard (the ranks' flags are reduced)
        value = value.to_local()
    if not value.is_floating_point():
        return torch.zeros((), device=value.device)
    return torch.maximum(torch.isnan(value).any().float() * 2, torch.isinf(value).any().float())


def last_checkpoint(trainer) -> Optional[str]:
    """The newest checkpoint the run's checkpoint callbacks wrote (``last_model_path``, else
    ``best_model_path``; a local path only if the file is there), or None."""
    callbacks = getattr(trainer, "checkpoint_callbacks", None) or []
    for attribute in ("last_model_path", "best_model_path"):
        for callback in callbacks:
            path = str(getattr(callback, attribute, "") or "")
            local = local_path(path)
            if path and (local is None or os.path.exists(local)):
                return path
    return None


def response_tokens(rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Loss units = response tokens (the shifted ``loss_mask``)."""
    return rows["loss_mask"][:, 1:].sum()


def sequences(rows: Mapping[str, torch.Tensor]) -> int:
    """Loss units = rows (one response, one pair, one sample)."""
    return rows["input_ids"].size(0)


def sequence_rows(batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The aligned [B, T] row tensors of a batch (``ROW_KEYS`` present in it), without the
    prompt-only tensors and strings a collated batch also carries."""
    return {key: batch[key] for key in ROW_KEYS if key in batch}


def rollout_rows(rollout) -> Dict[str, torch.Tensor]:
    """The aligned row tensors of a ``rollout.Rollout`` (prompt left-padded, response right-padded)."""
    return {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask, "loss_mask": rollout.loss_mask}


def micro_batches(rows: Mapping[str, Any], size: Optional[int]) -> Iterator[Dict[str, Any]]:
    """Row slices of aligned tensors, each cut after its last attended column.

    ``rows["attention_mask"]`` is [B, T]. Every tensor is sliced by rows; [B, T] tensors are cut
    to the slice's width ``W`` and shifted [B, T−1] ones (log-probs, advantages, masks) to
    ``W − 1``; [B] tensors (per-row values) are only sliced. Cutting after the last attended
    *column*, not at the longest row's length, keeps whole rows for right-padded
    demonstrations, left-padded-prompt rollouts and packed rows alike.

    ``rows`` may also be ``{group: rows}`` (e.g. chosen and rejected responses of SPIN's pairs):
    groups of as many rows, each of its own width, sliced in lockstep, each cut by its own mask.
    """
    groups = rows if all(isinstance(value, Mapping) for value in rows.values()) else None
    if groups is not None:
        sizes = {name: group["attention_mask"].size(0) for name, group in groups.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"micro_batches: row groups of different sizes {sizes}")
        slicers = [micro_batches(group, size) for group in groups.values()]
        for parts in zip(*slicers):
            yield dict(zip(groups, parts))
        return
    attention = rows["attention_mask"]
    total, full = attention.shape
    for name, value in rows.items():
        if value.size(0) != total or (value.dim() >= 2 and value.size(1) not in (full, full - 1)):
            raise ValueError(f"micro_batches: {name} {tuple(value.shape)} is not aligned with the attention "
                             f"mask {tuple(attention.shape)} (rows [B, T], [B, T-1] or [B] only)")
    step = size or total
    for start in range(0, total, step):
        part = {name: value[start : start + step] for name, value in rows.items()}
        columns = part["attention_mask"].bool().any(0).nonzero()
        width = int(columns[-1]) + 1 if columns.numel() else 1
        yield {name: _cut(value, full, width) for name, value in part.items()}


def map_micro_batches(rows: Mapping[str, torch.Tensor], fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor],
                      size: Optional[int]) -> torch.Tensor:
    """``fn`` over ``micro_batches(rows, size)``, the outputs concatenated over rows. A [b, W]
    or shifted [b, W−1] output of a micro-batch cut to width ``W`` is padded back (with zeros) to
    the full width T or T−1, so the result lines up with ``rows``; [b] outputs are concatenated."""
    full = rows["attention_mask"].size(1)
    out = []
    for micro in micro_batches(rows, size):
        value = fn(micro)
        if value.dim() >= 2:
            value = F.pad(value, (0, full - micro["attention_mask"].size(1)))
        out.append(value)
    return torch.cat(out)


def _cut(value: torch.Tensor, full: int, width: int) -> torch.Tensor:
    if value.dim() < 2:
        return value
    return value[:, :width] if value.size(1) == full else value[:, : max(width - 1, 1)]


def world_size(module: L.LightningModule) -> int:
    """Processes training together (1 without a trainer): the one place it is read."""
    trainer = attached_trainer(module)
    return trainer.world_size if trainer is not None else 1


def attached_trainer(module: L.LightningModule) -> Optional["L.Trainer"]:
    """The module's trainer, or None when it is used on its own (tests, benchmarks, export)."""
    try:
        return module.trainer  # the property raises when no trainer is attached
    except RuntimeError:
        return None


class Engine:
    """Globally-normalised backward and optimizer steps for a LightningModule in manual
    optimisation (see the module docstring). One per module: ``self.engine = Engine(self)``."""

    #: What a module without ``on_nonfinite`` / ``max_nonfinite_skips`` attributes gets.
    DEFAULT_ON_NONFINITE: OnNonFinite = "stop"
    DEFAULT_MAX_NONFINITE_SKIPS = 10

    def __init__(self, module: L.LightningModule) -> None:
        self.module = module
        self.pending_clip: Optional[float] = None  # set by step, used by clip_before_step
        self.pending_check = False  # set by step, cleared by clip_before_step
        #: Optimizer steps ``on_nonfinite: skip`` skipped (cumulative; checkpoints carry it).
        self.nonfinite_skipped = 0
        self._flags: Dict[str, torch.Tensor] = {}  # component -> nonfinite_code, since the last step
        self._unscaled_norm: Optional[torch.Tensor] = None  # the guard's gradient norm, reused to clip
        self._model_names: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()

    # ---- ranks -------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return world_size(self.module)

    def global_sum(self, value: Union[torch.Tensor, int, float]) -> torch.Tensor:
        """Sum over ranks (identity on one process), as a float tensor on the module's device."""
        value = torch.as_tensor(value, device=self.module.device).float()
        if self.world == 1:
            return value
        return self.module.trainer.strategy.reduce(value, reduce_op="sum")

    def global_units(self, rows: Mapping[str, torch.Tensor], units: Units) -> torch.Tensor:
        """Units of ``rows`` over every rank, at least 1 (a normaliser)."""
        return self.global_sum(units(rows)).clamp(min=1)

    # ---- the non-finite guard -------------------------------------------------------------
    def check_finite(self, name: str, value: torch.Tensor) -> None:
        """Flag ``value`` (a reward, advantage, KL, ...; any shape) for the next optimizer step's
        non-finite check, as the component ``name`` ("reward", "KL", ...). No host sync: the
        decision is taken at the step, the same on every rank (module docstring)."""
        code = nonfinite_code(value)
        previous = self._flags.get(name)
        self._flags[name] = code if previous is None else torch.maximum(previous, code.to(previous.device))

    def term_name(self, name: str) -> str:
        """How the loss term ``name`` reads in a ``NonFiniteError`` (``TERM_NAMES``)."""
        if name in TERM_NAMES:
            return TERM_NAMES[name]
        return f"{type(self.module).__name__} loss" if name == "loss" else f"{name} term"

    def model_name(self, optimizer) -> str:
        """The module's children whose parameters ``optimizer`` trains ("policy", "discriminator",
        "reward model"), or "model"."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer
        try:
            return self._model_names[optimizer]
        except (KeyError, TypeError):
            pass
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = [name.replace("_", " ") for name, child in self.module.named_children()
                 if any(id(p) in params for p in child.parameters())]
        name = " and ".join(names) or "model"
        try:
            self._model_names[optimizer] = name
        except TypeError:
            pass
        return name

    @property
    def on_nonfinite(self) -> str:
        return getattr(self.module, "on_nonfinite", self.DEFAULT_ON_NONFINITE)

    @property
    def max_nonfinite_skips(self) -> int:
        return getattr(self.module, "max_nonfinite_skips", self.DEFAULT_MAX_NONFINITE_SKIPS)

    def _guard(self, optimizer) -> bool:
        """The non-finite check of one optimizer step (module docstring). Returns True when the
        step is to be skipped (its gradients are dropped); raises ``NonFiniteError`` to stop."""
        flags, self._flags = self._flags, {}
        trainer = attached_trainer(self.module)
        names: List[str] = list(flags)
        codes = list(flags.values())
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        self._unscaled_norm = None
        if scaler is None or not scaler.is_enabled():
            norm = self._unscaled_norm = grad_norm(optimizer)
            if norm is not None:
                names.append(f"gradient norm of the {self.model_name(optimizer)}")
                codes.append(nonfinite_code(norm))
        if not codes:
            return False
        device = self.module.device
        found = self._first_nonfinite(torch.stack([code.to(device) for code in codes]), names, trainer)
        if found is None:
            if self.on_nonfinite == "skip":
                self._log_skipped()
            return False
        component, kind = found
        step = trainer.global_step if trainer is not None else 0
        where = _where(trainer)
        if self.on_nonfinite == "skip":
            self.nonfinite_skipped += 1
            if self.nonfinite_skipped <= self.max_nonfinite_skips:
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        param.grad = None  # the optimizer leaves parameters without a gradient as they are
                if trainer is None or trainer.is_global_zero:
                    log.warning("non-finite %s (%s) at step %d: skipped this optimizer step of the %s "
                                "(%d skipped, at most %d)", component, kind, step, self.model_name(optimizer),
                                self.nonfinite_skipped, self.max_nonfinite_skips)
                self._log_skipped()
                return True
            raise NonFiniteError(f"non-finite {component} ({kind}) at step {step}: {self.nonfinite_skipped} "
                                 f"optimizer steps skipped, more than max_nonfinite_skips={self.max_nonfinite_skips}; "
                                 f"stopped before the update; {where}", step, component)
        raise NonFiniteError(f"non-finite {component} ({kind}) at step {step}: stopped before the update; {where}",
                             step, component)

    def check_weights(self) -> None:
        """Raise ``NonFiniteError`` when a parameter of the module is NaN or infinite on any rank
        (collective: call it on every rank). ``IRLModule`` calls it from ``on_save_checkpoint``,
        before the checkpoint is written, so no checkpoint ever holds non-finite weights, whatever
        made them so (the guard keeps the updates finite; a resumed or injected NaN is not)."""
        module = self.module
        trainer = attached_trainer(module)
        device = module.device
        names: List[str] = []
        codes: List[torch.Tensor] = []
        groups = [(name.replace("_", " "), list(child.parameters())) for name, child in module.named_children()]
        groups.append(("model", list(module.parameters(recurse=False))))
        for name, params in groups:
            if params:
                names.append(f"weights of the {name}")
                codes.append(torch.stack([nonfinite_code(p).to(device) for p in params]).max())
        if not codes:
            return
        found = self._first_nonfinite(torch.stack(codes), names, trainer)
        if found is not None:
            component, kind = found
            step = trainer.global_step if trainer is not None else 0
            raise NonFiniteError(f"non-finite {component} ({kind}) at step {step}: not writing this checkpoint; "
                                 f"{_where(trainer)}", step, component)

    def _first_nonfinite(self, codes: torch.Tensor, names: List[str], trainer) -> Optional[Tuple[str, str]]:
        """(component, "NaN"/"inf") of the first non-finite entry of ``codes`` (in the order the
        components were recorded), or None: the same answer on every rank, from one reduce (max)
        of the codes and of the lowest rank that saw each. Every rank records the same components
        in the same order (the same ``backward`` / ``check_finite`` calls, as every method makes)."""
        world = self.world
        if world == 1:
            return _first(codes.tolist(), names)
        marks = (codes > 0).float() * (world - trainer.global_rank)
        merged = trainer.strategy.reduce(torch.cat([codes, marks]), reduce_op="max").tolist()
        found = _first(merged[: len(names)], names)
        if found is None:
            return None
        rank = world - int(merged[len(names) + names.index(found[0])])
        return found[0], f"{found[1]} on rank {rank}"

    def _log_skipped(self) -> None:
        if attached_trainer(self.module) is not None:
            self.module.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True, on_epoch=False)

    # ---- backward ----------------------------------------------------------------------
    def backward(
        self,
        rows: Mapping[str, torch.Tensor],
        loss: Callable[[Dict[str, torch.Tensor]], Sums],
        units: Union[Units, Mapping[str, Units]] = response_tokens,
        micro_batch_size: Optional[int] = None,
        weights: Optional[Mapping[str, float]] = None,
        stat_units: Optional[str] = None,
        names: Optional[Mapping[str, str]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Accumulate the gradient of a globally normalised loss over ``rows``.

        Args:
            rows: Aligned row tensors (``micro_batches``): the whole step's rows on this rank.
            loss: ``micro → sum`` (a tensor: one term named ``loss``) or ``micro → {name: sum}``.
                Names in ``units`` are loss terms (backpropagated); any other entry is a detached
                statistic, a sum over the ``stat_units`` term's units.
            units: What each term averages over, counted on the whole ``rows``: one function
                (single term) or ``{term: function}``.
            micro_batch_size: Rows per forward/backward (None = all rows at once).
            weights: Weight of each term in the backward (default 1).
            stat_units: The term whose global units normalise the statistics (default: the first).
            names: How terms read in a ``NonFiniteError`` (default ``term_name``): every term's
                sum is checked at the next optimizer step (module docstring).

        Returns:
            ``{name: this rank's share of the global mean}``, detached; for the terms the
            weight is not applied. Summed over ranks, each is the global mean.
        """
        named = dict(units) if isinstance(units, Mapping) else {"loss": units}
        weights = weights or {}
        world = self.world
        # all counts before any backward: one collective per term, the same on every rank
        counts = {name: self.global_units(rows, count) for name, count in named.items()}
        stat_count = counts[stat_units or next(iter(named))]
        labels = {name: (names or {}).get(name) or self.term_name(name) for name in named}
        for label in labels.values():  # every rank records the same components, micro-batches or not
            self._flags.setdefault(label, torch.zeros((), device=self.module.device))
        shares: Dict[str, torch.Tensor] = {}
        for micro in micro_batches(rows, micro_batch_size):
            sums = loss(micro)
            if not isinstance(sums, Mapping):
                sums = {"loss": sums}
            total = None
            for name, value in sums.items():
                if name in counts:
                    self.check_finite(labels[name], value)
                    term = value * (world / counts[name])
                    weighted = term * weights.get(name, 1.0)
                    total = weighted if total is None else total + weighted
                    share = term.detach() / world
                else:
                    share = value.detach().float() / stat_count
                shares[name] = shares[name] + share if name in shares else share
            if total is not None:
                self.module.manual_backward(total)
        return shares

    # ---- optimizer steps ---------------------------------------------------------------
    def step(self, optimizer, scheduler=None, max_grad_norm: Optional[float] = None, counted: bool = True) -> None:
        """Clip, step and zero one optimizer (a ``LightningOptimizer`` from ``self.optimizers()``),
        then step its scheduler if given. ``counted=False``: the step does not advance
        ``trainer.global_step`` (see the module docstring).

        Clipping happens in the module's ``on_before_optimizer_step`` hook (``clip_before_step``),
        which the precision plugin calls after it has unscaled the gradients (16-mixed's
        GradScaler) and before the update. Clipping before ``optimizer.step()``, the usual
        manual-optimisation recipe, clips the *scaled* gradients under 16-mixed: every update
        shrinks to about ``max_grad_norm / scale``. The same hook runs the non-finite guard (module
        docstring): it may skip the update or raise ``NonFiniteError`` before it."""
        module = self.module
        self.pending_clip, self.pending_check = max_grad_norm, True
        if counted:
            optimizer.step()
        else:
            module.trainer.strategy.optimizer_step(optimizer.optimizer, closure=_no_closure, model=module)
        if self.pending_check:
            self.pending_clip, self.pending_check = None, False
            raise RuntimeError(f"{type(module).__name__}.on_before_optimizer_step must call "
                               "self.engine.clip_before_step(optimizer): the gradients were not clipped "
                               "nor checked for non-finite values")
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    def clip_before_step(self, optimizer) -> None:
        """Clip the gradients of ``optimizer``'s parameters to the norm ``step`` was given; call it
        from ``on_before_optimizer_step`` (``IRLModule`` does). Runs the non-finite guard first
        (module docstring): a skipped step is not clipped, a stopped one raises ``NonFiniteError``."""
        max_norm, self.pending_clip, self.pending_check = self.pending_clip, None, False
        if self._guard(optimizer) or max_norm is None:
            return
        module = self.module
        if isinstance(module.trainer.strategy, FSDPStrategy):
            # FSDP1's precision plugin refuses norm clipping; its root-level clip_grad_norm_ would
            # clip every model together. The optimizer's own parameters hold gradient shards here.
            clip_sharded_grad_norm(optimizer, max_norm, module.trainer.strategy)
            return
        params = _params_with_grad(optimizer)
        if (self._unscaled_norm is not None and hasattr(torch.nn.utils, "clip_grads_with_norm_")
                and all(type(p.grad) is torch.Tensor for p in params)):
            # Whole (single-device or DDP-reduced), unscaled gradients: the guard's norm is the
            # global norm, so clip with it instead of computing it again, as clip_grad_norm_ would
            # (and Lightning's mixed-precision clip refuses fused optimizers outright).
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, self._unscaled_norm)
        else:  # sharded DTensor gradients (FSDP2), or scaled ones (16-mixed): Lightning's clip
            module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


def _params_with_grad(optimizer) -> List[torch.Tensor]:
    return [p for group in getattr(optimizer, "optimizer", optimizer).param_groups for p in group["params"]
            if p.grad is not None]


def clip_sharded_grad_norm(optimizer, max_norm: float, strategy) -> torch.Tensor:
    """Scale the gradients of ``optimizer``'s parameters so that their global norm is at most
    ``max_norm``, when each rank holds a shard of every gradient (FSDP1 with ``use_orig_params``);
    gradients replicated on every rank (``NO_SHARD``) are not summed over ranks. Returns the norm."""
    norm = grad_norm(optimizer)  # this rank's shards
    local = norm.pow(2) if norm is not None else torch.zeros((), device=strategy.root_device)
    sharded = str(getattr(strategy, "sharding_strategy", "")).split(".")[-1] in ("FULL_SHARD", "SHARD_GRAD_OP")
    total = (strategy.reduce(local, reduce_op="sum") if sharded and strategy.world_size > 1 else local).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for param in _params_with_grad(optimizer):
        param.grad.mul_(scale.to(param.grad.dtype))
    return total


def grad_norm(optimizer) -> Optional[torch.Tensor]:
    """The 2-norm of ``optimizer``'s gradients on this rank (a sharded gradient's local shard), as
    a 0-d float32 tensor, or None when no parameter has a gradient. NaN or inf when a gradient
    is."""
    grads = [p.grad.detach() for p in _params_with_grad(optimizer)]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # DTensor (FSDP2): the shard
    if not grads:
        return None
    if hasattr(torch.nn.utils, "get_total_norm") and not any(g.dtype == torch.float16 for g in grads):
        return torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False).float()  # foreach kernels
    # float16 norms overflow at 65504: reduce those in float32 (bf16 has float32's range)
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32 if g.dtype == torch.float16 else None).float()
             for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def _where(trainer) -> str:
    checkpoint = last_checkpoint(trainer)
    return f"last good checkpoint: {checkpoint}" if checkpoint else "no checkpoint was written before it"


def _first(codes: List[float], names: List[str]) -> Optional[Tuple[str, str]]:
    for code, name in zip(codes, names):
        if code > 0:
            return name, "NaN" if code >= 2 else "inf"
    return None


def _no_closure() -> None:
    return None


__all__ = ["Engine", "NonFiniteError", "OnNonFinite", "ROW_KEYS", "TERM_NAMES", "attached_trainer",
           "clip_sharded_grad_norm", "grad_norm", "last_checkpoint", "map_micro_batches", "micro_batches",
           "nonfinite_code", "response_tokens", "rollout_rows", "sequence_rows", "sequences", "world_size"]
