"""Sample-based evaluation at validation time, logged under ``eval/``.

``EvalConfig`` is the ``evaluation:`` argument of every algorithm. At an evaluating validation run
the module (``IRLModule``):

1. teacher-forces every answer of the expert's support for every validation prompt
   (``SampleEvaluator.support_batches`` → policy forward → ``update_support``) →
   ``eval/forward_kl``, exact for the validation prompts;
2. samples ``num_samples`` responses for each of the first ``num_prompts`` validation prompts
   (per device) at temperature 1 with ``rollout.sample`` (the policy's log-probs, from the
   sampling pass when exact: ``SamplingConfig.logprobs_from``)
   → ``eval/reverse_kl`` (± ``eval/reverse_kl_se``), ``eval/reverse_kl_valid``,
   ``eval/invalid_mass``, mode coverage, per-mode mass, entropy, distinct-n, self-BLEU,
   response length.

Reading the reverse direction (definitions in ``metrics.functional``): ``reverse_kl`` is the KL
from the policy to the expert smoothed with a random typist, a true divergence that grows with
every bit of invalid mass and with how far the valid part is from the expert;
``reverse_kl_valid`` is the KL of the policy conditioned on valid answers (the shape of the valid
part only) and ``invalid_mass`` the share of samples outside the support (the leak only).

``SampleEvaluator`` holds the metric objects and turns batches / rollouts into their inputs; it
never runs a model. The math lives in ``metrics.functional``. Metrics that need a known expert
exist only when the data come from a built-in task (or ``EvalConfig.task`` names one).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torchmetrics import Metric

from lightning_irl.data.collate import DemonstrationCollator
from lightning_irl.data.tasks import get_task
from lightning_irl.metrics.diversity import DistinctN, ResponseLength, SelfBLEU
from lightning_irl.metrics.functional import (
    COVERAGE_THRESHOLD,
    SMOOTHING,
    rollout_expert_logps,
    smoothed_expert_logp,
    support_examples,
)
from lightning_irl.metrics.known_expert import (
    ForwardKL,
    InvalidMass,
    ModeMass,
    PolicyEntropy,
    ReverseKL,
    ValidReverseKL,
)
from lightning_irl.rollout import Rollout, SamplingConfig


@dataclass
class EvalConfig:
    """Sample-based evaluation during validation (``eval/…`` metrics).

    Args:
        enabled: False turns the sampling metrics off (``val/loss`` is still logged).
        num_prompts: Validation prompts sampled per device at each evaluation (the first ones of
            the validation loader).
        num_samples: Responses per prompt; diversity metrics (distinct-n within a prompt,
            self-BLEU) need at least 2.
        every_n_val: Evaluate at every n-th validation run of ``fit`` (``validate`` always
            evaluates; the sanity check never does).
        max_new_tokens: Response length cap (default: the module's ``sampling.max_new_tokens``).
            A response cut off before EOS counts as outside the expert's support. It also
            bounds the random typist of the smoothed expert (``smoothing``).
        temperature: Sampling temperature. The KL, invalid-mass and entropy estimates assume 1
            (samples from the policy itself).
        seed: Seed of the evaluation's samples, so every evaluation draws with the same random
            numbers and training randomness is left untouched. None: the global generator.
        task: A built-in task to score against when the data module has none.
        smoothing: ε of ``eval/reverse_kl``: the KL is taken to (1 − ε)·expert + ε·random typist
            (uniform token each step, stopping at EOS or the cap), which is a distribution over
            everything the sampler can emit, so the value is a true KL (≥ 0) and finite. Valid
            samples are shifted by at most ε nats; an invalid one costs log(1/ε) ≈ 6.9 nats on
            top of its L·log V typist cost. Compare runs only at the same ε.
        support_batch_size: Rows (prompt, expert answer) per policy forward of the exact forward
            KL. None: as many as the validation batch has rows, so the extra forwards (about
            the mean number of expert answers per prompt) fit wherever validation fits.
        coverage_threshold: A mode is covered when the policy gives it at least this fraction
            of its expert weight.
        self_bleu_ngram: Highest n-gram order of self-BLEU.
    """

    enabled: bool = True
    num_prompts: int = 32
    num_samples: int = 4
    every_n_val: int = 1
    max_new_tokens: Optional[int] = None
    temperature: float = 1.0
    seed: Optional[int] = 1234
    task: Optional[str] = None
    smoothing: float = SMOOTHING
    support_batch_size: Optional[int] = None
    coverage_threshold: float = COVERAGE_THRESHOLD
    self_bleu_ngram: int = 4

    def __post_init__(self) -> None:
        if self.num_prompts < 0 or self.num_samples < 1 or self.every_n_val < 1:
            raise ValueError("evaluation: need num_prompts >= 0, num_samples >= 1, every_n_val >= 1")
        if not 0.0 < self.smoothing < 1.0:
            raise ValueError(f"evaluation.smoothing must be in (0, 1), got {self.smoothing}")
        if self.support_batch_size is not None and self.support_batch_size < 1:
            raise ValueError("evaluation.support_batch_size must be >= 1")

    def sampling(self, base: SamplingConfig) -> SamplingConfig:
        """Ancestral sampling from the policy (no top-p / top-k)."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens or base.max_new_tokens,
                              temperature=self.temperature, top_p=1.0, top_k=0, do_sample=True,
                              num_samples=self.num_samples)

    def build_evaluator(self, task=None) -> "SampleEvaluator":
        if self.task is not None:
            task = get_task(self.task)
        return SampleEvaluator(task, smoothing=self.smoothing, coverage_threshold=self.coverage_threshold,
                               self_bleu_ngram=self.self_bleu_ngram, support_batch_size=self.support_batch_size)

    @contextlib.contextmanager
    def rng(self, device: torch.device, rank: int = 0, step: int = 0) -> Iterator[None]:
        """Draw from a generator seeded with (seed, rank, step) and restore the global one after."""
        if self.seed is None:
            yield
            return
        device = torch.device(device)
        kind = device.type
        devices = [] if kind == "cpu" else [device.index or 0]
        with torch.random.fork_rng(devices=devices, device_type="cuda" if kind == "cpu" else kind):
            torch.manual_seed(self.seed + 100_003 * rank + step)
            yield


def task_mode_names(task) -> List[str]:
    """The expert's mode names: ``task.mode_names()`` where defined, else the modes seen in
    ``mode_weights`` over a few of the task's prompts (in order of appearance)."""
    names = getattr(task, "mode_names", None)
    if callable(names):
        return list(names())
    seen: Dict[str, None] = {}
    for prompt in task.prompts(16):
        for mode in task.mode_weights(prompt):
            seen.setdefault(mode, None)
    return list(seen)


def take_prompts(batch: Dict[str, Any], n: int) -> Dict[str, Any]:
    """The first ``n`` prompts of a batch (left-padded ids, mask, strings), without all-pad columns."""
    ids = batch["prompt_input_ids"][:n]
    mask = batch["prompt_attention_mask"][:n]
    used = mask.bool().any(0).nonzero()
    start = int(used[0]) if used.numel() else 0
    return {"prompt_input_ids": ids[:, start:], "prompt_attention_mask": mask[:, start:],
            "prompt": list(batch["prompt"][:n]), "response": list(batch.get("response", [""] * n)[:n])}


class SampleEvaluator(torch.nn.Module):
    """Every ``eval/…`` metric of one evaluation, fed from the expert's support and rollouts.

    Args:
        task: A ``KnownExpertTask`` (enables forward/reverse KL, invalid mass, modes) or None.
        smoothing, coverage_threshold, self_bleu_ngram, support_batch_size: see ``EvalConfig``.
    """

    def __init__(self, task=None, smoothing: float = SMOOTHING, coverage_threshold: float = COVERAGE_THRESHOLD,
                 self_bleu_ngram: int = 4, support_batch_size: Optional[int] = None) -> None:
        super().__init__()
        self.task = task
        self.smoothing = smoothing
        self.support_batch_size = support_batch_size
        self._support_cache: Dict[Any, Dict[str, List[Dict[str, Any]]]] = {}
        self.entropy = PolicyEntropy()
        self.distinct_1 = DistinctN(1)
        self.distinct_2 = DistinctN(2)
        self.self_bleu = SelfBLEU(self_bleu_ngram)
        self.response_length = ResponseLength()
        if task is not None:
            self.forward_kl = ForwardKL()
            self.reverse_kl = ReverseKL()
            self.reverse_kl_valid = ValidReverseKL()
            self.invalid_mass = InvalidMass()
            self.modes = ModeMass(task_mode_names(task), coverage_threshold)

    def metrics(self) -> Dict[str, Metric]:
        return {name: m for name, m in self.named_children() if isinstance(m, Metric)}

    def reset(self) -> None:
        for metric in self.metrics().values():
            metric.reset()

    def _cache(self, tokenizer, max_prompt_length: Optional[int]) -> Dict[str, List[Dict[str, Any]]]:
        # encoded support answers per prompt, reused across evaluations (same tokenizer, same prompts)
        return self._support_cache.setdefault((id(tokenizer), max_prompt_length), {})

    # ---- forward KL: the expert's whole support, teacher-forced ----------------------------
    def support_batches(self, prompts: Sequence[str], tokenizer,
                        max_prompt_length: Optional[int] = None) -> List[Dict[str, Any]]:
        """Collated batches (``DemonstrationCollator``) of every (prompt, expert answer) pair for
        the distinct ``prompts``, encoded as the data pipeline encodes demonstrations, at most
        ``support_batch_size`` rows each (default: ``len(prompts)``). Extra keys: ``expert_logp`` [B] and ``weight`` [B] =
        p_E(y|x) × how often the prompt occurs in ``prompts``. Empty without a task.

        The caller scores each batch with the policy (shifted per-token log-probs of
        ``input_ids``) and passes them to ``update_support``.
        """
        if self.task is None or not prompts:
            return []
        counts: Dict[str, int] = {}
        for prompt in prompts:
            counts[prompt] = counts.get(prompt, 0) + 1
        cache = self._cache(tokenizer, max_prompt_length)
        rows = [(example, count) for prompt, count in counts.items()
                for example in support_examples(self.task, tokenizer, prompt, max_prompt_length, cache)]
        collate = DemonstrationCollator(tokenizer.pad_token_id)
        batches = []
        size = self.support_batch_size or len(prompts)
        for start in range(0, len(rows), size):
            part = rows[start : start + size]
            batch = collate([example for example, _ in part])
            batch["expert_logp"] = torch.tensor([example["expert_logp"] for example, _ in part])
            batch["weight"] = torch.tensor([count * math.exp(example["expert_logp"]) for example, count in part])
            batches.append(batch)
        return batches

    def update_support(self, batch: Dict[str, Any], token_logps: torch.Tensor) -> None:
        """Forward KL from one ``support_batches`` batch: ``token_logps`` [B, T-1] are the policy's
        shifted per-token log-probs of ``batch["input_ids"]``."""
        if self.task is None:
            return
        mask = batch["loss_mask"][:, 1:].to(token_logps.device, token_logps.dtype)
        policy = (token_logps.detach() * mask).sum(-1).float()
        self.forward_kl.update(batch["expert_logp"].to(policy.device), policy, weight=batch["weight"].to(policy.device))

    # ---- policy samples -------------------------------------------------------------------
    def update_samples(self, prompts: Sequence[str], responses: Sequence[str], policy_logp, num_samples: int,
                       lengths=None, complete: Optional[Sequence[bool]] = None,
                       canonical: Optional[Sequence[bool]] = None, vocab_size: Optional[int] = None) -> None:
        """Policy samples: ``prompts`` one per prompt, ``responses`` / ``policy_logp`` (log π of
        each whole response) ``num_samples`` per prompt, contiguous.

        Args:
            lengths: Tokens of each response, EOS included (default: its words + 1, as a
                word-level tokenizer spells it).
            complete: False marks a sample that cannot be a valid response (cut off before EOS,
                special tokens inside). Default: all complete.
            canonical: False marks a sample whose token ids are not the canonical spelling of
                its string, so the smoothed expert gives it only the typist's share. Default:
                ``complete`` (a tokenizer with one spelling per string).
            vocab_size: Tokens the policy can emit (the typist's V); needed with a task.
        """
        k = num_samples
        if len(responses) != len(prompts) * k:
            raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts × {k} samples")
        policy_logp = torch.as_tensor(policy_logp, dtype=torch.float32).detach().cpu()
        sample_prompts = [p for p in prompts for _ in range(k)]
        self.entropy.update(policy_logp)
        groups = [list(responses[i : i + k]) for i in range(0, len(responses), k)]
        self.distinct_1.update(groups)
        self.distinct_2.update(groups)
        self.self_bleu.update(groups)
        if lengths is None:
            lengths = [len(r.split()) + 1 for r in responses]
        lengths = torch.as_tensor(lengths, dtype=torch.float32).cpu()
        self.response_length.update(lengths.tolist())
        if self.task is None:
            return
        if vocab_size is None:
            raise ValueError("update_samples: the reverse KL needs vocab_size (tokens the policy can emit)")
        complete = [True] * len(responses) if complete is None else list(complete)
        canonical = complete if canonical is None else [bool(c) and bool(ok) for c, ok in zip(canonical, complete)]
        expert = [self.task.log_prob(p, r) if ok else -math.inf
                  for p, r, ok in zip(sample_prompts, responses, complete)]
        expert_t = torch.tensor(expert, dtype=torch.float32)
        token_t = torch.tensor([lp if c else -math.inf for lp, c in zip(expert, canonical)], dtype=torch.float32)
        smoothed = smoothed_expert_logp(token_t, lengths, vocab_size, self.smoothing)
        self.reverse_kl.update(policy_logp, smoothed)
        self.reverse_kl_valid.update(policy_logp, expert_t)
        self.invalid_mass.update(expert_t)
        modes = [self.task.mode_of(p, r) if lp > -math.inf else None
                 for p, r, lp in zip(sample_prompts, responses, expert)]
        weights_by_prompt = {p: self.task.mode_weights(p) for p in prompts}
        self.modes.update(modes, [weights_by_prompt[p] for p in sample_prompts])

    def update_rollout(self, prompts: Sequence[str], rollout: Rollout, tokenizer, num_samples: int,
                       vocab_size: int) -> None:
        """``update_samples`` from a ``Rollout`` of ``prompts`` (``num_samples`` rows per prompt);
        ``vocab_size``: tokens the policy can emit (its output layer's rows, which may exceed
        ``len(tokenizer)``)."""
        lengths = rollout.response_lengths.detach().cpu()
        complete = canonical = None
        if self.task is not None:
            string, token, lengths = rollout_expert_logps(self.task, tokenizer, prompts, rollout, num_samples,
                                                          cache=self._cache(tokenizer, None))
            # the string-level value is recomputed by update_samples; keep only the verdicts
            complete = torch.isfinite(string).tolist()
            canonical = torch.isfinite(token).tolist()
        self.update_samples(prompts, rollout.responses, rollout.sequence_logprobs, num_samples,
                            lengths=lengths, complete=complete, canonical=canonical, vocab_size=vocab_size)

    # ---- exact log-ratios (the optimal discriminator) ------------------------------------------
    def demonstration_log_ratios(self, batch: Dict[str, Any], token_logps: torch.Tensor,
                                 eos_token_id: int) -> torch.Tensor:
        """``log p_E(y|x) − log π(y|x)`` of each demonstration of a validation batch: [B] on the
        CPU; ``token_logps`` [B, T-1] are the policy's shifted per-token log-probs of
        ``batch["input_ids"]``. NaN where the response was cut before EOS (its log π is not that
        of a whole response); −inf where the expert never gives the response."""
        mask = batch["loss_mask"][:, 1:].to(token_logps.device, token_logps.dtype)
        policy = (token_logps.detach() * mask).sum(-1).float().cpu()
        targets = batch["input_ids"][:, 1:].cpu()
        out = torch.full_like(policy, float("nan"))
        for i, positions in enumerate(mask.cpu().bool()):
            last = positions.nonzero()
            if last.numel() and int(targets[i, int(last[-1])]) == eos_token_id:
                out[i] = self.task.log_prob(batch["prompt"][i], batch["response"][i]) - policy[i]
        return out

    def rollout_log_ratios(self, prompts: Sequence[str], rollout: Rollout, tokenizer) -> torch.Tensor:
        """``log p_E^tok(y|x) − log π(y|x)`` of each rollout row: [N] on the CPU, −inf unless the
        response is the canonical spelling of an expert answer (the expert never emits any
        other token sequence)."""
        k = len(rollout.responses) // max(len(prompts), 1)
        _, token, _ = rollout_expert_logps(self.task, tokenizer, prompts, rollout, k,
                                           cache=self._cache(tokenizer, None))
        return token - rollout.sequence_logprobs.detach().float().cpu()

    # ---- output ---------------------------------------------------------------------------
    def compute(self) -> Dict[str, torch.Tensor]:
        """Metric values keyed by their ``eval/`` name (without the prefix); NaN = no data."""
        out: Dict[str, torch.Tensor] = {}
        for name, metric in self.metrics().items():
            value = metric.compute()
            if isinstance(value, dict):
                out.update(value)
            else:
                out[name] = value
        return out
