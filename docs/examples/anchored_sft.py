"""SFT anchored to the starting model: ``NLL + β · KL(π(·|s) ‖ π_ref(·|s))`` on the demonstrations.

The worked example of docs/adding_a_method.md: a complete method in one file. The KL is exact
over the vocabulary at every response position (not a sampled estimate), so ``kl_coef: 0`` is
SFT exactly and a large ``kl_coef`` keeps the policy near the model it started from.

    lightning_irl fit --config configs/quickstart.yaml \\
        --model lightning_irl_examples.AnchoredSFT ...     # or class_path: docs.examples.anchored_sft.AnchoredSFT
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F

from lightning_irl.algorithms.engine import response_tokens, sequence_rows
from lightning_irl.algorithms.policy import PolicyModule
from lightning_irl.models.spec import ModelSpec
from lightning_irl.objectives.logprobs import gather_token_logprobs, masked_sum, shifted_logits


def vocabulary_kl(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(logits) ‖ softmax(reference_logits))`` per position: [..., V] → [...]."""
    logp, ref_logp = F.log_softmax(logits.float(), -1), F.log_softmax(reference_logits.float(), -1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


class AnchoredSFT(PolicyModule):
    """Args: ``kl_coef`` β ≥ 0 of the anchor; the rest as ``PolicyModule``."""

    needs_reference = True  # the base builds the frozen start (or LoRA's adapter-off view)

    def __init__(self, policy: ModelSpec, kl_coef: float = 0.1, **kwargs: Any) -> None:
        super().__init__(policy, **kwargs)
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.kl_coef = kl_coef

    def loss_sums(self, micro: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Sums over this micro-batch's response tokens; the engine divides by the global count."""
        mask = micro["loss_mask"][:, 1:]
        logits = shifted_logits(self.policy, micro["input_ids"], micro["attention_mask"])
        with self.reference_mode() as reference:
            reference_logits = shifted_logits(reference, micro["input_ids"], micro["attention_mask"])
        nll = -masked_sum(gather_token_logprobs(logits, micro["input_ids"][:, 1:]), mask)
        return {"nll": nll, "kl": masked_sum(vocabulary_kl(logits, reference_logits), mask)}

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        self.count_tokens(batch)
        shares = self.engine.backward(sequence_rows(batch), self.loss_sums,
                                      units={"nll": response_tokens, "kl": response_tokens},
                                      micro_batch_size=self.micro_batch_size, weights={"kl": self.kl_coef})
        self.step(optimizer, scheduler)
        summed = dict(sync_dist=True, reduce_fx="sum")  # each share summed over ranks = the global mean
        self.log("train/loss", shares["nll"] + self.kl_coef * shares["kl"], prog_bar=True, **summed)
        self.log("train/nll", shares["nll"], **summed)
        self.log("train/kl_to_start", shares["kl"], **summed)
        self.log("train/lr", scheduler.get_last_lr()[0], on_step=True, on_epoch=False)
