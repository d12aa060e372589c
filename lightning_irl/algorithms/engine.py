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
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Union

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
import torch.nn.functional as F

#: The aligned per-token row tensors of a batch of sequences (demonstrations or rollouts).
ROW_KEYS = ("input_ids", "attention_mask", "loss_mask", "position_ids")

Units = Callable[[Mapping[str, torch.Tensor]], Union[torch.Tensor, int, float]]
Sums = Union[torch.Tensor, Mapping[str, torch.Tensor]]


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

    def __init__(self, module: L.LightningModule) -> None:
        self.module = module
        self.pending_clip: Optional[float] = None  # set by step, used by clip_before_step

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

    # ---- backward ----------------------------------------------------------------------
    def backward(
        self,
        rows: Mapping[str, torch.Tensor],
        loss: Callable[[Dict[str, torch.Tensor]], Sums],
        units: Union[Units, Mapping[str, Units]] = response_tokens,
        micro_batch_size: Optional[int] = None,
        weights: Optional[Mapping[str, float]] = None,
        stat_units: Optional[str] = None,
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
        shares: Dict[str, torch.Tensor] = {}
        for micro in micro_batches(rows, micro_batch_size):
            sums = loss(micro)
            if not isinstance(sums, Mapping):
                sums = {"loss": sums}
            total = None
            for name, value in sums.items():
                if name in counts:
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
        shrinks to about ``max_grad_norm / scale``."""
        module = self.module
        self.pending_clip = max_grad_norm
        if counted:
            optimizer.step()
        else:
            module.trainer.strategy.optimizer_step(optimizer.optimizer, closure=_no_closure, model=module)
        if self.pending_clip is not None:
            raise RuntimeError(f"{type(module).__name__}.on_before_optimizer_step must call "
                               "self.engine.clip_before_step(optimizer): the gradients were not clipped")
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    def clip_before_step(self, optimizer) -> None:
        """Clip the gradients of ``optimizer``'s parameters to the norm ``step`` was given; call it
        from ``on_before_optimizer_step`` (``IRLModule`` does)."""
        max_norm, self.pending_clip = self.pending_clip, None
        if max_norm is None:
            return
        module = self.module
        if isinstance(module.trainer.strategy, FSDPStrategy):
            # FSDP1's precision plugin refuses norm clipping; its root-level clip_grad_norm_ would
            # clip every model together. The optimizer's own parameters hold gradient shards here.
            clip_sharded_grad_norm(optimizer, max_norm, module.trainer.strategy)
        else:
            module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


def clip_sharded_grad_norm(optimizer, max_norm: float, strategy) -> torch.Tensor:
    """Scale the gradients of ``optimizer``'s parameters so that their global norm is at most
    ``max_norm``, when each rank holds a shard of every gradient (FSDP1 with ``use_orig_params``);
    gradients replicated on every rank (``NO_SHARD``) are not summed over ranks. Returns the norm."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    device = grads[0].device if grads else strategy.root_device
    local = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum() if grads else \
        torch.zeros((), device=device)
    sharded = str(getattr(strategy, "sharding_strategy", "")).split(".")[-1] in ("FULL_SHARD", "SHARD_GRAD_OP")
    total = (strategy.reduce(local, reduce_op="sum") if sharded and strategy.world_size > 1 else local).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.to(grad.dtype))
    return total


def _no_closure() -> None:
    return None


__all__ = ["Engine", "ROW_KEYS", "attached_trainer", "clip_sharded_grad_norm", "map_micro_batches", "micro_batches", "response_tokens", "rollout_rows", "sequence_rows", "sequences", "world_size"]
