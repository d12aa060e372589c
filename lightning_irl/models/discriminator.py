"""The adversarial discriminator: a one-logit sequence classifier read by ``models.scoring``."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_irl.models.scoring import last_token_index, prefix_logits, score_head, sequence_logits
from lightning_irl.models.spec import ModelSpec


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


__all__ = ["build_discriminator", "last_token_index", "prefix_logits", "score_head", "sequence_logits"]
