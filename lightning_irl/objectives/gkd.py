"""Generalized Jensen-Shannon divergence to a teacher (GKD, Agarwal et al. 2024, arXiv 2306.13649).

Per token, with ``p_S = softmax(student_logits / τ)``, ``p_T = softmax(teacher_logits / τ)``:

    M    = β·p_T + (1−β)·p_S                       (mixed in probability space, via logsumexp)
    JSD_β = β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M)

with the endpoints special-cased as in TRL: ``β = 0`` is forward KL ``KL(p_T ‖ p_S)`` (SFT-like,
mass-covering) and ``β = 1`` is reverse KL ``KL(p_S ‖ p_T)`` (mode-seeking). ``β = 0.5`` is the
ordinary Jensen-Shannon divergence. Note the interior formula tends to 0, not to the KLs, as β→0
or β→1; the endpoints are separate objectives, exactly as in TRL.

``generalized_jsd_loss`` reproduces ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` of
TRL 1.16.0 (the ``bench`` extra pins ``trl==1.16.0``) argument for argument, reductions included:
- ``labels``: positions with ``labels == -100`` are dropped (``jsd[mask]`` → [N, V]);
- ``"batchmean"``: ``jsd.sum() / mask.sum().clamp_min(1)`` with labels (a per-token mean), else
  ``jsd.sum() / max(jsd.size(0), 1)`` (divided by the batch size B only);
- ``"sum"``: ``jsd.sum()``;
- ``"mean"``: ``jsd.mean()`` over *elements*, i.e. also divided by the vocabulary size (TRL quirk);
- anything else (``"none"``): the per-(token, vocab-entry) terms, [N, V] or [B, T, V];
- ``num_items_in_batch`` (when given) overrides ``reduction``: ``jsd.sum() / num_items_in_batch``.
TRL does not rescale by τ² and computes in the input dtype; so does this copy. TRL's trainer calls
it with the default temperature 1.0 and teacher logits produced under ``no_grad``; this function
does not detach the teacher itself.

For this package's pipeline use ``token_generalized_jsd`` (per-token values, vocabulary summed) and
``masked_generalized_jsd_loss`` (a 0/1 or weight mask instead of labels, global token count as the
denominator); these compute in float32 at least. With ``mask = labels != -100`` and the default
denominator, ``masked_generalized_jsd_loss`` equals TRL's ``"batchmean"`` value.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from lightning_irl.objectives.logprobs import masked_sum, per_loss_token


def _check(beta: float, temperature: float) -> None:
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _elementwise_jsd(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float):
    """TRL's per-(token, vocab-entry) terms; summing over the last dim gives JSD_β per token."""
    if beta == 0:
        return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    if beta == 1:
        return F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    beta_t = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + torch.log1p(-beta_t), teacher_log_probs + torch.log(beta_t)]),
        dim=0,
    )
    # F.kl_div(input, target) = target·(log target − input): KL(target ‖ exp(input)).
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    return beta_t * kl_teacher + (1 - beta_t) * kl_student


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """TRL 1.16.0 ``GKDTrainer.generalized_jsd_loss``, same arguments and reductions (see module doc).

    ``student_logits``/``teacher_logits``: [B, T, V] (already shifted); ``labels``: [B, T] with -100
    at ignored positions.
    """
    _check(beta, temperature)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    jsd = _elementwise_jsd(student_log_probs, teacher_log_probs, beta)

    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]

    if num_items_in_batch is not None:
        jsd_sum = jsd.sum()
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(jsd_sum.device)
        return jsd_sum / num_items_in_batch
    if reduction == "batchmean":
        denom = mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1)
        return jsd.sum() / denom
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def token_generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """JSD_β per token: [..., V] logits → [...] (vocabulary summed), in float32 at least."""
    _check(beta, temperature)
    s = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
    t = teacher_logits if teacher_logits.dtype == torch.float64 else teacher_logits.float()
    if s.dtype != t.dtype:
        s, t = s.double(), t.double()
    student_log_probs = F.log_softmax(s / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(t / temperature, dim=-1)
    return _elementwise_jsd(student_log_probs, teacher_log_probs, beta).sum(-1)


def masked_generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    num_loss_tokens: Optional[Union[int, float, torch.Tensor]] = None,
) -> torch.Tensor:
    """``Σ_t mask_t·JSD_β(t) / num_loss_tokens`` over [B, T-1, V] logits and a [B, T-1] mask.

    ``num_loss_tokens`` defaults to ``mask.sum()`` (at least 1); pass the global count of loss
    tokens for accumulation/DDP-correct gradients (TRL's ``num_items_in_batch``).
    """
    per_token = token_generalized_jsd(student_logits, teacher_logits, beta, temperature)
    return per_loss_token(masked_sum(per_token, mask), mask, num_loss_tokens)
