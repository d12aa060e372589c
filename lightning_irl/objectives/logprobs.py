"""Log-probabilities of token sequences and masked reductions. Pure tensor functions.

Conventions used across the package:
- a batch holds ``input_ids``, ``attention_mask`` and ``loss_mask`` of shape [B, T], aligned;
  ``loss_mask[b, t] = 1`` when token ``t`` is a response token (EOS included) that the model
  predicts from tokens ``< t``. Prompt and padding positions are 0.
- per-token arrays returned here are *shifted*: shape [B, T-1], entry ``t`` scores token ``t+1``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F


def gather_token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., target]`` without materialising the full log-softmax twice.

    Computed in float32: bf16 log-softmax over a large vocabulary loses the small differences
    that importance ratios and KL estimates are made of.
    """
    logits = logits.float()
    return -F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view_as(targets)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore padding on either side, as ``generate`` computes them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_(min=0)


def shifted_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Next-token logits [B, T-1, V] for any padding side.

    With ``position_ids`` (a packed batch, ``data.collate.PackedDemonstrationCollator``) no
    attention mask is passed: transformers then derives a block-causal mask from the positions
    restarting at 0, so packed examples never attend to each other.
    """
    if position_ids is not None:
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    else:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
    return out.logits[:, :-1]


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    position_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """log π(token_{t+1} | tokens_{≤t}) for every position: [B, T-1]."""
    logits = shifted_logits(model, input_ids, attention_mask, position_ids)
    if temperature != 1.0:
        logits = logits / temperature
    return gather_token_logprobs(logits, input_ids[:, 1:])


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def per_loss_token(total: torch.Tensor, mask: torch.Tensor,
                   num_loss_tokens: Optional[Union[int, float, torch.Tensor]] = None) -> torch.Tensor:
    """``total / num_loss_tokens``; the default count is ``mask.sum()`` (at least 1). Pass the
    global count of loss tokens for accumulation- and DDP-correct gradients (TRL's
    ``num_items_in_batch``)."""
    if num_loss_tokens is None:
        return total / mask.to(total.dtype).sum().clamp(min=1)
    if isinstance(num_loss_tokens, torch.Tensor):
        return total / num_loss_tokens.to(device=total.device, dtype=total.dtype)
    return total / float(num_loss_tokens)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def sequence_logprobs(token_logps: torch.Tensor, shifted_mask: torch.Tensor) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over response tokens: [B]."""
    return masked_sum(token_logps, shifted_mask, dim=-1)


def token_nll_sum(token_logps: torch.Tensor, shifted_mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the response tokens (forward-KL / SFT numerator).

    Callers divide by the number of loss tokens in the *global* batch (all micro-batches of an
    optimizer step on all ranks), so accumulation and DDP give the gradient of one large batch.
    """
    return -masked_sum(token_logps, shifted_mask)
