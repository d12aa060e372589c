"""The math of the evaluation metrics as pure functions (no state, no Lightning).

Notation: ``x`` a prompt, ``y`` a whole response (EOS included), ``π`` the policy, ``p_E`` the
known expert, ``V`` the number of tokens the policy can emit (its output vocabulary), ``L(y)``
the number of tokens the sampler emitted for ``y`` (EOS included; ``max_new_tokens`` for a
response cut off before EOS). Log-probabilities are of whole responses, in nats.

How to read the three reverse-direction numbers:

- ``reverse_kl`` = KL(π ‖ p̃_E) = E_{y~π}[log π(y|x) − log p̃_E(y|x)], against the expert smoothed
  with a *random typist*:

      p̃_E(y|x) = (1 − ε)·p_E^tok(y|x) + ε·V^(−L(y)).

  The typist presses a uniformly random key at each step and stops at EOS or at the length cap,
  so ``u(y) = V^(−L(y))`` is a probability distribution over exactly the token sequences the
  sampler can emit. ``p_E^tok(y|x)`` is ``p_E`` of the response's string when ``y`` is the
  *canonical* spelling of that string (the token ids the data pipeline gives the expert's
  answer, then EOS), else 0: giving the string's probability to every spelling would make p̃_E
  sum over 1. So p̃_E sums to at most 1 and the reverse KL is a true divergence: ≥ 0, 0 only for
  π = p̃_E, and more invalid mass always costs. A sample outside the support costs
  ``log π(y) + L(y)·log V + log(1/ε)``: how much likelier π makes that junk than a random
  typist would, plus a fixed ``log(1/ε)`` (≈ 6.9 nats at the default ε = 1e-3). A valid sample
  costs ``log π(y) − log p_E(y)`` up to at most ``−log(1 − ε)`` ≈ ε nats. It replaces an older
  estimate that floored ``log p_E`` at log 1e-6, which went *negative* (more junk, lower value)
  when π spread mass thinly over many invalid responses.
- ``reverse_kl_valid`` = KL(π(·|x, valid) ‖ p_E) = E_{y~π|valid}[log π − log p_E] − log P_π(valid):
  the policy conditioned on staying in the support; a true KL with no smoothing, blind to how
  much mass leaks out. Read it with
- ``invalid_mass`` = P_{y~π}(p_E(y|x) = 0) at the string level (a response cut off before EOS
  or with a special token inside counts as invalid).

Other definitions:

- forward KL  KL(p_E‖π) = Σ_y p_E(y|x)[log p_E(y|x) − log π(y|x)], exact: every answer of the
  expert's support teacher-forced in its canonical spelling, averaged over prompts.
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
and a sub-word tokenizer can spell one string several ways. ``reverse_kl`` lives on token
sequences (non-canonical spellings of valid strings count as typist output), so it is ≥ the
KL between the string distributions the two induce. The forward KL scores the canonical
spelling only, an upper bound of the string-level one. ``reverse_kl_valid``, ``invalid_mass``
and the modes are string-level; the entropy is that of token sequences (≥ the string entropy).
With a word-level tokenizer (the ``modes`` task) every string has one spelling and these gaps
vanish.

Standard errors treat the samples as independent draws. With ``k`` samples for each of a fixed
set of prompts this is conservative for the average over those prompts (the spread between
prompts is counted as noise).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Hashable, List, Mapping, MutableMapping, Optional, Sequence, Tuple, TypeVar

import torch
from torchmetrics.functional.text import bleu_score

from lightning_irl.data.encode import encode_records
from lightning_irl.data.tasks.base import normalize

#: Default ε of the smoothed expert. Any ε in (0, 1) gives a true divergence; ε trades the bias on
#: valid samples (≤ −log(1 − ε) ≈ ε nats, far below the sampling error of a few hundred samples)
#: against the fixed extra cost log(1/ε) of an invalid one (≈ 6.9 nats, small next to the
#: L·log V ≈ 5–12 nats per token a long junk answer already costs, so the ranking of policies is
#: driven by the junk itself rather than by the constant).
SMOOTHING = 1e-3
COVERAGE_THRESHOLD = 0.5

T = TypeVar("T")
SupportCache = MutableMapping[str, List[Dict[str, Any]]]


def _tensor(values, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    if torch.is_tensor(values):
        return values.detach().float()
    device = like.device if like is not None else None
    return torch.as_tensor(values, dtype=torch.float32, device=device)


def forward_kl_terms(expert_logp, policy_logp) -> torch.Tensor:
    """Per-sample terms of KL(p_E‖π) for responses y of the expert: ``log p_E(y) − log π(y)``."""
    policy_logp = _tensor(policy_logp)
    return _tensor(expert_logp, policy_logp) - policy_logp


def typist_logp(lengths, vocab_size: int) -> torch.Tensor:
    """log u(y) = −L(y)·log V: the random typist's probability of a response of L tokens."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    return -_tensor(lengths) * math.log(vocab_size)


def smoothed_expert_logp(expert_logp, lengths, vocab_size: int, eps: float = SMOOTHING) -> torch.Tensor:
    """log p̃_E(y) = log((1 − ε)·p_E^tok(y) + ε·V^(−L(y))) per response.

    Args:
        expert_logp: log p_E^tok of each response: the expert's log-probability of its string
            where the response is that string's canonical spelling ending in EOS, −inf (or NaN)
            otherwise (``rollout_expert_logps`` gives it).
        lengths: Tokens the sampler emitted for each response, EOS included.
        vocab_size: Number of tokens the policy can emit (the output layer's rows).
        eps: Weight ε of the typist, in (0, 1].
    """
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"smoothing eps must be in (0, 1], got {eps}")
    expert = _tensor(expert_logp)
    typist = typist_logp(_tensor(lengths, expert), vocab_size) + math.log(eps)
    if eps == 1.0:
        return typist
    expert = torch.where(torch.isnan(expert), torch.full_like(expert, -math.inf), expert)
    return torch.logaddexp(expert + math.log1p(-eps), typist)


def reverse_kl_terms(policy_logp, smoothed_logp) -> torch.Tensor:
    """Per-sample terms of KL(π‖p̃_E) for samples y ~ π: ``log π(y) − log p̃_E(y)``; their mean
    is an unbiased estimate (``smoothed_logp`` from ``smoothed_expert_logp``)."""
    policy_logp = _tensor(policy_logp)
    return policy_logp - _tensor(smoothed_logp, policy_logp)


def mean_and_se(total, total_sq, count) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, standard error of the mean) from Σx, Σx² and n of independent draws (NaN where
    undefined: no draws for the mean, fewer than 2 for the error)."""
    total, total_sq, count = (torch.as_tensor(v, dtype=torch.float64) for v in (total, total_sq, count))
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    if count <= 0:
        return nan, nan
    mean = total / count
    if count < 2:
        return mean, nan
    variance = ((total_sq - count * mean * mean) / (count - 1)).clamp(min=0.0)  # clamp: rounding
    return mean, (variance / count).sqrt()


def estimate(terms) -> Tuple[float, float]:
    """(mean, standard error) of a per-sample estimate, e.g. of ``reverse_kl_terms``."""
    values = (terms.detach() if torch.is_tensor(terms) else torch.as_tensor(terms)).double().reshape(-1)
    mean, se = mean_and_se(values.sum(), (values * values).sum(), values.numel())
    return float(mean), float(se)


def invalid(expert_logp) -> torch.Tensor:
    """1.0 where a sample lies outside the expert's support (log p_E = −inf or NaN), else 0.0."""
    return (~torch.isfinite(_tensor(expert_logp))).float()


# ---- the expert's log-probabilities of sampled responses -----------------------------------
def support_examples(task, tokenizer, prompt: str, max_prompt_length: Optional[int] = None,
                     cache: Optional[SupportCache] = None) -> List[Dict[str, Any]]:
    """Every answer of ``task.support(prompt)`` encoded as the data pipeline encodes a
    demonstration (``data.encode.encode_records``, the answer never cut), each with its
    ``expert_logp``. ``input_ids[prompt_length:]`` is the answer's canonical spelling, EOS included.

    ``cache``: a dict reused across calls with the same task, tokenizer and ``max_prompt_length``.
    """
    if cache is not None and prompt in cache:
        return cache[prompt]
    support = task.support(prompt)
    records = [{"prompt": prompt, "response": answer} for answer in support]
    examples, stats = encode_records(records, tokenizer, max_length=None, max_prompt_length=max_prompt_length)
    if len(examples) != len(records):
        raise ValueError(f"{task.name}: some expert answers of {prompt!r} cannot be encoded ({stats.as_dict()})")
    for example, answer in zip(examples, support):
        example["expert_logp"] = math.log(support[answer])
    if cache is not None:
        cache[prompt] = examples
    return examples


def canonical_spellings(task, tokenizer, prompt: str,
                        cache: Optional[SupportCache] = None) -> Dict[str, Tuple[int, ...]]:
    """Each expert answer of ``prompt`` → its canonical token ids, EOS included."""
    return {e["response"]: tuple(e["input_ids"][e["prompt_length"]:])
            for e in support_examples(task, tokenizer, prompt, cache=cache)}


def rollout_expert_logps(task, tokenizer, prompts: Sequence[str], rollout, num_samples: int,
                         cache: Optional[SupportCache] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The expert's view of every response of a ``Rollout`` of ``prompts`` (``num_samples``
    contiguous rows per prompt): ``(string_logp, token_logp, lengths)``, each [N] on the CPU.

    - ``string_logp``: log p_E of the response's string; −inf when the string is outside the
      support, when the response was cut off before EOS, or when a special token (pad, unk, …)
      sits inside it (``Rollout.responses`` drops those when decoding, which would let a junk
      spelling pass as a valid string). Its −inf entries are the invalid mass.
    - ``token_logp``: log p_E^tok, the same where the response's token ids (EOS included) are
      the canonical spelling of its string (``canonical_spellings``), else −inf.
    - ``lengths``: tokens the sampler emitted, EOS included.

    ``smoothed_expert_logp(token_logp, lengths, vocab_size, eps)`` then gives log p̃_E.
    """
    k = num_samples
    rows = rollout.response_ids.tolist()
    if len(rows) != len(prompts) * k:
        raise ValueError(f"{len(rows)} responses for {len(prompts)} prompts × {k} samples")
    special = set(tokenizer.all_special_ids)
    string, token = [], []
    for i, (ids, mask, done, text) in enumerate(zip(rows, rollout.response_mask.tolist(),
                                                    rollout.finished.tolist(), rollout.responses)):
        prompt = prompts[i // k]
        response = tuple(t for t, m in zip(ids, mask) if m)
        body = response[:-1] if done else response
        logp = -math.inf
        if done and not any(t in special for t in body):
            logp = task.log_prob(prompt, text)
        canonical = math.isfinite(logp) and \
            canonical_spellings(task, tokenizer, prompt, cache).get(normalize(text)) == response
        string.append(logp)
        token.append(logp if canonical else -math.inf)
    return (torch.tensor(string, dtype=torch.float32), torch.tensor(token, dtype=torch.float32),
            rollout.response_lengths.detach().cpu().float())


# ---- modes and diversity ----------------------------------------------------------------------
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


# ---- closed forms for explicit distributions -------------------------------------------------
def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    high, low = max(a, b), min(a, b)
    return high + math.log1p(math.exp(low - high))


def exact_kls(expert: Mapping[Hashable, float], policy: Mapping[Hashable, float], vocab_size: int,
              eps: float = SMOOTHING, length: Callable[[Hashable], int] = len) -> Dict[str, float]:
    """The metrics' exact values for two explicit distributions over responses, by summation.

    Keys are responses as the sampler emits them, e.g. tuples of token ids ending in EOS (or
    ``max_new_tokens`` long without it); ``length(y)`` is L(y) (``len`` suits such tuples).
    ``expert`` is p_E^tok (canonical spellings only; it may sum to less than 1), ``policy`` is π
    and must list every response π can emit for the reverse KL to be exact. Every key is taken
    as its own string, so ``invalid_mass`` and ``reverse_kl_valid`` are those of a tokenizer
    with one spelling per string.

    Returns ``forward_kl`` KL(p_E‖π), ``reverse_kl`` KL(π‖p̃_E) with
    p̃_E = (1 − eps)·p_E + eps·V^(−L), ``reverse_kl_valid`` KL(π(·|valid)‖p_E) and
    ``invalid_mass``.
    """
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"smoothing eps must be in (0, 1], got {eps}")
    log_keep, log_eps, log_v = (math.log1p(-eps) if eps < 1 else -math.inf), math.log(eps), math.log(vocab_size)
    forward = sum(p * (math.log(p) - _log(policy.get(y, 0.0))) for y, p in expert.items() if p > 0)
    reverse = 0.0
    for y, q in policy.items():
        if q > 0:
            smoothed = _logaddexp(log_keep + _log(expert.get(y, 0.0)), log_eps - length(y) * log_v)
            reverse += q * (math.log(q) - smoothed)
    valid = sum(q for y, q in policy.items() if expert.get(y, 0.0) > 0)
    if valid > 0:
        reverse_valid = sum(q / valid * (math.log(q / valid) - math.log(expert[y]))
                            for y, q in policy.items() if q > 0 and expert.get(y, 0.0) > 0)
    else:
        reverse_valid = math.nan
    return {"forward_kl": forward, "reverse_kl": reverse, "reverse_kl_valid": reverse_valid,
            "invalid_mass": sum(q for y, q in policy.items() if expert.get(y, 0.0) <= 0)}
