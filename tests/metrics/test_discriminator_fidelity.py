"""Discriminator fidelity (metrics/discriminator.py) against its definitions, computed by hand:
BCE sums with math.log, Pearson from its formula, AUROC by counting pairs (Mann–Whitney)."""

import math
import random

import pytest
import torch

from lightning_irl.metrics.discriminator import LOG4, DiscriminatorFidelity, fidelity


def _softplus(x: float) -> float:
    return 0.0 if x == -math.inf else math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _pearson(xs, ys) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return cov / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))


def _auroc(scores, labels) -> float:
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _toy(seed=0, n_expert=40, n_policy=60):
    """Exact log-ratios of a known toy (some policy samples invalid: −inf) and a noisy learned logit."""
    rng = random.Random(seed)
    expert_exact = [rng.gauss(0.5, 1.0) for _ in range(n_expert)]
    policy_exact = [rng.gauss(-0.5, 1.0) if rng.random() < 0.7 else -math.inf for _ in range(n_policy)]
    noisy = lambda h: (h if h > -math.inf else rng.gauss(-2.0, 1.0)) * 0.6 + rng.gauss(0.0, 0.5)
    return expert_exact, policy_exact, [noisy(h) for h in expert_exact], [noisy(h) for h in policy_exact]


def test_fidelity_equals_its_definitions_on_a_toy():
    expert_exact, policy_exact, expert_h, policy_h = _toy()
    out = fidelity(*(torch.tensor(v) for v in (expert_h, expert_exact, policy_h, policy_exact)))
    bce = sum(_softplus(-h) for h in expert_h) / len(expert_h) + sum(_softplus(h) for h in policy_h) / len(policy_h)
    bayes = (sum(_softplus(-h) for h in expert_exact) / len(expert_exact)
             + sum(_softplus(h) for h in policy_exact) / len(policy_exact))
    assert float(out["bce_heldout"]) == pytest.approx(bce, rel=1e-5)
    assert float(out["bce_bayes"]) == pytest.approx(bayes, rel=1e-5)
    assert float(out["bayes_gap_closed"]) == pytest.approx((LOG4 - bce) / (LOG4 - bayes), rel=1e-4)
    finite = [(h, e) for h, e in zip(expert_h + policy_h, expert_exact + policy_exact) if e > -math.inf]
    assert float(out["corr_exact"]) == pytest.approx(_pearson(*zip(*finite)), abs=1e-5)
    valid = [e > -math.inf for e in policy_exact]
    assert float(out["auroc_invalid"]) == pytest.approx(_auroc(policy_h, valid), abs=1e-6)


def test_without_exact_answers_only_the_heldout_bce_is_defined():
    _, _, expert_h, policy_h = _toy(3)
    nan = float("nan")
    out = fidelity(torch.tensor(expert_h), torch.full((len(expert_h),), nan), torch.tensor(policy_h),
                   torch.full((len(policy_h),), nan))
    bce = sum(_softplus(-h) for h in expert_h) / len(expert_h) + sum(_softplus(h) for h in policy_h) / len(policy_h)
    assert float(out["bce_heldout"]) == pytest.approx(bce, rel=1e-5)
    assert all(math.isnan(float(out[name])) for name in ("bce_bayes", "bayes_gap_closed", "corr_exact",
                                                         "auroc_invalid"))


def test_chance_and_the_exact_logit_are_the_two_ends_of_the_gap():
    expert_exact, policy_exact, _, _ = _toy(1)
    exact = [torch.tensor(v) for v in (expert_exact, expert_exact, policy_exact, policy_exact)]
    perfect = fidelity(*exact)
    assert float(perfect["bayes_gap_closed"]) == pytest.approx(1.0, abs=1e-6)
    assert float(perfect["corr_exact"]) == pytest.approx(1.0, abs=1e-6)
    assert float(perfect["auroc_invalid"]) == 1.0
    chance = fidelity(torch.zeros(len(expert_exact)), exact[1], torch.zeros(len(policy_exact)), exact[3])
    assert float(chance["bce_heldout"]) == pytest.approx(LOG4, abs=1e-6)
    assert float(chance["bayes_gap_closed"]) == pytest.approx(0.0, abs=1e-6)


def test_the_metric_accumulates_batches_like_one_call():
    expert_exact, policy_exact, expert_h, policy_h = _toy(2)
    metric = DiscriminatorFidelity()
    for k in range(3):  # uneven batches; the last one has no demonstrations
        metric.update(expert_h[15 * k:15 * k + 15], expert_exact[15 * k:15 * k + 15], policy_h[15 * k:15 * k + 15],
                      policy_exact[15 * k:15 * k + 15])
    metric.update([], [], policy_h[45:], policy_exact[45:])
    whole = fidelity(*(torch.tensor(v) for v in (expert_h, expert_exact, policy_h, policy_exact)))
    for name, value in metric.compute().items():
        torch.testing.assert_close(value.float(), whole[name].float(), rtol=1e-5, atol=1e-6)
