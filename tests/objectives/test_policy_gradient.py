"""RLOO, REINFORCE and PPO-clip against brute-force loops and exact enumeration (docs/theory.md §3)."""

import itertools
import math

import pytest
import torch

from lightning_irl.objectives.policy_gradient import (
    policy_gradient_loss,
    positionwise_rloo,
    ppo_clip_loss,
    reward_to_go,
    rloo_advantages,
    shape_rewards,
    whiten,
)

DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------
# RLOO


def test_rloo_matches_a_loop_over_prompts_and_samples():
    g = torch.Generator().manual_seed(0)
    num_prompts, k = 3, 4
    flat = torch.randn(num_prompts * k, generator=g, dtype=DTYPE)
    by_loop = torch.empty_like(flat)
    for prompt in range(num_prompts):
        group = [prompt * k + j for j in range(k)]  # contiguous rows b·k … b·k + k − 1
        for i in group:
            others = [flat[j].item() for j in group if j != i]
            by_loop[i] = flat[i] - sum(others) / len(others)
    torch.testing.assert_close(rloo_advantages(flat, k), by_loop)
    grid = rloo_advantages(flat.reshape(num_prompts, k), k)
    assert grid.shape == (num_prompts, k)
    torch.testing.assert_close(grid.reshape(-1), by_loop)
    # the rescaled mean-baseline form
    grouped = flat.reshape(num_prompts, k)
    rescaled = k / (k - 1) * (grouped - grouped.mean(dim=1, keepdim=True))
    torch.testing.assert_close(grid, rescaled)


def test_rloo_input_errors():
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="groups"):
        rloo_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=r"\[B, k\]"):
        rloo_advantages(torch.zeros(2, 3), 2)


@pytest.mark.parametrize("k", [2, 3])
def test_rloo_policy_gradient_is_unbiased_by_enumeration(k):
    """Over every k-tuple of samples from a 3-outcome π_θ: E[∇ loss] = −∇E_π[r] exactly.

    The baseline that includes the sample itself (plain mean) is biased by a factor (k−1)/k.
    """
    theta = torch.tensor([0.3, -0.8, 0.5], dtype=DTYPE, requires_grad=True)
    reward = torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE)

    def expected_gradient(advantage_fn):
        logp = torch.log_softmax(theta, dim=0)
        surrogate = torch.zeros((), dtype=DTYPE)
        for samples in itertools.product(range(3), repeat=k):
            idx = torch.tensor(samples)
            probability = logp[idx].sum().exp().detach()
            advantages = advantage_fn(reward[idx])
            surrogate = surrogate + probability * policy_gradient_loss(logp[idx], advantages)
        return torch.autograd.grad(surrogate, theta)[0]

    exact = -torch.autograd.grad((torch.softmax(theta, 0) * reward).sum(), theta)[0]
    torch.testing.assert_close(expected_gradient(lambda r: rloo_advantages(r, k)), exact)
    with_self = expected_gradient(lambda r: r - r.mean())
    torch.testing.assert_close(with_self, exact * (k - 1) / k)


# ---------------------------------------------------------------------------------------------
# REINFORCE


def test_policy_gradient_loss_token_and_sequence_inputs_agree():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -9.0]], dtype=DTYPE, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([2.0, -4.0], dtype=DTYPE, requires_grad=True)
    loss = policy_gradient_loss(token_logps, advantages, mask)
    # −mean_b A_b Σ_t log π = −(2·(−6) + (−4)·(−0.75)) / 2
    assert loss.item() == pytest.approx(4.5)
    sequence = policy_gradient_loss(torch.tensor([-6.0, -0.75], dtype=DTYPE), advantages)
    torch.testing.assert_close(loss, sequence)
    loss.backward()
    assert advantages.grad is None  # advantages are constants
    torch.testing.assert_close(
        token_logps.grad, torch.tensor([[-1.0, -1.0, -1.0], [2.0, 2.0, 0.0]], dtype=DTYPE)
    )
    torch.testing.assert_close(
        policy_gradient_loss(token_logps, advantages, mask, denominator=4.0), loss * 2 / 4
    )
    with pytest.raises(ValueError, match="mask"):
        policy_gradient_loss(token_logps, advantages)


# ---------------------------------------------------------------------------------------------
# PPO-clip


def _ppo_by_loop(logp_new, logp_old, advantages, mask, eps):
    losses, clipped, kls = [], [], []
    for b in range(logp_new.size(0)):
        for t in range(logp_new.size(1)):
            if not mask[b, t]:
                continue
            ratio = math.exp(logp_new[b, t].item() - logp_old[b, t].item())
            a = advantages[b].item()
            unclipped = -ratio * a
            clipped_loss = -min(max(ratio, 1 - eps), 1 + eps) * a
            losses.append(max(unclipped, clipped_loss))
            clipped.append(clipped_loss > unclipped)
            kls.append(ratio - 1 - math.log(ratio))
    n = len(losses)
    return sum(losses) / n, sum(clipped) / n, sum(kls) / n


EPS = 0.2
# Per sequence: A > 0, A < 0, A > 0. Ratios chosen to hit every case: inside [0.8, 1.2];
# above 1.2 with A > 0 (clipped) and A < 0 (not clipped); below 0.8 with A < 0 (clipped) and
# A > 0 (not clipped). The last column of row 0 and two of row 2 are padding.
RATIOS = [[1.0, 1.5, 0.5, 9.0], [1.1, 1.5, 0.5, 0.7], [1.3, 0.9, 9.0, 9.0]]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
ADVANTAGES = [1.5, -2.0, 0.5]
# clipped: (0,1) ratio 1.5 A>0; (1,2) 0.5 A<0; (1,3) 0.7 A<0; (2,0) 1.3 A>0  → 4 of 9 tokens
EXPECTED_CLIPPED = [[0, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]]


def _ppo_inputs():
    g = torch.Generator().manual_seed(1)
    logp_old = -torch.rand(3, 4, generator=g, dtype=DTYPE) * 3
    logp_new = (logp_old + torch.tensor(RATIOS, dtype=DTYPE).log()).requires_grad_(True)
    return logp_new, logp_old, torch.tensor(ADVANTAGES, dtype=DTYPE), torch.tensor(MASK)


def test_ppo_token_level_matches_loop_and_zeroes_clipped_gradients():
    logp_new, logp_old, advantages, mask = _ppo_inputs()
    out = ppo_clip_loss(logp_new, logp_old, advantages, mask, clip_eps=EPS, level="token")
    loss, clip_fraction, approx_kl = _ppo_by_loop(logp_new, logp_old, advantages, mask, EPS)
    assert out.loss.item() == pytest.approx(loss, abs=1e-12)
    assert out.clip_fraction.item() == pytest.approx(4 / 9) == pytest.approx(clip_fraction)
    assert out.approx_kl.item() == pytest.approx(approx_kl, abs=1e-12)
    assert not out.clip_fraction.requires_grad and not out.approx_kl.requires_grad

    out.loss.backward()
    ratio = torch.tensor(RATIOS, dtype=DTYPE)
    active = mask.bool() & ~torch.tensor(EXPECTED_CLIPPED, dtype=torch.bool)
    expected_grad = torch.where(active, -ratio * advantages[:, None] / mask.sum(), torch.zeros(()))
    torch.testing.assert_close(logp_new.grad, expected_grad.to(DTYPE))


def test_ppo_sequence_level_matches_loop():
    logp_new, logp_old, advantages, mask = _ppo_inputs()
    out = ppo_clip_loss(logp_new, logp_old, advantages, mask, clip_eps=EPS, level="sequence")
    sequence_new = (logp_new * mask).sum(1, keepdim=True)
    sequence_old = (logp_old * mask).sum(1, keepdim=True)
    loss, clip_fraction, approx_kl = _ppo_by_loop(
        sequence_new, sequence_old, advantages, torch.ones(3, 1), EPS
    )
    assert out.loss.item() == pytest.approx(loss, abs=1e-12)
    assert out.clip_fraction.item() == pytest.approx(clip_fraction)
    assert out.approx_kl.item() == pytest.approx(approx_kl, abs=1e-12)
    # [B] sequence log-probs without a mask give the same result
    from_sums = ppo_clip_loss(sequence_new[:, 0], sequence_old[:, 0], advantages, clip_eps=EPS,
                              level="sequence")
    torch.testing.assert_close(from_sums.loss, out.loss)


def test_ppo_at_ratio_one_has_the_policy_gradient():
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(3, 5, generator=g, dtype=DTYPE)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]])
    advantages = torch.randn(3, generator=g, dtype=DTYPE)

    def grad(loss_fn):
        new = logp.clone().requires_grad_(True)
        return torch.autograd.grad(loss_fn(new), new)[0]

    reinforce = grad(lambda new: policy_gradient_loss(new, advantages, mask))
    sequence_ppo = grad(lambda new: ppo_clip_loss(new, logp, advantages, mask, level="sequence").loss)
    torch.testing.assert_close(sequence_ppo, reinforce)
    token_ppo = grad(lambda new: ppo_clip_loss(new, logp, advantages, mask, level="token").loss)
    # same per-token terms A_b ∇log π, divided by the token count instead of the sequence count
    torch.testing.assert_close(token_ppo, reinforce * 3 / mask.sum())
    out = ppo_clip_loss(logp, logp, advantages, mask)
    assert out.clip_fraction.item() == 0 and out.approx_kl.item() == 0


def test_ppo_denominator_and_errors():
    logp_new, logp_old, advantages, mask = _ppo_inputs()
    mean = ppo_clip_loss(logp_new, logp_old, advantages, mask).loss
    global_count = ppo_clip_loss(logp_new, logp_old, advantages, mask, denominator=18).loss
    torch.testing.assert_close(global_count, mean * 9 / 18)
    with pytest.raises(ValueError, match="level"):
        ppo_clip_loss(logp_new, logp_old, advantages, mask, level="step")
    with pytest.raises(ValueError, match="mask"):
        ppo_clip_loss(logp_new, logp_old, advantages, None, level="token")


# ---------------------------------------------------------------------------------------------
# helpers


def test_shape_rewards_subtracts_beta_times_summed_kl():
    rewards = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.5, 0.25, 100.0], [1.0, -1.0, 3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    shaped = shape_rewards(rewards, kl, mask, beta=0.1)
    torch.testing.assert_close(shaped, torch.tensor([1.0 - 0.075, 2.0 - 0.3]))
    assert not shaped.requires_grad


def test_whiten_uses_valid_entries_only():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, -70.0]], dtype=DTYPE)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = whiten(values, mask, eps=0.0)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DTYPE)
    torch.testing.assert_close(out[mask.bool()], (valid - valid.mean()) / valid.std(unbiased=False))
    kept_mean = whiten(values, mask, shift_mean=False, eps=0.0)
    torch.testing.assert_close(kept_mean[mask.bool()].mean(), valid.mean())
    full = whiten(valid)
    assert full.mean().abs() < 1e-12 and (full.pow(2).mean() - 1).abs() < 1e-6


def test_reward_to_go_and_positionwise_rloo_match_loops():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(6, 5, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1],
                         [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    returns = reward_to_go(rewards, mask)
    for b in range(6):
        for t in range(5):
            expected = sum(rewards[b, s] for s in range(t, 5) if mask[b, s]) if mask[b, t] else 0.0
            assert abs(float(returns[b, t]) - float(expected)) < 1e-5
    adv = positionwise_rloo(returns, 3)
    for b in range(6):
        group = range(b // 3 * 3, b // 3 * 3 + 3)
        for t in range(5):
            others = [float(returns[j, t]) for j in group if j != b]
            assert abs(float(adv[b, t]) - (float(returns[b, t]) - sum(others) / 2)) < 1e-5
