"""IQ-Learn for language models (Wulfmeier et al. 2024), offline χ²-regularised form.

The logits are soft Q-values, ``V(s) = logsumexp Q(s, ·)``, and the implied token reward is
``r_t = Q(s_t, a_t) − γ·V(s_{t+1})`` (``V = 0`` after the last response token). On demonstrations
the objective is SFT plus a χ² penalty on that reward (``objectives.iq_learn.iq_learn_loss``):

    E_E[ −log π(a_t|s_t) + λ·r_t² ]          (λ = 0 is exactly SFT)

Optionally (``policy_sample_weight > 0``) the same penalty is also applied on the policy's own
samples, ``w·λ·E_π[r_t²]``: the χ² regulariser over a mixture of expert and policy data as in
IQ-Learn's online variant. Only the regulariser is added: this is not the full online IQ-Learn
objective (no ``(1−γ)·E[V(s_0)]`` term, no replay buffer). docs/theory.md §4.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from lightning_irl.algorithms.base import BATCH_KEYS, IRLModule, split_micro_batches
from lightning_irl.models.spec import ModelSpec
from lightning_irl.objectives.iq_learn import iq_learn_loss, next_state_values
from lightning_irl.objectives.logprobs import shifted_logits


def implied_rewards(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``Q(s_t,a_t) − γ·V(s_{t+1})`` at loss positions (0 elsewhere), differentiable: [B, T-1].

    The same expression ``iq_learn_loss`` penalises, kept attached to the graph."""
    mask = mask.bool()
    work = logits.float()
    targets = targets.masked_fill(~mask, 0).long()
    q_taken = work.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    values = torch.logsumexp(work, dim=-1)
    rewards = q_taken - next_state_values(values, mask, gamma)
    return torch.where(mask, rewards, torch.zeros_like(rewards))


class IQLearn(IRLModule):
    """Inverse soft-Q learning with the policy's logits as Q (offline, χ² regulariser).

    Args:
        policy: The model being trained; usually an SFT export (``model_name_or_path: <folder>``).
        lam: λ ≥ 0, weight of the squared implied reward. 0 = SFT.
        gamma: Discount γ on ``V(s_{t+1})``.
        policy_sample_weight: w ≥ 0. When > 0 (and λ > 0), sample ``sampling.num_samples``
            responses per prompt from the policy each step and add ``w·λ·Σ r_t² / (global
            sampled tokens)``. Default 0: purely offline.
        **kwargs: ``IRLModule`` arguments (optimizer, micro_batch_size, max_grad_norm, sampling, ...).

    Normalisation: as ``nll_backward``, sums over response tokens × world_size / global loss-token
    count (summed over micro-batches and ranks before the first backward). The policy-sample
    penalty is normalised the same way by the global count of sampled tokens.
    """

    def __init__(
        self,
        policy: ModelSpec,
        lam: float = 1.0,
        gamma: float = 1.0,
        policy_sample_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, **kwargs)
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if policy_sample_weight < 0:
            raise ValueError(f"policy_sample_weight must be >= 0, got {policy_sample_weight}")
        self.lam = lam
        self.gamma = gamma
        self.policy_sample_weight = policy_sample_weight

    def _policy_sample_penalty(self, batch: Dict[str, Any], world: int) -> torch.Tensor:
        rollout = self.rollout(batch, compute_logprobs=False)
        generated = {key: getattr(rollout, key) for key in BATCH_KEYS}
        tokens = self.global_sum(generated["loss_mask"][:, 1:].sum().float()).clamp(min=1)
        scale = self.policy_sample_weight * self.lam * world / tokens
        total = torch.zeros((), device=self.device)
        for micro in split_micro_batches(generated, self.micro_batch_size):
            logits = shifted_logits(self.policy, micro["input_ids"], micro["attention_mask"])
            rewards = implied_rewards(logits, micro["input_ids"][:, 1:], micro["loss_mask"][:, 1:], self.gamma)
            penalty = (rewards * rewards).sum() * scale
            self.manual_backward(penalty)
            total += penalty.detach()
        return total / world

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        self.count_tokens(batch)

        world = self.trainer.world_size
        global_tokens = self.global_sum(batch["loss_mask"][:, 1:].sum().float()).clamp(min=1)
        nll = torch.zeros((), device=self.device)
        penalty = torch.zeros((), device=self.device)
        reward_stats = torch.zeros(3, device=self.device)  # Σ r, Σ r², count
        for micro in split_micro_batches(batch, self.micro_batch_size):
            logits = shifted_logits(self.policy, micro["input_ids"], micro["attention_mask"])
            mask = micro["loss_mask"][:, 1:]
            out = iq_learn_loss(logits, micro["input_ids"][:, 1:], mask, lam=self.lam, gamma=self.gamma,
                                num_loss_tokens=global_tokens)
            self.manual_backward(out.loss * world)
            nll += out.nll
            penalty += out.penalty
            r = out.implied_rewards[mask.bool()]
            reward_stats += torch.stack([r.sum(), (r * r).sum(), torch.tensor(float(r.numel()), device=r.device)])
        total = nll + penalty
        if self.policy_sample_weight > 0 and self.lam > 0:
            policy_penalty = self._policy_sample_penalty(batch, world)
            total = total + policy_penalty
            self.log("train/penalty_policy", policy_penalty, sync_dist=True, reduce_fx="sum")
        self.step_optimizer(optimizer, scheduler)

        reward_stats = self.global_sum(reward_stats)
        count = reward_stats[2].clamp(min=1)
        mean = reward_stats[0] / count
        std = (reward_stats[1] / count - mean * mean).clamp(min=0).sqrt()
        self.log("train/loss", total, prog_bar=True, sync_dist=True, reduce_fx="sum")
        self.log("train/nll", nll, sync_dist=True, reduce_fx="sum")
        self.log("train/penalty", penalty, sync_dist=True, reduce_fx="sum")
        self.log("iq/reward_mean", mean)
        self.log("iq/reward_std", std)
        self.log("train/lr", scheduler.get_last_lr()[0], on_step=True, on_epoch=False)
