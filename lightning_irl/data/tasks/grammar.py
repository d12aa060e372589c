"""A text-like known-expert task: instruction prompts answered from a template grammar.

Three intents ("Describe the weather in Paris .", "Write a greeting for Ada .", "Summarize :
Ada bought three books .") are each answered in one of three *families* of phrasing — the
expert's modes — with unequal, intent-dependent weights:

    direct    "It is rainy in Paris ."
    polite    "Certainly ! Today Paris is wet ."
    detailed  "The weather in Paris is rainy , so take an umbrella ."

Inside a family, synonym slots (``{Sure|Certainly}``, rainy/wet, ...) are chosen uniformly, so a
prompt has 7–10 valid responses, each with an exact probability
``p_E(y|x) = w(family | intent) / #phrasings(family, intent)``. The weights ``w`` in ``INTENTS``
are the defaults; ``GrammarTask(weights=...)`` (``get_task("grammar", weights=...)``,
``data.task_args``) replaces them for every intent or for named intents. Families start with
different words, so every response belongs to exactly one mode. The weather of each city is a
fixed fact the policy has to learn; everything else is copied from the prompt.

The tokenizer is a byte-pair-encoding one trained offline (``tokenizers``) on the task's own
text: every prompt and every valid response, in a fixed order, so it is the same on every run.
Words are split into sub-word pieces, and a policy may produce a valid *string* through a
non-canonical token sequence; validity and ``log_prob`` are defined on strings.
"""

from __future__ import annotations

import itertools
import random
import re
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_irl.data.tasks.base import KnownExpertTask, check_int, check_weights, normalize
from lightning_irl.tokenizers import EOS, PAD, UNK

CITY_WEATHER = {
    "Paris": "rain", "London": "rain", "Rome": "sun", "Cairo": "sun",
    "Oslo": "snow", "Moscow": "snow", "Lima": "fog", "Chicago": "wind",
}
WEATHER_WORDS = {
    "rain": ("rainy", "wet"), "sun": ("sunny", "bright"), "snow": ("snowy", "icy"),
    "fog": ("foggy", "misty"), "wind": ("windy", "breezy"),
}
WEATHER_ADVICE = {
    "rain": ("take an umbrella", "bring a raincoat"), "sun": ("wear a hat", "bring sunglasses"),
    "snow": ("wear boots", "dress warmly"), "fog": ("drive slowly", "stay careful"),
    "wind": ("hold your hat", "wear a jacket"),
}
NAMES = ("Ada", "Ben", "Chloe", "David", "Emma", "Felix", "Grace", "Hugo")
NUMBERS = ("two", "three", "four")
ITEMS = ("apples", "books", "lamps", "shirts")

MODES = ("direct", "polite", "detailed")

# intent -> (prompt template, {mode: (default weight, response template)}). ``{a|b}`` is a synonym
# choice, ``{slot}`` a value from the prompt (a tuple value is itself a synonym choice).
INTENTS = {
    "weather": ("Describe the weather in {city} .", {
        "direct": (0.5, "It is {adj} in {city} ."),
        "polite": (0.3, "{Sure|Certainly} ! Today {city} is {adj} ."),
        "detailed": (0.2, "The weather in {city} is {adj} , so {advice} ."),
    }),
    "greeting": ("Write a greeting for {name} .", {
        "direct": (0.6, "{Hello|Hi} {name} ."),
        "polite": (0.3, "{Sure|Certainly} ! Welcome , {name} , {it is great|it is nice} to meet you ."),
        "detailed": (0.1, "Here is a greeting : {Good morning|Good day} , {name} , I hope you are well ."),
    }),
    "summary": ("Summarize : {name} bought {number} {item} .", {
        "direct": (0.45, "{name} {bought|purchased} {number} {item} ."),
        "polite": (0.35, "{Sure|Certainly} ! In short , {name} {bought|purchased} {number} {item} ."),
        "detailed": (0.2, "The text says that {name} {bought|purchased} {number} {item} in total ."),
    }),
}

_BRACES = re.compile(r"\{([^{}]*)\}")


def expand(template: str, slots: Dict[str, object]) -> List[str]:
    """Every string a template produces: ``{a|b}`` choices and tuple-valued slots multiply out."""
    pieces: List[Tuple[str, ...]] = []
    last = 0
    for match in _BRACES.finditer(template):
        pieces.append((template[last:match.start()],))
        body = match.group(1)
        if "|" in body:
            pieces.append(tuple(body.split("|")))
        else:
            value = slots[body]
            pieces.append(tuple(value) if isinstance(value, tuple) else (str(value),))
        last = match.end()
    pieces.append((template[last:],))
    return [normalize("".join(choice)) for choice in itertools.product(*pieces)]


def _prompt_slots() -> Dict[str, List[Dict[str, object]]]:
    return {
        "weather": [{"city": c} for c in CITY_WEATHER],
        "greeting": [{"name": n} for n in NAMES],
        "summary": [{"name": n, "number": k, "item": i} for n in NAMES for k in NUMBERS for i in ITEMS],
    }


class GrammarTask(KnownExpertTask):
    """Instruction-like prompts, template-family modes, synonyms inside each family.

    Args:
        vocab_size: Size of the BPE vocabulary trained on the task's text (special tokens
            included); small enough that many words are split into pieces.
        weights: The expert's family weights ``w(direct, polite, detailed | intent)``, replacing
            the defaults of ``INTENTS``; each set is normalised to sum to 1. Either three
            positive numbers for direct, polite, detailed (or a ``{direct: .., polite: ..,
            detailed: ..}`` mapping), used for every intent, or a mapping from intent
            (``weather``, ``greeting``, ``summary``) to such weights: intents not named keep
            their defaults, e.g. ``{weather: [1, 1, 1]}``. The weights do not change the text
            the tokenizer is trained on, so the tokenizer stays the same.
    """

    name = "grammar"
    tokenizer_options = ("vocab_size",)

    def __init__(self, vocab_size: int = 320,
                 weights: Optional[Union[Sequence[float], Mapping[str, Any]]] = None) -> None:
        self.vocab_size = check_int(self.name, "vocab_size", vocab_size, 4)
        self.weights = _intent_weights(weights)
        self._by_prompt: Dict[str, Tuple[str, Dict[str, object]]] = {}
        self._by_intent: Dict[str, List[str]] = {}
        for intent, slot_list in _prompt_slots().items():
            template = INTENTS[intent][0]
            prompts = []
            for slots in slot_list:
                prompt = expand(template, slots)[0]
                self._by_prompt[prompt] = (intent, slots)
                prompts.append(prompt)
            self._by_intent[intent] = prompts
        self._support = lru_cache(maxsize=None)(self._compute_support)

    # ---- the expert ----------------------------------------------------------------------
    def all_prompts(self) -> List[str]:
        return list(self._by_prompt)

    def mode_names(self) -> List[str]:
        return list(MODES)

    def _parse(self, prompt: str) -> Tuple[str, Dict[str, object]]:
        try:
            return self._by_prompt[normalize(prompt)]
        except KeyError:
            raise ValueError(f"not a {self.name} prompt: {prompt!r}") from None

    def _response_slots(self, intent: str, slots: Dict[str, object]) -> Dict[str, object]:
        out = dict(slots)
        if intent == "weather":
            condition = CITY_WEATHER[str(slots["city"])]
            out["adj"] = WEATHER_WORDS[condition]
            out["advice"] = WEATHER_ADVICE[condition]
        return out

    def phrasings(self, prompt: str) -> Dict[str, List[str]]:
        """Every valid response of each mode (family) for ``prompt``."""
        intent, slots = self._parse(prompt)
        values = self._response_slots(intent, slots)
        return {mode: expand(template, values) for mode, (_, template) in INTENTS[intent][1].items()}

    def _compute_support(self, prompt: str) -> Tuple[Tuple[str, float, str], ...]:
        intent, _ = self._parse(prompt)
        weights = self.weights[intent]
        rows = []
        for mode, responses in self.phrasings(prompt).items():
            for response in responses:
                rows.append((response, weights[mode] / len(responses), mode))
        if len({r for r, _, _ in rows}) != len(rows):
            raise AssertionError(f"grammar produces a response twice for {prompt!r}")
        return tuple(rows)

    def support(self, prompt: str) -> Dict[str, float]:
        return {response: p for response, p, _ in self._support(normalize(prompt))}

    def mode_of(self, prompt: str, response: str) -> Optional[str]:
        response = normalize(response)
        for candidate, _, mode in self._support(normalize(prompt)):
            if candidate == response:
                return mode
        return None

    def mode_weights(self, prompt: str) -> Dict[str, float]:
        intent, _ = self._parse(prompt)
        return dict(self.weights[intent])

    def sample_prompt(self, rng: random.Random) -> str:
        intent = rng.choice(sorted(self._by_intent))
        return rng.choice(self._by_intent[intent])

    # ---- text and tokenizer --------------------------------------------------------------
    def corpus(self) -> List[str]:
        """Every prompt and every valid response, in a fixed order (the tokenizer's training text)."""
        lines: List[str] = []
        for prompt in self.all_prompts():
            lines.append(prompt)
            lines.extend(response for response, _, _ in self._support(prompt))
        return lines

    def vocabulary(self) -> List[str]:
        seen: Dict[str, None] = {}
        for line in self.corpus():
            for word in line.split():
                seen.setdefault(word, None)
        return list(seen)

    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        return bpe_tokenizer(self.corpus(), self.vocab_size)


def _intent_weights(value: Any) -> Dict[str, Dict[str, float]]:
    """``GrammarTask``'s ``weights`` option checked and resolved to ``{intent: {mode: weight}}``."""
    # Defaults are used as written (not renormalised) so default probabilities stay bit-identical.
    out = {intent: {mode: w for mode, (w, _) in modes.items()} for intent, (_, modes) in INTENTS.items()}
    if value is None:
        return out
    per_intent = isinstance(value, Mapping) and not (value and set(value) <= set(MODES))
    if not per_intent:
        if not isinstance(value, (Mapping, Sequence)) or isinstance(value, str):
            raise ValueError(f"grammar: weights must be three positive numbers for {', '.join(MODES)} (every "
                             f"intent) or a mapping from intent ({', '.join(INTENTS)}) to such numbers, "
                             f"got {value!r}")
        shared = check_weights("grammar", "weights", value, MODES)
        return {intent: dict(shared) for intent in out}
    unknown = [key for key in value if key not in INTENTS]
    if unknown:
        raise ValueError(f"grammar: weights: unknown intent {unknown[0]!r}; the intents are "
                         f"{', '.join(INTENTS)} (or give three numbers for {', '.join(MODES)} for every intent)")
    for intent, weights in value.items():
        out[intent] = check_weights("grammar", f"weights.{intent}", weights, MODES)
    return out


def bpe_tokenizer(lines: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-pair-encoding tokenizer trained on ``lines``: ``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2.

    Words are pre-split on white space with a ``▁`` marker (Metaspace), so decoding restores the
    text exactly; nothing is added around a sequence (no BOS), and ``clean_up_tokenization_spaces``
    is off so that ``"Paris ."`` decodes to ``"Paris ."``. Training is deterministic for a given
    list of lines.
    """
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK],
                                  min_frequency=1, show_progress=False)
    backend.train_from_iterator(list(lines), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   clean_up_tokenization_spaces=False)
