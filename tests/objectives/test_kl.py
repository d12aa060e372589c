"""KL estimators against the exact KL of enumerable categoricals (docs/theory.md §3)."""

import pytest
import torch

from lightning_irl.objectives.kl import kl_penalty

DTYPE = torch.float64


def _categoricals(seed, n=7, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    theta = (spread * torch.randn(n, generator=g, dtype=DTYPE)).requires_grad_(True)
    ref_logp = torch.log_softmax(spread * torch.randn(n, generator=g, dtype=DTYPE), dim=0)
    return theta, ref_logp


def _exact_kl(logp, ref_logp):
    return (logp.exp() * (logp - ref_logp)).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_and_k3_are_unbiased(seed):
    theta, ref_logp = _categoricals(seed, spread=2.0)
    logp = torch.log_softmax(theta, dim=0).detach()
    policy = logp.exp()
    exact = _exact_kl(logp, ref_logp)
    assert exact > 0.1
    for estimator in ("k1", "k3"):
        expectation = (policy * kl_penalty(logp, ref_logp, estimator)).sum()
        torch.testing.assert_close(expectation, exact, atol=1e-12, rtol=0)
    # k2 is biased when the distributions are far apart...
    k2 = (policy * kl_penalty(logp, ref_logp, "k2")).sum()
    assert not torch.isclose(k2, exact, atol=1e-2)


def test_k2_matches_its_definition_and_is_close_for_close_distributions():
    theta, ref_logp = _categoricals(3)
    logp = torch.log_softmax(theta, dim=0).detach()
    torch.testing.assert_close(kl_penalty(logp, ref_logp, "k2"), 0.5 * (logp - ref_logp) ** 2)
    # ...and its bias is third order: π_ref = softmax(θ + ε·v), error / KL = O(ε)
    g = torch.Generator().manual_seed(4)
    direction = torch.randn(7, generator=g, dtype=DTYPE)
    relative_errors = []
    for eps in (1e-1, 1e-2):
        close_ref = torch.log_softmax(theta.detach() + eps * direction, dim=0)
        exact = _exact_kl(logp, close_ref)
        k2 = (logp.exp() * kl_penalty(logp, close_ref, "k2")).sum()
        relative_errors.append(((k2 - exact) / exact).abs().item())
    assert relative_errors[1] < relative_errors[0] / 5
    assert relative_errors[1] < 0.02


def test_k3_is_nonnegative_everywhere():
    for dtype in (torch.float32, DTYPE):
        log_ratio = torch.cat([torch.linspace(-20, 20, 4001, dtype=dtype), torch.zeros(1, dtype=dtype)])
        k3 = kl_penalty(log_ratio, torch.zeros_like(log_ratio), "k3")
        assert (k3 >= 0).all()
        assert k3[-1] == 0  # δ = 0 exactly
    # and accurate near zero, where e^{−δ} − 1 and δ cancel: k3 ≈ δ²/2
    tiny = torch.tensor([1e-9], dtype=torch.float32)
    assert kl_penalty(tiny, torch.zeros_like(tiny), "k3").item() == pytest.approx(5e-19, rel=1e-3)


def test_pathwise_gradients_in_expectation():
    """KL in the loss: E_{a~π}[∇_θ k(a)] with π's sampling weights held fixed.

    k1 → 0, k2 → ∇KL(π ‖ π_ref), k3 → ∇KL(π_ref ‖ π), as kl.py's docstring says.
    """
    theta, ref_logp = _categoricals(5, spread=1.5)

    def expected_pathwise_grad(estimator):
        logp = torch.log_softmax(theta, dim=0)
        surrogate = (logp.exp().detach() * kl_penalty(logp, ref_logp, estimator)).sum()
        return torch.autograd.grad(surrogate, theta)[0]

    def grad_of(divergence):
        return torch.autograd.grad(divergence(torch.log_softmax(theta, dim=0)), theta)[0]

    reverse = grad_of(lambda logp: _exact_kl(logp, ref_logp))
    forward = grad_of(lambda logp: _exact_kl(ref_logp, logp))
    assert reverse.abs().max() > 1e-2 and not torch.allclose(reverse, forward, atol=1e-3)
    torch.testing.assert_close(expected_pathwise_grad("k1"), torch.zeros_like(theta), atol=1e-12, rtol=0)
    torch.testing.assert_close(expected_pathwise_grad("k2"), reverse, atol=1e-12, rtol=0)
    torch.testing.assert_close(expected_pathwise_grad("k3"), forward, atol=1e-12, rtol=0)


def test_per_token_estimates_sum_to_sequence_kl():
    """Two-step autoregressive π and π_ref: E[Σ_t k_t] = KL of the sequence distributions."""
    g = torch.Generator().manual_seed(6)
    vocab = 3

    def token_logps():
        first = torch.log_softmax(torch.randn(vocab, generator=g, dtype=DTYPE), 0)
        second = torch.log_softmax(torch.randn(vocab, vocab, generator=g, dtype=DTYPE), 1)
        return torch.stack([first.repeat_interleave(vocab), second.reshape(-1)], dim=1)  # [9, 2]

    logp, ref_logp = token_logps(), token_logps()
    policy = logp.sum(1).exp()
    exact = _exact_kl(logp.sum(1), ref_logp.sum(1))
    for estimator in ("k1", "k3"):
        expectation = (policy * kl_penalty(logp, ref_logp, estimator).sum(1)).sum()
        torch.testing.assert_close(expectation, exact, atol=1e-12, rtol=0)


def test_unknown_estimator():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
