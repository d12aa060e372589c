"""Log-probabilities of token sequences and masked reductions. Pure tensor functions.

Conventions used across the package:
- a batch holds ``input_ids``, ``attention_mask`` and ``loss_mask`` of shape [B, T], aligned;
  ``loss_mask[b, t] = 1`` when token ``t`` is a response token (EOS included) that the model
  predicts from tokens ``< t``. Prompt and padding positions are 0.
- per-token arrays returned here are *shifted*: shape [B, T-1], entry ``t`` scores token ``t+1``.
"""

from __future__ import annotations

import warnings
from typing import Optional, Set, Union

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


def causal_lm_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The model's logits [B, T, V] for any padding side (unshifted).

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
    return out.logits


def shifted_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Next-token logits [B, T-1, V] for any padding side (see ``causal_lm_logits``)."""
    return causal_lm_logits(model, input_ids, attention_mask, position_ids)[:, :-1]


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


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """A PEFT wrapper's base model (the transformers model with the adapters in it), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The module that projects the final hidden states onto the vocabulary (a PEFT model's
    base model's), or None for a model that does not declare one."""
    declared = getattr(base_model(model), "get_output_embeddings", None)
    return declared() if callable(declared) else None


#: model classes already warned about by masked_token_logprobs (their head is not get_output_embeddings)
_warned_full_logits: Set[type] = set()


def masked_token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """log π(token_{t+1} | tokens_{≤t}) where the *shifted* ``mask`` [B, T-1] is set: [N], in the
    order of ``mask.nonzero()``. The values of ``token_logprobs(...)[mask.bool()]``, without the
    [B, T-1, V] logits.

    The output head is the largest matmul of a small model and its float32 log-softmax the
    largest activation of any model with a real vocabulary; prompt and padding positions (often
    most of a demonstration batch) are never scored, so they are not projected. A forward
    pre-hook on the head, live for this call only, hands it the scored positions' hidden states
    [1, N, H] instead of [B, T, H]. Hidden states are per position and every family's
    post-processing of the logits (Gemma 2's final soft-capping, logit scales) is elementwise,
    so the values are the full path's for any model; the model's own ``forward`` still runs
    from its root, so DDP, FSDP2 (whose backward hooks sit on the root's outputs), autocast and
    gradient checkpointing see a normal call. Why not transformers' boolean ``logits_to_keep``:
    it exists from transformers 5 on and only in models that implement it; the hook needs
    nothing but ``get_output_embeddings``.

    A model whose head is not its output-embeddings module returns its full logits: they are
    used as they are (exact, only not faster; a warning once per model class). Anything else is
    an error, never a silently wrong value. A host sync (``nonzero``).
    """
    rows, columns = mask.bool().nonzero(as_tuple=True)
    targets = input_ids[rows, columns + 1]
    calls = []

    def keep_scored_positions(module, args):
        if not args or args[0].shape[:2] != input_ids.shape:
            raise RuntimeError(
                f"{type(module).__name__}, the output head of {type(model).__name__}, was not called with the "
                f"[B, T, H] hidden states of the batch {tuple(input_ids.shape)}: masked_token_logprobs cannot "
                "select the scored positions; use token_logprobs")
        calls.append(module)
        return (args[0][rows, columns].unsqueeze(0), *args[1:])

    head = output_head(model)
    handle = head.register_forward_pre_hook(keep_scored_positions) if head is not None else None
    try:
        logits = causal_lm_logits(model, input_ids, attention_mask, position_ids)
    finally:
        if handle is not None:
            handle.remove()
    if len(calls) == 1 and logits.shape[:2] == (1, rows.numel()):
        logits = logits[0]
    elif not calls and logits.shape[:2] == input_ids.shape:
        if type(model) not in _warned_full_logits:
            _warned_full_logits.add(type(model))
            warnings.warn(f"{type(model).__name__} does not compute its logits with get_output_embeddings(): "
                          "masked_token_logprobs reads them from the full [B, T, V] logits", stacklevel=2)
        logits = logits[rows, columns]
    else:
        raise RuntimeError(
            f"{type(model).__name__} called its output head {len(calls)} time(s) and returned logits of shape "
            f"{tuple(logits.shape)} for {rows.numel()} scored positions: masked_token_logprobs cannot tell which "
            "logits score which token; use token_logprobs")
    return gather_token_logprobs(logits, targets)


def scored_token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``token_logprobs`` [B, T-1] where the shifted ``mask`` is set, 0 elsewhere (never
    computed: ``masked_token_logprobs``), for readers that multiply by the loss mask anyway."""
    values = masked_token_logprobs(model, input_ids, attention_mask, mask, position_ids)
    return values.new_zeros(mask.shape).masked_scatter(mask.bool(), values)


def masked_token_nll_sum(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    shifted_mask: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``token_nll_sum(token_logprobs(...), shifted_mask)``, the output head run on the scored
    positions only (``masked_token_logprobs``). A weighted mask weighs its tokens as there."""
    logps = masked_token_logprobs(model, input_ids, attention_mask, shifted_mask, position_ids)
    return -(logps * shifted_mask[shifted_mask.bool()].to(logps.dtype)).sum()


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
