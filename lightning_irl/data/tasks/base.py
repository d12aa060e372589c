"""Built-in tasks whose expert distribution p_E(y|x) is known exactly.

A task works on strings: prompts and responses are whitespace-separated symbols, so any
tokenizer (the task's own word-level one, or a BPE one) can carry them, and every metric can
score decoded samples against the exact expert.
"""

from __future__ import annotations

import abc
import inspect
import math
import numbers
import random
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from transformers import PreTrainedTokenizerFast

from lightning_irl.tokenizers import word_level_tokenizer


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
    #: Constructor options that change ``vocabulary()`` (and so the task's tokenizer); these, and
    #: only these, may be spelled in a ``task:<name>?option=value`` tokenizer string.
    tokenizer_options: Tuple[str, ...] = ()

    @classmethod
    def option_defaults(cls) -> Dict[str, Any]:
        """Every constructor option with its default: the options ``get_task`` accepts."""
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        return {p.name: p.default for p in params}

    def tokenizer_spec(self) -> str:
        """The ``tokenizer:`` string that builds this task's tokenizer (``task:modes?alphabet=abcdefghij``).

        Options left at their default are not written: a default task gives plain ``task:<name>``.
        """
        defaults = self.option_defaults()
        query = [f"{key}={_quote(str(getattr(self, key)))}" for key in self.tokenizer_options
                 if getattr(self, key) != defaults[key]]
        return f"task:{self.name}" + ("?" + "&".join(query) if query else "")

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
        return word_level_tokenizer(self.vocabulary())


def _quote(value: str) -> str:
    # '&' separates options in a tokenizer string; '%' starts an escape there.
    return value.replace("%", "%25").replace("&", "%26")


# ---- option checks shared by the tasks: each raises one ValueError line naming the task ----------
def _is_number(value: Any) -> bool:
    # bool is an int to Python, but `weights: [true, 1, 1]` is a typo, not a weight.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_weights(task: str, option: str, value: Any, modes: Sequence[str]) -> Dict[str, float]:
    """Positive finite weights for ``modes``, given in that order or as a ``{mode: weight}`` mapping
    naming every mode; returned normalised to sum to 1."""
    count = {2: "two", 3: "three"}.get(len(modes), str(len(modes)))
    wanted = f"{option} must be {count} positive numbers for {', '.join(modes)}"
    if isinstance(value, Mapping):
        if set(value) != set(modes):
            raise ValueError(f"{task}: {wanted} (a mapping must name exactly {', '.join(modes)}), "
                             f"got {dict(value)!r}")
        values = [value[mode] for mode in modes]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
    else:
        raise ValueError(f"{task}: {wanted}, got {value!r}")
    if len(values) != len(modes) or not all(_is_number(w) and w > 0 for w in values):
        raise ValueError(f"{task}: {wanted}, got {_plain(value)!r}")
    total = float(sum(values))
    return {mode: w / total for mode, w in zip(modes, values)}


def check_int(task: str, option: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{task}: {option} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _plain(value: Any) -> Any:
    # tuples and ListConfig-like sequences print as lists, which is how a user wrote them
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
