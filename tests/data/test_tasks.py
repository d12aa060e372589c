"""Built-in known-expert tasks: exact support, modes, sampler, tokenizers."""

import collections
import math
import os
import random
import subprocess
import sys

import pytest

from lightning_irl.data.tasks import TASKS, GrammarTask, ModesTask, get_task
from lightning_irl.data.tasks.grammar import expand


@pytest.fixture(scope="module")
def grammar():
    return GrammarTask()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_support_is_a_distribution_partitioned_by_modes(name):
    task = get_task(name)
    for prompt in task.prompts(40, seed=1):
        support = task.support(prompt)
        assert math.isclose(sum(support.values()), 1.0, abs_tol=1e-9)
        weights = task.mode_weights(prompt)
        assert math.isclose(sum(weights.values()), 1.0, abs_tol=1e-9)
        by_mode = collections.defaultdict(float)
        for response, p in support.items():
            assert p > 0
            assert math.isclose(task.log_prob(prompt, response), math.log(p))
            assert task.log_prob(prompt, "  " + response.replace(" ", "   ") + " ") == task.log_prob(prompt, response)
            mode = task.mode_of(prompt, response)
            assert mode in weights
            by_mode[mode] += p
        for mode, w in weights.items():
            assert math.isclose(by_mode[mode], w, abs_tol=1e-9), (prompt, mode)
        outside = "zzz " + next(iter(support))
        assert task.log_prob(prompt, outside) == -math.inf
        assert task.mode_of(prompt, outside) is None


@pytest.mark.parametrize("name", sorted(TASKS))
def test_sampler_matches_exact_probabilities(name):
    task = get_task(name)
    prompt = task.prompts(1, seed=3)[0]
    rng = random.Random(0)
    n = 20000
    counts = collections.Counter(task.sample_response(prompt, rng) for _ in range(n))
    for response, p in task.support(prompt).items():
        # 5 standard errors of a binomial proportion
        assert abs(counts[response] / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9, response
    assert set(counts) <= set(task.support(prompt))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_records_are_reproducible(name):
    task = get_task(name)
    assert task.records(20, seed=5) == task.records(20, seed=5)
    assert task.records(20, seed=5) != task.records(20, seed=6)


def test_modes_task_answers():
    task = ModesTask()
    assert task.answers("c a b =") == {"copy": "c a b", "reverse": "b a c", "sort": "a b c"}
    assert task.support("c a b =") == pytest.approx({"c a b": 0.6, "b a c": 0.3, "a b c": 0.1})


def test_grammar_expand_and_modes(grammar):
    assert expand("{Hi|Hello} {name} .", {"name": "Ada"}) == ["Hi Ada .", "Hello Ada ."]
    assert expand("It is {adj} .", {"adj": ("rainy", "wet")}) == ["It is rainy .", "It is wet ."]
    prompt = "Describe the weather in Paris ."
    support = grammar.support(prompt)
    assert support["It is rainy in Paris ."] == pytest.approx(0.25)
    assert support["Certainly ! Today Paris is wet ."] == pytest.approx(0.3 / 4)
    assert grammar.mode_of(prompt, "The weather in Paris is wet , so bring a raincoat .") == "detailed"
    assert grammar.log_prob(prompt, "It is sunny in Paris .") == -math.inf  # wrong fact
    assert grammar.mode_weights("Write a greeting for Ada .") == {"direct": 0.6, "polite": 0.3, "detailed": 0.1}
    assert grammar.mode_names() == ["direct", "polite", "detailed"]
    assert len(grammar.all_prompts()) == 8 + 8 + 8 * 3 * 4
    with pytest.raises(ValueError, match="not a grammar prompt"):
        grammar.support("Describe the weather in Atlantis .")


def test_grammar_tokenizer_round_trips_and_splits_words(grammar):
    tok = grammar.build_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == grammar.vocab_size
    pieces = 0
    for line in grammar.corpus():
        ids = tok(line)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == line  # no clean-up of " ." and friends
        pieces += len(ids) - len(line.split())
    assert pieces > 0  # a real sub-word vocabulary: some words take several tokens
    # response decoded from generated ids (EOS and padding skipped) is the string the task scores
    ids = tok("It is rainy in Paris .")["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "It is rainy in Paris ."


def test_grammar_tokenizer_is_deterministic(grammar, tmp_path):
    vocab = grammar.build_tokenizer().backend_tokenizer.to_str()
    assert GrammarTask().build_tokenizer().backend_tokenizer.to_str() == vocab
    out = tmp_path / "tok.json"
    code = ("import sys; from lightning_irl.data.tasks import get_task; "
            "open(sys.argv[1], 'w').write(get_task('grammar').build_tokenizer().backend_tokenizer.to_str())")
    env = dict(os.environ, PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, timeout=120)
    assert out.read_text() == vocab


def test_task_tokenizer_through_model_spec():
    from lightning_irl.models.spec import ModelSpec

    tok = ModelSpec(config={"model_type": "llama"}, tokenizer="task:grammar").load_tokenizer()
    assert tok.decode(tok("Summarize : Ada bought two books .")["input_ids"]) == "Summarize : Ada bought two books ."
