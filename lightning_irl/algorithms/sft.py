"""Supervised fine-tuning = behaviour cloning = minimising forward KL(d_E ‖ d_π).

The loss is the response-token negative log-likelihood, summed and divided by the number of
response tokens in the global batch (docs/theory.md §2, first row of the divergence table).
"""

from __future__ import annotations

from typing import Any, Dict

from lightning_irl.algorithms.policy import PolicyModule


class SFT(PolicyModule):
    """Forward KL / behaviour cloning on demonstrations. Arguments: see ``PolicyModule``."""

    supports_packing = True  # nll_sum forwards the packed batch's position_ids

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        self.count_tokens(batch)
        loss = self.nll_backward(batch)
        self.step(optimizer, scheduler)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, reduce_fx="sum")
        self.log("train/lr", scheduler.get_last_lr()[0], on_step=True, on_epoch=False)
