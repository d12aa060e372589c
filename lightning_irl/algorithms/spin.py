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
from typing import Any, Dict, Optional

import torch

from lightning_irl.algorithms.base import check_choices, freeze
from lightning_irl.algorithms.engine import rollout_rows, sequence_rows
from lightning_irl.algorithms.policy import PolicyModule
from lightning_irl.models.spec import ModelSpec
from lightning_irl.objectives.logprobs import sequence_logprobs, token_logprobs
from lightning_irl.objectives.spin import SPINLossType, spin_loss
from lightning_irl.rollout import sample

log = logging.getLogger(__name__)

def identical_fraction(chosen: Dict[str, torch.Tensor], rejected: Dict[str, torch.Tensor]) -> float:
    """Share of rows whose response tokens (loss-mask positions) are the same in both batches."""
    def responses(part):
        return [ids[mask.bool()].tolist() for ids, mask in zip(part["input_ids"], part["loss_mask"])]

    pairs = list(zip(responses(chosen), responses(rejected)))
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


class SPIN(PolicyModule):
    """Self-play fine-tuning (SPIN) and its multi-iteration form (IRFT).

    Args:
        policy: The model being trained; usually an SFT export (``model_name_or_path: <folder>``).
        kl_coef: β of the implicit reward ``β·(log π_θ − log π_t)``: the KL coefficient of the RL
            problem whose optimum that reward describes (SPIN and DPO call it β). The logistic loss
            is minimised over all distributions when ``β·log(π/π_t)`` is the log-odds ``log(p_E/π_t) + c`` of
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
        **kwargs: ``PolicyModule`` arguments (optimizer, micro_batch_size, max_grad_norm, sampling,
            export, ...). ``sampling`` drives the opponent's generations: ``num_samples``
            responses per prompt, ``temperature``, ``max_new_tokens``. ``micro_batch_size`` counts
            (chosen, rejected) pairs.

    Normalisation (the engine): the loss is a mean over the (chosen, rejected) pairs of the global
    step, so gradient accumulation and DDP give the gradient of one batch.
    """

    def __init__(
        self,
        policy: ModelSpec,
        kl_coef: float = 0.1,
        loss_type: SPINLossType = "sigmoid",
        label_smoothing: float = 0.0,
        iterations: int = 1,
        steps_per_iteration: Optional[int] = None,
        sft_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, **kwargs)
        check_choices(SPIN.__init__, loss_type=loss_type)
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if steps_per_iteration is not None and steps_per_iteration < 1:
            raise ValueError(f"steps_per_iteration must be >= 1, got {steps_per_iteration}")
        if sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
        self.kl_coef = kl_coef
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

    def _pair_sums(self, pair: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        out = spin_loss(*self._pair_logps(pair["chosen"], pair["rejected"]), beta=self.kl_coef,
                        loss_type=self.loss_type, label_smoothing=self.label_smoothing)
        return {"spin": out.losses.sum(), "chosen": out.chosen_rewards.sum(), "rejected": out.rejected_rewards.sum(),
                "margins": out.margins.sum(), "accuracies": out.accuracies.float().sum()}

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        self.count_tokens(batch)
        self._maybe_refresh_opponent()

        k = self.sampling.num_samples
        generated = sample(self.opponent, self.tokenizer, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                           self.sampling, compute_logprobs=False)
        rejected = rollout_rows(generated)
        chosen = {key: value.repeat_interleave(k, dim=0) for key, value in sequence_rows(batch).items()}
        shares = self.engine.backward({"chosen": chosen, "rejected": rejected}, self._pair_sums,
                                      {"spin": lambda pairs: pairs["chosen"]["input_ids"].size(0)},
                                      self.micro_batch_size)
        total = shares["spin"]
        if self.sft_weight > 0:
            nll = self.nll_backward(batch, weight=self.sft_weight)
            total = total + self.sft_weight * nll
            self.log("train/nll", nll, sync_dist=True, reduce_fx="sum")
        self.step(optimizer, scheduler)

        self.log("train/loss", total, prog_bar=True, sync_dist=True, reduce_fx="sum")
        self.log("train/spin_loss", shares["spin"], sync_dist=True, reduce_fx="sum")
        for name in ("chosen", "rejected", "margins", "accuracies"):
            self.log(f"rewards/{name}", shares[name], sync_dist=True, reduce_fx="sum")
        self.log("spin/iteration", self.opponent_iteration.float())
        self.log("spin/finished_fraction", generated.finished.float().mean(), sync_dist=True)
        # pairs whose generation reproduced the demonstration: z = 0 exactly, no gradient
        self.log("spin/identical_fraction", identical_fraction(chosen, rejected), sync_dist=True)
        self.log("train/lr", scheduler.get_last_lr()[0], on_step=True, on_epoch=False)

        if self.steps_per_iteration is not None and \
                self.trainer.global_step >= self.iterations * self.steps_per_iteration:
            self.trainer.should_stop = True
