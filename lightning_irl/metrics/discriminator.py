"""How good is a learned discriminator? Fidelity against the exact answer on a known-expert task.

On a task whose expert ``p_E`` is known, and with the policy ``π`` known too, the optimal
discriminator logit is exact: ``h*(x, y) = log p_E(y|x) − log π(y|x)`` (``−∞`` outside the
expert's support). So a learned logit ``h`` can be graded on held-out demonstrations (label 1) and
fresh policy samples (label 0):

- ``bce_heldout``: the discriminator's loss on them, ``mean_E softplus(−h) + mean_π softplus(h)``
  (a sum of two means, as in training). A discriminator that cannot tell the sides apart scores
  ``log 4 ≈ 1.386`` (at ``h = 0``).
- ``bce_bayes``: the same loss of ``h*`` on the same samples: the lowest any discriminator can
  reach in expectation (the Bayes-optimal value). A policy sample outside the support costs
  ``h*`` nothing (``softplus(−∞) = 0``).
- ``bayes_gap_closed = (log 4 − bce_heldout) / (log 4 − bce_bayes)``: 0 at chance, 1 at the
  optimum (it can exceed 1 on a finite sample, or go below 0 for a discriminator worse than chance).
- ``corr_exact``: Pearson correlation of ``h`` with ``h*`` over every sample where ``h*`` is
  finite (demonstrations and valid policy samples): does it rank answers as the true ratio does?
  For AIRL the reward *is* ``h``, so this is the reward model's fidelity.
- ``auroc_invalid``: AUROC of ``h`` for telling valid policy samples (label 1) from invalid ones:
  does it at least push down what the expert never says? (torchmetrics ``binary_auroc``.)

On data without a known expert the exact log-ratios are NaN: only ``bce_heldout`` is defined.

The states are concatenated across ranks (``dist_reduce_fx="cat"``), so DDP gives the values of
one process that saw every sample.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.functional import pearson_corrcoef
from torchmetrics.functional.classification import binary_auroc

LOG4 = math.log(4.0)


def balanced_bce(expert_logits: torch.Tensor, policy_logits: torch.Tensor) -> torch.Tensor:
    """``mean_E softplus(−h) + mean_π softplus(h)``: the discriminator loss, expert = 1. Exact
    for infinite logits (``h* = −∞`` on an invalid policy sample costs 0)."""
    expert = F.softplus(-expert_logits.double()).mean()
    policy = F.softplus(policy_logits.double()).mean()
    return (expert + policy).float()


def fidelity(expert_h: torch.Tensor, expert_exact: torch.Tensor, policy_h: torch.Tensor,
             policy_exact: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The five fidelity numbers (see the module docstring) from flat tensors: learned logits and
    exact log-ratios ``log p_E − log π`` of demonstrations and of policy samples."""
    nan = torch.tensor(float("nan"))
    out = {"bce_heldout": nan, "bce_bayes": nan, "bayes_gap_closed": nan, "corr_exact": nan,
           "auroc_invalid": nan}
    if expert_h.numel() and policy_h.numel():
        bce = balanced_bce(expert_h, policy_h)
        bayes = balanced_bce(expert_exact, policy_exact)
        out.update(bce_heldout=bce, bce_bayes=bayes, bayes_gap_closed=(LOG4 - bce) / (LOG4 - bayes))
    h = torch.cat([expert_h, policy_h]).float()
    exact = torch.cat([expert_exact, policy_exact]).float()
    finite = torch.isfinite(exact)
    if int(finite.sum()) >= 2 and float(exact[finite].std()) > 0 and float(h[finite].std()) > 0:
        out["corr_exact"] = pearson_corrcoef(h[finite], exact[finite])
    valid = torch.isfinite(policy_exact)
    if 0 < int(valid.sum()) < valid.numel():
        out["auroc_invalid"] = binary_auroc(policy_h.float(), valid.long())
    return out


class DiscriminatorFidelity(Metric):
    """Accumulates (learned logit, exact log-ratio) pairs of demonstrations and policy samples;
    ``compute`` returns ``fidelity(...)``'s dict (logged as ``disc/<name>``)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("expert_h", "expert_exact", "policy_h", "policy_exact"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, expert_h, expert_exact, policy_h, policy_exact) -> None:
        for name, value in (("expert_h", expert_h), ("expert_exact", expert_exact), ("policy_h", policy_h),
                            ("policy_exact", policy_exact)):
            getattr(self, name).append(torch.as_tensor(value, dtype=torch.float32).detach().reshape(-1).to(self.device))

    def compute(self) -> Dict[str, torch.Tensor]:
        def cat(states) -> torch.Tensor:
            if isinstance(states, torch.Tensor):
                return states.reshape(-1)
            return torch.cat(states) if states else torch.zeros(0)

        return fidelity(cat(self.expert_h), cat(self.expert_exact), cat(self.policy_h), cat(self.policy_exact))


__all__ = ["DiscriminatorFidelity", "LOG4", "balanced_bce", "fidelity"]
