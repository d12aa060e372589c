"""The math of the evaluation metrics as pure functions (no state, no Lightning).

Notation: ``x`` a prompt, ``y`` a whole response (EOS included), ``π`` the policy, ``p_E`` the
known expert. Log-probabilities are of whole responses, in nats.

- forward KL  KL(p_E‖π) = E_{y~p_E}[log p_E(y|x) − log π(y|x)]   (expert samples)
- reverse KL  KL(π‖p_E) = E_{y~π}[log π(y|x) − log p_E(y|x)]     (policy samples)
  Where p_E(y|x) = 0 the term is infinite, so the estimate uses a floor,
  ``log p_E ≥ log(1e-6)`` by default (``LOG_FLOOR``), and the mass that hits it is reported
  separately as the invalid mass. The floored value is finite and tracks the valid part; it is
  not a bound on the true (infinite) KL, and can dip below 0 when π spreads tiny mass over many
  invalid responses.
- valid reverse KL  KL(π(·|x, valid)‖p_E) = E_{y~π|valid}[log π − log p_E] − log P_π(valid): a
  true KL (≥ 0, no floor) of the policy conditioned on staying in the support
- invalid mass = P_{y~π}(p_E(y|x) = 0)
- per-mode mass m_π(c) = P_{y~π}(mode(y) = c); expert weight m_E(c) = E_x[w_E(c|x)] over the
  same prompts; mode coverage = share of modes with m_E(c) > 0 and m_π(c) ≥ threshold · m_E(c)
  (threshold 0.5 by default: a mode counts as produced when the policy gives it at least half
  its expert weight).
- entropy estimate H(π) ≈ −E_{y~π}[log π(y|x)]
- distinct-n: unique / total word n-grams among the k samples of one prompt, averaged over prompts
- self-BLEU: BLEU of each sample against the other k−1 samples of its prompt (torchmetrics
  ``bleu_score``, word tokens, up to 4-grams with sacrebleu's *effective order*: a hypothesis of
  L < n words uses orders 1..L), averaged over samples.

Tokens vs strings: p_E is defined on strings, the policy's log-probability on token sequences,
and a sub-word tokenizer can spell one string several ways. Scoring the canonical tokenization
makes the forward KL an upper bound of the string-level one; the reverse KL estimate is the
string-level one minus H(tokenization | string) under π (a lower bound), and the entropy is that
of token sequences (≥ the string entropy). The gaps vanish when π spells strings canonically; with
a word-level tokenizer (the ``modes`` task) there are none.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

import torch

LOG_FLOOR = math.log(1e-6)
COVERAGE_THRESHOLD = 0.5

T = TypeVar("T")


def _tensor(values, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    if torch.is_tensor(values):
        return values.detach().float()
    device = like.device if like is not None else None
    return torch.as_tensor(values, dtype=torch.float32, device=device)


def forward_kl_terms(expert_logp, policy_logp) -> torch.Tensor:
    """Per-sample terms of KL(p_E‖π) for samples y ~ p_E: ``log p_E(y) − log π(y)``."""
    policy_logp = _tensor(policy_logp)
    return _tensor(expert_logp, policy_logp) - policy_logp


def reverse_kl_terms(policy_logp, expert_logp, log_floor: float = LOG_FLOOR) -> torch.Tensor:
    """Per-sample terms of the floored KL(π‖p_E) for samples y ~ π:
    ``log π(y) − max(log p_E(y), log_floor)`` (``expert_logp`` is −inf outside the support)."""
    policy_logp = _tensor(policy_logp)
    return policy_logp - _tensor(expert_logp, policy_logp).clamp(min=log_floor)


def invalid(expert_logp) -> torch.Tensor:
    """1.0 where a sample lies outside the expert's support (log p_E = −inf or NaN), else 0.0."""
    return (~torch.isfinite(_tensor(expert_logp))).float()


def mode_counts(modes: Sequence[Optional[str]], names: Sequence[str]) -> torch.Tensor:
    """How many samples fall in each named mode: [len(names)] (None / unknown names count nowhere)."""
    index = {name: i for i, name in enumerate(names)}
    counts = torch.zeros(len(names))
    for mode in modes:
        if mode in index:
            counts[index[mode]] += 1
    return counts


def expert_mode_weights(weights: Sequence[Mapping[str, float]], names: Sequence[str]) -> torch.Tensor:
    """Σ over samples of the expert's mode weights for the sample's prompt: [len(names)]."""
    out = torch.zeros(len(names))
    for row in weights:
        for i, name in enumerate(names):
            out[i] += float(row.get(name, 0.0))
    return out


def mode_coverage(policy_mass: torch.Tensor, expert_mass: torch.Tensor,
                  threshold: float = COVERAGE_THRESHOLD) -> torch.Tensor:
    """Share of the expert's modes (those with expert mass > 0) that the policy gives at least
    ``threshold`` times their expert mass."""
    present = expert_mass > 0
    if not bool(present.any()):
        return torch.tensor(float("nan"))
    covered = (policy_mass >= threshold * expert_mass) & present
    return covered.sum().float() / present.sum().float()


def ngrams(words: Sequence[str], n: int) -> List[Tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> Tuple[int, int]:
    """(unique, total) word n-grams over ``texts``; distinct-n = unique / total."""
    grams = [g for text in texts for g in ngrams(text.split(), n)]
    return len(set(grams)), len(grams)


def self_bleu(texts: Sequence[str], n_gram: int = 4) -> List[float]:
    """BLEU of each text against all the others as references (needs ≥ 2 texts).

    Uses ``torchmetrics.functional.text.bleu_score`` (no smoothing) with the effective order
    ``min(n_gram, words in the hypothesis)`` and uniform weights; an empty hypothesis scores 0.
    """
    from torchmetrics.functional.text import bleu_score

    if len(texts) < 2:
        return []
    scores = []
    for i, hypothesis in enumerate(texts):
        order = min(n_gram, len(hypothesis.split()))
        if order == 0:
            scores.append(0.0)
            continue
        references = [t for j, t in enumerate(texts) if j != i]
        scores.append(float(bleu_score([hypothesis], [references], n_gram=order)))
    return scores


def groups_of(values: Sequence[T], k: int) -> List[List[T]]:
    """Consecutive groups of ``k`` (the rollout layout: samples of one prompt are contiguous)."""
    if k < 1 or len(values) % k:
        raise ValueError(f"{len(values)} values do not split into groups of {k}")
    return [list(values[i : i + k]) for i in range(0, len(values), k)]


def exact_kls(expert: Mapping[str, float], policy: Mapping[str, float],
              log_floor: float = LOG_FLOOR) -> Dict[str, float]:
    """Closed-form forward KL, floored reverse KL and invalid mass of two explicit distributions
    over strings (dicts of probabilities), for tests and for small enumerable tasks."""
    forward = sum(p * (math.log(p) - (math.log(policy[y]) if policy.get(y, 0) > 0 else -math.inf))
                  for y, p in expert.items() if p > 0)
    reverse = sum(q * (math.log(q) - max(math.log(expert[y]) if expert.get(y, 0) > 0 else -math.inf, log_floor))
                  for y, q in policy.items() if q > 0)
    invalid_mass = sum(q for y, q in policy.items() if expert.get(y, 0) <= 0)
    return {"forward_kl": forward, "reverse_kl": reverse, "invalid_mass": invalid_mass}
