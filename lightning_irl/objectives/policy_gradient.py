"""Policy optimisation with a learned reward: RLOO advantages, REINFORCE and PPO-clip losses.

Conventions
-----------
- Objective: ``max E_π[r] − β·KL(π ‖ π_ref)``; losses here are *minimised*.
- Shapes: per-token arrays are [B, T] with a ``mask`` [B, T] (1 on response tokens, as the
  shifted ``loss_mask`` of ``logprobs``); per-sequence arrays are [B].
- Grouping (RLOO): the k samples of one prompt are contiguous. Flat rewards [B·k] are read as
  [B, k], rows ``b·k … b·k + k − 1`` belonging to prompt ``b`` (``repeat_interleave`` order).
- Advantages and rewards are constants of the loss: the losses detach them.
- Normalisation: each loss is a mean over its units (sequences, or tokens for token-level PPO)
  unless ``denominator`` is given; pass the *global* count of those units (all micro-batches of an
  optimizer step on all ranks) so accumulation and DDP give the gradient of one large batch.
- KL placement: ``shape_rewards`` puts ``β·KL`` in the reward (the usual RLOO/PPO choice). For KL in
  the loss the caller adds ``β · masked_mean(kl_penalty(logp, ref_logp, "k2"), mask)`` to the loss
  (see ``kl.py`` for why k2 there).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, Union

import torch

from lightning_irl.objectives.logprobs import masked_mean, masked_sum, masked_var


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE-leave-one-out advantages ``A_i = r_i − mean_{j≠i} r_j`` within each prompt.

    ``rewards``: [B·k] (grouped contiguously, see module doc) or [B, k]; the result has the same
    shape. Equivalently ``A_i = k/(k−1) · (r_i − mean_j r_j)``. The baseline excludes ``r_i``, so
    it is independent of sample ``i`` and the gradient estimate stays unbiased.
    """
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got k={k}")
    if rewards.dim() == 1:
        if rewards.numel() % k != 0:
            raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of k={k}")
        grouped = rewards.reshape(-1, k)
    elif rewards.dim() == 2 and rewards.size(1) == k:
        grouped = rewards
    else:
        raise ValueError(f"rewards must be [B*k] or [B, k] with k={k}; got {tuple(rewards.shape)}")
    leave_one_out_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - leave_one_out_mean).reshape(rewards.shape)


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``G_t = Σ_{t'≥t} r_{t'}`` over the valid positions of each row; 0 elsewhere. [B, T] → [B, T]."""
    rewards = rewards * mask.to(rewards.dtype)
    return rewards.flip(-1).cumsum(-1).flip(-1) * mask.to(rewards.dtype)


def positionwise_rloo(returns: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out baseline per position: ``G_{i,t} − mean_{j≠i} G_{j,t}`` within each prompt's
    k contiguous rows (0 past a row's end counts as its return there). [B·k, T] → [B·k, T]."""
    n, width = returns.shape
    grouped = returns.reshape(n // k, k, width).transpose(1, 2).reshape(-1, k)
    return rloo_advantages(grouped, k).reshape(n // k, width, k).transpose(1, 2).reshape(n, width)


def _sequence_logps(logps: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, T] token log-probs + mask → [B] summed; [B] sequence log-probs pass through."""
    if mask is None:
        if logps.dim() != 1:
            raise ValueError(f"token log-probs {tuple(logps.shape)} need a mask; pass [B] to skip it")
        return logps
    if logps.shape != mask.shape:
        raise ValueError(f"log-probs {tuple(logps.shape)} and mask {tuple(mask.shape)} differ")
    return masked_sum(logps, mask, dim=-1)


def _mean(values: torch.Tensor, denominator: Optional[Union[float, torch.Tensor]]) -> torch.Tensor:
    return values.mean() if denominator is None else values.sum() / denominator


def policy_gradient_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    denominator: Optional[Union[float, torch.Tensor]] = None,
) -> torch.Tensor:
    """REINFORCE loss ``mean_b[−A_b · log π(y_b | x_b)]``.

    ``logps``: [B] sequence log-probs, or [B, T] token log-probs with ``mask`` (summed over
    response tokens). ``advantages``: [B], detached here. Its gradient is the sequence-level
    score-function estimate ``−mean_b A_b ∇log π(y_b|x_b)``.
    """
    sequence_logps = _sequence_logps(logps, mask)
    if advantages.shape != sequence_logps.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B] = {tuple(sequence_logps.shape)}")
    return _mean(-advantages.detach() * sequence_logps, denominator)


class PPOClipOutput(NamedTuple):
    """``loss`` to minimise; ``clip_fraction``: share of units (tokens or sequences) where the
    clipped term is the larger loss, i.e. clipping binds and the gradient is zero;
    ``approx_kl``: mean ``(ρ − 1) − log ρ`` with ``ρ = π_new / π_old`` (k3 estimate of
    KL(π_old ‖ π_new) per unit, for samples drawn from π_old). The last two are detached."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def ppo_clip_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    clip_eps: float = 0.2,
    level: Literal["token", "sequence"] = "token",
    denominator: Optional[Union[float, torch.Tensor]] = None,
) -> PPOClipOutput:
    """PPO-clip: ``max(−ρ A, −clip(ρ, 1 − ε, 1 + ε) A)`` = ``−min(ρ A, clip(ρ) A)``.

    ``level="token"``: ``ρ_t = exp(logp_new_t − logp_old_t)`` per token of [B, T] arrays, the
    sequence advantage ``A_b`` broadcast over its tokens (or per-token advantages ``A_{b,t}``
    given as [B, T], e.g. reward-to-go), loss = masked mean over all tokens.
    ``level="sequence"``: ``ρ_b = exp(Σ_t logp_new − Σ_t logp_old)`` over response tokens (or
    [B] sequence log-probs with ``mask=None``), loss = mean over sequences.

    ``logp_old`` and ``advantages`` are constants (detached). At ``ρ = 1`` the sequence-level
    gradient equals ``policy_gradient_loss``'s; the token-level one is the same sum of
    ``A_b ∇log π(y_t|s_t)`` divided by the number of tokens instead of sequences.
    """
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be positive, got {clip_eps}")
    logp_old = logp_old.detach()
    advantages = advantages.detach()
    if level == "token":
        if mask is None or logp_new.dim() != 2:
            raise ValueError("token-level PPO needs [B, T] log-probs and a [B, T] mask")
        if logp_new.shape != logp_old.shape or logp_new.shape != mask.shape:
            raise ValueError(
                f"logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)} and "
                f"mask {tuple(mask.shape)} must match"
            )
        if advantages.shape == logp_new.shape[:1]:
            advantages = advantages.unsqueeze(-1)  # one advantage per sequence, on every token
        elif advantages.shape != logp_new.shape:
            raise ValueError(f"advantages must be [B] or [B, T]; got {tuple(advantages.shape)}")
        log_ratio = logp_new - logp_old
        unit_mask = mask
    elif level == "sequence":
        log_ratio = _sequence_logps(logp_new, mask) - _sequence_logps(logp_old, mask)
        if advantages.shape != log_ratio.shape:
            raise ValueError(f"advantages {tuple(advantages.shape)} must be [B] = {tuple(log_ratio.shape)}")
        unit_mask = torch.ones_like(log_ratio)
    else:
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")

    ratio = log_ratio.exp()
    unclipped_loss = -ratio * advantages
    clipped_loss = -ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    per_unit_loss = torch.maximum(unclipped_loss, clipped_loss)
    if denominator is None:
        loss = masked_mean(per_unit_loss, unit_mask)
    else:
        loss = masked_sum(per_unit_loss, unit_mask) / denominator
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_loss > unclipped_loss).to(per_unit_loss.dtype), unit_mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, unit_mask)
    return PPOClipOutput(loss, clip_fraction, approx_kl)


def whiten(
    values: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(x − mean) / sqrt(var + eps)`` over the valid entries (biased variance).

    ``shift_mean=False`` adds the mean back: the spread is normalised, the mean is kept (TRL's
    convention for rewards). Invalid entries are transformed too; mask them downstream.
    """
    if mask is None:
        mask = torch.ones_like(values)
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + eps)
    # As in TRL: without the shift the mean is added back, so only the spread is normalised.
    return whitened if shift_mean else whitened + mean


def shape_rewards(
    seq_rewards: torch.Tensor, kl_per_token: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """KL in the reward: ``r_b − β Σ_t kl_{b,t}`` over response tokens; [B] in, [B] out.

    ``kl_per_token`` is a per-token estimate (``kl.kl_penalty``) of KL(π ‖ π_ref) on the sampled
    tokens. The result carries no gradient: in REINFORCE/PPO the shaped reward is a constant.
    """
    if kl_per_token.shape != mask.shape or seq_rewards.shape != kl_per_token.shape[:1]:
        raise ValueError(
            f"seq_rewards {tuple(seq_rewards.shape)} must be [B] and kl_per_token "
            f"{tuple(kl_per_token.shape)} / mask {tuple(mask.shape)} [B, T]"
        )
    return (seq_rewards - beta * masked_sum(kl_per_token, mask, dim=-1)).detach()


__all__ = [
    "PPOClipOutput",
    "policy_gradient_loss",
    "positionwise_rloo",
    "ppo_clip_loss",
    "reward_to_go",
    "rloo_advantages",
    "shape_rewards",
    "whiten",
]
