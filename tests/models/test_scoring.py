"""Scores are read at the last real token whatever the padding side, also when pad == EOS."""

import torch

from lightning_irl.models.scoring import last_token_index, prefix_logits, sequence_logits


def test_score_is_read_at_last_real_token_for_both_padding_sides_and_pad_equal_eos(tiny_spec, tokenizer):
    tokenizer.pad_token = tokenizer.eos_token  # the hard case: pad id == eos id
    model = tiny_spec.build_sequence_classifier(tokenizer).eval()
    eos = tokenizer.eos_token_id
    rows = [[3, 4, 5, eos], [6, 3, eos]]  # both end with EOS, which must be scored
    alone = torch.stack([sequence_logits(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))[0]
                         for r in rows])
    right = torch.tensor([[3, 4, 5, eos], [6, 3, eos, eos]])
    right_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    left = torch.tensor([[3, 4, 5, eos], [eos, 6, 3, eos]])
    left_mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(sequence_logits(model, right, right_mask), alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sequence_logits(model, left, left_mask), alone, atol=1e-5, rtol=1e-5)
        # transformers' own pooling stops before the first pad id, i.e. before the EOS: different
        hf = model(input_ids=right, attention_mask=right_mask).logits.squeeze(-1)
        assert not torch.allclose(hf, alone, atol=1e-4)
        # the prefix score at the last position is the sequence score
        prefix = prefix_logits(model, right, right_mask)
        torch.testing.assert_close(prefix[0, 3], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prefix[1, 2], alone[1], atol=1e-5, rtol=1e-5)


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [1, 3, 3]
