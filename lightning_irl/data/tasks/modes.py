"""The quickstart task: one prompt, three ways to answer it, with unequal weights.

A prompt is a string of distinct letters followed by ``=``. The expert copies it (weight 0.6),
reverses it (0.3) or sorts it (0.1). Prompts that are already sorted either way are never drawn,
so the three answers are always distinct and every response belongs to at most one mode. A
policy that mixes modes mid-answer ("c a b f" for "c a f b") puts mass outside the support: the
failure mode of mass-covering objectives on a capacity-limited model.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence

from lightning_irl.data.tasks.base import KnownExpertTask, normalize

SEPARATOR = "="


class ModesTask(KnownExpertTask):
    name = "modes"

    def __init__(
        self,
        alphabet: str = "abcdefgh",
        min_length: int = 3,
        max_length: int = 5,
        weights: Sequence[float] = (0.6, 0.3, 0.1),
    ) -> None:
        if len(set(alphabet)) != len(alphabet) or len(alphabet) < max_length:
            raise ValueError("alphabet must hold distinct symbols, at least max_length of them")
        if not 2 <= min_length <= max_length:
            raise ValueError("need 2 <= min_length <= max_length")
        if len(weights) != 3 or any(w <= 0 for w in weights):
            raise ValueError("weights: three positive numbers for copy, reverse, sort")
        total = float(sum(weights))
        self.alphabet = alphabet
        self.min_length = min_length
        self.max_length = max_length
        self.weights = {
            "copy": weights[0] / total,
            "reverse": weights[1] / total,
            "sort": weights[2] / total,
        }

    def vocabulary(self) -> List[str]:
        return list(self.alphabet) + [SEPARATOR]

    def sample_prompt(self, rng: random.Random) -> str:
        while True:
            n = rng.randint(self.min_length, self.max_length)
            letters = rng.sample(self.alphabet, n)
            if letters != sorted(letters) and letters != sorted(letters, reverse=True):
                return " ".join(letters + [SEPARATOR])

    def _letters(self, prompt: str) -> List[str]:
        symbols = prompt.split()
        if not symbols or symbols[-1] != SEPARATOR:
            raise ValueError(f"not a {self.name} prompt: {prompt!r}")
        return symbols[:-1]

    def answers(self, prompt: str) -> Dict[str, str]:
        letters = self._letters(prompt)
        return {
            "copy": " ".join(letters),
            "reverse": " ".join(reversed(letters)),
            "sort": " ".join(sorted(letters)),
        }

    def support(self, prompt: str) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for mode, answer in self.answers(prompt).items():
            out[answer] = out.get(answer, 0.0) + self.weights[mode]
        return out

    def mode_of(self, prompt: str, response: str) -> Optional[str]:
        response = normalize(response)
        for mode, answer in self.answers(prompt).items():
            if answer == response:
                return mode
        return None

    def mode_weights(self, prompt: str) -> Dict[str, float]:
        return dict(self.weights)
