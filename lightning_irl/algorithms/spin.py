"""SPIN / IRFT: self-play against the previous iterate, no reward model, no discriminator.

The implicit reward of a response is ``r(y) = β·(log π_θ(y|x) − log π_t(y|x))`` with sequence
log-probs summed over response tokens (EOS included). The loss (``objectives.spin.spin_loss``)
pushes the demonstration ("chosen") above a response sampled from the opponent ``π_t``
("rejected"): ``ℓ(r(y_demo) − r(y_gen))``, ``ℓ(z) = log(1 + e^{−z})`` (or a hinge). docs/theory.md §4.

The opponent ``π_t`` is the previous iterate: a frozen copy of the policy (eval mode, no grad, not
in the optimizer, not exported) that *is* part of the Lightning checkpoint, so a resumed run plays
against the same opponent. Training is split into ``iterations`` of ``steps_per_iteration``
optimizer steps; at the first step of each new iteration the current policy is copied into the
opponent. Rejected responses are sampled from the opponent on each batch's prompts with the
rollout component (``sampling``: ``num_samples`` responses per prompt, the demonstration is
repeated for each). Because the opponent is frozen within an iteration, sampling it batch by batch
draws from the same distribution as SPIN's "generate the whole dataset, then train" loop.

- ``iterations = 1``: plain SPIN against the starting model (usually an SFT checkpoint).
- ``iterations = T`` with ``steps_per_iteration`` covering a shard of the prompts each: IRFT
  (Li et al. 2024), T rounds of "sample from the latest policy, then train on those samples".
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Dict, Iterator, Optional

import torch

from lightning_irl.algorithms.base import BATCH_KEYS, IRLModule, freeze, split_micro_batches
from lightning_irl.models.spec import ModelSpec
from lightning_irl.objectives.logprobs import sequence_logprobs, token_logprobs
from lightning_irl.objectives.spin import SPIN_LOSS_TYPES, spin_loss
from lightning_irl.rollout import sample

log = logging.getLogger(__name__)

def identical_fraction(chosen: Dict[str, torch.Tensor], rejected: Dict[str, torch.Tensor]) -> float:
    """Share of rows whose response tokens (loss-mask positions) are the same in both batches."""
    def responses(part):
        return [ids[mask.bool()].tolist() for ids, mask in zip(part["input_ids"], part["loss_mask"])]

    pairs = list(zip(responses(chosen), responses(rejected)))
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


class SPIN(IRLModule):
    """Self-play fine-tuning (SPIN) and its multi-iteration form (IRFT).

    Args:
        policy: The model being trained; usually an SFT export (``model_name_or_path: <folder>``).
        beta: β of the implicit reward ``β·(log π_θ − log π_t)``. The logistic loss is minimised
            over all distributions when ``β·log(π/π_t)`` is the log-odds ``log(p_E/π_t) + c`` of
            telling demonstrations from opponent samples, i.e. ``π_{t+1} ∝ π_t·(p_E/π_t)^{1/β}``:
            β = 1 aims at the expert, β < 1 overshoots (0.1, the DPO habit, raises the ratio to
            the 10th power; see benchmarks/implicit_vs_sft.py). Default 0.1 as in TRL's DPO.
        loss_type: ``sigmoid`` (SPIN/DPO's logistic loss) or ``hinge``.
        label_smoothing: Conservative-DPO smoothing ε of the sigmoid loss, in [0, 0.5).
        iterations: Number of self-play iterations T (the opponent is refreshed T − 1 times).
            With ``steps_per_iteration`` set, training stops after T iterations.
        steps_per_iteration: Optimizer steps per iteration. Default: the run's total steps
            (``trainer.max_steps`` or ``max_epochs`` × batches) split evenly into ``iterations``.
            For whole-epoch iterations, give the number of batches per epoch times the epochs.
        sft_weight: Add ``sft_weight`` × the SFT loss (response-token NLL of the demonstrations,
            normalised by the global token count) to the SPIN loss. 0 = pure SPIN.
        **kwargs: ``IRLModule`` arguments (optimizer, micro_batch_size, max_grad_norm, sampling,
            export, ...). ``sampling`` drives the opponent's generations: ``num_samples``
            responses per prompt, ``temperature``, ``max_new_tokens``. ``micro_batch_size`` counts
            (chosen, rejected) pairs.

    Normalisation: the loss is a per-pair mean. Each micro-batch backpropagates
    ``Σ per-pair losses × world_size / (global pair count)``, the pair count summed over ranks
    before the first backward, so gradient accumulation and DDP give the gradient of one batch.
    """

    def __init__(
        self,
        policy: ModelSpec,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        iterations: int = 1,
        steps_per_iteration: Optional[int] = None,
        sft_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, **kwargs)
        if loss_type not in SPIN_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {SPIN_LOSS_TYPES}, got {loss_type!r}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if steps_per_iteration is not None and steps_per_iteration < 1:
            raise ValueError(f"steps_per_iteration must be >= 1, got {steps_per_iteration}")
        if sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.iterations = iterations
        self.steps_per_iteration = steps_per_iteration
        self.sft_weight = sft_weight
        self.opponent: Optional[torch.nn.Module] = None
        # The iteration whose opponent is loaded; part of the state dict so resuming is exact.
        self.register_buffer("opponent_iteration", torch.zeros((), dtype=torch.long))

    # ---- building ----------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        if self.opponent is None:
            self.opponent = freeze(copy.deepcopy(self.policy))

    def iteration_length(self) -> int:
        if self.steps_per_iteration is not None:
            return self.steps_per_iteration
        return max(1, math.ceil(self.total_steps() / self.iterations))

    def refresh_opponent(self) -> None:
        """π_t ← π_θ (copy the policy's current weights into the frozen opponent)."""
        self.opponent.load_state_dict(self.policy.state_dict())
        freeze(self.opponent)

    def _maybe_refresh_opponent(self) -> None:
        iteration = min(self.trainer.global_step // self.iteration_length(), self.iterations - 1)
        if iteration > int(self.opponent_iteration):
            self.refresh_opponent()
            self.opponent_iteration.fill_(iteration)
            log.info("SPIN iteration %d: opponent refreshed at step %d", iteration, self.trainer.global_step)

    # ---- training ----------------------------------------------------------------------
    def _pair_logps(self, chosen: Dict[str, torch.Tensor], rejected: Dict[str, torch.Tensor]):
        def logps(model, part):
            return sequence_logprobs(token_logprobs(model, part["input_ids"], part["attention_mask"]),
                                     part["loss_mask"][:, 1:])

        with torch.no_grad():
            opponent_chosen, opponent_rejected = logps(self.opponent, chosen), logps(self.opponent, rejected)
        return logps(self.policy, chosen), logps(self.policy, rejected), opponent_chosen, opponent_rejected

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        self.count_tokens(batch)
        self._maybe_refresh_opponent()

        k = self.sampling.num_samples
        generated = sample(self.opponent, self.tokenizer, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                           self.sampling, compute_logprobs=False)
        rejected = {key: getattr(generated, key) for key in BATCH_KEYS}
        chosen = {key: batch[key].repeat_interleave(k, dim=0) if k > 1 else batch[key] for key in BATCH_KEYS}

        world = self.trainer.world_size
        local_pairs = torch.tensor(float(chosen["input_ids"].size(0)), device=self.device)
        global_pairs = self.global_sum(local_pairs).clamp(min=1)
        # this rank's share of: loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies
        sums = torch.zeros(5, device=self.device)
        for chosen_part, rejected_part in zip(split_micro_batches(chosen, self.micro_batch_size),
                                              split_micro_batches(rejected, self.micro_batch_size)):
            out = spin_loss(*self._pair_logps(chosen_part, rejected_part), beta=self.beta,
                            loss_type=self.loss_type, label_smoothing=self.label_smoothing)
            loss = out.losses.sum() * world / global_pairs
            self.manual_backward(loss)
            sums += torch.stack([out.losses.detach().sum(), out.chosen_rewards.sum(), out.rejected_rewards.sum(),
                                 out.margins.sum(), out.accuracies.sum()]).float()
        shares = sums / global_pairs  # summed over ranks (reduce_fx="sum") = global means
        total = shares[0]
        if self.sft_weight > 0:
            nll = self.nll_backward(batch, scale=self.sft_weight)
            total = total + self.sft_weight * nll
            self.log("train/nll", nll, sync_dist=True, reduce_fx="sum")
        self.step_optimizer(optimizer, scheduler)

        self.log("train/loss", total, prog_bar=True, sync_dist=True, reduce_fx="sum")
        self.log("train/spin_loss", shares[0], sync_dist=True, reduce_fx="sum")
        for i, name in enumerate(("chosen", "rejected", "margins", "accuracies"), start=1):
            self.log(f"rewards/{name}", shares[i], sync_dist=True, reduce_fx="sum")
        self.log("spin/iteration", self.opponent_iteration.float())
        self.log("spin/finished_fraction", generated.finished.float().mean(), sync_dist=True)
        # pairs whose generation reproduced the demonstration: z = 0 exactly, no gradient
        self.log("spin/identical_fraction", identical_fraction(chosen, rejected), sync_dist=True)
        self.log("train/lr", scheduler.get_last_lr()[0], on_step=True, on_epoch=False)

        if self.steps_per_iteration is not None and \
                self.trainer.global_step >= self.iterations * self.steps_per_iteration:
            self.trainer.should_stop = True
