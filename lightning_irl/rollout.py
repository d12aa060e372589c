"""Sampling from the policy: one component that every algorithm uses.

Prompts come left-padded; ``generate`` (KV cache) continues them; the result is re-assembled into
one right-aligned-prompt / right-padded-response batch whose per-token log-probs are recomputed in
a forward pass at temperature 1, i.e. under the policy being trained, not the sampling-warped
distribution that ``generate``'s scores describe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from lightning_irl.objectives.logprobs import token_logprobs


@dataclass
class SamplingConfig:
    """How responses are sampled.

    Args:
        max_new_tokens: Length cap of a response (EOS included).
        temperature: Softmax temperature for sampling (log-probs are always at temperature 1).
        top_p: Nucleus sampling mass (1.0 = off).
        top_k: Keep the k most likely tokens (0 = off).
        do_sample: False = greedy decoding.
        num_samples: Responses per prompt (k); samples of one prompt are contiguous rows.
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    num_samples: int = 1


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
    kwargs = dict(
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        synced_gpus=_distributed() if synced_gpus is None else synced_gpus,
        use_cache=True,
    )
    if config.do_sample:
        kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    output = model.generate(input_ids=prompt_input_ids, attention_mask=prompt_attention_mask, **kwargs)
    prompt_length = prompt_input_ids.size(1)
    response_ids = output[:, prompt_length:]
    if response_ids.size(1) == 0:  # nothing generated at all (max_new_tokens=0)
        response_ids = torch.full((output.size(0), 1), tokenizer.pad_token_id, device=output.device)
    response_mask = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    finished = ((response_ids == tokenizer.eos_token_id) & response_mask.bool()).any(-1)
    response_ids = torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id)
    input_ids = torch.cat([prompt_input_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_attention_mask.long(), response_mask], dim=1)
    loss_mask = torch.cat([torch.zeros_like(prompt_attention_mask, dtype=torch.long), response_mask], dim=1)
    logprobs = token_logprobs(model, input_ids, attention_mask) if compute_logprobs else None
    if was_training:
        model.train()
    texts = tokenizer.batch_decode(
        [ids[mask.bool()].tolist() for ids, mask in zip(response_ids, response_mask)],
        skip_special_tokens=True,
    )
    return Rollout(input_ids, attention_mask, loss_mask, logprobs, finished, prompt_length, texts)
