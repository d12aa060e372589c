"""SPIN loss against first-principles computations on Python floats and closed-form gradients."""

import math

import pytest
import torch

from lightning_irl.objectives.spin import spin_loss


def _softplus(x: float) -> float:
    """log(1 + e^x), stable for large |x|."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _inputs(seed=0, n=6, scale=20.0):
    g = torch.Generator().manual_seed(seed)
    # Sequence log-probs are large negative numbers; spread them so z covers both signs and |z| > 1.
    return [(-scale * torch.rand(n, generator=g, dtype=torch.float64) * 5) for _ in range(4)]


def _hand_z(pc, pr, oc, orj, beta):
    return [beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc, pr, oc, orj)]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_sigmoid_matches_hand_computation(beta, label_smoothing):
    pc, pr, oc, orj = _inputs()
    out = spin_loss(pc, pr, oc, orj, beta=beta, label_smoothing=label_smoothing)
    z = _hand_z(pc.tolist(), pr.tolist(), oc.tolist(), orj.tolist(), beta)
    assert min(z) < -1 and max(z) > 1  # the example exercises both sides
    # ℓ(z) = log(1 + e^{-z}); conservative form (1-ε)ℓ(z) + εℓ(-z).
    per = [(1 - label_smoothing) * _softplus(-zi) + label_smoothing * _softplus(zi) for zi in z]
    assert out.loss.item() == pytest.approx(sum(per) / len(per), rel=1e-12, abs=1e-12)
    assert out.losses.tolist() == pytest.approx(per, rel=1e-12, abs=1e-12)

    chosen = [beta * (a - c) for a, c in zip(pc.tolist(), oc.tolist())]
    rejected = [beta * (b - d) for b, d in zip(pr.tolist(), orj.tolist())]
    assert out.chosen_rewards.tolist() == pytest.approx(chosen, rel=1e-12, abs=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx(rejected, rel=1e-12, abs=1e-12)
    assert out.margins.tolist() == pytest.approx(z, rel=1e-12, abs=1e-10)
    assert out.accuracies.tolist() == [1.0 if c > r else 0.0 for c, r in zip(chosen, rejected)]
    assert out.accuracies.dtype == torch.float32


def test_hinge_matches_hand_computation():
    pc, pr, oc, orj = _inputs(seed=1, scale=1.0)
    beta = 0.7
    out = spin_loss(pc, pr, oc, orj, beta=beta, loss_type="hinge")
    z = _hand_z(pc.tolist(), pr.tolist(), oc.tolist(), orj.tolist(), beta)
    assert any(zi > 1 for zi in z) and any(zi < 1 for zi in z)  # both hinge branches
    per = [max(0.0, 1.0 - zi) for zi in z]
    assert out.loss.item() == pytest.approx(sum(per) / len(per), rel=1e-12)


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.3), ("hinge", 0.0)])
def test_gradient_matches_closed_form(loss_type, label_smoothing):
    pc, pr, oc, orj = (t.clone().requires_grad_() for t in _inputs(seed=2, scale=1.0))
    beta = 0.9
    out = spin_loss(pc, pr, oc, orj, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    out.loss.backward()
    z = _hand_z(pc.tolist(), pr.tolist(), oc.tolist(), orj.tolist(), beta)
    n = len(z)
    if loss_type == "sigmoid":
        # d/dz [(1-ε) softplus(-z) + ε softplus(z)] = -(1-ε) σ(-z) + ε σ(z)
        dldz = [-(1 - label_smoothing) * _sigmoid(-zi) + label_smoothing * _sigmoid(zi) for zi in z]
    else:
        dldz = [-1.0 if zi < 1 else 0.0 for zi in z]
    expected_pc = [beta * d / n for d in dldz]  # ∂z/∂π_chosen = β; the loss is a mean over n pairs
    assert pc.grad.tolist() == pytest.approx(expected_pc, rel=1e-10, abs=1e-14)
    assert pr.grad.tolist() == pytest.approx([-g for g in expected_pc], rel=1e-10, abs=1e-14)
    assert oc.grad.tolist() == pytest.approx([-g for g in expected_pc], rel=1e-10, abs=1e-14)
    assert orj.grad.tolist() == pytest.approx(expected_pc, rel=1e-10, abs=1e-14)
    for stat in (out.chosen_rewards, out.rejected_rewards, out.margins, out.accuracies):
        assert not stat.requires_grad


def test_opponent_equal_to_policy_gives_log2():
    pc, pr, _, _ = _inputs(seed=3)
    out = spin_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2.0), rel=1e-14)
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.margins == 0)
    assert torch.all(out.accuracies == 0)  # a tie is not a win
    hinge = spin_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, loss_type="hinge")
    assert hinge.loss.item() == 1.0


def test_demonstration_favoured_lowers_loss_and_swapping_flips_margin():
    pc, pr, oc, orj = _inputs(seed=4)
    a = spin_loss(pc, pr, oc, orj, beta=0.5)
    b = spin_loss(pr, pc, orj, oc, beta=0.5)  # chosen and rejected swapped
    torch.testing.assert_close(a.margins, -b.margins)
    raised = spin_loss(pc + 1.0, pr, oc, orj, beta=0.5)  # policy puts more mass on the demonstration
    assert raised.loss < a.loss


def test_rejects_bad_arguments():
    x = torch.zeros(2)
    with pytest.raises(ValueError):
        spin_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError):
        spin_loss(x, x, x, x, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError):
        spin_loss(x, x, x, x, label_smoothing=0.5)
