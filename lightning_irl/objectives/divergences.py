"""Discriminator-based IRL: the reward table for f-divergences, and the discriminator's losses.

Conventions
-----------
- A discriminator outputs a logit ``h`` per (prompt, response) or per prefix; ``D = σ(h)`` is its
  probability that the sample is from the expert. It is trained with binary cross-entropy,
  expert = 1, policy = 0, i.e. ``max E_E[log D] + E_π[log(1 − D)]``. At the optimum
  ``h = log d_E − log d_π``.
- Divergences are written ``D_f(d_E ‖ d_π) = E_π[f(u)]`` with ``u = d_E / d_π = e^h``.
  The policy *minimises* ``D_f``; the reward whose score-function gradient does it is

      r = u·f'(u) − f(u),       E_π[r ∇_θ log π_θ] = −∇_θ D_f(d_E ‖ π_θ)

  with ``r`` treated as a fixed number (detached) at the current θ. Derivation:
  ``∇ Σ π f(d_E/π) = Σ ∇π·f(u) + Σ π f'(u)·(−u ∇π/π) = −Σ π (u f'(u) − f(u)) ∇log π``.
  Adding a constant to ``r`` changes nothing in expectation (``E_π[c ∇log π] = 0``), so the
  closed-form rewards below drop constants (each entry records the constant it dropped).

The table (``DIVERGENCES``), ``h`` the discriminator logit:

=====================  ========================================  =====================  ==========
name                   f(u)                                      reward (closed form)   dropped
=====================  ========================================  =====================  ==========
``reverse_kl`` (AIRL)  ``−log u``  → KL(d_π ‖ d_E)               ``h``                  ``−1``
``forward_kl``         ``u log u`` → KL(d_E ‖ d_π)               ``e^h``                ``0``
``js`` (GAIL)          ``u log u − (1+u) log(1+u)``              ``softplus(h)``        ``0``
``chi2`` (Pearson)     ``(u − 1)²`` → Σ (d_E − d_π)² / d_π       ``e^{2h}``             ``−1``
``squared_hellinger``  ``(√u − 1)²`` → Σ (√d_E − √d_π)²          ``e^{h/2}``            ``−1``
=====================  ========================================  =====================  ==========

Notes on the entries:
- ``js``: this f is the GAN one, ``D_f = 2·JS(d_E, d_π) − log 4`` (JS with the natural log and
  the ½ weights). ``u f' − f = log(1 + u) = softplus(h) = −log(1 − D)``: the GAIL reward. With the
  textbook JS f (half of this, plus a linear term) the reward is ``½ softplus(h) − ½ log 2``:
  same gradient direction, half the scale. The other common GAIL reward, ``log D =
  −softplus(−h)``, is a *different* reward and is not used here.
- ``forward_kl``: the reward ``e^h`` is an importance weight ``d_E / d_π``; it is unbounded and
  high-variance, so ``divergence_reward`` takes a ``log_ratio_clip`` that clamps ``h`` first.
  (Forward KL is usually better minimised directly: it is SFT.)
- Total variation (``f = |u − 1| / 2``) is left out: ``f`` is not differentiable at ``u = 1``.

Adding a divergence is one table entry with just ``f``: its reward is then computed by
``reward_from_f`` (autograd); a closed form is an optional speed-up, tested against the rule.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F


def reward_from_f(f: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """The general rule ``r = u f'(u) − f(u)`` at ``u = e^h``, by autograd, elementwise.

    ``f`` must act elementwise. It uses ``u f'(u) = d/dh f(e^h)``, so the derivative is taken with
    respect to ``h``. Gradients flow to ``h`` only if ``h`` already requires grad (the derivative
    graph is kept then); otherwise the result is a plain tensor.
    """
    keep_graph = h.requires_grad
    with torch.enable_grad():
        log_ratio = h if keep_graph else h.detach().requires_grad_(True)
        f_of_u = f(log_ratio.exp())
        (u_times_f_prime,) = torch.autograd.grad(f_of_u.sum(), log_ratio, create_graph=keep_graph)
        reward = u_times_f_prime - f_of_u
    return reward if keep_graph else reward.detach()


@dataclass(frozen=True)
class Divergence:
    """One row of the reward table.

    ``f`` defines ``D_f(d_E ‖ d_π) = E_π[f(d_E / d_π)]`` (elementwise torch function of ``u``).
    ``closed_form_reward`` (optional) equals ``u f'(u) − f(u)`` minus ``dropped_constant``.
    """

    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    closed_form_reward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    dropped_constant: float = 0.0

    def reward(self, h: torch.Tensor) -> torch.Tensor:
        """Reward for discriminator logit ``h`` (closed form if known, else the autograd rule)."""
        if self.closed_form_reward is not None:
            return self.closed_form_reward(h)
        return reward_from_f(self.f, h)


DIVERGENCES: dict[str, Divergence] = {
    entry.name: entry
    for entry in (
        Divergence("reverse_kl", f=lambda u: -torch.log(u), closed_form_reward=lambda h: h,
                   dropped_constant=-1.0),
        Divergence("forward_kl", f=lambda u: u * torch.log(u), closed_form_reward=torch.exp),
        Divergence("js", f=lambda u: u * torch.log(u) - (1 + u) * torch.log1p(u),
                   closed_form_reward=F.softplus),
        Divergence("chi2", f=lambda u: (u - 1) ** 2, closed_form_reward=lambda h: torch.exp(2 * h),
                   dropped_constant=-1.0),
        Divergence("squared_hellinger", f=lambda u: (torch.sqrt(u) - 1) ** 2,
                   closed_form_reward=lambda h: torch.exp(h / 2), dropped_constant=-1.0),
    )
}


#: The table's row names, as a type: configs list them in ``--help`` and reject other values.
DivergenceName = Literal["reverse_kl", "forward_kl", "js", "chi2", "squared_hellinger"]
assert set(typing.get_args(DivergenceName)) == set(DIVERGENCES), "DivergenceName must name every row"


def get_divergence(name: str) -> Divergence:
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(
            f"unknown divergence {name!r}; expected one of {sorted(DIVERGENCES)}"
        ) from None


def divergence_reward(
    name: str, h: torch.Tensor, log_ratio_clip: Optional[float] = None
) -> torch.Tensor:
    """Reward for the divergence ``name`` from discriminator logits ``h`` (any shape).

    ``log_ratio_clip``: if given, ``h`` is clamped to ``[−clip, clip]`` first. That bounds the
    importance weight of ``forward_kl`` by ``e^clip`` (and likewise ``chi2``/``hellinger``); the
    clamp also stops the discriminator's extreme logits from dominating a batch for any entry.
    """
    divergence = get_divergence(name)
    if log_ratio_clip is not None:
        if log_ratio_clip <= 0:
            raise ValueError(f"log_ratio_clip must be positive, got {log_ratio_clip}")
        h = h.clamp(-log_ratio_clip, log_ratio_clip)
    return divergence.reward(h)


def token_rewards_from_prefix_logits(
    h_prefix: torch.Tensor,
    mask: torch.Tensor,
    divergence: str = "reverse_kl",
    log_ratio_clip: Optional[float] = None,
) -> torch.Tensor:
    """Per-token rewards from a discriminator logit per response prefix: [B, T] → [B, T].

    ``h_prefix[b, t] ≈ log d_E(y_≤t | x) − log d_π(y_≤t | x)`` is the logit of the prefix that
    *ends* with the response token at position ``t``; ``mask[b, t] = 1`` where position ``t`` is a
    response token (same alignment). Valid positions are normally contiguous (left- or
    right-padded alike); gaps are allowed: each valid position looks back to the previous valid one.

    With ``g = divergence_reward(divergence, ·)``: ``r_t = g(h_t) − g(h_{t'})`` where ``t'`` is the
    previous valid position, and the first response token gets ``r = g(h_1)``. So
    ``Σ_t r_t = g(h_T)``: exactly the sequence-level reward of the whole response. Summing
    ``g(h_t)`` instead would count each prefix many times.

    Why differences: ``g(h_{t−1})`` is a function of the state ``s_t = (x, y_<t)`` only, so this is
    potential-based shaping of the sequence reward; the reward-to-go from step ``t`` differs from
    ``g(h_T)`` by a state-dependent baseline, and the policy gradient is unchanged. For reverse KL
    ``g(h) = h`` and ``r_t = h_t − h_{t−1}`` with ``h_0 = 0`` (the empty prefix has ratio 1).
    For other divergences ``g(0) ≠ 0``; the empty-prefix term is dropped (a per-sequence constant)
    so the sum matches the sequence reward. Invalid positions get 0.
    """
    if h_prefix.shape != mask.shape or h_prefix.dim() != 2:
        raise ValueError(
            f"h_prefix and mask must both be [B, T]; got {tuple(h_prefix.shape)} and {tuple(mask.shape)}"
        )
    valid = mask.bool()
    prefix_reward = divergence_reward(divergence, h_prefix, log_ratio_clip)
    positions = torch.arange(h_prefix.size(1), device=h_prefix.device).expand_as(h_prefix)
    last_valid_so_far = torch.where(valid, positions, -1).cummax(dim=1).values
    previous_valid = torch.cat(
        [torch.full_like(last_valid_so_far[:, :1], -1), last_valid_so_far[:, :-1]], dim=1
    )
    previous_reward = torch.where(
        previous_valid >= 0,
        prefix_reward.gather(1, previous_valid.clamp(min=0)),
        torch.zeros_like(prefix_reward),
    )
    return torch.where(valid, prefix_reward - previous_reward, torch.zeros_like(prefix_reward))


def log_ratio_prefix_logits(
    q_token_logps: torch.Tensor,
    policy_token_logps: torch.Tensor,
    shifted_mask: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Prefix logits of the *log-ratio* discriminator ``h = a·(log q_φ − log π) + b``: [B, T−1] → [B, T].

    ``q_token_logps`` / ``policy_token_logps`` are shifted per-token log-probs ([B, T−1], entry
    ``t`` scores token ``t+1``) of the same rows under a trainable causal LM ``q_φ`` and under the
    policy (no gradient); ``shifted_mask`` = ``loss_mask[:, 1:]``. Entry ``t`` of the result scores
    the prefix that ends at token ``t``: ``h_t = b + a·Σ_{s ≤ t, s response} (log q − log π)(y_s)``,
    so prompt positions hold ``b`` and the last real token holds the sequence logit
    ``a·(log q(y|x) − log π(y|x)) + b``. The scale ``a`` (1 at the optimum ``q = d_E``) and the
    offset ``b`` calibrate an imperfect ``q`` (Platt scaling): with ``a < 1`` a noisy ratio is
    trusted less. Consecutive differences are the per-token log-ratios, which
    is what ``token_rewards_from_prefix_logits`` gives back for ``reverse_kl``.

    Why this form: the optimal discriminator logit is ``log d_E − log d_π``; writing it with an LM
    head makes "how likely is each token of this answer under an expert-like model" the quantity
    learned, which a causal LM already computes token by token, where a fresh scalar head on a
    classifier has to discover it from one bit per sequence. With ``q`` started at ``π`` it starts
    at ``h = b``, exactly the "cannot tell them apart" discriminator.
    """
    if q_token_logps.shape != policy_token_logps.shape or q_token_logps.shape != shifted_mask.shape:
        raise ValueError(
            f"q / policy log-probs and mask must share one [B, T-1] shape; got {tuple(q_token_logps.shape)}, "
            f"{tuple(policy_token_logps.shape)}, {tuple(shifted_mask.shape)}"
        )
    ratio = (q_token_logps - policy_token_logps.detach()) * shifted_mask.to(q_token_logps.dtype)
    return bias + scale * F.pad(ratio.cumsum(-1), (1, 0))


def bce_sum(logits: torch.Tensor, target: float) -> torch.Tensor:
    """``Σ BCE-with-logits(h, target)`` against a constant target: ``softplus(−h)`` summed for
    target 1, ``softplus(h)`` for target 0. A sum, so a caller can normalise micro-batches and
    ranks by the global count (one side of ``bce_discriminator_loss``)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="sum")


def bce_discriminator_loss(
    expert_logits: torch.Tensor, policy_logits: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Discriminator loss, expert = 1: ``mean_E[−log σ(h)] + mean_π[−log(1 − σ(h))]``.

    The negative of the GAN objective ``E_E[log D] + E_π[log(1 − D)]`` (a sum of two means, so the
    two batches may differ in size and each side weighs the same). Minimised at
    ``h = log d_E − log d_π``. ``label_smoothing = ε`` uses targets ``1 − ε`` for expert and ``ε``
    for policy samples (two-sided smoothing).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    expert_loss = bce_sum(expert_logits, 1.0 - label_smoothing) / expert_logits.numel()
    policy_loss = bce_sum(policy_logits, label_smoothing) / policy_logits.numel()
    return expert_loss + policy_loss


@dataclass(frozen=True)
class DiscriminatorAccuracy:
    """Fractions classified right: ``expert`` (h > 0 on expert), ``policy`` (h < 0 on policy
    samples), ``overall`` (pooled over all samples). ``h = 0`` counts as wrong on both sides."""

    expert: torch.Tensor
    policy: torch.Tensor
    overall: torch.Tensor


@torch.no_grad()
def discriminator_accuracy(
    expert_logits: torch.Tensor, policy_logits: torch.Tensor
) -> DiscriminatorAccuracy:
    expert_right = (expert_logits > 0).float()
    policy_right = (policy_logits < 0).float()
    return DiscriminatorAccuracy(
        expert=expert_right.mean(),
        policy=policy_right.mean(),
        overall=torch.cat([expert_right.flatten(), policy_right.flatten()]).mean(),
    )


def r1_penalty(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """R1-style gradient penalty ``mean_b ‖∇_{inputs_b} h_b‖²`` (differentiable).

    ``logits``: [B] discriminator logits computed from ``inputs`` ([B, ...], e.g. embeddings, with
    ``requires_grad``). Assumes sample ``b``'s logit depends only on ``inputs[b]`` (no batch-level
    mixing), so the gradient of ``Σ_b h_b`` splits per sample. Usually applied to expert samples
    (Mescheder et al. 2018); the caller scales it by ``γ / 2``.
    """
    if not inputs.requires_grad:
        raise ValueError("r1_penalty needs inputs that require grad (the tensor the logits came from)")
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad.pow(2).reshape(grad.size(0), -1).sum(dim=1).mean()


__all__ = [
    "DIVERGENCES",
    "Divergence",
    "DiscriminatorAccuracy",
    "DivergenceName",
    "bce_discriminator_loss",
    "bce_sum",
    "discriminator_accuracy",
    "divergence_reward",
    "get_divergence",
    "log_ratio_prefix_logits",
    "r1_penalty",
    "reward_from_f",
    "token_rewards_from_prefix_logits",
]
