"""Per-token estimators of KL(π ‖ π_ref) from log-probabilities of sampled tokens (Schulman 2020).

With ``δ = log π(a|s) − log π_ref(a|s)`` for a token ``a`` sampled from ``π(·|s)``:

- ``k1 = δ``                  unbiased for KL(π ‖ π_ref); can be negative; high variance.
- ``k2 = δ² / 2``             biased (error O(δ³) for close distributions); always ≥ 0; low variance.
- ``k3 = e^{−δ} − 1 + δ``     unbiased (``E_π[e^{−δ}] = Σ π_ref = 1``) and always ≥ 0. It is
  ``(ρ − 1) − log ρ`` with ``ρ = π_ref / π``. Note ``e^{−δ}`` grows fast when π_ref ≫ π.

Summing a per-token estimator over response tokens estimates the sequence KL (chain rule).

Where the KL goes:
- *in the reward* (``policy_gradient.shape_rewards``): the estimate is a fixed number subtracted
  from the reward; any estimator's expectation is what matters, so k1 (or k3) is the usual choice.
- *in the loss* (``β · masked_mean(kl_penalty(...))`` added by the caller): only the pathwise
  gradient through ``logp`` flows, and the samples' own probability is not differentiated.
  In expectation over ``a ~ π`` that gradient is: k1 → 0 (useless), k2 → ∇KL(π ‖ π_ref)
  (the right one), k3 → ∇KL(π_ref ‖ π) (the *forward* KL's gradient). Use k2 in the loss for
  the reverse KL; the tests prove all three statements by enumeration.
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimate, same shape as ``logp``; tokens must be sampled from π.

    ``logp`` and ``ref_logp`` are log-probabilities of the same sampled tokens under the policy and
    the frozen reference. Masking is the caller's job (padding entries give arbitrary values).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        # expm1 keeps e^{−δ} − 1 accurate when δ ≈ 0, where the two O(δ) terms nearly cancel.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


__all__ = ["KLEstimator", "kl_penalty"]
