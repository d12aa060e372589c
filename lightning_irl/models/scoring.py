"""Reading a scalar score (reward / discriminator logit) from a sequence classifier.

transformers' ``*ForSequenceClassification`` pools at the last token that is not ``pad_token_id``.
That breaks when pad == EOS (the EOS that ends a response is skipped) and with left padding in
some versions. Here the position comes from the attention mask instead, for either padding side.
"""

from __future__ import annotations

import torch

from lightning_irl.objectives.logprobs import position_ids_from_mask


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position of each row (works for left and right padding)."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def _head(model) -> torch.nn.Module:
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise TypeError(f"{type(model).__name__} has no score head (score / classifier / v_head)")


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One logit per sequence, read at its last real token: [B] (or [B, num_labels])."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    rows = torch.arange(hidden.size(0), device=hidden.device)
    logits = _head(model)(hidden[rows, last_token_index(attention_mask)])
    return logits.squeeze(-1) if logits.size(-1) == 1 else logits


def prefix_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A logit after every prefix: [B, T]; entry t scores tokens ≤ t (causal backbone)."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return _head(model)(hidden).squeeze(-1)
