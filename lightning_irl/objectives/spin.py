"""SPIN / IRFT self-play loss (Chen et al. 2024; Li et al. NeurIPS 2024), DPO's sigmoid form.

The implicit reward of a response is ``r(y) = β·(log π_θ(y|x) − log π_t(y|x))`` where ``π_t`` is the
*opponent*: the previous iterate, frozen, which also generated ``y_gen``. The loss pushes the
demonstration's implicit reward above the self-generated one:

    z = r(y_demo) − r(y_gen)
      = β·[(log π_θ(y_demo) − log π_t(y_demo)) − (log π_θ(y_gen) − log π_t(y_gen))]
    loss = mean_b ℓ(z_b)

- ``"sigmoid"`` (default): ``ℓ(z) = log(1 + e^{−z}) = −log σ(z)``; with ``label_smoothing = ε``
  it is DPO's conservative form ``−(1−ε)·log σ(z) − ε·log σ(−z)``.
- ``"hinge"``: ``ℓ(z) = max(0, 1 − z)`` (SLiC / TRL's DPO ``"hinge"``; β acts as ``1/margin``).

"chosen" is the demonstration, "rejected" the opponent's generation. Log-probs are *sequence*
log-probs: summed over response tokens (EOS included), the same convention as DPO's sigmoid loss
(see ``logprobs.sequence_logprobs``). With the opponent equal to the policy (iteration start),
``z = 0`` and the sigmoid loss is ``log 2``.

The reward statistics mirror TRL's DPO metrics ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins`` and ``rewards/accuracies`` (a strict ``chosen > rejected``, so ties count as 0).
"""

from __future__ import annotations

import typing
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

SPINLossType = Literal["sigmoid", "hinge"]
SPIN_LOSS_TYPES = typing.get_args(SPINLossType)


class SPINOutput(NamedTuple):
    loss: torch.Tensor  # scalar: mean over the batch of the per-pair losses
    losses: torch.Tensor  # [B] per-pair losses (attached to the graph)
    chosen_rewards: torch.Tensor  # [B] β·(π_chosen − opp_chosen), detached
    rejected_rewards: torch.Tensor  # [B] β·(π_rejected − opp_rejected), detached
    margins: torch.Tensor  # [B] chosen_rewards − rejected_rewards, detached (= z)
    accuracies: torch.Tensor  # [B] float, 1.0 where chosen_rewards > rejected_rewards


def spin_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    opponent_chosen_logps: torch.Tensor,
    opponent_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> SPINOutput:
    """SPIN loss from sequence log-probs, each of shape [B].

    ``policy_*`` come from the model being trained, ``opponent_*`` from the frozen previous iterate
    ``π_t`` (pass them detached or computed under ``no_grad``). ``chosen`` = demonstration,
    ``rejected`` = the opponent's own sample for the same prompt.
    """
    if loss_type not in SPIN_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {SPIN_LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "hinge" and label_smoothing != 0.0:
        raise ValueError("label_smoothing applies to the sigmoid loss only")

    chosen_logratios = policy_chosen_logps - opponent_chosen_logps
    rejected_logratios = policy_rejected_logps - opponent_rejected_logps
    z = beta * (chosen_logratios - rejected_logratios)

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(z) * (1.0 - label_smoothing)
        if label_smoothing:
            losses = losses - F.logsigmoid(-z) * label_smoothing
    else:  # hinge
        losses = torch.relu(1.0 - z)

    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return SPINOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=chosen_rewards - rejected_rewards,
        accuracies=(chosen_rewards > rejected_rewards).float(),
    )
