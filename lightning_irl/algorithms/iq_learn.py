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

from lightning_irl.algorithms.engine import response_tokens, rollout_rows, sequence_rows
from lightning_irl.algorithms.policy import PolicyModule
from lightning_irl.models.spec import ModelSpec
from lightning_irl.objectives.iq_learn import implied_rewards, iq_learn_loss
from lightning_irl.objectives.logprobs import shifted_logits


class IQLearn(PolicyModule):
    """Inverse soft-Q learning with the policy's logits as Q (offline, χ² regulariser).

    Args:
        policy: The model being trained; usually an SFT export (``model_name_or_path: <folder>``).
        lam: λ ≥ 0, weight of the squared implied reward. 0 = SFT.
        gamma: Discount γ on ``V(s_{t+1})``.
        policy_sample_weight: w ≥ 0. When > 0 (and λ > 0), sample ``sampling.num_samples``
            responses per prompt from the policy each step and add ``w·λ·Σ r_t² / (global
            sampled tokens)``. Default 0: purely offline.
        **kwargs: ``PolicyModule`` arguments (optimizer, micro_batch_size, max_grad_norm, sampling, ...).

    Normalisation (the engine): per response token of the global step, for the demonstrations'
    terms and, separately, for the policy-sample penalty over the sampled tokens.
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

    def _demonstration_sums(self, micro: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        logits = shifted_logits(self.policy, micro["input_ids"], micro["attention_mask"])
        mask = micro["loss_mask"][:, 1:]
        out = iq_learn_loss(logits, micro["input_ids"][:, 1:], mask, lam=self.lam, gamma=self.gamma,
                            num_loss_tokens=1)  # sums: the engine normalises
        rewards = out.implied_rewards[mask.bool()]
        return {"loss": out.loss, "nll": out.nll, "penalty": out.penalty,
                "reward": rewards.sum(), "reward_sq": (rewards * rewards).sum()}

    def _sample_penalty_sum(self, micro: Dict[str, torch.Tensor]) -> torch.Tensor:
        logits = shifted_logits(self.policy, micro["input_ids"], micro["attention_mask"])
        rewards = implied_rewards(logits, micro["input_ids"][:, 1:], micro["loss_mask"][:, 1:], self.gamma)
        return (rewards * rewards).sum()

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        self.count_tokens(batch)
        shares = self.engine.backward(sequence_rows(batch), self._demonstration_sums, response_tokens,
                                      self.micro_batch_size, names={"loss": "IQ-Learn loss"})
        total = shares["loss"]
        if self.policy_sample_weight > 0 and self.lam > 0:
            rollout = self.rollout(batch, compute_logprobs=False)
            penalty = self.engine.backward(rollout_rows(rollout), self._sample_penalty_sum, response_tokens,
                                           self.micro_batch_size,
                                           weights={"loss": self.policy_sample_weight * self.lam},
                                           names={"loss": "IQ-Learn penalty on policy samples"})["loss"]
            penalty = penalty * self.policy_sample_weight * self.lam
            total = total + penalty
            self.log("train/penalty_policy", penalty, sync_dist=True, reduce_fx="sum")
        self.step(optimizer, scheduler)

        # shares summed over ranks are global means: E[r] and E[r²] per demonstrated token
        moments = self.engine.global_sum(torch.stack([shares["reward"], shares["reward_sq"]]))
        self.log("train/loss", total, prog_bar=True, sync_dist=True, reduce_fx="sum")
        self.log("train/nll", shares["nll"], sync_dist=True, reduce_fx="sum")
        self.log("train/penalty", shares["penalty"], sync_dist=True, reduce_fx="sum")
        self.log("iq/reward_mean", moments[0])
        self.log("iq/reward_std", (moments[1] - moments[0] ** 2).clamp(min=0).sqrt())
        self.log("train/lr", scheduler.get_last_lr()[0], on_step=True, on_epoch=False)
