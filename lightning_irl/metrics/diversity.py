"""Task-agnostic sample metrics: diversity (distinct-n, self-BLEU) and response length.

States are sums, so DDP reduction is exact. Diversity is measured *within* the k samples of one
prompt (the quantity a mode-seeking objective reduces) and averaged over prompts; this keeps the
states summable, unlike corpus-wide unique n-gram counts.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric

from lightning_irl.metrics.functional import distinct_n, self_bleu


class _Mean(Metric):
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")

    def _add(self, total: float, count: float) -> None:
        self.total += total
        self.count += count

    def compute(self) -> torch.Tensor:
        if self.count <= 0:
            return torch.tensor(float("nan"))
        return self.total / self.count


class DistinctN(_Mean):
    """Distinct-n: unique / total word n-grams among the samples of one prompt, averaged over
    prompts. ``update(groups)`` takes one list of response strings per prompt; groups without
    any n-gram are skipped.

    Args:
        n: n-gram order (1 = distinct words).
    """

    higher_is_better = True

    def __init__(self, n: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n

    def update(self, groups: Sequence[Sequence[str]]) -> None:
        for group in groups:
            unique, total = distinct_n(group, self.n)
            if total:
                self._add(unique / total, 1)


class SelfBLEU(_Mean):
    """Self-BLEU: BLEU of each sample against the other samples of the same prompt, averaged over
    samples (groups of one sample are skipped). High = the samples repeat each other.

    Args:
        n_gram: Highest n-gram order (effective order for shorter responses).
    """

    higher_is_better = False

    def __init__(self, n_gram: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_gram = n_gram

    def update(self, groups: Sequence[Sequence[str]]) -> None:
        for group in groups:
            scores = self_bleu(list(group), self.n_gram)
            if scores:
                self._add(sum(scores), len(scores))


class ResponseLength(_Mean):
    """Mean response length in tokens, EOS included (``update(lengths)``, one per sample)."""

    def update(self, lengths) -> None:
        lengths = torch.as_tensor(lengths, dtype=torch.float32).reshape(-1)
        self._add(float(lengths.sum()), lengths.numel())
