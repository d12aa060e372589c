"""IQ-Learn for language models (Wulfmeier et al. 2024), offline χ²-regularised form.

The language model's logits are read as soft Q-values: ``Q(s_t, a) = logits[t, a]``, so

    V(s)       = logsumexp_a Q(s, a)                  (soft value)
    π(a | s)   = exp(Q(s, a) − V(s))                  (the usual softmax policy)
    r_t        = Q(s_t, a_t) − γ·V(s_{t+1})           (implied token reward, inverse Bellman)

Because ``log π(a|s) + V(s) = Q(s, a)``, the χ²-regularised objective on demonstrations

    E_E[ −log π(a_t|s_t) + λ·(log π(a_t|s_t) + V(s_t) − γ·V(s_{t+1}))² ]

is SFT plus ``λ·r_t²``. With ``λ = 0`` it is exactly the SFT loss (same value, same gradient).

Shift convention (see ``logprobs``): ``logits`` is [B, T-1, V] and ``targets``/``mask`` are
[B, T-1]; position ``t`` holds the state ``s_t`` and predicts ``a_t = targets[t]``. The state
after taking ``a_t`` is ``s_{t+1}``, whose Q-values are ``logits[t+1]``.

Terminal states: ``V(s_{t+1}) = 0`` whenever position ``t+1`` is not a loss position (or does not
exist), i.e. after the last response token of each sequence (normally EOS). Consequences:
- logits, targets at positions with ``mask = 0`` are never read into the value (changing them
  changes nothing);
- a gap in the mask (e.g. a user turn between two assistant turns) ends an episode;
- a response cut by the length cap rather than EOS is also treated as terminal — an approximation.

The gradient flows through both ``Q(s_t, a_t)`` and ``V(s_{t+1})`` (full gradient, not a
semi-gradient / target network).

Normalisation matches SFT: sums over loss tokens divided by ``num_loss_tokens`` (defaults to the
number of loss tokens in this batch); callers pass the global count so gradient accumulation and
DDP give the gradient of one large batch.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from lightning_irl.objectives.logprobs import per_loss_token


class IQLearnOutput(NamedTuple):
    loss: torch.Tensor  # scalar: nll + penalty (attached)
    implied_rewards: torch.Tensor  # [B, T-1] r_t = Q(s_t,a_t) − γ V(s_{t+1}), 0 off-mask, detached
    nll: torch.Tensor  # scalar: Σ −log π(a_t|s_t) / num_loss_tokens, detached
    penalty: torch.Tensor  # scalar: λ·Σ r_t² / num_loss_tokens, detached (loss = nll + penalty)


def _work_dtype(x: torch.Tensor) -> torch.Tensor:
    # float32 at least (bf16 logsumexp over a vocabulary loses the differences the reward is made of);
    # float64 stays float64.
    return x if x.dtype == torch.float64 else x.float()


def next_state_values(values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``γ·V(s_{t+1})`` for every position: ``values[:, t+1]`` where both ``t`` and ``t+1`` are loss
    positions, else 0 (terminal). ``values`` and ``mask`` are [B, T-1]."""
    mask = mask.bool()
    next_valid = torch.zeros_like(mask)
    next_valid[:, :-1] = mask[:, :-1] & mask[:, 1:]
    shifted = torch.zeros_like(values)
    shifted[:, :-1] = values[:, 1:]
    return gamma * torch.where(next_valid, shifted, torch.zeros_like(shifted))


def implied_rewards(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                    gamma: float = 1.0) -> torch.Tensor:
    """``r_t = Q(s_t, a_t) − γ·V(s_{t+1})`` at loss positions (0 elsewhere), differentiable:
    [B, T-1, V] logits, [B, T-1] targets and mask → [B, T-1] in float32 (at least)."""
    mask_b = mask.bool()
    work = _work_dtype(logits)
    safe_targets = targets.masked_fill(~mask_b, 0).long()
    q_taken = work.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # Q(s_t, a_t)
    values = torch.logsumexp(work, dim=-1)  # V(s_t)
    rewards = q_taken - next_state_values(values, mask_b, gamma)
    return torch.where(mask_b, rewards, torch.zeros_like(rewards))


def iq_learn_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    lam: float = 1.0,
    gamma: float = 1.0,
    num_loss_tokens: Optional[Union[int, float, torch.Tensor]] = None,
) -> IQLearnOutput:
    """Offline IQ-Learn (χ²) loss on demonstration tokens.

    Args:
        logits: [B, T-1, V] shifted next-token logits (= Q-values), position ``t`` predicts
            ``targets[:, t]``.
        targets: [B, T-1] demonstrated tokens; values at ``mask = 0`` are ignored (may be -100).
        mask: [B, T-1] 1 at loss (response) positions, 0 at prompt/padding.
        lam: weight λ ≥ 0 of the squared implied reward.
        gamma: discount γ applied to ``V(s_{t+1})``.
        num_loss_tokens: denominator; defaults to ``mask.sum()`` (at least 1).
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    mask_b = mask.bool()
    work = _work_dtype(logits)
    safe_targets = targets.masked_fill(~mask_b, 0).long()

    # −log π(a_t|s_t): the very expression SFT uses (logprobs.gather_token_logprobs), so λ=0 is SFT.
    nll_tok = F.cross_entropy(
        work.reshape(-1, work.size(-1)), safe_targets.reshape(-1), reduction="none"
    ).view_as(safe_targets)
    nll_sum = torch.where(mask_b, nll_tok, torch.zeros_like(nll_tok)).sum()
    rewards = implied_rewards(work, targets, mask_b, gamma)
    sq_sum = (rewards * rewards).sum()

    nll = per_loss_token(nll_sum, mask_b, num_loss_tokens)
    penalty = lam * per_loss_token(sq_sum, mask_b, num_loss_tokens)
    loss = nll + penalty
    return IQLearnOutput(
        loss=loss,
        implied_rewards=rewards.detach(),
        nll=nll.detach(),
        penalty=penalty.detach(),
    )
