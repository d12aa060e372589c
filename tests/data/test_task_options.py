"""Task options (``get_task(name, **options)``, ``data.task_args``, ``task:<name>?option=value``):
exact distributions under the options, every bad value as one error line, tokenizers unchanged
by default and matching the vocabulary otherwise."""

import collections
import hashlib
import json
import math

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lightning_irl.data import DataError, DemonstrationDataModule
from lightning_irl.data.tasks import GrammarTask, ModesTask, get_task, parse_tokenizer_spec, task_tokenizer
from lightning_irl.models.spec import ModelSpec

# sha256 of ``backend_tokenizer.to_str()`` of each default task tokenizer, recorded before task
# options existed: seeded model inits and published numbers depend on these exact vocabularies.
DEFAULT_TOKENIZER_SHA256 = {
    "modes": "6bbc4456912c4f1c6ecb77e108f86916387752a659ad384fb6c48f41ece567ed",
    "grammar": "d99c3703833bfa490d65ff33fc101c09a8c7787ce7412fd96c51f286b6371fb6",
}
# ``get_task("modes").records(3, seed=0)`` before task options existed.
DEFAULT_MODES_RECORDS = [{"prompt": "g a c e =", "response": "g a c e"},
                         {"prompt": "h c e b =", "response": "h c e b"},
                         {"prompt": "c g a e =", "response": "e a g c"}]


def _sha(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


@pytest.fixture(scope="module")
def grammar_tokenizer_sha():
    return _sha(GrammarTask().build_tokenizer())


# ---- defaults stay exactly as they were -------------------------------------------------------
def test_default_tasks_and_tokenizers_are_unchanged(grammar_tokenizer_sha):
    assert _sha(get_task("modes").build_tokenizer()) == DEFAULT_TOKENIZER_SHA256["modes"]
    assert _sha(ModelSpec(config={"model_type": "llama"}, tokenizer="task:modes").load_tokenizer()) \
        == DEFAULT_TOKENIZER_SHA256["modes"]
    assert grammar_tokenizer_sha == DEFAULT_TOKENIZER_SHA256["grammar"]
    assert get_task("modes").records(3, seed=0) == DEFAULT_MODES_RECORDS
    # the exact floats of the original normalisation (0.6 + 0.3 + 0.1 sums to just under 1)
    assert get_task("modes").weights == {"copy": 0.6000000000000001, "reverse": 0.30000000000000004,
                                         "sort": 0.10000000000000002}
    assert get_task("grammar").mode_weights("Write a greeting for Ada .") == {"direct": 0.6, "polite": 0.3,
                                                                             "detailed": 0.1}
    assert get_task("modes").tokenizer_spec() == "task:modes"
    assert get_task("grammar").tokenizer_spec() == "task:grammar"


def test_options_that_keep_the_vocabulary_keep_the_tokenizer(grammar_tokenizer_sha):
    modes = get_task("modes", weights=[1, 2, 3], min_length=4, max_length=7)
    assert _sha(modes.build_tokenizer()) == DEFAULT_TOKENIZER_SHA256["modes"]
    assert modes.tokenizer_spec() == "task:modes"
    grammar = get_task("grammar", weights={"weather": [1, 1, 1], "summary": [3, 2, 1]})
    assert _sha(grammar.build_tokenizer()) == grammar_tokenizer_sha
    assert grammar.tokenizer_spec() == "task:grammar"


# ---- modes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [[2, 3, 5], (0.2, 0.3, 0.5), {"sort": 5, "copy": 2, "reverse": 3}])
def test_modes_weights_set_the_exact_support(weights):
    task = get_task("modes", weights=weights)
    # the three answers of "c a b =" written out by hand
    assert task.support("c a b =") == pytest.approx({"c a b": 0.2, "b a c": 0.3, "a b c": 0.5}, abs=1e-15)
    for prompt in task.prompts(50, seed=4):
        support = task.support(prompt)
        assert len(support) == 3 and math.isclose(sum(support.values()), 1.0, abs_tol=1e-12)
        letters = prompt.split()[:-1]
        assert support[" ".join(reversed(letters))] == pytest.approx(0.3)
        assert task.mode_weights(prompt) == pytest.approx({"copy": 0.2, "reverse": 0.3, "sort": 0.5})


def test_modes_records_follow_the_weights():
    task = get_task("modes", weights=[1, 1, 2])
    n = 12000
    counts = collections.Counter(task.mode_of(r["prompt"], r["response"]) for r in task.records(n, seed=3))
    for mode, p in {"copy": 0.25, "reverse": 0.25, "sort": 0.5}.items():
        assert abs(counts[mode] / n - p) < 5 * math.sqrt(p * (1 - p) / n), (mode, counts)


def test_modes_prompt_lengths_and_alphabet_are_respected():
    task = get_task("modes", alphabet="abcdefghij", min_length=4, max_length=6)
    lengths = collections.Counter()
    used = set()
    for prompt in task.prompts(3000, seed=0):
        *letters, separator = prompt.split()
        assert separator == "="
        assert len(set(letters)) == len(letters) and set(letters) <= set("abcdefghij")
        assert letters not in (sorted(letters), sorted(letters, reverse=True))
        lengths[len(letters)] += 1
        used |= set(letters)
    assert set(lengths) == {4, 5, 6}  # every length of the range, nothing outside it
    assert used == set("abcdefghij")
    assert task.vocabulary() == list("abcdefghij") + ["="]
    fixed = get_task("modes", alphabet="abc", min_length=3, max_length=3)
    assert set(fixed.prompts(200, seed=1)) == {"a c b =", "b a c =", "b c a =", "c a b ="}  # the 4 unsorted orders


# ---- grammar ---------------------------------------------------------------------------------
def test_grammar_weights_per_intent_set_the_exact_support():
    task = get_task("grammar", weights={"weather": [1, 1, 2]})
    support = task.support("Describe the weather in Paris .")
    # Paris: direct has 2 phrasings (rainy|wet), polite 4 (Sure|Certainly x rainy|wet),
    # detailed 4 (rainy|wet x two pieces of advice); weights normalise to 1/4, 1/4, 1/2.
    assert support["It is wet in Paris ."] == pytest.approx(0.25 / 2)
    assert support["Sure ! Today Paris is rainy ."] == pytest.approx(0.25 / 4)
    assert support["The weather in Paris is wet , so bring a raincoat ."] == pytest.approx(0.5 / 4)
    assert len(support) == 10 and math.isclose(sum(support.values()), 1.0, abs_tol=1e-12)
    # intents not named keep their defaults
    assert task.support("Write a greeting for Ada .")["Hi Ada ."] == pytest.approx(0.6 / 2)
    assert task.mode_weights("Summarize : Ada bought two books .") == {"direct": 0.45, "polite": 0.35,
                                                                       "detailed": 0.2}


@pytest.mark.parametrize("weights", [[1, 2, 1], {"direct": 1, "polite": 2, "detailed": 1},
                                     {"weather": [1, 2, 1], "greeting": (1, 2, 1),
                                      "summary": {"detailed": 1, "polite": 2, "direct": 1}}])
def test_grammar_weights_for_every_intent_by_enumeration(weights):
    task = get_task("grammar", weights=weights)
    expected = {"direct": 0.25, "polite": 0.5, "detailed": 0.25}
    for prompt in task.all_prompts():
        support = task.support(prompt)
        assert math.isclose(sum(support.values()), 1.0, abs_tol=1e-12)
        per_mode = collections.Counter(task.mode_of(prompt, r) for r in support)
        for response, p in support.items():
            mode = task.mode_of(prompt, response)
            assert p == pytest.approx(expected[mode] / per_mode[mode])
        assert task.mode_weights(prompt) == pytest.approx(expected)


# ---- bad values: one ValueError line each ----------------------------------------------------
BAD = [
    ("modes", {"weigths": [1, 1, 1]}, r"^modes: unknown option 'weigths'; the options are alphabet, max_length, "
                                      r"min_length, weights$"),
    ("modes", {"weights": [1, 1]}, r"^modes: weights must be three positive numbers for copy, reverse, sort, "
                                   r"got \[1, 1\]$"),
    ("modes", {"weights": [0.2, -0.3, 0.5]}, r"got \[0\.2, -0\.3, 0\.5\]$"),
    ("modes", {"weights": [0, 1, 1]}, r"three positive numbers"),
    ("modes", {"weights": [1, float("nan"), 1]}, r"three positive numbers"),
    ("modes", {"weights": [True, 1, 1]}, r"three positive numbers"),
    ("modes", {"weights": ["1", 1, 1]}, r"three positive numbers"),
    ("modes", {"weights": "0.6 0.3 0.1"}, r"three positive numbers.*got '0\.6 0\.3 0\.1'"),
    ("modes", {"weights": {"copy": 1, "reverse": 1}}, r"a mapping must name exactly copy, reverse, sort"),
    ("modes", {"min_length": 2}, r"^modes: min_length must be an integer >= 3, got 2$"),
    ("modes", {"min_length": 3.5}, r"min_length must be an integer"),
    ("modes", {"max_length": "5"}, r"max_length must be an integer >= 3, got '5'"),
    ("modes", {"min_length": 5, "max_length": 4}, r"need min_length <= max_length, got 5 > 4"),
    ("modes", {"max_length": 9}, r"max_length 9 needs at least that many alphabet symbols, 'abcdefgh' has 8"),
    ("modes", {"alphabet": "abcdea"}, r"alphabet symbols must be distinct, 'a' repeat"),
    ("modes", {"alphabet": "abc def"}, r"must not hold white space or the separator '='"),
    ("modes", {"alphabet": "abc=def"}, r"must not hold white space"),
    ("modes", {"alphabet": 12345}, r"alphabet must be a string"),
    ("modes", {"alphabet": ["a", "b", "c"]}, r"alphabet must be a string"),
    ("grammar", {"weights": {"wether": [1, 1, 1]}}, r"^grammar: weights: unknown intent 'wether'; the intents are "
                                                   r"weather, greeting, summary"),
    ("grammar", {"weights": {"weather": [1, 1]}}, r"^grammar: weights\.weather must be three positive numbers for "
                                                  r"direct, polite, detailed, got \[1, 1\]$"),
    ("grammar", {"weights": {"detailed": 1}}, r"a mapping must name exactly direct, polite, detailed"),
    ("grammar", {"weights": 0.5}, r"^grammar: weights must be three positive numbers .* or a mapping from intent"),
    ("grammar", {"vocab_size": "big"}, r"vocab_size must be an integer"),
    ("grammar", {"alphabet": "abc"}, r"^grammar: unknown option 'alphabet'; the options are vocab_size, weights$"),
    ("nope", {}, r"unknown built-in task 'nope'; choose one of \['grammar', 'modes'\]"),
]


@pytest.mark.parametrize("name, options, message", BAD, ids=[f"{n}-{m[:30]}" for n, _, m in BAD])
def test_bad_options_are_one_clear_line(name, options, message):
    with pytest.raises(ValueError, match=message) as info:
        get_task(name, **options)
    assert "\n" not in str(info.value)


# ---- tokenizer strings -----------------------------------------------------------------------
def test_tokenizer_string_builds_the_matching_vocabulary():
    assert parse_tokenizer_spec("task:modes") == ("modes", {})
    assert parse_tokenizer_spec("task:modes?alphabet=abcdefghij") == ("modes", {"alphabet": "abcdefghij"})
    assert parse_tokenizer_spec("task:grammar?vocab_size=400") == ("grammar", {"vocab_size": 400})
    tok = ModelSpec(config={"model_type": "llama"}, tokenizer="task:modes?alphabet=abcdefghij").load_tokenizer()
    expected = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate("abcdefghij")}, "=": 13}
    assert tok.get_vocab() == expected
    # the same vocabulary written directly with the tokenizers library, independent of the task code
    reference = Tokenizer(models.WordLevel(expected, unk_token="<unk>"))
    reference.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    ours, theirs = json.loads(tok.backend_tokenizer.to_str()), json.loads(reference.to_str())
    assert (ours["model"], ours["pre_tokenizer"]) == (theirs["model"], theirs["pre_tokenizer"])
    task = get_task("modes", alphabet="abcdefghij", weights=[1, 1, 1])
    assert task.tokenizer_spec() == "task:modes?alphabet=abcdefghij"
    for record in task.records(50, seed=0):
        ids = tok(record["prompt"] + " " + record["response"])["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == record["prompt"] + " " + record["response"]


def test_tokenizer_string_escapes_ampersand():
    task = get_task("modes", alphabet="ab&c%d")
    spec = task.tokenizer_spec()
    assert spec == "task:modes?alphabet=ab%26c%25d"
    assert task_tokenizer(spec).get_vocab() == task.build_tokenizer().get_vocab()


@pytest.mark.parametrize("spec, message", [
    ("task:modes?weights=1", r"'weights' does not choose the modes vocabulary \(tokenizer options: alphabet\); "
                             r"set it in data.task_args"),
    ("task:modes?alphabet", r"expected option=value after '\?', got 'alphabet'"),
    ("task:modes?alphabet=abc&alphabet=abcd", r"option 'alphabet' is given twice"),
    ("task:modes?alphabet=aab", r"alphabet symbols must be distinct"),
    ("task:grammar?vocab_size=big", r"vocab_size must be an integer, got 'big'"),
    ("task:nope?alphabet=abc", r"unknown built-in task 'nope'"),
])
def test_bad_tokenizer_strings_are_one_clear_line(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        ModelSpec(config={"model_type": "llama"}, tokenizer=spec).load_tokenizer()
    assert "\n" not in str(info.value)


# ---- the data module -------------------------------------------------------------------------
def test_data_module_draws_from_the_configured_task():
    options = {"alphabet": "abcdefghij", "min_length": 4, "max_length": 6, "weights": [1, 1, 2]}
    dm = DemonstrationDataModule(task="modes", task_args=options, num_train=400, num_val=0, batch_size=8)
    assert dm.hparams.task_args == options
    tokenizer = ModelSpec(config={"model_type": "llama"}, tokenizer=dm.task.tokenizer_spec()).load_tokenizer()
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    train = dm.datasets["train"]
    assert len(train) == 400
    assert all(tokenizer.unk_token_id not in e["input_ids"] for e in train)
    assert {len(e["prompt"].split()) - 1 for e in train} == {4, 5, 6}
    assert dm.task.weights == {"copy": 0.25, "reverse": 0.25, "sort": 0.5}
    # records equal the task's own, seeded as the data module seeds them
    reference = get_task("modes", **options).records(400, seed=0)
    assert [(e["prompt"], e["response"]) for e in train] == [(r["prompt"], r["response"]) for r in reference]


def test_data_module_stops_early_on_a_tokenizer_without_the_task_symbols():
    dm = DemonstrationDataModule(task="modes", task_args={"alphabet": "abcdefghij"}, num_val=0)
    dm.set_tokenizer(ModelSpec(config={"model_type": "llama"}, tokenizer="task:modes").load_tokenizer())
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    assert str(info.value) == ('data.task modes: the tokenizer cannot encode task symbol(s) i j (they would become '
                               '<unk>); give the model the task\'s tokenizer: tokenizer: '
                               '"task:modes?alphabet=abcdefghij"')
    assert "train" not in dm.datasets
    # weights and lengths do not change the vocabulary: the default tokenizer serves them
    dm = DemonstrationDataModule(task="modes", task_args={"weights": [1, 1, 1], "max_length": 8}, num_train=16,
                                 num_val=0)
    dm.set_tokenizer(ModelSpec(config={"model_type": "llama"}, tokenizer="task:modes").load_tokenizer())
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 16


def test_data_module_task_args_errors():
    with pytest.raises(ValueError, match=r"^modes: weights must be three positive numbers"):
        DemonstrationDataModule(task="modes", task_args={"weights": [1, 2]})
    with pytest.raises(ValueError, match=r"^modes: unknown option 'alphabets'"):
        DemonstrationDataModule(task="modes", task_args={"alphabets": "abc"})
    with pytest.raises(ValueError, match=r"^data.task_args needs data.task"):
        DemonstrationDataModule(train_file="x.jsonl", task_args={"weights": [1, 1, 1]})
    with pytest.raises(ValueError, match=r"^data.task_args must be a mapping"):
        DemonstrationDataModule(task="modes", task_args=[1, 1, 1])


def test_eval_config_task_by_name_still_works():
    from lightning_irl.metrics.evaluation import EvalConfig

    evaluator = EvalConfig(task="modes").build_evaluator()
    assert isinstance(evaluator.task, ModesTask)
    assert evaluator.task.support("c a b =") == get_task("modes").support("c a b =")


def test_rng_stream_of_modes_prompts_is_independent_of_weights():
    # weights only change responses: the same seed draws the same prompts
    prompts = [r["prompt"] for r in get_task("modes").records(30, seed=9)]
    assert prompts == [r["prompt"] for r in get_task("modes", weights=[1, 1, 1]).records(30, seed=9)]
