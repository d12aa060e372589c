"""IQ-Learn loss: λ=0 is SFT exactly; λ>0 against a hand loop over (b, t); γ and masking."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_irl.objectives.iq_learn import iq_learn_loss

B, T1, V = 3, 6, 7  # T1 = T-1, the shifted length


def _batch(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T1, V, generator=g) * 2).to(dtype)
    targets = torch.randint(0, V, (B, T1), generator=g)
    # Row 0: prompt then response reaching the end of the row (last position terminal).
    # Row 1: response followed by right padding. Row 2: left padding + prompt, single response token.
    mask = torch.tensor(
        [[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0]], dtype=torch.long
    )
    return logits, targets, mask


def _sft_reference(logits, targets, mask, num_tokens):
    labels = targets.masked_fill(mask == 0, -100)
    return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="sum") / num_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_loss_tokens", [None, 17])
def test_lambda_zero_is_exactly_sft(dtype, num_loss_tokens):
    logits, targets, mask = _batch(dtype)
    a = logits.clone().requires_grad_()
    out = iq_learn_loss(a, targets, mask, lam=0.0, gamma=0.9, num_loss_tokens=num_loss_tokens)
    out.loss.backward()

    b = logits.clone().requires_grad_()
    n = int(mask.sum()) if num_loss_tokens is None else num_loss_tokens
    ref = _sft_reference(b, targets, mask, n)
    ref.backward()

    tol = 1e-7 if dtype == torch.float32 else 1e-14
    assert out.loss.dtype == dtype
    assert abs(out.loss.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=tol)
    assert out.penalty.item() == 0.0
    assert out.nll.item() == out.loss.item()


def _hand_loop(logits, targets, mask, lam, gamma, num_tokens):
    """Per (b, t) on Python floats: Q, V by explicit logsumexp, r = Q(s,a) − γ V(s'), V(end) = 0."""
    L = logits.tolist()
    nll = pen = 0.0
    rewards = [[0.0] * T1 for _ in range(B)]
    for b in range(B):
        for t in range(T1):
            if not mask[b, t]:
                continue
            row = L[b][t]
            m = max(row)
            v_s = m + math.log(sum(math.exp(x - m) for x in row))
            q = row[int(targets[b, t])]
            log_pi = q - v_s
            terminal = t + 1 >= T1 or not mask[b, t + 1]
            if terminal:
                v_next = 0.0
            else:
                nxt = L[b][t + 1]
                m2 = max(nxt)
                v_next = m2 + math.log(sum(math.exp(x - m2) for x in nxt))
            r = log_pi + v_s - gamma * v_next  # the objective's written form
            rewards[b][t] = r
            nll += -log_pi
            pen += lam * r * r
    return (nll + pen) / num_tokens, nll / num_tokens, pen / num_tokens, rewards


@pytest.mark.parametrize("lam", [0.1, 1.0])
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_matches_hand_loop(lam, gamma):
    logits, targets, mask = _batch(seed=1)
    out = iq_learn_loss(logits, targets, mask, lam=lam, gamma=gamma)
    n = int(mask.sum())
    loss, nll, pen, rewards = _hand_loop(logits, targets, mask, lam, gamma, n)
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)
    assert out.nll.item() == pytest.approx(nll, rel=1e-12)
    assert out.penalty.item() == pytest.approx(pen, rel=1e-12)
    torch.testing.assert_close(out.implied_rewards, torch.tensor(rewards, dtype=torch.float64))
    assert pen > 0


def test_gamma_zero_reward_is_q_and_gamma_enters_linearly():
    logits, targets, mask = _batch(seed=2)
    r0 = iq_learn_loss(logits, targets, mask, lam=1.0, gamma=0.0).implied_rewards
    q = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(r0, q)
    r1 = iq_learn_loss(logits, targets, mask, lam=1.0, gamma=1.0).implied_rewards
    r_half = iq_learn_loss(logits, targets, mask, lam=1.0, gamma=0.5).implied_rewards
    torch.testing.assert_close(r_half, 0.5 * (r0 + r1))
    # Terminal positions (last response token of each row) do not depend on γ.
    for b, t in [(0, 5), (1, 3), (2, 4)]:
        assert r0[b, t] == r1[b, t]
    assert not torch.allclose(r0[0, 2], r1[0, 2])


def test_gradient_matches_hand_formula_autograd():
    logits, targets, mask = _batch(seed=3)
    lam, gamma, n = 0.7, 0.95, 11.0
    a = logits.clone().requires_grad_()
    iq_learn_loss(a, targets, mask, lam=lam, gamma=gamma, num_loss_tokens=n).loss.backward()

    b = logits.clone().requires_grad_()
    total = b.new_zeros(())
    for bi in range(B):
        for t in range(T1):
            if not mask[bi, t]:
                continue
            v_s = torch.logsumexp(b[bi, t], 0)
            q = b[bi, t, targets[bi, t]]
            terminal = t + 1 >= T1 or not mask[bi, t + 1]
            v_next = b.new_zeros(()) if terminal else torch.logsumexp(b[bi, t + 1], 0)
            total = total + (-(q - v_s)) + lam * (q - gamma * v_next) ** 2
    (total / n).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_masked_positions_contribute_nothing():
    logits, targets, mask = _batch(seed=4)
    base = iq_learn_loss(logits, targets, mask, lam=0.5, gamma=0.9)
    off = mask == 0
    changed_logits = logits.clone()
    changed_logits[off] = torch.randn(int(off.sum()), V, dtype=logits.dtype) * 50
    changed_targets = targets.masked_fill(off, -100)  # ignore_index-style labels are accepted too
    other = iq_learn_loss(changed_logits, changed_targets, mask, lam=0.5, gamma=0.9)
    assert other.loss.item() == base.loss.item()
    torch.testing.assert_close(other.implied_rewards, base.implied_rewards, rtol=0, atol=0)
    assert torch.all(base.implied_rewards[off] == 0)

    a = logits.clone().requires_grad_()
    iq_learn_loss(a, targets, mask, lam=0.5, gamma=0.9).loss.backward()
    assert torch.all(a.grad[off] == 0)
    assert torch.all(a.grad[mask.bool()].abs().sum(-1) > 0)


def test_empty_mask_is_zero_not_nan():
    logits, targets, _ = _batch()
    out = iq_learn_loss(logits, targets, torch.zeros(B, T1, dtype=torch.long), lam=1.0)
    assert out.loss.item() == 0.0
