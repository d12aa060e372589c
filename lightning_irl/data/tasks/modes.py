"""The quickstart task: one prompt, three ways to answer it, with unequal weights.

A prompt is a string of distinct letters followed by ``=``. The expert copies it (weight 0.6),
reverses it (0.3) or sorts it (0.1) by default; the weights, the prompt lengths and the alphabet
are options (``get_task("modes", weights=[1, 1, 1])``, ``data.task_args``). Prompts that are
already sorted either way are never drawn, so the three answers are always distinct and every
response belongs to at most one mode. A
policy that mixes modes mid-answer ("c a b f" for "c a f b") puts mass outside the support: the
failure mode of mass-covering objectives on a capacity-limited model.
"""

from __future__ import annotations

import random
from typing import Dict, List, Mapping, Optional, Sequence, Union

from lightning_irl.data.tasks.base import KnownExpertTask, check_int, check_weights, normalize

SEPARATOR = "="
MODES = ("copy", "reverse", "sort")


class ModesTask(KnownExpertTask):
    """Copy, reverse or sort a prompt of distinct letters.

    Args:
        alphabet: The prompt symbols, one character each (distinct, no white space, not ``=``).
            A different alphabet changes the vocabulary: give the model the matching tokenizer,
            ``tokenizer: "task:modes?alphabet=<alphabet>"``.
        min_length: Fewest letters in a prompt (at least 3: two letters are always sorted one
            way or the other, so copy, reverse and sort could not all differ).
        max_length: Most letters in a prompt (at most ``len(alphabet)``).
        weights: Weights of copy, reverse and sort, as three positive numbers in that order or
            a ``{copy: .., reverse: .., sort: ..}`` mapping; normalised to sum to 1.
    """

    name = "modes"
    tokenizer_options = ("alphabet",)

    def __init__(
        self,
        alphabet: str = "abcdefgh",
        min_length: int = 3,
        max_length: int = 5,
        weights: Union[Sequence[float], Mapping[str, float]] = (0.6, 0.3, 0.1),
    ) -> None:
        if not isinstance(alphabet, str) or not alphabet:
            raise ValueError(f"modes: alphabet must be a string of distinct one-character symbols, got {alphabet!r}")
        if any(c.isspace() or c == SEPARATOR for c in alphabet):
            raise ValueError(f"modes: alphabet must not hold white space or the separator {SEPARATOR!r}, "
                             f"got {alphabet!r}")
        repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
        if repeated:
            raise ValueError(f"modes: alphabet symbols must be distinct, {''.join(repeated)!r} repeat in {alphabet!r}")
        min_length = check_int(self.name, "min_length", min_length, 3)
        max_length = check_int(self.name, "max_length", max_length, 3)
        if min_length > max_length:
            raise ValueError(f"modes: need min_length <= max_length, got {min_length} > {max_length}")
        if max_length > len(alphabet):
            raise ValueError(f"modes: max_length {max_length} needs at least that many alphabet symbols, "
                             f"{alphabet!r} has {len(alphabet)}")
        self.alphabet = alphabet
        self.min_length = min_length
        self.max_length = max_length
        self.weights = check_weights(self.name, "weights", weights, MODES)

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
