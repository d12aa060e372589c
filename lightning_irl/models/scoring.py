"""Scalar logits (discriminator / reward model) from a Hugging Face sequence classifier, read
where *we* say.

One network serves both discriminator levels and the reward model: a causal backbone with a linear ``score`` head
(``AutoModelForSequenceClassification`` of a decoder model, ``num_labels=1``) gives a logit at every
position; position ``t`` has seen tokens ``≤ t`` only, so it scores the prefix that ends there.

- sequence level: the logit at the **last real token** of each row (the rightmost position whose
  ``attention_mask`` is 1), whatever the padding side;
- token level: the logit at every response position (``h_t`` for the prefix ``y_≤t``).

Why not the classifier's own pooled output: transformers picks "the rightmost token that is not
``pad_token_id``". When the pad token *is* the EOS token (common: ``ensure_pad_token`` reuses EOS),
that skips the EOS that ends every finished response, so finished and truncated responses are read
at different places; and a row that contains pad-id tokens inside it is read too early. Here the
position comes from the attention mask, never from token ids. The per-position logits are taken
with a forward hook on the head while the *whole* classifier runs its own ``forward``, so wrappers
that act on the root module's forward (FSDP, DeepSpeed) see a normal call.

Position ids are computed from the attention mask (as for the policy), so a left-padded rollout and
a right-padded demonstration put the same token at the same position: otherwise the discriminator
could tell them apart by their padding alone.
"""

from __future__ import annotations

from typing import Optional

import torch

from lightning_irl.objectives.logprobs import position_ids_from_mask


def score_head(classifier: torch.nn.Module) -> torch.nn.Module:
    """The linear head of a decoder sequence classifier (``score`` in Llama, Qwen, Mistral, GPT-2...)."""
    head = getattr(classifier, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(
            f"{type(classifier).__name__} has no `score` head: the discriminator must be a decoder "
            "(causal) backbone with a linear score head, as AutoModelForSequenceClassification builds "
            "for llama, qwen2, mistral, gpt2, ... models"
        )
    return head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the rightmost attended position of each row: [B]. Works for left and right padding."""
    positions = torch.arange(attention_mask.size(-1), device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def prefix_logits(
    classifier: torch.nn.Module,
    input_ids: Optional[torch.Tensor],
    attention_mask: torch.Tensor,
    inputs_embeds: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A logit for every prefix: [B, T] float32; entry ``t`` scores tokens ``≤ t`` of the row.

    Pass ``inputs_embeds`` instead of ``input_ids`` to differentiate with respect to the
    embeddings (R1 penalty). Padding positions hold arbitrary values: mask them.
    """
    head = score_head(classifier)
    captured = []
    handle = head.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        output = classifier(
            input_ids=None if inputs_embeds is not None else input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the score head of {type(classifier).__name__} was not called in its forward")
    logits = captured[-1]
    if logits.dim() != 3 or logits.size(-1) != 1:
        raise ValueError(f"the discriminator needs num_labels=1 (one logit); its head gives {tuple(logits.shape)}")
    # Sharded training (FSDP) gathers a unit's weights for backward from hooks on the unit's
    # *outputs*; the head's output captured here is not one. A zero-weight term on the model's
    # own output puts that hook on the gradient's path, before the head's backward needs them.
    return logits[..., 0].float() + 0.0 * output.logits.float().sum()


def sequence_logits(
    classifier: torch.nn.Module,
    input_ids: Optional[torch.Tensor],
    attention_mask: torch.Tensor,
    inputs_embeds: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One logit per row, read at its last real token: [B] float32."""
    logits = prefix_logits(classifier, input_ids, attention_mask, inputs_embeds)
    rows = torch.arange(logits.size(0), device=logits.device)
    return logits[rows, last_token_index(attention_mask)]


__all__ = ["last_token_index", "prefix_logits", "score_head", "sequence_logits"]
