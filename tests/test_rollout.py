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


# ---- logprobs_from: auto ----------------------------------------------------------------------
def _gpt2_with_dropout():
    from lightning_irl.models.spec import ModelSpec

    spec = ModelSpec(config={"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
                             "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1},
                     tokenizer="task:modes", seed=0)
    tokenizer = spec.load_tokenizer()
    return spec.build_causal_lm(tokenizer), tokenizer


def _both_sources(model, tok, ids, mask, seed=11, **kwargs):
    out = {}
    for source in ("forward", "generate"):
        torch.manual_seed(seed)
        out[source] = sample(model, tok, ids, mask, SamplingConfig(logprobs_from=source, **kwargs))
    assert torch.equal(out["forward"].input_ids, out["generate"].input_ids)
    return out["forward"], out["generate"]


def test_auto_is_the_default_and_takes_the_sampling_pass_after_one_check(setup, monkeypatch):
    """Float32: the one-time check finds the two sources equal (measured <= 1e-6 per token), so
    ``auto`` returns the sampling pass's values and runs no forward pass afterwards."""
    from lightning_irl import rollout as rollout_module

    assert SamplingConfig().logprobs_from == "auto"
    model, tok = setup
    ids, mask = left_padded(tok, PROMPTS)
    monkeypatch.setattr(rollout_module, "_VERIFIED", type(rollout_module._VERIFIED)())
    config = SamplingConfig(max_new_tokens=6, num_samples=2)
    torch.manual_seed(3)
    first = sample(model, tok, ids, mask, config)  # the check: both sources computed once
    assert first.logprobs_source == "generate"
    assert rollout_module._VERIFIED[model] == {False: True}
    forward, generate = _both_sources(model, tok, ids, mask, seed=3, max_new_tokens=6, num_samples=2)
    assert torch.equal(first.input_ids, forward.input_ids)
    torch.testing.assert_close(first.logprobs, generate.logprobs, atol=0, rtol=0)
    m = forward.loss_mask[:, 1:].bool()
    assert (first.logprobs - forward.logprobs)[m].abs().max() <= 1e-5
    calls = []
    monkeypatch.setattr(rollout_module, "response_token_logprobs", lambda *a, **k: calls.append(1))
    torch.manual_seed(4)
    again = sample(model, tok, ids, mask, config)
    assert again.logprobs_source == "generate" and not calls  # no forward pass any more


def test_auto_falls_back_to_the_forward_pass_when_the_sources_disagree(setup, monkeypatch, caplog):
    from lightning_irl import rollout as rollout_module

    model, tok = setup
    ids, mask = left_padded(tok, PROMPTS)
    monkeypatch.setattr(rollout_module, "_VERIFIED", type(rollout_module._VERIFIED)())
    monkeypatch.setattr(rollout_module, "AUTO_TOLERANCE", {False: -1.0, True: -1.0})  # nothing passes
    torch.manual_seed(5)
    with caplog.at_level("WARNING", logger="lightning_irl.rollout"):
        first = sample(model, tok, ids, mask, SamplingConfig(max_new_tokens=6))
    assert first.logprobs_source == "forward" and "recomputing them in a forward pass" in caplog.text
    assert rollout_module._VERIFIED[model] == {False: False}
    torch.manual_seed(5)
    forward = sample(model, tok, ids, mask, SamplingConfig(max_new_tokens=6, logprobs_from="forward"))
    torch.testing.assert_close(first.logprobs, forward.logprobs, atol=0, rtol=0)
    assert sample(model, tok, ids, mask, SamplingConfig(max_new_tokens=6)).logprobs_source == "forward"


def test_auto_under_bf16_uses_the_sampling_pass_except_for_a_ratio(setup, monkeypatch):
    """bf16 autocast: the sources differ by bf16 rounding (measured <= 8e-3 per token, as far from
    the float32 values as the forward pass itself), inside ``AUTO_TOLERANCE``; PPO's old
    log-probs (``for_ratio``) are recomputed, bit for bit the training forward's."""
    from lightning_irl import rollout as rollout_module
    from lightning_irl.models.scoring import response_token_logprobs

    model, tok = setup
    ids, mask = left_padded(tok, PROMPTS)
    monkeypatch.setattr(rollout_module, "_VERIFIED", type(rollout_module._VERIFIED)())
    config = SamplingConfig(max_new_tokens=6, num_samples=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rollout_module.reduced_precision(model, ids.device)
        torch.manual_seed(6)
        plain = sample(model, tok, ids, mask, config)
        torch.manual_seed(6)
        ratio = sample(model, tok, ids, mask, config, for_ratio=True)
        model.train()
        try:
            train = response_token_logprobs(model, ratio.input_ids, ratio.attention_mask, ratio.loss_mask)
        finally:
            model.eval()
    assert not rollout_module.reduced_precision(model, ids.device)
    assert plain.logprobs_source == "generate" and ratio.logprobs_source == "forward"
    assert rollout_module._VERIFIED[model] == {True: True}
    m = ratio.loss_mask[:, 1:].bool()
    assert torch.equal(plain.input_ids, ratio.input_ids)
    delta = (plain.logprobs - ratio.logprobs)[m].abs().max()
    assert delta <= rollout_module.AUTO_TOLERANCE[True]
    assert torch.exp(train - ratio.logprobs)[m].sub(1).abs().max() <= 1e-6  # PPO's first ratio: 1


def test_dropout_does_not_separate_the_sources():
    """Both sources run in eval mode (``sample`` switches the model), so a model with active
    dropout gets equal values from both; only the train-mode forward differs (by dropout)."""
    from lightning_irl.models.scoring import response_token_logprobs

    model, tok = _gpt2_with_dropout()
    model.train()
    ids, mask = left_padded(tok, PROMPTS)
    forward, generate = _both_sources(model, tok, ids, mask, max_new_tokens=6, num_samples=2)
    assert model.training
    m = forward.loss_mask[:, 1:].bool()
    assert (generate.logprobs - forward.logprobs)[m].abs().max() <= 1e-5
    with torch.no_grad():
        train = response_token_logprobs(model, forward.input_ids, forward.attention_mask, forward.loss_mask)
    assert (train - forward.logprobs)[m].abs().max() > 1e-3


@pytest.mark.parametrize("path", ["one call", "buckets", "shared prefix"])
def test_response_token_logprobs_equal_the_full_forward_and_its_gradient(setup, path, monkeypatch):
    """The LM head only from the first scored column, rows in length buckets or over a cache of
    the prompts shared by the k samples: the same values and gradients as ``token_logprobs`` on
    the scored tokens, zeros before them."""
    from lightning_irl.models import scoring

    model, tok = setup
    monkeypatch.setattr(scoring, "_PREFIX_VERIFIED", type(scoring._PREFIX_VERIFIED)())
    prompts = ["c a b =", "d b a f g a b c d =", "h =", "a b c d e f g h a b c d e f ="]
    ids, mask = left_padded(tok, prompts)
    torch.manual_seed(7)
    rollout = sample(model, tok, ids, mask, SamplingConfig(max_new_tokens=6, num_samples=3, temperature=3.0),
                     compute_logprobs=False)
    rows = (rollout.input_ids, rollout.attention_mask)
    start = rollout.prompt_length
    if path == "buckets":
        assert len(scoring.length_buckets(rollout.attention_mask)) > 1  # the prompts' lengths differ enough
    if path == "shared prefix":
        assert scoring.shared_prefix_plan(*rows, start) is not None  # 4 distinct prompts in 12 rows
    m = rollout.loss_mask[:, 1:].bool()
    grads = []
    for fn in ("full", path):
        model.zero_grad()
        if fn == "full":
            logps = token_logprobs(model, *rows)
        else:
            logps = scoring.response_token_logprobs(model, *rows, rollout.loss_mask, bucketed=path != "one call",
                                                    shared_prefix=path == "shared prefix")
            assert torch.all(logps[:, : start - 1] == 0)
        (logps * m).sum().backward()
        grads.append(([p.grad.clone() for p in model.parameters()], logps.detach()))
    if path == "shared prefix":
        assert scoring._PREFIX_VERIFIED[model] == {False: True}  # the one-time check passed
    torch.testing.assert_close(grads[1][1][m], grads[0][1][m], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0][0], grads[1][0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_a_model_whose_cache_does_not_reproduce_its_forward_keeps_the_plain_path(setup, monkeypatch, caplog):
    from lightning_irl.models import scoring

    model, tok = setup
    monkeypatch.setattr(scoring, "_PREFIX_VERIFIED", type(scoring._PREFIX_VERIFIED)())
    monkeypatch.setattr(scoring, "PREFIX_TOLERANCE", {False: -1.0, True: -1.0})  # nothing passes
    ids, mask = left_padded(tok, PROMPTS)
    calls = []
    shared = scoring._shared_logprobs
    monkeypatch.setattr(scoring, "_shared_logprobs", lambda *a: calls.append(1) or shared(*a))
    with caplog.at_level("WARNING", logger="lightning_irl.models.scoring"):
        torch.manual_seed(8)  # the first rollout runs the check (for its prompt prefill)
        rollout = sample(model, tok, ids, mask, SamplingConfig(max_new_tokens=5, num_samples=4),
                         compute_logprobs=False)
        with torch.no_grad():
            first = scoring.response_token_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.loss_mask)
            again = scoring.response_token_logprobs(model, rollout.input_ids, rollout.attention_mask,
                                                    rollout.loss_mask)
    assert "reading every row in full" in caplog.text and scoring._PREFIX_VERIFIED[model] == {False: False}
    assert len(calls) == 1  # the check only
    with torch.no_grad():
        plain = scoring.response_token_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.loss_mask,
                                                shared_prefix=False)
    torch.testing.assert_close(first, plain, atol=0, rtol=0)
    torch.testing.assert_close(again, plain, atol=0, rtol=0)


def test_k_samples_continue_one_prefill_of_their_prompt(setup, monkeypatch):
    """Once a model's cache passed the shared-prefix check, ``generate`` continues the k samples
    of a prompt from one prefill of it: the same tokens under the same seed, the same log-probs."""
    from lightning_irl import rollout as rollout_module
    from lightning_irl.models import scoring

    model, tok = setup
    ids, mask = left_padded(tok, PROMPTS)
    config = SamplingConfig(max_new_tokens=6, num_samples=3, logprobs_from="generate")
    monkeypatch.setattr(scoring, "_PREFIX_VERIFIED", type(scoring._PREFIX_VERIFIED)())
    monkeypatch.setattr(rollout_module, "shared_prompt_cache", lambda *a: None)
    torch.manual_seed(9)
    plain = sample(model, tok, ids, mask, config)
    assert model not in scoring._PREFIX_VERIFIED
    caches = []
    monkeypatch.setattr(rollout_module, "shared_prompt_cache",
                        lambda *a: caches.append(scoring.shared_prompt_cache(*a)) or caches[-1])
    torch.manual_seed(9)
    shared = sample(model, tok, ids, mask, config)
    assert caches and caches[0] is not None  # checked at this first call, then used
    assert scoring._PREFIX_VERIFIED[model] == {False: True}
    assert torch.equal(shared.input_ids, plain.input_ids)
    m = plain.loss_mask[:, 1:].bool()
    torch.testing.assert_close(shared.logprobs[m], plain.logprobs[m], atol=1e-5, rtol=1e-5)
