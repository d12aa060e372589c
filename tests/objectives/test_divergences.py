"""Divergence rewards against exact enumeration: E_π[r ∇log π] = −∇D_f(d_E ‖ π) (docs/theory.md §2)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_irl.objectives.divergences import (
    DIVERGENCES,
    Divergence,
    bce_discriminator_loss,
    bce_sum,
    discriminator_accuracy,
    divergence_reward,
    r1_penalty,
    reward_from_f,
    token_rewards_from_prefix_logits,
)

DTYPE = torch.float64


# Each divergence written directly in terms of the two distributions, independently of the
# f in the table: p = d_E (expert), q = π (policy).
def _js(p, q):
    m = 0.5 * (p + q)
    return 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()


CLOSED_FORM_DIVERGENCE = {
    "reverse_kl": lambda p, q: (q * (q / p).log()).sum(),  # KL(π ‖ d_E)
    "forward_kl": lambda p, q: (p * (p / q).log()).sum(),  # KL(d_E ‖ π)
    "js": lambda p, q: 2 * _js(p, q) - math.log(4.0),  # the GAN f: 2·JS − log 4
    "chi2": lambda p, q: ((p - q) ** 2 / q).sum(),  # Pearson χ²(d_E ‖ π)
    "squared_hellinger": lambda p, q: ((p.sqrt() - q.sqrt()) ** 2).sum(),
}


def test_every_table_entry_has_an_independent_closed_form():
    assert set(DIVERGENCES) == set(CLOSED_FORM_DIVERGENCE)


def _random_distribution(n, generator):
    return torch.softmax(torch.randn(n, generator=generator, dtype=DTYPE), dim=0)


class FlatToy:
    """π_θ = softmax(θ) over 8 outcomes; d_E random with full support."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.randn(8, generator=g, dtype=DTYPE).requires_grad_(True)
        self.expert = _random_distribution(8, g)

    def params(self):
        return [self.theta]

    def log_policy(self):
        return torch.log_softmax(self.theta, dim=0)


class AutoregressiveToy:
    """Two tokens from a vocabulary of 3: π(y1, y2) = softmax(θ1)[y1] · softmax(θ2[y1])[y2].

    Outcomes are the 9 sequences, flattened as index 3·y1 + y2, so log π is a sum over tokens.
    """

    vocab = 3

    def __init__(self, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.theta1 = torch.randn(self.vocab, generator=g, dtype=DTYPE).requires_grad_(True)
        self.theta2 = torch.randn(self.vocab, self.vocab, generator=g, dtype=DTYPE).requires_grad_(True)
        self.expert = _random_distribution(self.vocab**2, g)

    def params(self):
        return [self.theta1, self.theta2]

    def token_log_policy(self):
        """[9, 2]: log π(y1) and log π(y2 | y1) for every sequence."""
        first = torch.log_softmax(self.theta1, dim=0)  # [V]
        second = torch.log_softmax(self.theta2, dim=1)  # [V, V]
        return torch.stack(
            [first.repeat_interleave(self.vocab), second.reshape(-1)], dim=1
        )

    def log_policy(self):
        return self.token_log_policy().sum(dim=1)

    def prefix_log_ratios(self):
        """[9, 2]: exact log d_E(y_≤t) − log π(y_≤t) for t = 1, 2."""
        token_logp = self.token_log_policy()
        expert_first = self.expert.reshape(self.vocab, self.vocab).sum(dim=1)
        h1 = expert_first.log().repeat_interleave(self.vocab) - token_logp[:, 0]
        h2 = self.expert.log() - token_logp.sum(dim=1)
        return torch.stack([h1, h2], dim=1)


def _grad(scalar, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, params)])


def _score_function_gradient(toy, reward_fn):
    """Exact E_π[r ∇log π] with r evaluated at the current θ and then held fixed."""
    log_policy = toy.log_policy()
    policy = log_policy.exp()
    h = toy.expert.log() - log_policy
    reward = reward_fn(h).detach()
    return _grad((policy.detach() * reward * log_policy).sum(), toy.params())


def _divergence_gradient(toy, closed_form):
    return _grad(closed_form(toy.expert, toy.log_policy().exp()), toy.params())


@pytest.mark.parametrize("toy_class", [FlatToy, AutoregressiveToy])
@pytest.mark.parametrize("name", sorted(CLOSED_FORM_DIVERGENCE))
def test_score_function_gradient_is_minus_divergence_gradient(toy_class, name):
    toy = toy_class()
    estimate = _score_function_gradient(toy, lambda h: divergence_reward(name, h))
    exact = _divergence_gradient(toy, CLOSED_FORM_DIVERGENCE[name])
    assert exact.abs().max() > 1e-3  # not at a stationary point: the check has teeth
    torch.testing.assert_close(estimate, -exact, atol=1e-6, rtol=0)


def test_wrong_reward_fails_the_gradient_check():
    """log D = −softplus(−h) is not the JS reward; swapping rewards breaks the identity."""
    toy = FlatToy()
    exact = _divergence_gradient(toy, CLOSED_FORM_DIVERGENCE["js"])
    log_d = _score_function_gradient(toy, lambda h: -F.softplus(-h))
    assert not torch.allclose(log_d, -exact, atol=1e-3)
    reverse_kl_reward = _score_function_gradient(toy, lambda h: h)
    assert not torch.allclose(reverse_kl_reward, -exact, atol=1e-3)


def test_table_f_defines_the_named_divergence():
    """E_π[f(d_E/π)] with the table's f equals the independent closed form (incl. JS's scaling)."""
    toy = FlatToy()
    with torch.no_grad():
        q = toy.log_policy().exp()
        p = toy.expert
        for name, divergence in DIVERGENCES.items():
            via_f = (q * divergence.f(p / q)).sum()
            torch.testing.assert_close(via_f, CLOSED_FORM_DIVERGENCE[name](p, q), atol=1e-12, rtol=0)


def test_entry_with_only_f_uses_the_autograd_rule():
    """Adding a divergence is one entry with f: Neyman χ², f = (1 − u)²/u, Σ (π − d_E)²/d_E."""
    neyman = Divergence("neyman_chi2", f=lambda u: (1 - u) ** 2 / u)
    for toy in (FlatToy(), AutoregressiveToy()):
        estimate = _score_function_gradient(toy, neyman.reward)
        exact = _divergence_gradient(toy, lambda p, q: ((q - p) ** 2 / p).sum())
        torch.testing.assert_close(estimate, -exact, atol=1e-6, rtol=0)
    # and its closed form, u f' − f = 2 − 2/u, is what the rule computes
    h = torch.linspace(-3, 3, 13, dtype=DTYPE)
    torch.testing.assert_close(neyman.reward(h), 2 - 2 * torch.exp(-h))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_autograd_rule_reproduces_closed_form(name):
    divergence = DIVERGENCES[name]
    h = torch.linspace(-4, 4, 33, dtype=DTYPE, requires_grad=True)
    generic = reward_from_f(divergence.f, h)
    closed = divergence.closed_form_reward(h)
    torch.testing.assert_close(generic, closed + divergence.dropped_constant, atol=1e-10, rtol=1e-10)
    # with h requiring grad, the rule is differentiable too, with the closed form's derivative
    torch.testing.assert_close(
        torch.autograd.grad(generic.sum(), h)[0], torch.autograd.grad(closed.sum(), h)[0]
    )
    # without, it returns a plain tensor
    assert not reward_from_f(divergence.f, h.detach()).requires_grad


def test_named_closed_forms():
    h = torch.linspace(-5, 5, 21, dtype=DTYPE)
    torch.testing.assert_close(divergence_reward("reverse_kl", h), h)
    torch.testing.assert_close(divergence_reward("forward_kl", h), h.exp())
    # GAIL's reward: −log(1 − D) with D = σ(h)
    torch.testing.assert_close(divergence_reward("js", h), -torch.log1p(-torch.sigmoid(h)))


def test_log_ratio_clip_bounds_the_importance_weight():
    h = torch.tensor([-10.0, -1.0, 0.0, 1.5, 10.0, 100.0], dtype=DTYPE)
    clipped = divergence_reward("forward_kl", h, log_ratio_clip=2.0)
    assert clipped.max() <= math.exp(2.0) + 1e-12
    torch.testing.assert_close(clipped, h.clamp(-2, 2).exp())
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence_reward("total_variation", h)
    with pytest.raises(ValueError, match="positive"):
        divergence_reward("forward_kl", h, log_ratio_clip=0.0)


# ---------------------------------------------------------------------------------------------
# token level


def test_token_rewards_reverse_kl_by_hand():
    h = torch.tensor([[0.0, 0.5, 1.5, -1.0, 9.0], [7.0, 7.0, 2.0, 3.0, 0.25]], dtype=DTYPE)
    right_padded = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    expected = torch.tensor(
        [[0.0, 0.5, 1.0, -2.5, 0.0], [7.0, 0.0, -5.0, 1.0, -2.75]], dtype=DTYPE
    )
    torch.testing.assert_close(token_rewards_from_prefix_logits(h, right_padded), expected)
    left_padded = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 1]])  # second row has a gap
    expected = torch.tensor([[0.0, 0.0, 1.5, -2.5, 10.0], [0.0, 7.0, -5.0, 0.0, -1.75]], dtype=DTYPE)
    torch.testing.assert_close(token_rewards_from_prefix_logits(h, left_padded), expected)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_token_rewards_telescope_to_sequence_reward(name):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, 7, generator=g, dtype=DTYPE)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1]]
    )
    last_valid = torch.tensor([6, 2, 6, 6])
    rewards = token_rewards_from_prefix_logits(h, mask, divergence=name, log_ratio_clip=1.0)
    assert (rewards[mask == 0] == 0).all()
    sequence_reward = divergence_reward(name, h[torch.arange(4), last_valid], log_ratio_clip=1.0)
    torch.testing.assert_close(rewards.sum(dim=1), sequence_reward)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_token_level_rewards_give_the_exact_divergence_gradient(name):
    """Per-token rewards from exact prefix log-ratios, reward-to-go REINFORCE: still −∇D_f.

    Summing the prefix rewards themselves (each token rewarded g(h_t)) is biased: it fails.
    """
    toy = AutoregressiveToy()
    h_prefix = toy.prefix_log_ratios().detach()
    mask = torch.ones_like(h_prefix)

    def reward_to_go_gradient(token_rewards):
        token_logp = toy.token_log_policy()
        policy = token_logp.sum(dim=1).exp().detach()
        to_go = token_rewards.flip(1).cumsum(1).flip(1)
        return _grad((policy[:, None] * to_go * token_logp).sum(), toy.params())

    exact = _divergence_gradient(toy, CLOSED_FORM_DIVERGENCE[name])
    differences = token_rewards_from_prefix_logits(h_prefix, mask, divergence=name)
    torch.testing.assert_close(reward_to_go_gradient(differences), -exact, atol=1e-6, rtol=0)
    each_prefix = divergence_reward(name, h_prefix)
    assert not torch.allclose(reward_to_go_gradient(each_prefix), -exact, atol=1e-3)


def test_token_rewards_shape_errors():
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        token_rewards_from_prefix_logits(torch.zeros(2, 3), torch.ones(2, 4))


# ---------------------------------------------------------------------------------------------
# discriminator


def test_bce_loss_matches_hand_written():
    g = torch.Generator().manual_seed(4)
    expert, policy = torch.randn(5, generator=g, dtype=DTYPE), torch.randn(3, generator=g, dtype=DTYPE)
    by_hand = -(torch.sigmoid(expert).log().mean() + (1 - torch.sigmoid(policy)).log().mean())
    torch.testing.assert_close(bce_discriminator_loss(expert, policy), by_hand)
    torch.testing.assert_close(bce_sum(policy, 0.0), -(1 - torch.sigmoid(policy)).log().sum())
    eps = 0.1
    smoothed = -(
        ((1 - eps) * torch.sigmoid(expert).log() + eps * (1 - torch.sigmoid(expert)).log()).mean()
        + (eps * torch.sigmoid(policy).log() + (1 - eps) * (1 - torch.sigmoid(policy)).log()).mean()
    )
    torch.testing.assert_close(bce_discriminator_loss(expert, policy, label_smoothing=eps), smoothed)
    with pytest.raises(ValueError):
        bce_discriminator_loss(expert, policy, label_smoothing=0.5)


def test_discriminator_optimum_is_the_log_ratio():
    """A free logit per outcome, batches whose counts are exactly d_E and d_π: h* = log d_E/d_π."""
    expert_counts = torch.tensor([1, 2, 3, 4, 10])
    policy_counts = torch.tensor([4, 1, 3, 2, 10])
    expert_idx = torch.repeat_interleave(torch.arange(5), expert_counts)
    policy_idx = torch.repeat_interleave(torch.arange(5), policy_counts)
    logits = torch.zeros(5, dtype=DTYPE, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], max_iter=200, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = bce_discriminator_loss(logits[expert_idx], logits[policy_idx])
        loss.backward()
        return loss

    optimizer.step(closure)
    expected = (expert_counts / expert_counts.sum()).log() - (policy_counts / policy_counts.sum()).log()
    torch.testing.assert_close(logits.detach(), expected.to(DTYPE), atol=1e-6, rtol=0)


def test_discriminator_accuracy():
    acc = discriminator_accuracy(torch.tensor([2.0, -1.0, 0.0, 3.0]), torch.tensor([-1.0, 0.5]))
    assert acc.expert.item() == pytest.approx(0.5)
    assert acc.policy.item() == pytest.approx(0.5)
    assert acc.overall.item() == pytest.approx(3 / 6)


def test_r1_penalty_closed_form_and_differentiable():
    """h_b = (x_b · w)²: ∇_x h_b = 2 (x_b · w) w, so the penalty is mean_b 4 (x_b · w)² ‖w‖²."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, 2, generator=g, dtype=DTYPE, requires_grad=True)
    x = torch.randn(4, 3, 2, generator=g, dtype=DTYPE, requires_grad=True)

    def penalty(weight):
        logits = (x * weight).sum(dim=(1, 2)) ** 2
        return r1_penalty(logits, x)

    projection = (x * w).sum(dim=(1, 2))
    torch.testing.assert_close(penalty(w), (4 * projection**2 * w.pow(2).sum()).mean())
    assert torch.autograd.gradcheck(penalty, (w,))
    with pytest.raises(ValueError, match="require grad"):
        r1_penalty(torch.zeros(2), torch.zeros(2, 3))
