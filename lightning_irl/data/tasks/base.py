"""Built-in tasks whose expert distribution p_E(y|x) is known exactly.

A task works on strings: prompts and responses are whitespace-separated symbols, so any
tokenizer (the task's own word-level one, or a BPE one) can carry them, and every metric can
score decoded samples against the exact expert.
"""

from __future__ import annotations

import abc
import math
import random
from typing import Dict, List, Optional

from transformers import PreTrainedTokenizerFast


def normalize(text: str) -> str:
    """Canonical form of a response: single spaces, no leading/trailing white space."""
    return " ".join(text.split())


class KnownExpertTask(abc.ABC):
    """A demonstration source with an exactly computable expert distribution.

    Subclasses define prompts, a finite set of named response modes with weights, and the
    exact probability of any response. ``log_prob`` returns ``-inf`` outside the expert's
    support, which is what the invalid-mass metric counts.
    """

    name: str = "task"

    @abc.abstractmethod
    def sample_prompt(self, rng: random.Random) -> str:
        """Draw one prompt."""

    @abc.abstractmethod
    def support(self, prompt: str) -> Dict[str, float]:
        """Every response the expert gives to ``prompt`` with its probability (sums to 1)."""

    @abc.abstractmethod
    def mode_of(self, prompt: str, response: str) -> Optional[str]:
        """The name of the expert mode a response belongs to, or None if it is in none."""

    @abc.abstractmethod
    def mode_weights(self, prompt: str) -> Dict[str, float]:
        """Expert probability of each mode for this prompt (sums to 1)."""

    @abc.abstractmethod
    def vocabulary(self) -> List[str]:
        """Every symbol that can appear in a prompt or a response."""

    # ---- derived, shared by every task -------------------------------------------------
    def log_prob(self, prompt: str, response: str) -> float:
        p = self.support(prompt).get(normalize(response), 0.0)
        return math.log(p) if p > 0 else -math.inf

    def sample_response(self, prompt: str, rng: random.Random) -> str:
        items = list(self.support(prompt).items())
        responses = [r for r, _ in items]
        weights = [p for _, p in items]
        return rng.choices(responses, weights=weights, k=1)[0]

    def records(self, n: int, seed: int = 0) -> List[Dict[str, str]]:
        """``n`` (prompt, expert response) demonstrations, reproducible from ``seed``."""
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            prompt = self.sample_prompt(rng)
            out.append({"prompt": prompt, "response": self.sample_response(prompt, rng)})
        return out

    def prompts(self, n: int, seed: int = 0) -> List[str]:
        rng = random.Random(seed)
        return [self.sample_prompt(rng) for _ in range(n)]

    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        """A word-level tokenizer over the task's symbols, built offline with ``tokenizers``."""
        from lightning_irl.models.tokenizers import word_level_tokenizer

        return word_level_tokenizer(self.vocabulary())
