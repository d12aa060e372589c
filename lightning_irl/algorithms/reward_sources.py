"""Where a reward model's positive and negative (prompt, response) pairs come from.

A ``SampleSource`` names one side of a classifier's data (Inverse-RLignment, docs/theory.md §5):

- ``demonstrations``: the data module's own batch (prompt + expert response);
- ``policy``: responses sampled from a frozen policy (a folder such as an SFT export, a Hub id,
  or an inline config) on the *batch's prompts*, with the rollout component;
- ``file``: (prompt, response) records from a JSONL / JSON / Parquet / CSV file, encoded exactly
  as demonstrations are (prompt tokens, response tokens, EOS).

Demonstration and policy sides see the same prompts in every step, so the prompt distribution
cancels out of the classifier's optimum, ``h(x, y) = log p_pos(y|x) − log p_neg(y|x)``. A file
side is drawn independently of the batch (shuffled, cycled); if its prompts are distributed
differently from the other side's, the classifier can tell the sides apart by the prompt alone.

The runtime classes (``DemonstrationSide``, ``PolicySide``, ``FileSide``) turn a data-module batch
into a ``SideBatch``: token ids, attention mask and loss mask (the response tokens, EOS included)
of whole sequences (prompt + response) in the reward model's tokenizer, with any padding side,
plus the texts. The log-ratio reward model sums token log-probs over the loss mask only.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from lightning_irl.data.collate import pad_rows, pad_sequences
from lightning_irl.data.encode import EncodeStats, encode_record, encode_records
from lightning_irl.data.records import DataError, load_records, validate_records
from lightning_irl.models.spec import ModelSpec
from lightning_irl.rollout import SamplingConfig, sample

log = logging.getLogger(__name__)

KINDS = ("demonstrations", "policy", "file")


@dataclass
class SampleSource:
    """One side (positive or negative) of a reward model's training data.

    Args:
        kind: ``demonstrations``, ``policy`` or ``file``. Default: ``policy`` when ``policy`` is
            given, ``file`` when ``file`` is given, else ``demonstrations``.
        policy: The policy to sample (``kind: policy``), e.g.
            ``{model_name_or_path: checkpoints/quickstart/version_0/export}``. Frozen, eval mode.
        file: Records with a prompt and a response (``kind: file``).
        val_file: Held-out records of a ``file`` side. Without one, ``val_fraction`` of ``file``
            (seeded split) is held out for validation / test.
        prompt_field: Field of the prompt in ``file`` records. Default (None): detected as for
            demonstrations (TRL's ``prompt``/``completion``, ``prompt``/``response``, ``messages``).
        response_field: Field of the response in ``file`` records. Default (None): detected.
        val_fraction: Share of ``file`` records held out when there is no ``val_file``.
        seed: Seed of the ``file`` split and shuffling.
        sampling: Sampling of a ``policy`` side (default: the module's ``sampling``);
            ``num_samples`` responses per prompt.
        retokenize: Decode a policy's samples and re-encode (prompt, response) text with the
            classifier's tokenizer exactly as demonstrations are encoded, so that a non-canonical
            sub-word spelling cannot give the side away. Always on when the policy's tokenizer
            differs from the classifier's.
        max_length: Longest ``file`` record in classifier tokens (longer responses are cut).
    """

    kind: Optional[str] = None
    policy: Optional[ModelSpec] = None
    file: Optional[str] = None
    val_file: Optional[str] = None
    prompt_field: Optional[str] = None
    response_field: Optional[str] = None
    val_fraction: float = 0.1
    seed: int = 0
    sampling: Optional[SamplingConfig] = None
    retokenize: bool = False
    max_length: Optional[int] = 1024

    def __post_init__(self) -> None:
        if self.kind is None:
            self.kind = "policy" if self.policy is not None else "file" if self.file is not None else "demonstrations"
        if self.kind not in KINDS:
            raise ValueError(f"sample source kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "policy" and self.policy is None:
            raise ValueError("a `policy` sample source needs `policy:` (a folder, Hub id or inline config)")
        if self.kind == "file" and self.file is None:
            raise ValueError("a `file` sample source needs `file:` (JSONL/JSON/Parquet/CSV of prompt, response)")
        if self.kind != "policy" and self.policy is not None:
            raise ValueError(f"a {self.kind!r} sample source takes no `policy:`")
        if self.kind != "file" and (self.file is not None or self.val_file is not None):
            raise ValueError(f"a {self.kind!r} sample source takes no `file:` / `val_file:`")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")

    def describe(self) -> str:
        if self.kind == "policy":
            assert self.policy is not None
            return f"policy:{self.policy.model_name_or_path or 'inline config'}"
        if self.kind == "file":
            return f"file:{self.file}"
        return "demonstrations"


@dataclass
class SideBatch:
    """Whole sequences of one side: ``input_ids``/``attention_mask``/``loss_mask`` [N, T] (any
    padding side; ``loss_mask`` marks the response tokens, EOS included)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompts: List[str]
    responses: List[str]
    loss_mask: Optional[torch.Tensor] = None

    def rows(self, device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
        """The aligned row tensors (``input_ids``, ``attention_mask``, ``loss_mask`` when known)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.loss_mask is not None:
            out["loss_mask"] = self.loss_mask
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    def __len__(self) -> int:
        return self.input_ids.size(0)


# ---- helpers -------------------------------------------------------------------------------
def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str],
                 finished: Optional[Sequence[bool]] = None, max_length: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """(prompt, response) texts → right-padded ids encoded as demonstrations are (prompt tokens,
    response tokens, EOS), with the ``loss_mask`` of the response tokens. ``finished[i] = False``
    leaves the EOS off (a response cut at the length cap). An empty response is the prompt
    followed by EOS alone (the EOS its one response token)."""
    rows, masks = [], []
    stats = EncodeStats()
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        example = encode_record({"prompt": prompt, "response": response, "where": f"pair {i}"}, tokenizer,
                                max_length, None, "truncate", stats) if response.strip() else None
        if example is None:  # empty response: prompt + EOS
            prompt_ids = encode_record({"prompt": prompt, "where": f"pair {i}"}, tokenizer, None, None, "truncate",
                                       stats)["input_ids"]
            ids, mask = prompt_ids + [tokenizer.eos_token_id], [0] * len(prompt_ids) + [1]
        else:
            ids, mask = example["input_ids"], example["loss_mask"]
        if finished is not None and not finished[i] and ids and ids[-1] == tokenizer.eos_token_id:
            ids, mask = ids[:-1], mask[:-1]
        rows.append(ids)
        masks.append(mask)
    return {**pad_sequences(rows, tokenizer.pad_token_id), "loss_mask": pad_rows(masks, 0)}


def same_vocabulary(a, b) -> bool:
    return a is b or (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id)


def left_pad_prompts(tokenizer, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
    rows = [encode_record({"prompt": p, "where": f"prompt {i}"}, tokenizer, None, None, "truncate",
                          EncodeStats())["input_ids"] for i, p in enumerate(prompts)]
    return pad_sequences(rows, tokenizer.pad_token_id, left=True)


# ---- runtime sides -------------------------------------------------------------------------
class Side:
    """Turns a data-module batch into this side's sequences. ``stage``: train / val / test / predict."""

    source: SampleSource

    def start(self, stage: str) -> None:
        """Called at the start of an evaluation epoch."""

    def draw(self, batch: Dict[str, Any], stage: str) -> Optional[SideBatch]:
        raise NotImplementedError

    def rest(self, stage: str, batch_size: int) -> Iterator[SideBatch]:
        """Held-out sequences not drawn during an evaluation epoch (file sides)."""
        return iter(())


class DemonstrationSide(Side):
    def __init__(self, source: SampleSource) -> None:
        self.source = source

    def draw(self, batch: Dict[str, Any], stage: str) -> SideBatch:
        return SideBatch(batch["input_ids"], batch["attention_mask"], list(batch["prompt"]), list(batch["response"]),
                         batch.get("loss_mask"))


class PolicySide(Side):
    """Samples ``sampling.num_samples`` responses per batch prompt from a frozen policy."""

    def __init__(self, source: SampleSource, model: torch.nn.Module, policy_tokenizer, tokenizer,
                 sampling: SamplingConfig) -> None:
        self.source = source
        self.model = model
        self.policy_tokenizer = policy_tokenizer
        self.tokenizer = tokenizer
        self.sampling = source.sampling or sampling
        self.shared_vocabulary = same_vocabulary(policy_tokenizer, tokenizer)
        self.retokenize = source.retokenize or not self.shared_vocabulary

    def draw(self, batch: Dict[str, Any], stage: str) -> SideBatch:
        device = batch["input_ids"].device
        if self.shared_vocabulary:
            ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        else:
            prompts = left_pad_prompts(self.policy_tokenizer, batch["prompt"])
            ids, mask = prompts["input_ids"].to(device), prompts["attention_mask"].to(device)
        rollout = sample(self.model, self.policy_tokenizer, ids, mask, self.sampling, compute_logprobs=False)
        k = self.sampling.num_samples
        prompts = [p for p in batch["prompt"] for _ in range(k)]
        if not self.retokenize:
            return SideBatch(rollout.input_ids, rollout.attention_mask, prompts, rollout.responses, rollout.loss_mask)
        encoded = encode_pairs(self.tokenizer, prompts, rollout.responses, rollout.finished.tolist())
        return SideBatch(encoded["input_ids"].to(device), encoded["attention_mask"].to(device), prompts,
                         rollout.responses, encoded["loss_mask"].to(device))


class FileSide(Side):
    """Records of a file, shuffled and cycled for training; the held-out part, sharded over
    ranks, once per evaluation epoch."""

    def __init__(self, source: SampleSource, tokenizer, rank: int = 0, world_size: int = 1) -> None:
        self.source = source
        self.tokenizer = tokenizer
        fields = dict(prompt_field=source.prompt_field, response_field=source.response_field,
                      messages_field=None, require_response=True)
        records = validate_records(load_records(source.file), **fields)
        train = self._encode(records, source.file)
        if source.val_file is not None:
            val = self._encode(validate_records(load_records(source.val_file), **fields), source.val_file)
        else:
            order = list(range(len(train)))
            random.Random(source.seed).shuffle(order)
            n_val = int(round(len(train) * source.val_fraction))
            held = set(order[:n_val])
            val = [train[i] for i in sorted(held)]
            train = [e for i, e in enumerate(train) if i not in held]
        if not train:
            raise DataError(f"{source.file}: no training records left after holding out {len(val)}")
        if not val:
            log.warning("sample source %s has no held-out records: validation sees one side only", source.describe())
        self.train = train
        self.val = val[rank::world_size]
        self._rng = random.Random(source.seed * 7919 + rank)
        self._order: List[int] = []
        self._eval_cursor = 0

    def _encode(self, records, name: str):
        examples, stats = encode_records(records, self.tokenizer, self.source.max_length, None, "truncate")
        if not examples:
            raise DataError(f"{name}: every record was dropped ({stats.as_dict()})")
        if stats.truncated_response or stats.dropped_empty_response:
            log.warning("%s: truncated %d response(s), dropped %d empty one(s)", name, stats.truncated_response,
                        stats.dropped_empty_response)
        return examples

    def _collate(self, examples, device) -> SideBatch:
        padded = pad_sequences([e["input_ids"] for e in examples], self.tokenizer.pad_token_id)
        return SideBatch(padded["input_ids"].to(device), padded["attention_mask"].to(device),
                         [e["prompt"] for e in examples], [e["response"] for e in examples],
                         pad_rows([e["loss_mask"] for e in examples], 0).to(device))

    def start(self, stage: str) -> None:
        self._eval_cursor = 0

    def draw(self, batch: Dict[str, Any], stage: str) -> Optional[SideBatch]:
        n = len(batch["prompt"])
        device = batch["input_ids"].device
        if stage == "train":
            picked = []
            while len(picked) < n:
                if not self._order:
                    self._order = list(range(len(self.train)))
                    self._rng.shuffle(self._order)
                picked.append(self.train[self._order.pop()])
            return self._collate(picked, device)
        picked = self.val[self._eval_cursor : self._eval_cursor + n]
        self._eval_cursor += len(picked)
        return self._collate(picked, device) if picked else None

    def rest(self, stage: str, batch_size: int) -> Iterator[SideBatch]:
        while self._eval_cursor < len(self.val):
            picked = self.val[self._eval_cursor : self._eval_cursor + batch_size]
            self._eval_cursor += len(picked)
            yield self._collate(picked, torch.device("cpu"))
