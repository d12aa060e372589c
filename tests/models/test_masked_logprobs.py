"""``masked_token_logprobs`` / ``masked_token_nll_sum`` / ``scored_token_logprobs`` (the SFT loss
and the held-out NLL: the output head run on the scored positions only) against the full-logits
path they replace (``token_logprobs`` + ``token_nll_sum``): same values and same gradients, for
every family of the model matrix (Gemma 2's final soft-capping included), right- and left-padded
rows, a packed batch, LoRA, gradient checkpointing and bf16 autocast; and a model whose head is
not its output embeddings is read exactly or refused, never silently wrong."""

from __future__ import annotations

import warnings
from typing import Dict, Optional

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_irl.models.lora import LoraSpec, apply_lora
from lightning_irl.objectives.logprobs import (
    masked_token_logprobs,
    masked_token_nll_sum,
    output_head,
    scored_token_logprobs,
    token_logprobs,
    token_nll_sum,
)
from tests.models.test_families import FAMILIES, NAMES, Family

VOCAB = 97


def build(family: Family) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family.config_class(**family.config, vocab_size=VOCAB, pad_token_id=0))
    return model.eval()  # no dropout: both paths must see the same network


def padded_batch(rows: int = 4, width: int = 12, left: bool = False) -> Dict[str, torch.Tensor]:
    """Rows of different lengths, each a prompt then a response (the loss mask), padded on one side."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (rows, width), generator=g)
    attention, loss = torch.zeros(rows, width, dtype=torch.long), torch.zeros(rows, width, dtype=torch.long)
    for r, (length, prompt) in enumerate([(12, 5), (7, 3), (9, 6), (4, 2)][:rows]):
        span = slice(width - length, width) if left else slice(0, length)
        attention[r, span] = 1
        loss[r, span][prompt:] = 1
    return {"input_ids": ids.masked_fill(attention == 0, 0), "attention_mask": attention, "loss_mask": loss}


def packed_batch() -> Dict[str, torch.Tensor]:
    """Two rows holding 2 and 3 examples end to end (positions restart at 0), the second padded."""
    batch = padded_batch(rows=2)
    batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6],
                                          [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 0, 0]])
    batch["attention_mask"] = torch.tensor([[1] * 12, [1] * 10 + [0] * 2])
    batch["loss_mask"] = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1],
                                       [0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 0]])
    return batch


def loss_and_grads(model, batch, masked: bool):
    model.zero_grad(set_to_none=True)
    args = (model, batch["input_ids"], batch["attention_mask"])
    shifted = batch["loss_mask"][:, 1:]
    position_ids: Optional[torch.Tensor] = batch.get("position_ids")
    if masked:
        loss = masked_token_nll_sum(*args, shifted, position_ids=position_ids)
    else:
        loss = token_nll_sum(token_logprobs(*args, position_ids=position_ids), shifted)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_as_full_logits(model, batch, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same per-token log-probs, loss and gradients as the full path; and the head projected only
    the scored positions (what makes it cheaper)."""
    shifted = batch["loss_mask"][:, 1:]
    head_rows = []
    handle = output_head(model).register_forward_hook(lambda m, a, out: head_rows.append(out.shape[:-1]))
    try:
        with torch.no_grad():
            got = masked_token_logprobs(model, batch["input_ids"], batch["attention_mask"], shifted,
                                        position_ids=batch.get("position_ids"))
    finally:
        handle.remove()
    assert head_rows == [(1, int(shifted.sum()))]
    with torch.no_grad():
        full = token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                              position_ids=batch.get("position_ids"))
    torch.testing.assert_close(got, full[shifted.bool()], rtol=rtol, atol=atol)
    with torch.no_grad():  # the [B, T-1] layout validation reads: the same values in place, 0 elsewhere
        in_place = scored_token_logprobs(model, batch["input_ids"], batch["attention_mask"], shifted,
                                         position_ids=batch.get("position_ids"))
    torch.testing.assert_close(in_place, full * shifted, rtol=rtol, atol=atol)

    loss, grads = loss_and_grads(model, batch, masked=True)
    expected_loss, expected_grads = loss_and_grads(model, batch, masked=False)
    torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=atol)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("family", FAMILIES, ids=NAMES)
def test_every_family_gives_the_full_logits_values_and_gradients(family):
    model = build(family)
    if family.name == "gemma2":  # the soft-capping the masked logits must still go through
        assert model.config.final_logit_softcapping
    for left in (False, True):
        assert_same_as_full_logits(model, padded_batch(left=left))
    assert_same_as_full_logits(model, packed_batch())


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name in ("llama", "gemma2", "gpt2")],
                         ids=["llama", "gemma2", "gpt2"])
def test_lora_with_and_without_an_adapted_head(family):
    for spec in (LoraSpec(r=4, alpha=8, target_modules="all-linear"),  # the head stays a plain Linear
                 LoraSpec(r=4, alpha=8, target_modules="all-linear", modules_to_save=["lm_head"])):
        model = apply_lora(build(family), spec)
        assert_same_as_full_logits(model, padded_batch())
        assert_same_as_full_logits(model, packed_batch())


def test_gradient_checkpointing_and_bf16_autocast():
    llama = next(f for f in FAMILIES if f.name == "llama")
    model = build(llama)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # transformers checkpoints in training mode only; Llama has no dropout
    assert_same_as_full_logits(model, padded_batch())
    model.gradient_checkpointing_disable()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # the head's bf16 matmul on [1, N, H] and on [B, T, H] may round differently
        assert_same_as_full_logits(model, padded_batch(), rtol=2e-2, atol=2e-2)


def test_no_scored_token_gives_a_zero_loss_that_still_backpropagates():
    model = build(FAMILIES[0])
    batch = padded_batch()
    batch["loss_mask"].zero_()
    loss, grads = loss_and_grads(model, batch, masked=True)
    assert float(loss) == 0.0 and grads and all(float(g.abs().max()) == 0.0 for g in grads.values())


class _Wrapped(torch.nn.Module):
    """A causal LM run ``runs`` times per call, declaring ``declared`` as its output embeddings."""

    def __init__(self, inner, declared: Optional[torch.nn.Module], runs: int = 1, **extra):
        super().__init__()
        self.inner, self.declared, self.runs, self.extra = inner, declared, runs, extra

    def get_output_embeddings(self):
        return self.declared

    def forward(self, **kwargs):
        return [self.inner(**kwargs, **self.extra) for _ in range(self.runs)][-1]


class _NoHead(_Wrapped):
    pass


def test_a_head_other_than_the_output_embeddings_is_read_exactly_or_refused():
    inner = build(FAMILIES[0])
    batch = padded_batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"][:, 1:])
    expected = token_logprobs(inner, *args[:2])[args[2].bool()]
    # the declared head is never called, or none is declared: the full logits came back and are
    # read as they are, with a warning once per model class
    for model in (_Wrapped(inner, torch.nn.Linear(32, VOCAB)), _NoHead(inner, None)):
        with pytest.warns(UserWarning, match="full"):
            torch.testing.assert_close(masked_token_logprobs(model, *args), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.testing.assert_close(masked_token_logprobs(model, *args), expected)
    # the head called twice, or on other positions than the batch's: refused
    with pytest.raises(RuntimeError, match="2 time"):
        masked_token_logprobs(_Wrapped(inner, inner.lm_head, runs=2), *args)
    with pytest.raises(RuntimeError, match="not called with"):
        masked_token_logprobs(_Wrapped(inner, inner.lm_head, logits_to_keep=1), *args)
    assert not inner.lm_head._forward_pre_hooks  # the hook never outlives the call
