"""Sampling from the policy: one component that every algorithm uses.

Prompts come left-padded; ``generate`` (KV cache) continues them; the result is re-assembled into
one right-aligned-prompt / right-padded-response batch whose per-token log-probs are recomputed in
a forward pass at temperature 1, i.e. under the policy being trained, not the sampling-warped
distribution that ``generate``'s scores describe.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from lightning_irl.objectives.logprobs import gather_token_logprobs, sequence_logprobs, token_logprobs


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


@dataclass
class SamplingConfig:
    """How responses are sampled.

    Args:
        max_new_tokens: Length cap of a response (EOS included).
        temperature: Softmax temperature for sampling (log-probs are always at temperature 1);
            0 means greedy decoding.
        top_p: Nucleus sampling mass (1.0 = off).
        top_k: Keep the k most likely tokens (0 = off).
        do_sample: False = greedy decoding.

    Nothing else shapes the distribution: repetition penalties, n-gram blocking and the like that
    a Hub model's ``generation_config`` may carry are switched off, so that at temperature 1 with
    top-p 1 and top-k 0 the samples come from the policy itself (what KL estimates assume).
        num_samples: Responses per prompt (k); samples of one prompt are contiguous rows.
        logprobs_from: ``forward`` (default) recomputes the response log-probs in one full
            forward pass, exactly as training computes them; ``generate`` takes them from the raw
            (pre-temperature) logits ``generate`` already produced with its KV cache: no extra
            pass, equal up to float rounding of cached vs full attention.

    Out-of-range values (``num_samples`` or ``max_new_tokens`` < 1, a negative temperature,
    ``top_p`` outside (0, 1], a negative ``top_k``) raise ``ValueError`` at construction.
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    num_samples: int = 1
    logprobs_from: str = "forward"

    def __post_init__(self) -> None:
        if self.logprobs_from not in ("forward", "generate"):
            raise ValueError(f"logprobs_from must be 'forward' or 'generate', got {self.logprobs_from!r}")
        checks = (
            ("num_samples", self.num_samples, _is_int(self.num_samples) and self.num_samples >= 1, ">= 1"),
            ("max_new_tokens", self.max_new_tokens, _is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
             ">= 1"),
            ("temperature", self.temperature, _is_real(self.temperature) and 0 <= self.temperature < math.inf,
             ">= 0 (0: greedy)"),
            ("top_p", self.top_p, _is_real(self.top_p) and 0 < self.top_p <= 1, "in (0, 1] (1: off)"),
            ("top_k", self.top_k, _is_int(self.top_k) and self.top_k >= 0, ">= 0 (0: off)"),
        )
        for name, value, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {value!r}")


@dataclass
class Rollout:
    """Sampled responses, ``N = prompts × num_samples`` rows.

    ``input_ids``/``attention_mask``/``loss_mask`` [N, P+R] follow the package's batch convention
    (prompt left-padded, response right-padded, loss_mask on response tokens incl. EOS).
    ``logprobs`` [N, P+R-1] are shifted per-token log-probs under the policy; take them with
    ``loss_mask[:, 1:]``. ``finished`` marks responses that ended with EOS.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    logprobs: Optional[torch.Tensor]
    finished: torch.Tensor
    prompt_length: int
    responses: List[str]

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]

    @property
    def response_mask(self) -> torch.Tensor:
        return self.loss_mask[:, self.prompt_length :]

    @property
    def sequence_logprobs(self) -> torch.Tensor:
        """log π(y|x) of each whole response (EOS included): [N]. Needs ``logprobs``."""
        if self.logprobs is None:
            raise ValueError("this rollout was sampled with compute_logprobs=False")
        return sequence_logprobs(self.logprobs, self.loss_mask[:, 1:])

    @property
    def response_lengths(self) -> torch.Tensor:
        """Tokens per response, EOS included: [N]."""
        return self.response_mask.sum(-1)

    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it (generate pads finished rows)."""
    is_eos = response_ids == eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).long()


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    config: SamplingConfig,
    compute_logprobs: bool = True,
    synced_gpus: Optional[bool] = None,
) -> Rollout:
    """Sample ``config.num_samples`` responses per (left-padded) prompt.

    ``synced_gpus`` (default: on when torch.distributed runs several processes) keeps every rank
    stepping until all are done, which sharded models (FSDP, ZeRO-3) need: their forward passes
    are collective.
    """
    k = config.num_samples
    if k > 1:
        prompt_input_ids = prompt_input_ids.repeat_interleave(k, dim=0)
        prompt_attention_mask = prompt_attention_mask.repeat_interleave(k, dim=0)
    was_training = model.training
    model.eval()
    from_generate = compute_logprobs and config.logprobs_from == "generate"
    kwargs = generate_kwargs(tokenizer, config, synced_gpus)
    if from_generate:
        kwargs.update(return_dict_in_generate=True, output_logits=True)
    try:
        output = model.generate(input_ids=prompt_input_ids, attention_mask=prompt_attention_mask, **kwargs)
        step_logits = None
        if from_generate:
            step_logits = torch.stack(output.logits, dim=1) if output.logits else None  # [N, R, V], raw
            output = output.sequences
        return _assemble(model, tokenizer, prompt_input_ids, prompt_attention_mask, output, compute_logprobs,
                         step_logits)
    finally:
        if was_training:
            model.train()


def generate_kwargs(tokenizer, config: SamplingConfig, synced_gpus: Optional[bool] = None) -> dict:
    """Keyword arguments of ``model.generate`` for ``config`` (also used by the benchmark)."""
    do_sample = config.do_sample and config.temperature > 0
    kwargs = dict(
        max_new_tokens=config.max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        synced_gpus=_distributed() if synced_gpus is None else synced_gpus,
        use_cache=True,
        # neutralise distribution-shaping defaults a Hub generation_config may carry
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        min_new_tokens=0,
    )
    if do_sample:
        kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    return kwargs


def _assemble(model, tokenizer, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor,
              output: torch.Tensor, compute_logprobs: bool, step_logits: Optional[torch.Tensor] = None) -> Rollout:
    prompt_length = prompt_input_ids.size(1)
    response_ids = output[:, prompt_length:]
    if response_ids.size(1) == 0:  # nothing generated at all: one masked-out pad column
        response_ids = torch.full((output.size(0), 1), tokenizer.pad_token_id, device=output.device)
        response_mask = torch.zeros_like(response_ids)
    else:
        response_mask = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    finished = ((response_ids == tokenizer.eos_token_id) & response_mask.bool()).any(-1)
    response_ids = torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id)
    input_ids = torch.cat([prompt_input_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_attention_mask.long(), response_mask], dim=1)
    loss_mask = torch.cat([torch.zeros_like(prompt_attention_mask, dtype=torch.long), response_mask], dim=1)
    logprobs = None
    if step_logits is not None:
        # shifted alignment: entry t scores token t+1, so response token j sits at P-1+j
        logprobs = torch.zeros(input_ids.size(0), input_ids.size(1) - 1, device=input_ids.device)
        response_logps = gather_token_logprobs(step_logits, response_ids) * response_mask
        logprobs[:, prompt_length - 1 :] = response_logps
    elif compute_logprobs:
        logprobs = token_logprobs(model, input_ids, attention_mask)
    texts = tokenizer.batch_decode(
        [ids[mask.bool()].tolist() for ids, mask in zip(response_ids, response_mask)],
        skip_special_tokens=True,
    )
    return Rollout(input_ids, attention_mask, loss_mask, logprobs, finished, prompt_length, texts)
