"""Metrics against a known expert, as torchmetrics ``Metric`` classes.

Thin wrappers over ``metrics.functional``: every state is a sum (``dist_reduce_fx="sum"``), so the
value computed after a DDP all-reduce equals the value of one process that saw every sample.
Each ``update`` takes samples' log-probabilities (or modes) directly, so the classes are testable
without a model. Definitions, smoothing and thresholds: ``lightning_irl.metrics.functional``.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch
from torchmetrics import Metric

from lightning_irl.metrics.functional import (
    COVERAGE_THRESHOLD,
    expert_mode_weights,
    forward_kl_terms,
    invalid,
    mean_and_se,
    mode_counts,
    mode_coverage,
    reverse_kl_terms,
)


def _nan() -> torch.Tensor:
    return torch.tensor(float("nan"))


class _WeightedMean(Metric):
    """Σ w·value / Σ w with summed states."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")

    def _add(self, values: torch.Tensor, weight=None) -> None:
        values = values.to(self.total.device, torch.float32).reshape(-1)
        if weight is None:
            w = torch.ones_like(values)
        else:
            w = torch.as_tensor(weight, dtype=torch.float32, device=values.device).reshape(-1)
        self.total += (values * w).sum()
        self.weight += w.sum()

    def compute(self) -> torch.Tensor:
        if self.weight <= 0:
            return _nan()
        return self.total / self.weight


class ForwardKL(_WeightedMean):
    """KL(p_E‖π): weighted mean of ``log p_E(y|x) − log π(y|x)``.

    With ``weight = p_E(y|x)`` over every answer of each prompt's support (what the evaluation
    does) it is the exact KL averaged over prompts; without weights, a Monte Carlo estimate from
    expert samples.
    """

    higher_is_better = False

    def update(self, expert_logp, policy_logp, weight: Optional[Sequence[float]] = None) -> None:
        self._add(forward_kl_terms(expert_logp, policy_logp), weight)


class ReverseKL(Metric):
    """KL(π‖p̃_E) from policy samples, against the expert smoothed with a random typist (see
    ``metrics.functional``): the mean of ``log π(y|x) − log p̃_E(y|x)``, with its standard error.

    ``update(policy_logp, smoothed_logp)`` takes log p̃_E already computed
    (``functional.smoothed_expert_logp``). ``compute`` returns
    ``{"reverse_kl": mean, "reverse_kl_se": standard error}``; the states are Σ, Σ of squares and
    the count, so both survive a DDP all-reduce.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("total_sq", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")

    def update(self, policy_logp, smoothed_logp) -> None:
        terms = reverse_kl_terms(policy_logp, smoothed_logp).to(self.total.device).reshape(-1)
        self.total += terms.sum()
        self.total_sq += (terms * terms).sum()
        self.count += terms.numel()

    def compute(self) -> Dict[str, torch.Tensor]:
        mean, se = mean_and_se(self.total, self.total_sq, self.count)
        return {"reverse_kl": mean.float(), "reverse_kl_se": se.float()}


class ValidReverseKL(Metric):
    """KL(π(·|x, valid) ‖ p_E(·|x)): the reverse KL of the policy *conditioned on staying inside
    the expert's support*, a true KL (≥ 0, no smoothing), complementary to ``InvalidMass``.

    ``update(policy_logp, expert_logp)`` with the string-level log p_E (−inf outside the
    support). Estimated as ``mean_valid[log π(y|x) − log p_E(y|x)] − log V`` with ``V`` the
    valid share of the samples (consistent; assumes V is about the same across prompts).
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("valid", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("samples", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, policy_logp, expert_logp) -> None:
        ok = 1.0 - invalid(expert_logp).to(self.total.device)
        policy = torch.as_tensor(policy_logp, dtype=torch.float32).detach().to(self.total.device)
        terms = policy - torch.as_tensor(expert_logp, dtype=torch.float32).to(self.total.device)
        self.total += torch.where(ok > 0, terms, torch.zeros_like(terms)).sum()
        self.valid += ok.sum()
        self.samples += ok.numel()

    def compute(self) -> torch.Tensor:
        if self.valid <= 0:
            return _nan()
        return self.total / self.valid - torch.log(self.valid / self.samples)


class InvalidMass(_WeightedMean):
    """Share of policy samples outside the expert's support (``expert_logp`` = −inf)."""

    higher_is_better = False

    def update(self, expert_logp) -> None:
        self._add(invalid(expert_logp))


class PolicyEntropy(_WeightedMean):
    """Entropy estimate of the policy's response distribution: ``−mean log π(y|x)`` over its own
    samples, in nats per response."""

    def update(self, policy_logp) -> None:
        self._add(-torch.as_tensor(policy_logp, dtype=torch.float32).detach())


class ModeMass(Metric):
    """Per-mode mass of the policy and mode coverage.

    ``update(modes, expert_weights)``: for each policy sample, the expert mode it falls in (None
    when in none) and the expert's mode weights for that sample's prompt. ``compute`` returns
    ``{"mode_coverage": ..., "mass_<mode>": ...}`` where ``mass_<mode>`` is the share of samples
    in that mode and ``mode_coverage`` is the share of modes whose policy mass reaches
    ``threshold`` × their expert weight (averaged over the same prompts).

    Args:
        modes: Names of the expert's modes (fixed: they size the states).
        threshold: Fraction of a mode's expert weight the policy must give it to cover it.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, modes: Sequence[str], threshold: float = COVERAGE_THRESHOLD, **kwargs) -> None:
        super().__init__(**kwargs)
        if not modes:
            raise ValueError("ModeMass needs at least one mode name")
        self.modes = list(modes)
        self.threshold = threshold
        size = len(self.modes)
        self.add_state("policy_counts", default=torch.zeros(size, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("expert_weights", default=torch.zeros(size, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("samples", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")

    def update(self, modes: Sequence[Optional[str]], expert_weights: Sequence[Mapping[str, float]]) -> None:
        if len(modes) != len(expert_weights):
            raise ValueError("one expert-weight mapping per sample is needed")
        device = self.policy_counts.device
        self.policy_counts += mode_counts(modes, self.modes).to(device, torch.float32)
        self.expert_weights += expert_mode_weights(expert_weights, self.modes).to(device, torch.float32)
        self.samples += len(modes)

    def compute(self) -> Dict[str, torch.Tensor]:
        if self.samples <= 0:
            return {"mode_coverage": _nan(), **{f"mass_{m}": _nan() for m in self.modes}}
        policy = self.policy_counts / self.samples
        expert = self.expert_weights / self.samples
        out = {"mode_coverage": mode_coverage(policy, expert, self.threshold)}
        out.update({f"mass_{m}": policy[i] for i, m in enumerate(self.modes)})
        return out
