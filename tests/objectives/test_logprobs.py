"""Log-probs of token sequences and the masked reductions, against unpadded per-row forwards and
explicit loops."""

import pytest
import torch

from lightning_irl.objectives.logprobs import (
    gather_token_logprobs,
    masked_mean,
    masked_sum,
    masked_var,
    per_loss_token,
    sequence_logprobs,
    token_logprobs,
    token_nll_sum,
)


def test_token_logprobs_ignore_padding_on_either_side(tiny_spec, tokenizer):
    model = tiny_spec.build_causal_lm(tokenizer).eval()
    rows = [[5, 6, 7, 8, 9], [5, 6, 7]]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        alone = [torch.log_softmax(model(input_ids=torch.tensor([r])).logits[0, :-1].double(), -1)
                 .gather(-1, torch.tensor(r[1:])[:, None])[:, 0] for r in rows]
        for side in ("left", "right"):
            ids = [r + [pad] * (5 - len(r)) if side == "right" else [pad] * (5 - len(r)) + r for r in rows]
            mask = [[int(i < len(r)) for i in range(5)] if side == "right" else
                    [int(i >= 5 - len(r)) for i in range(5)] for r in rows]
            out = token_logprobs(model, torch.tensor(ids), torch.tensor(mask))
            assert out.shape == (2, 4)
            torch.testing.assert_close(out[0].double(), alone[0], rtol=1e-4, atol=1e-5)
            short = out[1, :2] if side == "right" else out[1, 2:]
            torch.testing.assert_close(short.double(), alone[1], rtol=1e-4, atol=1e-5)


def test_gather_token_logprobs_is_the_float32_log_softmax_even_for_bf16_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 50, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 50, (3, 4), generator=g)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    got = gather_token_logprobs(logits, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


def test_masked_reductions_match_loops():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    kept = [values[b, t] for b in range(3) for t in range(5) if mask[b, t]]
    assert float(masked_sum(values, mask)) == pytest.approx(float(sum(kept)))
    mean = sum(kept) / len(kept)
    assert float(masked_mean(values, mask)) == pytest.approx(float(mean))
    assert float(masked_var(values, mask)) == pytest.approx(float(sum((v - mean) ** 2 for v in kept) / len(kept)))
    rows = masked_mean(values, mask, dim=-1)
    assert float(rows[2]) == 0.0  # an empty row is 0, not NaN
    torch.testing.assert_close(sequence_logprobs(values, mask), masked_sum(values, mask, dim=-1))
    assert float(token_nll_sum(values, mask)) == pytest.approx(-float(sum(kept)))
    # per loss token: the mask's count by default, any given count (a global one) otherwise
    assert float(per_loss_token(torch.tensor(6.0), mask)) == pytest.approx(6.0 / 5)
    assert float(per_loss_token(torch.tensor(6.0), mask, 12)) == pytest.approx(0.5)
    assert float(per_loss_token(torch.tensor(6.0), mask, torch.tensor(3))) == pytest.approx(2.0)
    assert float(per_loss_token(torch.tensor(6.0), torch.zeros(2, 2))) == pytest.approx(6.0)
