"""The adversarial discriminators, in two forms (``Adversarial(discriminator_form=...)``):

- ``classifier``: a one-logit sequence classifier (fresh scalar ``score`` head) read by
  ``models.scoring`` at the last real token or at every prefix;
- ``log_ratio``: ``h = log q_φ(y|x) − log π(y|x) + b`` with ``q_φ`` a causal LM (started from the
  policy) and ``b`` a scalar (``LogRatioDiscriminator``; the math is
  ``objectives.divergences.log_ratio_prefix_logits``).

The reward model's log-ratio form (``algorithms.reward_model.RewardModel(form="log_ratio")``)
reuses ``LogRatioDiscriminator`` with a *fixed* frozen reference in place of the policy
(``log_ratio_rewards``; ``LogRatioReward`` bundles both for scoring).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_irl.models.scoring import (
    last_token_index,
    prefix_logits,
    response_token_logprobs,
    score_head,
    sequence_logits,
)
from lightning_irl.models.spec import ModelSpec
from lightning_irl.objectives.divergences import log_ratio_prefix_logits

LOG_RATIO_FILE = "log_ratio_discriminator.json"


def build_discriminator(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A one-logit sequence classifier that reads the policy's token ids.

    The discriminator is fed the policy's ids directly, so its vocabulary must cover the policy
    tokenizer's (an inline ``config`` gets the policy tokenizer's size automatically).
    """
    classifier = spec.build_sequence_classifier(tokenizer, num_labels=1)
    score_head(classifier)
    vocab = classifier.get_input_embeddings().num_embeddings
    if vocab < len(tokenizer):
        raise ValueError(
            f"the discriminator's vocabulary ({vocab} embeddings) is smaller than the policy tokenizer "
            f"({len(tokenizer)} tokens): it reads the policy's token ids, so it must share the tokenizer"
        )
    return classifier


class LogRatioDiscriminator(torch.nn.Module):
    """``h(x, y) = a·(log q_φ(y|x) − log π(y|x)) + b``: a causal LM ``q``, a ``scale`` a (starts
    at 1) and a ``bias`` b (starts at 0).

    ``forward`` runs ``q`` itself (so FSDP wrappers on this module see a normal call) and takes
    the policy's shifted token log-probs of the same rows as an input (computed without gradient
    by the caller: the discriminator never trains the policy). Returns the prefix logits [B, T]
    and ``q``'s shifted token log-probs [B, T−1] of the response tokens (0 before the first
    response column: ``q``'s LM head runs from there on only), for an optional likelihood term on
    demonstrations.

    At the optimum of the BCE, ``q ∝ d_E`` on the data, ``a = 1`` and ``h = log d_E − log π``;
    with ``q`` started as a copy of the policy, training starts from ``h = b = 0`` (``D = ½``).
    Memory: one more causal LM of the policy's size with its own gradients and optimizer state
    (with LoRA on the policy: a frozen copy of the base plus its own adapter).
    """

    def __init__(self, q: torch.nn.Module, bias: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        self.q = q
        # one-element vectors, not 0-dim: FSDP2's fully_shard refuses scalar parameters
        self.bias = torch.nn.Parameter(torch.tensor([float(bias)]))
        self.scale = torch.nn.Parameter(torch.tensor([float(scale)]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, policy_token_logps: torch.Tensor,
                loss_mask: torch.Tensor, calibrate_only: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """``calibrate_only``: the logit's gradient reaches ``a`` and ``b`` only (``q`` is then fitted
        by the caller's likelihood term alone: the "fit q as a language model, calibrate a, b"
        warm-up)."""
        q_logps = response_token_logprobs(self.q, input_ids, attention_mask, loss_mask)
        width = q_logps.size(1)
        h = log_ratio_prefix_logits(q_logps.detach() if calibrate_only else q_logps, policy_token_logps[:, :width],
                                    loss_mask[:, 1 : width + 1], self.bias.float(), self.scale.float())
        return h, q_logps

    @staticmethod
    def _value(parameter: torch.nn.Parameter) -> torch.Tensor:
        """A scalar parameter as a plain 0-dim tensor (gathered when FSDP2 shards it: collective)."""
        value = parameter.detach()
        return (value.full_tensor() if hasattr(value, "full_tensor") else value).float().reshape(())

    def bias_value(self) -> torch.Tensor:
        return self._value(self.bias)

    def scale_value(self) -> torch.Tensor:
        return self._value(self.scale)

    def describe(self) -> dict:
        """What ``log_ratio_discriminator.json`` holds beside an exported ``q``: a reward from it
        needs the policy too, ``r = scale·(log q(y|x) − log π(y|x)) + bias``."""
        return {"form": "log_ratio", "bias": float(self.bias_value()), "scale": float(self.scale_value()),
                "reward": "scale * (log q(y|x) - log pi(y|x)) + bias, q = the causal LM in this folder"}


def log_ratio_rewards(discriminator: LogRatioDiscriminator, reference: torch.nn.Module, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, loss_mask: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sequence rewards ``a·Σ_response (log q − log p_ref)(y_t) + b`` [B] float32 of whole rows (any
    padding side), and ``q``'s shifted response-token log-probs [B, T−1] (for a likelihood term).

    ``p_ref`` is a frozen causal LM reading the same ids (no gradient reaches it); the sums run
    over the ``loss_mask`` tokens only (the response, EOS included), so prompt tokens, which both
    models score but which say nothing about the response, never enter the reward. The value is
    the last real token's prefix logit of ``LogRatioDiscriminator``.
    """
    if loss_mask is None:
        raise ValueError("the log-ratio reward sums log q − log p_ref over the response tokens only: it needs the "
                         "rows' loss_mask (response tokens, EOS included)")
    with torch.no_grad():
        reference_logps = response_token_logprobs(reference, input_ids, attention_mask, loss_mask)
    h, q_logps = discriminator(input_ids, attention_mask, reference_logps, loss_mask)
    rows = torch.arange(h.size(0), device=h.device)
    return h[rows, last_token_index(attention_mask)], q_logps


class LogRatioReward(torch.nn.Module):
    """A log-ratio reward model ready to score: ``LogRatioDiscriminator`` (``q``, ``a``, ``b``) and
    its frozen reference ``p_ref``; ``forward(input_ids, attention_mask, loss_mask)`` gives
    ``a·(log q(y|x) − log p_ref(y|x)) + b`` [B] (``log_ratio_rewards``). What
    ``algorithms.reward_model.load_reward_model`` builds from a log-ratio export."""

    def __init__(self, discriminator: LogRatioDiscriminator, reference: torch.nn.Module) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.reference = reference

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        return log_ratio_rewards(self.discriminator, self.reference, input_ids, attention_mask, loss_mask)[0]


__all__ = ["LOG_RATIO_FILE", "LogRatioDiscriminator", "LogRatioReward", "build_discriminator", "last_token_index",
           "log_ratio_rewards", "prefix_logits", "score_head", "sequence_logits"]
