"""Scalar logits (discriminator / reward model) from a Hugging Face sequence classifier, and token
log-probs from a causal LM, read where *we* say.

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

``response_token_logprobs`` reads a causal LM the same way: token log-probs where the loss mask
says, with the LM head (and its log-softmax over the vocabulary) run only from the first scored
column on (``logits_to_keep``): a rollout's prompt positions are never projected onto the
vocabulary.

Length buckets (``bucketed=True``; ``length_buckets``): rows of different lengths padded to one
width waste the padding's share of every matmul (a rollout batch of 16 prompts of 4-20 tokens
with 8 new tokens: about 30%). The rows are sorted by length and cut into a few groups, each
trimmed to the columns it attends (left padding included), one model call per group; the outputs
go back to the full width in the original row order (differentiable). Positions come from the
attention mask, so a row's values do not depend on its group (up to float rounding of a
different matmul shape). The number of groups minimises ``cells × (1 + BUCKET_PENALTY × (groups
− 1))``: an extra call must save more than ``BUCKET_PENALTY`` of the cells. With several
processes there is one group (a sharded model's forward passes are collective: every rank must
make as many).

Attention kernel: on the CPU, these reads (``bucketed``) of rows up to ``CPU_MATH_ATTENTION_MAX``
(128) columns run SDPA's math kernel, not torch's CPU flash kernel: measured on one thread, forward +
backward of short rows (64 × 4 heads × 28 columns) 10.7 vs 21.2 ms in bf16 and 9.6 vs 11.1 ms in
float32; from 256 columns on the flash kernel is faster. (Values differ by rounding only: ≤ 5e-7
in float32, 2e-3 in bf16; a PPO minibatch and its rollout on both sides of the bound would start
at a ratio off 1 by that much in bf16.)

Shared prefixes (``start`` given: the first column whose values are read): rows whose first
``start`` columns are the same (the k samples of a prompt in a rollout batch) run those columns
once per distinct prefix, with a KV cache (``DynamicCache``), gathered to every row for the rest
of the columns (differentiable: gradients flow back through the gathered cache). A rollout of 16
prompts × 4 samples runs its prompt tokens 16 times instead of 64 (measured: a third less time
per forward and backward, ~5M-parameter Llama). Used when it saves more cells than the length
buckets do (the same ``BUCKET_PENALTY`` per extra call), on one process, without gradient
checkpointing (it would replay the cache update), and after a one-time check per model and
precision that its values match the plain forward's (``AUTO_TOLERANCE``-like bounds: 1e-4 in
float32, 5e-2 in reduced precision; a model whose cache does not reproduce its forward gets a
warning and the plain path from then on). ``shared_prompt_cache`` does the same for ``generate``:
the k samples of a prompt continue one prefill of it (a model whose cache passed that check).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_irl.objectives.logprobs import base_model, gather_token_logprobs, position_ids_from_mask, token_logprobs

log = logging.getLogger(__name__)


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


#: An extra length bucket (one more model call) must save this share of the padded cells.
BUCKET_PENALTY = 0.1
MAX_BUCKETS = 8

#: (rows: an index tensor, or ``slice(None)`` for all rows in order; first column; end column)
Bucket = Tuple[Union[torch.Tensor, slice], int, int]


def length_buckets(attention_mask: torch.Tensor, enabled: bool = True) -> List[Bucket]:
    """Groups of rows of similar attended span, each with the columns ``[first, end)`` that hold
    every attended token of its rows (module docstring). One group (all rows in order, cut to the
    batch's attended columns) when ``enabled`` is False, with several processes, or when that is
    cheapest. A host sync."""
    rows, width = attention_mask.shape
    attended = attention_mask.bool()
    any_attended = attended.any(-1)
    first = torch.where(any_attended, attended.int().argmax(-1), width)
    end = torch.where(any_attended, width - attended.flip(-1).int().argmax(-1), 0)
    first_l, end_l = first.tolist(), end.tolist()

    def cut(indices) -> Tuple[int, int]:
        a, e = min(first_l[i] for i in indices), max(end_l[i] for i in indices)
        return (a, e) if e > a else (0, 1)  # no attended token at all: one column

    whole = [(slice(None), *cut(range(rows)))]
    if not enabled or rows < 2 or distributed():
        return whole
    order = sorted(range(rows), key=lambda i: end_l[i] - first_l[i])
    a, e = whole[0][1:]
    best, best_score = None, rows * (e - a)
    for groups in range(2, min(MAX_BUCKETS, rows) + 1):
        parts = [order[i * rows // groups : (i + 1) * rows // groups] for i in range(groups)]
        cuts = [cut(p) for p in parts]
        score = sum(len(p) * (c[1] - c[0]) for p, c in zip(parts, cuts)) * (1 + BUCKET_PENALTY * (groups - 1))
        if score < best_score:
            best = [(attention_mask.new_tensor(p, dtype=torch.long), *c) for p, c in zip(parts, cuts)]
            best_score = score
    return best or whole


def bucket_rows(rows: Union[torch.Tensor, slice], count: int) -> List[int]:
    """The row indices of a bucket as a list."""
    return list(range(count)) if isinstance(rows, slice) else rows.tolist()


def run_buckets(buckets: List[Bucket], width: int,
                fn: Callable[[Union[torch.Tensor, slice], int, int], torch.Tensor]) -> torch.Tensor:
    """``fn(rows, first, end)`` per bucket → [b, end − first] (or shifted [b, end − first − 1], or
    [b]); the outputs at the full ``width`` (T, or T − 1 for shifted outputs; zeros outside each
    bucket's columns), in the original row order."""
    outs = []
    for rows, a, e in buckets:
        value = fn(rows, a, e)
        if value.dim() >= 2:
            value = F.pad(value, (a, width - a - value.size(1)))
        outs.append(value)
    if len(buckets) == 1 and isinstance(buckets[0][0], slice):
        return outs[0]
    inverse = torch.argsort(torch.cat([rows for rows, _, _ in buckets]))
    return torch.cat(outs)[inverse]


def distributed() -> bool:
    """Whether torch.distributed runs several processes (their forward passes may be collective)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


#: On the CPU, rows up to this many columns run SDPA's math kernel (module docstring).
CPU_MATH_ATTENTION_MAX = 128


def attention_kernel(width: int, device: torch.device):
    """The SDPA kernel for a model call over ``width`` columns on ``device``: the math kernel on
    the CPU up to ``CPU_MATH_ATTENTION_MAX`` columns, else torch's choice (module docstring). A
    model with eager attention is not affected."""
    if torch.device(device).type == "cpu" and width <= CPU_MATH_ATTENTION_MAX:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def reduced_precision(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether a forward of ``model`` on ``device`` now runs below float32: an active autocast to
    a lower dtype, floating-point weights below float32, or TF32 matmuls on CUDA."""
    device_type = torch.device(device).type
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) != torch.float32:
        return True
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype != torch.float32:
        return True
    return device_type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                      or torch.get_float32_matmul_precision() != "highest")


#: max |Δ| between the shared-prefix and the plain forward accepted by the one-time check (float32,
#: reduced precision)
PREFIX_TOLERANCE = {False: 1e-4, True: 5e-2}
_PREFIX_VERIFIED: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[bool, bool]]" = weakref.WeakKeyDictionary()

#: (one row per distinct prefix, each row's prefix index)
PrefixPlan = Tuple[torch.Tensor, torch.Tensor]


def shared_prefix_plan(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       start: Optional[int]) -> Optional[PrefixPlan]:
    """Whether to run the first ``start`` columns once per distinct prefix (module docstring):
    the plan, or None when it would not save more than the length buckets (a host sync)."""
    rows, width = input_ids.shape
    if start is None or start < 2 or start >= width or rows < 2 or distributed():
        return None
    prefix = torch.cat([input_ids[:, :start] * attention_mask[:, :start], attention_mask[:, :start]], dim=1)
    unique, inverse = torch.unique(prefix, dim=0, return_inverse=True)
    distinct = unique.size(0)
    if distinct == rows:
        return None
    shared_cells = (distinct * start + rows * (width - start)) * (1 + BUCKET_PENALTY)
    buckets = length_buckets(attention_mask)
    bucket_cells = sum(len(bucket_rows(r, rows)) * (e - a) for r, a, e in buckets)
    if shared_cells >= bucket_cells * (1 + BUCKET_PENALTY * (len(buckets) - 1)):
        return None
    first = torch.full((distinct,), rows, dtype=torch.long, device=input_ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(rows, device=input_ids.device), reduce="amin")
    return first, inverse


def _prefix_cache_calls(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                        plan: PrefixPlan, **kwargs):
    """The two calls of the shared-prefix path: (output of the distinct prefixes' call, output of
    every row's call on columns ``start:`` over the gathered cache)."""
    from transformers import DynamicCache

    first, inverse = plan
    cache = DynamicCache(config=base_model(model).config)
    prefix_mask = attention_mask[first, :start]
    with attention_kernel(input_ids.size(1), input_ids.device):
        head = model(input_ids=input_ids[first, :start], attention_mask=prefix_mask,
                     position_ids=position_ids_from_mask(prefix_mask), past_key_values=cache, use_cache=True,
                     **kwargs.get("prefix", {}))
    cache.batch_select_indices(inverse)
    positions = position_ids_from_mask(attention_mask)[:, start:]
    with attention_kernel(input_ids.size(1), input_ids.device):
        rest = model(input_ids=input_ids[:, start:], attention_mask=attention_mask, position_ids=positions,
                     past_key_values=cache, use_cache=True, **kwargs.get("rest", {}))
    return head, rest


def _shared_logprobs(model, input_ids, attention_mask, start: int, plan: PrefixPlan) -> torch.Tensor:
    keep = input_ids.size(1) - start
    head, rest = _prefix_cache_calls(model, input_ids, attention_mask, start, plan,
                                     prefix={"logits_to_keep": 1}, rest={"logits_to_keep": keep})
    logits = torch.cat([head.logits[:, -1:][plan[1]], rest.logits[:, -keep:-1]], dim=1)  # predict start … T−1
    return F.pad(gather_token_logprobs(logits, input_ids[:, start:]), (start - 1, 0))


def _shared_prefix_logits(classifier, input_ids, attention_mask, start: int, plan: PrefixPlan) -> torch.Tensor:
    captured = []
    handle = score_head(classifier).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        head, rest = _prefix_cache_calls(classifier, input_ids, attention_mask, start, plan)
    finally:
        handle.remove()
    if len(captured) < 2:
        raise RuntimeError(f"the score head of {type(classifier).__name__} was not called in its forward")
    logits = torch.cat([captured[-2][:, -1:, 0][plan[1]], captured[-1][..., 0]], dim=1).float()  # columns start−1 …
    zero = 0.0 * (head.logits.float().sum() + rest.logits.float().sum())  # FSDP's hooks: see prefix_logits
    return F.pad(logits, (start - 1, 0)) + zero


def _use_shared_prefix(model, input_ids, attention_mask, start, plain: Callable[[], torch.Tensor],
                       shared: Callable[[PrefixPlan], torch.Tensor],
                       plan: Optional[PrefixPlan] = None) -> Optional[torch.Tensor]:
    """``shared(plan)`` when the rows share prefixes enough (or ``plan`` is given) and the model
    passed (or now passes) the one-time check against ``plain()``; else None (the caller runs
    the plain path)."""
    base = base_model(model)
    if getattr(base, "is_gradient_checkpointing", False):
        return None
    plan = shared_prefix_plan(input_ids, attention_mask, start) if plan is None else plan
    if plan is None:
        return None
    reduced = reduced_precision(model, input_ids.device)
    verdict = _PREFIX_VERIFIED.get(model, {}).get(reduced)
    if verdict is None:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                expected, got = plain(), shared(plan)
            columns = torch.zeros_like(expected, dtype=torch.bool)
            columns[:, start - 1 :] = True
            mask = columns & attention_mask[:, -expected.size(1) :].bool()
            delta = float(((got - expected).abs() * mask).amax()) if mask.any() else 0.0
            verdict = delta <= PREFIX_TOLERANCE[reduced]
            reason = f"differ by {delta:.3g} (tolerance {PREFIX_TOLERANCE[reduced]:g})"
        except Exception as error:  # noqa: BLE001 — a model whose cache cannot continue a forward
            verdict, reason = False, f"fail ({type(error).__name__}: {error})"
        finally:
            model.train(was_training)
        _PREFIX_VERIFIED.setdefault(model, {})[reduced] = verdict
        if not verdict:
            log.warning("%s: forward passes over a KV cache of shared prefixes %s: reading every row in full "
                        "from now on", type(base).__name__, reason)
    return shared(plan) if verdict else None


def shared_prompt_cache(model: torch.nn.Module, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor,
                        repeats: int):
    """A ``DynamicCache`` of every prompt but its last token, computed once per prompt and repeated
    ``repeats`` times per row (``repeat_interleave``), for ``generate`` to continue k samples of
    each prompt from (rollout.sample): the prompts' prefill runs once instead of k times. None
    when not worth it or not known to be exact: fewer than 2 repeats or prompt columns, several
    processes (a sharded forward is collective), a model with a ``generation_config.
    cache_implementation`` of its own, or a model whose KV cache fails the shared-prefix check at
    this precision (module docstring; run here on the first call if no read has run it)."""
    from transformers import DynamicCache

    width = prompt_input_ids.size(1)
    base = base_model(model)
    if repeats < 2 or width < 2 or distributed():
        return None
    if getattr(getattr(base, "generation_config", None), "cache_implementation", None) not in (None, "dynamic"):
        return None
    reduced = reduced_precision(model, prompt_input_ids.device)
    if _PREFIX_VERIFIED.get(model, {}).get(reduced) is None and width >= 3 and accepts_logits_to_keep(model):
        # Checked here, at the model's first rollout, on these prompts (each twice), whatever ran
        # before: a run resumed from a checkpoint then samples exactly as the run it continues,
        # which would otherwise prefill every row until a training read had run the check.
        ids = prompt_input_ids.repeat_interleave(2, dim=0)
        mask = prompt_attention_mask.repeat_interleave(2, dim=0)
        rows = torch.arange(ids.size(0), device=ids.device)
        _use_shared_prefix(model, ids, mask, width - 1,
                           plain=lambda: response_token_logprobs(model, ids, mask, start=width - 1, shared_prefix=False),
                           shared=lambda plan: _shared_logprobs(model, ids, mask, width - 1, plan),
                           plan=(rows[0::2], rows // 2))
    if not _PREFIX_VERIFIED.get(model, {}).get(reduced):
        return None
    cache = DynamicCache(config=base.config)
    mask = prompt_attention_mask[:, :-1]
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    with torch.no_grad():
        model(input_ids=prompt_input_ids[:, :-1], attention_mask=mask, position_ids=position_ids_from_mask(mask),
              past_key_values=cache, use_cache=True, **extra)
    cache.batch_repeat_interleave(repeats)
    return cache


def prefix_logits(
    classifier: torch.nn.Module,
    input_ids: Optional[torch.Tensor],
    attention_mask: torch.Tensor,
    inputs_embeds: Optional[torch.Tensor] = None,
    bucketed: bool = False,
    start: Optional[int] = None,
) -> torch.Tensor:
    """A logit for every prefix: [B, T] float32; entry ``t`` scores tokens ``≤ t`` of the row.

    Pass ``inputs_embeds`` instead of ``input_ids`` to differentiate with respect to the
    embeddings (R1 penalty). Padding positions hold arbitrary values: mask them. ``bucketed``:
    one call per length bucket, or, with ``start`` (only the logits from column ``start − 1`` on
    are read; the others are then 0), over a cache of shared prefixes (module docstring; neither
    with ``inputs_embeds``).
    """
    if bucketed and inputs_embeds is None:
        with attention_kernel(attention_mask.size(1), attention_mask.device):
            if start is not None:
                shared = _use_shared_prefix(
                    classifier, input_ids, attention_mask, start,
                    plain=lambda: prefix_logits(classifier, input_ids, attention_mask, bucketed=True),
                    shared=lambda plan: _shared_prefix_logits(classifier, input_ids, attention_mask, start, plan))
                if shared is not None:
                    return shared
            buckets = length_buckets(attention_mask)
            return run_buckets(buckets, attention_mask.size(1),
                               lambda rows, a, e: prefix_logits(classifier, input_ids[rows, a:e],
                                                                attention_mask[rows, a:e]))
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
    bucketed: bool = False,
    start: Optional[int] = None,
) -> torch.Tensor:
    """One logit per row, read at its last real token: [B] float32 (``bucketed``, ``start``:
    ``prefix_logits``; ``start`` at most the first column of every row's last token)."""
    logits = prefix_logits(classifier, input_ids, attention_mask, inputs_embeds, bucketed=bucketed, start=start)
    rows = torch.arange(logits.size(0), device=logits.device)
    return logits[rows, last_token_index(attention_mask)]


_ACCEPTS_LOGITS_TO_KEEP: Dict[type, bool] = {}


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward (a PEFT wrapper's base model's) takes ``logits_to_keep``."""
    base = base_model(model)
    kind = type(base)
    if kind not in _ACCEPTS_LOGITS_TO_KEEP:
        try:
            _ACCEPTS_LOGITS_TO_KEEP[kind] = "logits_to_keep" in inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            _ACCEPTS_LOGITS_TO_KEEP[kind] = False
    return _ACCEPTS_LOGITS_TO_KEEP[kind]


def first_scored_column(loss_mask: torch.Tensor) -> Optional[int]:
    """The first column holding a scored (response) token of any row, or None (a host sync)."""
    columns = loss_mask.bool().any(0).nonzero()
    return int(columns[0]) if columns.numel() else None


def response_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    start: Optional[int] = None,
    bucketed: bool = True,
    shared_prefix: bool = True,
) -> torch.Tensor:
    """``objectives.logprobs.token_logprobs`` (shifted [B, T−1], float32) with the LM head run
    only where tokens are scored: from column ``start`` on (default: ``first_scored_column`` of
    ``loss_mask``). Entries before ``start − 1`` (they score prompt tokens) are 0; the others are
    the same values. Falls back to the full computation for a model without ``logits_to_keep``.
    ``bucketed``: one call per length bucket, or (``shared_prefix``) two over a cache of shared
    prefixes (module docstring)."""
    if bucketed:
        if start is None and loss_mask is not None:
            start = first_scored_column(loss_mask)
        if shared_prefix and start is not None and start >= 2 and accepts_logits_to_keep(model):
            shared = _use_shared_prefix(
                model, input_ids, attention_mask, start,
                plain=lambda: response_token_logprobs(model, input_ids, attention_mask, loss_mask, start,
                                                      shared_prefix=False),
                shared=lambda plan: _shared_logprobs(model, input_ids, attention_mask, start, plan))
            if shared is not None:
                return shared
        buckets = length_buckets(attention_mask)
        if loss_mask is not None:
            scored = loss_mask.bool()
            firsts = torch.where(scored.any(-1), scored.int().argmax(-1), input_ids.size(1)).tolist()

        def part(rows, a: int, e: int) -> torch.Tensor:
            if loss_mask is not None:
                first = min(firsts[i] for i in bucket_rows(rows, len(firsts)))
                group_start = first - a if first < e else None
            else:
                group_start = None if start is None else start - a
            return response_token_logprobs(model, input_ids[rows, a:e], attention_mask[rows, a:e],
                                           start=group_start, bucketed=False)

        return run_buckets(buckets, input_ids.size(1) - 1, part)
    width = input_ids.size(1)
    if start is None and loss_mask is not None:
        start = first_scored_column(loss_mask)
    if start is None or start <= 1 or not accepts_logits_to_keep(model):
        with attention_kernel(width, input_ids.device):
            return token_logprobs(model, input_ids, attention_mask)
    keep = width - start + 1  # the logits at positions start−1 … T−1 (the last one predicts nothing)
    with attention_kernel(width, input_ids.device):
        output = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False, logits_to_keep=keep)
    logits = output.logits[:, -keep:-1]
    return F.pad(gather_token_logprobs(logits, input_ids[:, start:]), (start - 1, 0))


__all__ = ["BUCKET_PENALTY", "CPU_MATH_ATTENTION_MAX", "PREFIX_TOLERANCE", "accepts_logits_to_keep", "attention_kernel",
           "bucket_rows", "distributed", "first_scored_column", "last_token_index", "length_buckets", "prefix_logits",
           "reduced_precision", "response_token_logprobs", "run_buckets", "score_head", "sequence_logits",
           "shared_prefix_plan", "shared_prompt_cache"]
