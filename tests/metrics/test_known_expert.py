"""Known-expert metrics against exact computations on enumerable spaces.

Responses here are strings of a word-level tokenizer (one spelling per string): ``L(y)`` is
their word count + 1 (EOS), and ``VOCAB`` stands for the policy's output size in the smoothed
expert p̃_E = (1 − ε)·p_E + ε·VOCAB^(−L) of the reverse KL.

Sampling tolerances are 5 standard errors of the per-sample terms (computed exactly from the
distributions), so a correct estimator fails with probability < 1e-6 per check; the generators
are seeded anyway.
"""

import itertools
import math
import random

import pytest
import torch

from lightning_irl.data.tasks import ModesTask
from lightning_irl.metrics import (
    SMOOTHING,
    ForwardKL,
    InvalidMass,
    ModeMass,
    PolicyEntropy,
    ReverseKL,
    SampleEvaluator,
    ValidReverseKL,
)
from lightning_irl.metrics.functional import exact_kls, mode_coverage, smoothed_expert_logp

N = 20_000
EXPERT = {"a": 0.6, "b": 0.3, "c": 0.1}
POLICY = {"a": 0.2, "b": 0.3, "c": 0.3, "d": 0.2}  # "d" lies outside the expert's support


def draw(dist, n, seed):
    names = list(dist)
    idx = torch.multinomial(torch.tensor([dist[k] for k in names]), n, replacement=True,
                            generator=torch.Generator().manual_seed(seed))
    return [names[i] for i in idx.tolist()]


VOCAB = 8


def logp(dist, y):
    return math.log(dist[y]) if dist.get(y, 0) > 0 else -math.inf


def length(y):
    return len(y.split()) + 1


def smoothed(expert, y, eps=SMOOTHING):
    """log p̃_E(y) in plain floats."""
    return math.log((1 - eps) * expert.get(y, 0.0) + eps * VOCAB ** -length(y))


def moments(dist, term, n=N):
    """Exact mean of ``term(y)`` under ``dist`` and the standard error of an n-sample average."""
    mean = sum(p * term(y) for y, p in dist.items())
    var = sum(p * (term(y) - mean) ** 2 for y, p in dist.items())
    return mean, math.sqrt(var / n)


def conditional_kl(expert, policy, n):
    """KL(π(·|valid) ‖ p_E) and the standard error (delta method) of the n-sample estimator
    mean_valid[log π − log p_E] − log V̂."""
    valid = sum(q for y, q in policy.items() if expert.get(y, 0) > 0)
    cond = {y: q / valid for y, q in policy.items() if expert.get(y, 0) > 0}
    kl = sum(c * math.log(c / expert[y]) for y, c in cond.items())
    _, se_terms = moments(cond, lambda y: math.log(policy[y]) - math.log(expert[y]), n=n * valid)
    return kl, math.sqrt(se_terms**2 + (1 - valid) / (valid * n))


def test_closed_forms_by_hand():
    exact = exact_kls(EXPERT, POLICY, VOCAB, length=length)
    forward = 0.6 * math.log(0.6 / 0.2) + 0.3 * math.log(1) + 0.1 * math.log(0.1 / 0.3)
    e, u = SMOOTHING, VOCAB ** -2  # every response here is one word + EOS
    reverse = (0.2 * math.log(0.2 / ((1 - e) * 0.6 + e * u)) + 0.3 * math.log(0.3 / ((1 - e) * 0.3 + e * u))
               + 0.3 * math.log(0.3 / ((1 - e) * 0.1 + e * u)) + 0.2 * math.log(0.2 / (e * u)))
    valid = 0.25 * math.log(0.25 / 0.6) + 0.375 * math.log(0.375 / 0.3) + 0.375 * math.log(0.375 / 0.1)
    assert exact["forward_kl"] == pytest.approx(forward)
    assert exact["reverse_kl"] == pytest.approx(reverse)
    assert exact["reverse_kl_valid"] == pytest.approx(valid)
    assert exact["invalid_mass"] == pytest.approx(0.2)


def test_forward_kl_converges_and_exact_with_weights():
    ys = draw(EXPERT, N, seed=0)
    metric = ForwardKL()
    metric.update(torch.tensor([logp(EXPERT, y) for y in ys]), torch.tensor([logp(POLICY, y) for y in ys]))
    mean, se = moments(EXPERT, lambda y: logp(EXPERT, y) - logp(POLICY, y))
    assert mean == pytest.approx(exact_kls(EXPERT, POLICY, VOCAB, length=length)["forward_kl"])
    assert abs(float(metric.compute()) - mean) < 5 * se
    # the whole support weighted by p_E: the exact value
    exact = ForwardKL()
    support = list(EXPERT)
    exact.update([logp(EXPERT, y) for y in support], [logp(POLICY, y) for y in support],
                 weight=[EXPERT[y] for y in support])
    assert float(exact.compute()) == pytest.approx(mean, abs=1e-6)


def test_reverse_kl_invalid_mass_and_entropy_converge():
    ys = draw(POLICY, N, seed=1)
    pol = torch.tensor([logp(POLICY, y) for y in ys])
    exp = torch.tensor([logp(EXPERT, y) for y in ys])
    tilde = smoothed_expert_logp(exp, torch.tensor([length(y) for y in ys]), VOCAB)
    reverse, valid_kl, invalid, entropy = ReverseKL(), ValidReverseKL(), InvalidMass(), PolicyEntropy()
    for start in range(0, N, 4096):  # several updates accumulate like one
        sl = slice(start, start + 4096)
        reverse.update(pol[sl], tilde[sl])
        valid_kl.update(pol[sl], exp[sl])
        invalid.update(exp[sl])
        entropy.update(pol[sl])
    exact = exact_kls(EXPERT, POLICY, VOCAB, length=length)
    mean, se = moments(POLICY, lambda y: logp(POLICY, y) - smoothed(EXPERT, y))
    assert mean == pytest.approx(exact["reverse_kl"])
    out = reverse.compute()
    assert abs(float(out["reverse_kl"]) - mean) < 5 * se
    assert float(out["reverse_kl_se"]) == pytest.approx(se, rel=0.05)
    assert abs(float(invalid.compute()) - 0.2) < 5 * math.sqrt(0.2 * 0.8 / N)
    h, se_h = moments(POLICY, lambda y: -logp(POLICY, y))
    assert abs(float(entropy.compute()) - h) < 5 * se_h
    # KL of the policy conditioned on the support: {a: .25, b: .375, c: .375} against the expert
    kl_valid, se_v = conditional_kl(EXPERT, POLICY, N)
    conditioned = {"a": 0.25, "b": 0.375, "c": 0.375}
    assert kl_valid == pytest.approx(sum(q * math.log(q / EXPERT[y]) for y, q in conditioned.items()))
    assert kl_valid == pytest.approx(exact["reverse_kl_valid"])
    assert abs(float(valid_kl.compute()) - kl_valid) < 5 * se_v


def test_mode_coverage_threshold_is_inclusive():
    expert = torch.tensor([0.6, 0.3, 0.1])
    assert float(mode_coverage(torch.tensor([0.6, 0.35, 0.05]), expert)) == 1.0  # 0.05 = 0.5 × 0.1
    assert float(mode_coverage(torch.tensor([0.6, 0.36, 0.04]), expert)) == pytest.approx(2 / 3)
    assert float(mode_coverage(torch.tensor([1.0, 0.0, 0.0]), expert, threshold=0.1)) == pytest.approx(1 / 3)
    # modes the expert never uses do not count
    assert float(mode_coverage(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))) == 1.0


# ---- hand-built policies on a tiny modes task (3 letters: 6 permutations, 3 of them valid) ----
TASK = ModesTask(alphabet="abcd", min_length=3, max_length=3)


def permutations(prompt):
    return [" ".join(p) for p in itertools.permutations(prompt.split()[:-1])]


POLICIES = {
    "expert": lambda prompt: TASK.support(prompt),
    "copy_only": lambda prompt: {TASK.answers(prompt)["copy"]: 1.0},
    "uniform_modes": lambda prompt: {a: 1 / 3 for a in TASK.answers(prompt).values()},
    "uniform_permutations": lambda prompt: {p: 1 / 6 for p in permutations(prompt)},
}


# every prompt of TASK has the same three distinct answers, so per-sample terms are i.i.d. across
# prompts: one prompt's distributions give the exact value and the standard error
PROMPT = "c a b ="
N_PROMPTS, K = 300, 8


def evaluate(policy, n_prompts=N_PROMPTS, k=K, seed=0):
    """Feed the evaluator ``k`` samples per prompt of a hand-built policy with exact log-probs,
    plus one expert sample per prompt scored under the policy (forward KL)."""
    prompts = TASK.prompts(n_prompts, seed=seed)
    evaluator = SampleEvaluator(TASK)
    responses, logps = [], []
    for i, prompt in enumerate(prompts):
        dist = policy(prompt)
        ys = draw(dist, k, seed=seed * 100_000 + i)
        responses += ys
        logps += [math.log(dist[y]) for y in ys]
    evaluator.update_samples(prompts, responses, logps, num_samples=k, vocab_size=VOCAB)
    # forward KL by teacher forcing the expert's own samples (the policy's exact log-probs)
    rng = random.Random(seed)
    expert_ys = [TASK.sample_response(p, rng) for p in prompts]
    evaluator.forward_kl.update([TASK.log_prob(p, y) for p, y in zip(prompts, expert_ys)],
                                [logp(policy(p), y) for p, y in zip(prompts, expert_ys)])
    return {k: float(v) for k, v in evaluator.compute().items()}


def test_the_expert_itself():
    out = evaluate(POLICIES["expert"])
    assert out["forward_kl"] == pytest.approx(0.0, abs=1e-6)  # every term is exactly 0
    # against the smoothed expert only the ε shift is left: between 0 and −log(1 − ε)
    expert = TASK.support(PROMPT)
    reverse, se_r = moments(expert, lambda y: logp(expert, y) - smoothed(expert, y), n=N_PROMPTS * K)
    assert 0 < reverse < -math.log(1 - SMOOTHING)
    assert abs(out["reverse_kl"] - reverse) < 5 * se_r + 1e-6
    assert out["reverse_kl_valid"] == pytest.approx(0.0, abs=1e-6)
    assert out["invalid_mass"] == 0.0
    assert out["mode_coverage"] == 1.0
    n = N_PROMPTS * K
    assert abs(out["mass_copy"] - 0.6) < 5 * math.sqrt(0.6 * 0.4 / n)
    assert abs(out["mass_sort"] - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n)


def test_a_policy_on_one_mode():
    out = evaluate(POLICIES["copy_only"])
    assert out["mode_coverage"] == pytest.approx(1 / 3)
    assert out["mass_copy"] == 1.0 and out["mass_reverse"] == 0.0 and out["mass_sort"] == 0.0
    assert out["invalid_mass"] == 0.0
    copy = TASK.answers(PROMPT)["copy"]  # exact: one response per prompt, all of the same length
    assert out["reverse_kl"] == pytest.approx(-smoothed(TASK.support(PROMPT), copy), abs=1e-5)
    assert out["reverse_kl_se"] == pytest.approx(0.0, abs=1e-5)
    assert out["entropy"] == pytest.approx(0.0, abs=1e-6)
    assert out["distinct_2"] == pytest.approx(2 / 16)  # 8 identical 3-letter samples: 2 distinct of 16 bigrams
    assert out["self_bleu"] == pytest.approx(1.0)
    # the expert's reverse / sort answers have probability 0 under this policy: infinite forward KL
    assert math.isinf(out["forward_kl"])


def test_uniform_over_the_modes():
    out = evaluate(POLICIES["uniform_modes"])
    expert, policy = TASK.support(PROMPT), POLICIES["uniform_modes"](PROMPT)
    forward, se_f = moments(expert, lambda y: logp(expert, y) - logp(policy, y), n=N_PROMPTS)
    reverse, se_r = moments(policy, lambda y: logp(policy, y) - smoothed(expert, y), n=N_PROMPTS * K)
    assert forward == pytest.approx(sum(p * math.log(3 * p) for p in TASK.weights.values()))
    assert abs(out["forward_kl"] - forward) < 5 * se_f
    assert abs(out["reverse_kl"] - reverse) < 5 * se_r
    assert out["invalid_mass"] == 0.0 and out["mode_coverage"] == 1.0
    assert out["entropy"] == pytest.approx(math.log(3), abs=1e-5)


def test_uniform_over_permutations_leaks_half_its_mass():
    out = evaluate(POLICIES["uniform_permutations"])
    assert abs(out["invalid_mass"] - 0.5) < 5 * math.sqrt(0.25 / (N_PROMPTS * K))
    # each mode gets 1/6: enough for reverse (≥ 0.15) and sort (≥ 0.05), not for copy (< 0.3)
    assert out["mode_coverage"] == pytest.approx(2 / 3)
    expert, policy = TASK.support(PROMPT), POLICIES["uniform_permutations"](PROMPT)
    exact = exact_kls(expert, policy, VOCAB, length=length)
    reverse, se_r = moments(policy, lambda y: logp(policy, y) - smoothed(expert, y), n=N_PROMPTS * K)
    assert reverse == pytest.approx(exact["reverse_kl"])
    # invalid terms log(1/6) + 4·log V + log(1/ε) dominate
    assert abs(out["reverse_kl"] - reverse) < 5 * se_r
    assert out["reverse_kl_se"] == pytest.approx(se_r, rel=0.1)
    kl_valid, se_v = conditional_kl(expert, policy, N_PROMPTS * K)
    assert kl_valid == pytest.approx(sum((1 / 3) * math.log((1 / 3) / p) for p in TASK.weights.values()))
    assert abs(out["reverse_kl_valid"] - kl_valid) < 5 * se_v
    forward, se_f = moments(expert, lambda y: logp(expert, y) - logp(policy, y), n=N_PROMPTS)
    assert forward == pytest.approx(exact["forward_kl"])
    assert abs(out["forward_kl"] - forward) < 5 * se_f


def test_mode_mass_states_sum_and_reset():
    m = ModeMass(["x", "y"])
    m.update(["x", None], [{"x": 0.5, "y": 0.5}] * 2)
    m.update(["y", "x"], [{"x": 1.0}] * 2)
    out = m.compute()
    assert float(out["mass_x"]) == 0.5 and float(out["mass_y"]) == 0.25
    assert float(out["mode_coverage"]) == 1.0  # expert: x 0.75, y 0.25; policy 0.5 ≥ 0.375, 0.25 ≥ 0.125
    m.reset()
    assert math.isnan(float(m.compute()["mode_coverage"]))


def test_evaluator_without_a_task_has_only_task_free_metrics():
    evaluator = SampleEvaluator(None)
    evaluator.update_samples(["p"], ["a b", "a c"], [-1.0, -2.0], num_samples=2, lengths=[3, 3])
    out = evaluator.compute()
    assert set(out) == {"entropy", "distinct_1", "distinct_2", "self_bleu", "response_length"}
    assert float(out["entropy"]) == 1.5 and float(out["response_length"]) == 3.0
    assert float(out["distinct_1"]) == pytest.approx(3 / 4)
