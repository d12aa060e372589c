"""rollout.sample: generate with a KV cache, masks, k samples per prompt, recomputed log-probs."""

import pytest
import torch

from lightning_irl.data.collate import pad_sequences
from lightning_irl.objectives.logprobs import token_logprobs
from lightning_irl.rollout import SamplingConfig, generate_kwargs, response_mask_from_ids, sample

PROMPTS = ["c a b =", "d b a f g =", "h a ="]



@pytest.fixture(scope="module")
def setup():
    from lightning_irl.models.spec import ModelSpec
    from tests.conftest import TINY_LLAMA

    spec = ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes", seed=0)
    tokenizer = spec.load_tokenizer()
    model = spec.build_causal_lm(tokenizer).eval()
    return model, tokenizer


def left_padded(tokenizer, prompts):
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    padded = pad_sequences(rows, tokenizer.pad_token_id, left=True)
    return padded["input_ids"], padded["attention_mask"]


def test_response_mask_stops_after_first_eos():
    eos = 1
    ids = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 1, 7, 1], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert torch.equal(response_mask_from_ids(ids, eos), expected)


def test_greedy_logprobs_equal_generate_scores(setup):
    model, tok = setup
    ids, mask = left_padded(tok, PROMPTS)
    config = SamplingConfig(max_new_tokens=6, do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
                         **generate_kwargs(tok, config))
    rollout = sample(model, tok, ids, mask, config)
    P = ids.size(1)
    steps = len(out.scores)
    assert torch.equal(rollout.response_ids[:, :steps][rollout.response_mask[:, :steps].bool()],
                       out.sequences[:, P:][rollout.response_mask[:, :steps].bool()])
    scores = torch.stack(out.scores, 1).log_softmax(-1)  # greedy: the raw next-token logits
    chosen = scores.gather(-1, out.sequences[:, P:, None]).squeeze(-1)
    recomputed = rollout.logprobs[:, P - 1 : P - 1 + steps]
    m = rollout.response_mask[:, :steps].bool()
    assert torch.allclose(recomputed[m], chosen[m], atol=1e-4)
    # whole-response log-prob = sum over response tokens, EOS included
    assert torch.allclose(rollout.sequence_logprobs, (chosen * m).sum(-1), atol=1e-4)


def test_left_padding_gives_the_unpadded_continuation(setup):
    model, tok = setup
    ids, mask = left_padded(tok, PROMPTS)
    config = SamplingConfig(max_new_tokens=7, do_sample=False)
    batched = sample(model, tok, ids, mask, config)
    for i, prompt in enumerate(PROMPTS):
        one = torch.tensor([tok(prompt)["input_ids"]])
        alone = sample(model, tok, one, torch.ones_like(one), config)
        n = int(alone.response_mask.sum())
        assert int(batched.response_mask[i].sum()) == n
        assert torch.equal(batched.response_ids[i, :n], alone.response_ids[0, :n])
        assert torch.allclose(batched.sequence_logprobs[i], alone.sequence_logprobs[0], atol=1e-4)
        assert batched.responses[i] == alone.responses[0]


def test_logprobs_match_an_unpadded_forward(setup):
    model, tok = setup
    ids, mask = left_padded(tok, PROMPTS)
    torch.manual_seed(1)
    rollout = sample(model, tok, ids, mask, SamplingConfig(max_new_tokens=6, num_samples=2))
    for row in range(rollout.input_ids.size(0)):
        keep = rollout.attention_mask[row].bool()
        seq = rollout.input_ids[row][keep][None]
        ref = token_logprobs(model, seq, torch.ones_like(seq))[0]
        n = int(rollout.response_mask[row].sum())
        got = rollout.logprobs[row][rollout.loss_mask[row, 1:].bool()]
        assert torch.allclose(got, ref[-n:], atol=1e-4)


def test_k_samples_are_contiguous_and_masks_are_consistent(setup):
    model, tok = setup
    ids, mask = left_padded(tok, PROMPTS)
    k = 5
    torch.manual_seed(0)
    # a high temperature over a 12-token vocabulary: EOS gets sampled early in many rows
    rollout = sample(model, tok, ids, mask, SamplingConfig(max_new_tokens=8, temperature=3.0, num_samples=k))
    N, P = len(PROMPTS) * k, ids.size(1)
    assert rollout.input_ids.shape[0] == N and rollout.prompt_length == P
    for i in range(len(PROMPTS)):
        for j in range(k):
            assert torch.equal(rollout.input_ids[i * k + j, :P], ids[i])
    resp, rmask = rollout.response_ids, rollout.response_mask
    assert resp.size(1) <= 8
    assert torch.equal(rollout.loss_mask[:, :P], torch.zeros_like(ids.repeat_interleave(k, 0)))
    assert torch.equal(rollout.attention_mask[:, P:], rmask)
    eos = tok.eos_token_id
    assert 0 < int(rollout.finished.sum()) < N  # both kinds of rows are exercised
    for r in range(N):
        n = int(rmask[r].sum())
        assert torch.all(rmask[r, :n] == 1) and torch.all(rmask[r, n:] == 0)  # one block
        body = resp[r, :n].tolist()
        assert (eos in body) == bool(rollout.finished[r])
        if rollout.finished[r]:
            assert body.index(eos) == n - 1  # the mask ends at the first EOS
        assert torch.all(resp[r, n:] == tok.pad_token_id)
        assert rollout.responses[r] == tok.decode(body, skip_special_tokens=True)
    assert torch.equal(rollout.response_lengths, rmask.sum(-1))
    assert len({tuple(r.tolist()) for r in resp}) > len(PROMPTS)  # samples differ


def test_top_k_one_and_temperature_zero_are_greedy(setup):
    model, tok = setup
    ids, mask = left_padded(tok, PROMPTS)
    greedy = sample(model, tok, ids, mask, SamplingConfig(max_new_tokens=6, do_sample=False))
    top1 = sample(model, tok, ids, mask, SamplingConfig(max_new_tokens=6, top_k=1, temperature=1.7))
    cold = sample(model, tok, ids, mask, SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert greedy.responses == top1.responses == cold.responses
    # log-probs are under the policy (temperature 1), whatever the sampling temperature
    assert torch.allclose(top1.sequence_logprobs, greedy.sequence_logprobs, atol=1e-5)


def test_restores_training_mode_and_skips_logprobs(setup):
    model, tok = setup
    ids, mask = left_padded(tok, PROMPTS)
    model.train()
    try:
        rollout = sample(model, tok, ids, mask, SamplingConfig(max_new_tokens=3), compute_logprobs=False)
        assert model.training
        assert rollout.logprobs is None
        with pytest.raises(ValueError):
            rollout.sequence_logprobs
    finally:
        model.eval()


def test_hub_generation_defaults_do_not_reshape_the_distribution(setup):
    model, tok = setup
    ids, mask = left_padded(tok, PROMPTS)
    config = SamplingConfig(max_new_tokens=6, do_sample=False)
    before = sample(model, tok, ids, mask, config).responses
    saved = model.generation_config.to_dict()
    try:  # what a pretrained checkpoint's generation_config.json may carry
        model.generation_config.repetition_penalty = 5.0
        model.generation_config.no_repeat_ngram_size = 1
        model.generation_config.min_new_tokens = 4
        assert sample(model, tok, ids, mask, config).responses == before
    finally:
        model.generation_config.update(**saved)


def test_predict_rows_follow_the_k_sample_layout(tiny_spec):
    from lightning_irl.algorithms import SFT

    module = SFT(tiny_spec, sampling=SamplingConfig(max_new_tokens=5, num_samples=3))
    module.configure_model()
    tok = module.tokenizer
    ids, mask = left_padded(tok, PROMPTS)
    rows = module.predict_step({"prompt_input_ids": ids, "prompt_attention_mask": mask, "prompt": PROMPTS}, 0)
    assert [r["prompt"] for r in rows] == [p for p in PROMPTS for _ in range(3)]
    for row in rows:
        assert set(row) >= {"prompt", "response", "logprob", "finished"}
        assert row["logprob"] <= 0.0


def test_logprobs_from_generate_equal_the_recomputed_ones(setup):
    """The KV-cached raw logits of ``generate`` give the same response log-probs as one full
    forward pass (up to float rounding), for the same samples."""
    from lightning_irl.data.tasks import get_task
    from lightning_irl.data.collate import DemonstrationCollator
    from lightning_irl.data.encode import encode_records

    model, tokenizer = setup
    examples, _ = encode_records(get_task("modes").records(6, seed=3), tokenizer)
    batch = DemonstrationCollator(tokenizer.pad_token_id)(examples)
    rollouts = {}
    for source in ("forward", "generate"):
        torch.manual_seed(11)
        config = SamplingConfig(max_new_tokens=7, num_samples=3, logprobs_from=source)
        rollouts[source] = sample(model, tokenizer, batch["prompt_input_ids"], batch["prompt_attention_mask"], config)
    forward, generate = rollouts["forward"], rollouts["generate"]
    assert torch.equal(forward.input_ids, generate.input_ids)
    mask = forward.loss_mask[:, 1:].bool()
    assert mask.sum() > 20
    torch.testing.assert_close(generate.logprobs[mask], forward.logprobs[mask], atol=1e-5, rtol=1e-5)
    assert torch.all(generate.logprobs[~mask] == 0)
    with pytest.raises(ValueError, match="logprobs_from"):
        SamplingConfig(logprobs_from="scores")
