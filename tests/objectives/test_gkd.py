"""Generalized JSD against explicit enumeration over the vocabulary in probability space (float64)."""

import math

import pytest
import torch

from lightning_irl.objectives.gkd import (
    generalized_jsd_loss,
    masked_generalized_jsd_loss,
    token_generalized_jsd,
)

B, T, V = 2, 3, 5
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPS = [1.0, 0.7, 2.0]


def _logits(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=g) * 2.5).to(dtype)


def _softmax(row, temperature):
    xs = [x / temperature for x in row]
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    z = sum(e)
    return [x / z for x in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _enum_jsd(student_row, teacher_row, beta, temperature):
    """The GKD definition, mixing in probability space; endpoints are the two KLs."""
    p_s = _softmax(student_row, temperature)
    p_t = _softmax(teacher_row, temperature)
    if beta == 0:
        return _kl(p_t, p_s)
    if beta == 1:
        return _kl(p_s, p_t)
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)


def _enum_table(student, teacher, beta, temperature):
    s, t = student.tolist(), teacher.tolist()
    return [[_enum_jsd(s[b][i], t[b][i], beta, temperature) for i in range(T)] for b in range(B)]


LABELS = torch.tensor([[-100, 3, 1], [-100, -100, 4]])
MASK = LABELS != -100


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPS)
def test_per_token_matches_enumeration(beta, temperature):
    s, t = _logits(0), _logits(1)
    got = token_generalized_jsd(s, t, beta=beta, temperature=temperature)
    want = torch.tensor(_enum_table(s, t, beta, temperature), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert torch.all(want > 0)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPS)
def test_trl_reductions_match_enumeration(beta, temperature):
    s, t = _logits(2), _logits(3)
    table = _enum_table(s, t, beta, temperature)
    flat = [table[b][i] for b in range(B) for i in range(T)]
    kept = [table[b][i] for b in range(B) for i in range(T) if MASK[b, i]]
    kw = dict(beta=beta, temperature=temperature)

    def val(**extra):
        return generalized_jsd_loss(s, t, **kw, **extra).item()

    approx = lambda x: pytest.approx(x, rel=1e-10, abs=1e-13)  # noqa: E731
    # Without labels: batchmean divides the total by the batch size only; mean also by T and V.
    assert val() == approx(sum(flat) / B)
    assert val(reduction="sum") == approx(sum(flat))
    assert val(reduction="mean") == approx(sum(flat) / (B * T * V))
    # With labels: -100 positions dropped; batchmean is a per-token mean.
    assert val(labels=LABELS) == approx(sum(kept) / len(kept))
    assert val(labels=LABELS, reduction="sum") == approx(sum(kept))
    assert val(labels=LABELS, reduction="mean") == approx(sum(kept) / (len(kept) * V))
    none = generalized_jsd_loss(s, t, labels=LABELS, reduction="none", **kw)
    assert none.shape == (len(kept), V)
    assert none.sum(-1).tolist() == [approx(x) for x in kept]
    assert generalized_jsd_loss(s, t, reduction="none", **kw).shape == (B, T, V)
    # num_items_in_batch (a global token count) overrides the reduction.
    assert val(labels=LABELS, num_items_in_batch=10) == approx(sum(kept) / 10)
    assert val(labels=LABELS, num_items_in_batch=torch.tensor(10)) == approx(sum(kept) / 10)
    # Our mask-based variant equals TRL's batchmean with labels, and takes a global count.
    ours = masked_generalized_jsd_loss(s, t, MASK, **kw)
    assert ours.item() == approx(sum(kept) / len(kept))
    assert masked_generalized_jsd_loss(s, t, MASK.float(), num_loss_tokens=10, **kw).item() == approx(
        sum(kept) / 10
    )


def test_endpoints_are_forward_and_reverse_kl():
    s, t = _logits(4), _logits(5)
    st, tt = s.tolist(), t.tolist()
    fwd = [[_kl(_softmax(tt[b][i], 1.0), _softmax(st[b][i], 1.0)) for i in range(T)] for b in range(B)]
    rev = [[_kl(_softmax(st[b][i], 1.0), _softmax(tt[b][i], 1.0)) for i in range(T)] for b in range(B)]
    torch.testing.assert_close(token_generalized_jsd(s, t, beta=0.0), torch.tensor(fwd, dtype=torch.float64))
    torch.testing.assert_close(token_generalized_jsd(s, t, beta=1.0), torch.tensor(rev, dtype=torch.float64))
    assert not torch.allclose(torch.tensor(fwd), torch.tensor(rev))  # the two differ here


def test_beta_half_is_js_divergence_symmetric_and_bounded():
    s, t = _logits(6), _logits(7)
    half = token_generalized_jsd(s, t, beta=0.5)
    torch.testing.assert_close(half, token_generalized_jsd(t, s, beta=0.5), rtol=1e-12, atol=1e-15)
    # JS(P, Q) = H((P+Q)/2) − (H(P) + H(Q))/2 ≤ log 2
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    ent = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
    torch.testing.assert_close(half, ent((ps + pt) / 2) - (ent(ps) + ent(pt)) / 2)
    assert torch.all(half <= math.log(2))
    # Swapping roles maps β to 1 − β.
    for beta in (0.1, 0.3):
        torch.testing.assert_close(
            token_generalized_jsd(s, t, beta=beta), token_generalized_jsd(t, s, beta=1 - beta)
        )


@pytest.mark.parametrize("beta", BETAS)
def test_zero_with_zero_gradient_when_student_equals_teacher(beta):
    t = _logits(8)
    s = (t + 3.0).requires_grad_()  # a constant shift leaves the softmax unchanged
    loss = masked_generalized_jsd_loss(s, t, MASK, beta=beta, temperature=0.7)
    assert abs(loss.item()) < 1e-14
    loss.backward()
    assert s.grad.abs().max().item() < 1e-14


def test_masked_positions_contribute_nothing_and_bf16_computes_in_float32():
    s, t = _logits(9), _logits(10)
    s2 = s.clone()
    s2[~MASK] = torch.randn(int((~MASK).sum()), V, dtype=s.dtype) * 10
    a = masked_generalized_jsd_loss(s, t, MASK, beta=0.3)
    b = masked_generalized_jsd_loss(s2, t, MASK, beta=0.3)
    assert a.item() == b.item()
    trl_a = generalized_jsd_loss(s, t, labels=LABELS, beta=0.3)
    trl_b = generalized_jsd_loss(s2, t, labels=LABELS, beta=0.3)
    assert trl_a.item() == trl_b.item()
    lowp = masked_generalized_jsd_loss(s.bfloat16(), t.bfloat16(), MASK, beta=0.3)
    assert lowp.dtype == torch.float32
    ref = masked_generalized_jsd_loss(s.bfloat16().double(), t.bfloat16().double(), MASK, beta=0.3)
    assert lowp.item() == pytest.approx(ref.item(), rel=1e-5)


def test_rejects_bad_arguments():
    s = _logits(0)
    with pytest.raises(ValueError):
        token_generalized_jsd(s, s, beta=1.5)
    with pytest.raises(ValueError):
        generalized_jsd_loss(s, s, temperature=0.0)
