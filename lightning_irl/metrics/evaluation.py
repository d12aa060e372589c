"""Sample-based evaluation at validation time, logged under ``eval/``.

``EvalConfig`` is the ``evaluation:`` argument of every algorithm. At an evaluating validation run
the module (``IRLModule``):

1. scores every validation demonstration under the policy by teacher forcing (the NLL pass it
   makes anyway) → ``eval/forward_kl`` against the task's exact ``log p_E``;
2. samples ``num_samples`` responses for each of the first ``num_prompts`` validation prompts
   (per device) at temperature 1 with ``rollout.sample`` (log-probs recomputed under the policy)
   → reverse KL, invalid mass, mode coverage, per-mode mass, entropy, distinct-n, self-BLEU,
   response length.

``SampleEvaluator`` holds the metric objects and turns batches / rollouts into their inputs;
the math lives in ``metrics.functional``. Metrics that need a known expert exist only when the
data come from a built-in task (or ``EvalConfig.task`` names one).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torchmetrics import Metric

from lightning_irl.metrics.diversity import DistinctN, ResponseLength, SelfBLEU
from lightning_irl.metrics.functional import COVERAGE_THRESHOLD, LOG_FLOOR
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
            A response cut off before EOS counts as outside the expert's support.
        temperature: Sampling temperature. The KL, invalid-mass and entropy estimates assume 1
            (samples from the policy itself).
        seed: Seed of the evaluation's samples, so every evaluation draws with the same random
            numbers and training randomness is left untouched. None: the global generator.
        task: A built-in task to score against when the data module has none.
        log_floor: Floor on log p_E in the reverse KL where the expert gives probability 0.
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
    log_floor: float = LOG_FLOOR
    coverage_threshold: float = COVERAGE_THRESHOLD
    self_bleu_ngram: int = 4

    def __post_init__(self) -> None:
        if self.num_prompts < 0 or self.num_samples < 1 or self.every_n_val < 1:
            raise ValueError("evaluation: need num_prompts >= 0, num_samples >= 1, every_n_val >= 1")

    def sampling(self, base: SamplingConfig) -> SamplingConfig:
        """Ancestral sampling from the policy (no top-p / top-k)."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens or base.max_new_tokens,
                              temperature=self.temperature, top_p=1.0, top_k=0, do_sample=True,
                              num_samples=self.num_samples)

    def build_evaluator(self, task=None) -> "SampleEvaluator":
        if self.task is not None:
            from lightning_irl.data.tasks import get_task

            task = get_task(self.task)
        return SampleEvaluator(task, log_floor=self.log_floor, coverage_threshold=self.coverage_threshold,
                               self_bleu_ngram=self.self_bleu_ngram)

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
    """Every ``eval/…`` metric of one evaluation, fed from demonstrations and rollouts.

    Args:
        task: A ``KnownExpertTask`` (enables forward/reverse KL, invalid mass, modes) or None.
        log_floor, coverage_threshold, self_bleu_ngram: see ``EvalConfig``.
    """

    def __init__(self, task=None, log_floor: float = LOG_FLOOR, coverage_threshold: float = COVERAGE_THRESHOLD,
                 self_bleu_ngram: int = 4) -> None:
        super().__init__()
        self.task = task
        self.entropy = PolicyEntropy()
        self.distinct_1 = DistinctN(1)
        self.distinct_2 = DistinctN(2)
        self.self_bleu = SelfBLEU(self_bleu_ngram)
        self.response_length = ResponseLength()
        if task is not None:
            self.forward_kl = ForwardKL()
            self.reverse_kl = ReverseKL(log_floor)
            self.reverse_kl_valid = ValidReverseKL()
            self.invalid_mass = InvalidMass()
            self.modes = ModeMass(task_mode_names(task), coverage_threshold)

    def metrics(self) -> Dict[str, Metric]:
        return {name: m for name, m in self.named_children() if isinstance(m, Metric)}

    def reset(self) -> None:
        for metric in self.metrics().values():
            metric.reset()

    # ---- inputs ---------------------------------------------------------------------------
    def expert_logps(self, prompts: Sequence[str], responses: Sequence[str]) -> List[float]:
        return [self.task.log_prob(p, r) for p, r in zip(prompts, responses)]

    def update_demonstrations(self, batch: Dict[str, Any], token_logps: torch.Tensor, eos_token_id: int) -> None:
        """Forward KL from expert demonstrations: ``token_logps`` [B, T-1] are the policy's shifted
        per-token log-probs of ``batch["input_ids"]``. Rows whose response was truncated (no EOS)
        are skipped: their policy log-prob is not that of the whole response."""
        if self.task is None:
            return
        mask = batch["loss_mask"][:, 1:].to(token_logps.dtype)
        policy = (token_logps * mask).sum(-1)
        targets = batch["input_ids"][:, 1:]
        rows = []
        for i in range(targets.size(0)):
            positions = mask[i].nonzero()
            if positions.numel() and int(targets[i, int(positions[-1])]) == eos_token_id:
                rows.append(i)
        if not rows:
            return
        expert = self.expert_logps([batch["prompt"][i] for i in rows], [batch["response"][i] for i in rows])
        self.forward_kl.update(torch.tensor(expert), policy[rows].float())

    def update_samples(self, prompts: Sequence[str], responses: Sequence[str], policy_logp,
                       num_samples: int, lengths=None, complete: Optional[Sequence[bool]] = None) -> None:
        """Policy samples: ``prompts`` one per prompt, ``responses`` / ``policy_logp`` (log π of
        each whole response) ``num_samples`` per prompt, contiguous. ``complete`` False marks a
        sample that cannot be a valid response (cut off before EOS, special tokens inside)."""
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
            lengths = [len(r.split()) for r in responses]
        self.response_length.update(lengths)
        if self.task is None:
            return
        complete = [True] * len(responses) if complete is None else list(complete)
        expert = [lp if ok else float("-inf")
                  for lp, ok in zip(self.expert_logps(sample_prompts, responses), complete)]
        expert_t = torch.tensor(expert)
        self.reverse_kl.update(policy_logp, expert_t)
        self.reverse_kl_valid.update(policy_logp, expert_t)
        self.invalid_mass.update(expert_t)
        modes = [self.task.mode_of(p, r) if lp > float("-inf") else None
                 for p, r, lp in zip(sample_prompts, responses, expert)]
        weights_by_prompt = {p: self.task.mode_weights(p) for p in prompts}
        self.modes.update(modes, [weights_by_prompt[p] for p in sample_prompts])

    def update_rollout(self, prompts: Sequence[str], rollout: Rollout, tokenizer, num_samples: int) -> None:
        """``update_samples`` from a ``Rollout`` of ``prompts`` (``num_samples`` rows per prompt)."""
        special = set(tokenizer.all_special_ids)
        complete = []
        for ids, mask, done in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist(),
                                   rollout.finished.tolist()):
            body = [t for t, m in zip(ids, mask) if m][: -1 if done else None]
            complete.append(bool(done) and not any(t in special for t in body))
        self.update_samples(prompts, rollout.responses, rollout.sequence_logprobs, num_samples,
                            lengths=rollout.response_lengths.tolist(), complete=complete)

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
