"""Sampling from the policy: one component that every algorithm uses.

Prompts come left-padded; ``generate`` (KV cache) continues them; the result is re-assembled into
one right-aligned-prompt / right-padded-response batch with per-token log-probs at temperature 1,
i.e. under the policy being trained, not the sampling-warped distribution that ``generate``'s
processed scores describe: taken from the raw logits of the sampling pass itself, or recomputed in
one full forward pass (``SamplingConfig.logprobs_from``).
"""

from __future__ import annotations

import logging
import math
import numbers
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from lightning_irl.models.scoring import distributed, reduced_precision, response_token_logprobs, shared_prompt_cache
from lightning_irl.objectives.logprobs import gather_token_logprobs, sequence_logprobs

log = logging.getLogger(__name__)

LOGPROBS_SOURCES = ("auto", "forward", "generate")

#: What ``logprobs_from: auto`` accepts as "the same values" (max |Δ| over response tokens between the
#: sampling pass and a full forward pass, checked once per model and precision): float32, and reduced
#: precision (bf16 / fp16 weights or autocast, TF32 matmuls). Measured on CPU (``SamplingConfig``):
#: at most 1e-6 in float32 and 8e-3 in bf16, so both bounds leave a wide margin.
AUTO_TOLERANCE = {False: 1e-4, True: 5e-2}

# model -> {reduced precision?: the sampling pass's log-probs passed the check}
_VERIFIED: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[bool, bool]]" = weakref.WeakKeyDictionary()


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
        logprobs_from: Where the response log-probs (temperature 1, eval mode) come from.
            ``generate`` takes them from the raw (pre-temperature, pre-top-p/k) logits the
            sampling pass already computed with its KV cache: no extra pass. ``forward``
            recomputes them in one full forward pass, the training forward's computation (on the
            CPU bit for bit its values on the same rows). ``auto`` (default): ``generate``, except
            (1) when the caller compares them with the training forward (``sample(...,
            for_ratio=True)``: PPO's importance ratio, which must start at 1) under reduced
            precision, and (2) when the two sources disagree by more than ``AUTO_TOLERANCE`` on a
            model: checked once per model and precision, on its first rollout (that one pays for
            both passes; a warning names the difference, and the model then keeps ``forward``).
            The sampling pass keeps its raw logits ([N, R, V] float32) until they are read: the
            same size as the forward pass's logits.

            Measured (``benchmarks/rollout_throughput.py --deltas``, CPU, 64 rollouts of 16 new
            tokens, Llama and GPT-2 of 32 and 256 hidden units): max |Δ| per response token
            between the two sources ≤ 1e-6 in float32 (≤ 6e-6 per sequence); ≤ 8e-3 under bf16
            autocast or bf16 weights (≤ 4.2e-2 per sequence, mean ≤ 1.8e-3, unbiased: the signed
            mean is far below the spread). In bf16 the sampling pass is no further from the
            float32 values than the forward pass (max 9.4e-3 vs 1.3e-2): it is as exact, only not
            bit-identical (cached vs full attention round differently). So ``auto`` uses it
            wherever log-probs are estimates of log π (the KL to the reference, the log-ratio
            discriminator's log π, RLOO's inputs, reported log-probs), and keeps the forward pass
            for PPO in reduced precision, where such an offset would start the ratio off 1 (in
            float32 the ratio starts within 1e-5 of 1 either way). Dropout does not separate the
            sources: both run in eval mode (``sample`` switches the model); the training forward
            of a model with active dropout differs from both (0.17 for GPT-2 at p = 0.1), so PPO
            with dropout never starts at ratio 1.

    Out-of-range values (``num_samples`` or ``max_new_tokens`` < 1, a negative temperature,
    ``top_p`` outside (0, 1], a negative ``top_k``) raise ``ValueError`` at construction.
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    num_samples: int = 1
    logprobs_from: str = "auto"

    def __post_init__(self) -> None:
        if self.logprobs_from not in LOGPROBS_SOURCES:
            raise ValueError(f"logprobs_from must be one of {', '.join(LOGPROBS_SOURCES)}, "
                             f"got {self.logprobs_from!r}")
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
    ``loss_mask[:, 1:]``. ``finished`` marks responses that ended with EOS. ``logprobs_source``:
    ``generate`` or ``forward`` (what ``SamplingConfig.logprobs_from`` resolved to), None without
    log-probs.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    logprobs: Optional[torch.Tensor]
    finished: torch.Tensor
    prompt_length: int
    responses: List[str]
    logprobs_source: Optional[str] = None

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
    for_ratio: bool = False,
) -> Rollout:
    """Sample ``config.num_samples`` responses per (left-padded) prompt.

    ``synced_gpus`` (default: on when torch.distributed runs several processes) keeps every rank
    stepping until all are done, which sharded models (FSDP, ZeRO-3) need: their forward passes
    are collective. ``for_ratio``: the log-probs will be compared with the training forward's
    (PPO's ratio), which makes ``logprobs_from: auto`` recompute them under reduced precision
    (``SamplingConfig``).
    """
    k = config.num_samples
    was_training = model.training
    model.eval()
    kwargs = generate_kwargs(tokenizer, config, synced_gpus)
    try:
        # the k samples of a prompt continue one prefill of it (models.scoring.shared_prompt_cache)
        cache = shared_prompt_cache(model, prompt_input_ids, prompt_attention_mask, k) if k > 1 else None
        if cache is not None:
            kwargs["past_key_values"] = cache
        if k > 1:
            prompt_input_ids = prompt_input_ids.repeat_interleave(k, dim=0)
            prompt_attention_mask = prompt_attention_mask.repeat_interleave(k, dim=0)
        source = logprobs_source(model, config, prompt_input_ids.device, for_ratio) if compute_logprobs else None
        if source in ("generate", "check"):
            kwargs.update(return_dict_in_generate=True, output_logits=True)
        output = model.generate(input_ids=prompt_input_ids, attention_mask=prompt_attention_mask, **kwargs)
        step_logits = None
        if source in ("generate", "check"):
            step_logits = torch.stack(output.logits, dim=1) if output.logits else None  # [N, R, V], raw
            output = output.sequences
        rollout = _assemble(model, tokenizer, prompt_input_ids, prompt_attention_mask, output, compute_logprobs,
                            step_logits if source == "generate" else None)
        if source == "check":
            rollout = _check_generate_logprobs(model, rollout, step_logits)
        return rollout
    finally:
        if was_training:
            model.train()


def logprobs_source(model, config: SamplingConfig, device: torch.device, for_ratio: bool = False) -> str:
    """``forward`` or ``generate``: what ``config.logprobs_from`` means for ``model`` now (see
    ``SamplingConfig``); ``check`` when ``auto`` has not yet compared the two on this model at this
    precision (``sample`` then computes both once)."""
    if config.logprobs_from != "auto":
        return config.logprobs_from
    reduced = reduced_precision(model, device)
    if for_ratio and reduced:
        return "forward"
    verdict = _VERIFIED.get(model, {}).get(reduced)
    if verdict is None:
        return "check"
    return "generate" if verdict else "forward"


def _check_generate_logprobs(model, rollout: Rollout, step_logits: Optional[torch.Tensor]) -> Rollout:
    """``auto``'s one-time check: the forward pass's log-probs (``rollout`` holds them) against the
    sampling pass's (``step_logits``); records the verdict for ``model`` at this precision (the
    same on every rank: the worst difference is reduced over ranks) and returns the rollout with
    the log-probs of the source chosen."""
    reduced = reduced_precision(model, rollout.input_ids.device)
    mask = rollout.loss_mask[:, 1:].bool()
    if step_logits is None or not mask.any():
        return rollout  # nothing generated: decide on a later rollout
    from_generate = _generate_logprobs(rollout, step_logits)
    delta = ((from_generate - rollout.logprobs).abs() * mask).amax().float()
    if distributed():
        dist.all_reduce(delta, op=dist.ReduceOp.MAX)
    delta = float(delta)
    tolerance = AUTO_TOLERANCE[reduced]
    ok = math.isfinite(delta) and delta <= tolerance
    _VERIFIED.setdefault(model, {})[reduced] = ok
    precision = "reduced precision" if reduced else "float32"
    if ok:
        log.debug("logprobs_from=auto: the sampling pass's log-probs match the forward pass's (max |diff| %.2e, "
                  "%s) on %s: using them", delta, precision, type(model).__name__)
        rollout.logprobs, rollout.logprobs_source = from_generate, "generate"
    else:
        log.warning("logprobs_from=auto: the sampling pass's log-probs differ from a forward pass's by %.3g (%s, "
                    "tolerance %g) on %s: recomputing them in a forward pass from now on", delta, precision,
                    tolerance, type(model).__name__)
    return rollout


def _generate_logprobs(rollout: Rollout, step_logits: torch.Tensor) -> torch.Tensor:
    """Shifted [N, P+R-1] log-probs of the rollout's response tokens from the raw step logits
    [N, R', V] of ``generate`` (R' ≥ the rollout's response width)."""
    P = rollout.prompt_length
    response_ids, response_mask = rollout.input_ids[:, P:], rollout.loss_mask[:, P:]
    width = response_ids.size(1)
    ids = rollout.input_ids
    logprobs = torch.zeros(ids.size(0), ids.size(1) - 1, device=ids.device)
    # shifted alignment: entry t scores token t+1, so response token j sits at P-1+j
    logprobs[:, P - 1 :] = gather_token_logprobs(step_logits[:, :width], response_ids) * response_mask
    return logprobs


def generate_kwargs(tokenizer, config: SamplingConfig, synced_gpus: Optional[bool] = None) -> dict:
    """Keyword arguments of ``model.generate`` for ``config`` (also used by the benchmark)."""
    do_sample = config.do_sample and config.temperature > 0
    kwargs = dict(
        max_new_tokens=config.max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        synced_gpus=distributed() if synced_gpus is None else synced_gpus,
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
    texts = tokenizer.batch_decode(
        [ids[mask.bool()].tolist() for ids, mask in zip(response_ids, response_mask)],
        skip_special_tokens=True,
    )
    rollout = Rollout(input_ids, attention_mask, loss_mask, None, finished, prompt_length, texts)
    if step_logits is not None:
        rollout.logprobs, rollout.logprobs_source = _generate_logprobs(rollout, step_logits), "generate"
    elif compute_logprobs:
        logprobs = response_token_logprobs(model, input_ids, attention_mask, start=prompt_length)
        rollout.logprobs, rollout.logprobs_source = logprobs * loss_mask[:, 1:], "forward"
    return rollout
