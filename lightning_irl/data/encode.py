"""Turning validated records into token ids with a response mask, under stated length limits.

Policy (counted in ``EncodeStats``):
- prompts longer than ``max_prompt_length`` keep their *last* tokens (the part next to the answer);
- a record longer than ``max_length`` is, with ``overlong="truncate"``, cut at the end of the
  response (the cut response then has no EOS: the model is not taught to stop there), or, with
  ``overlong="drop"``, left out;
- records whose response is empty (no tokens before EOS) are left out: they teach nothing but
  "stop at once", which is almost always a data error.
Prompt and response are tokenized separately and concatenated, so the boundary is exact; put any
separator the model should see at the end of the prompt.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

from transformers import PreTrainedTokenizerBase

from lightning_irl.data.records import DataError


@dataclass
class EncodeStats:
    records: int = 0
    kept: int = 0
    dropped_empty_response: int = 0
    dropped_overlong: int = 0
    truncated_prompt: int = 0
    truncated_response: int = 0
    loss_tokens: int = 0

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"]) if text else (
        [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    )


def _text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_segments(tokenizer: PreTrainedTokenizerBase, messages: List[Dict[str, str]], where: str):
    """Split a rendered chat into (text, is_assistant_content) segments via the chat template.

    Each assistant turn k contributes ``render(messages[:k], add_generation_prompt=True)`` as
    context and the rest of ``render(messages[:k+1])`` as trained text, so template markers of the
    assistant header are context and the assistant's words plus its end marker are trained.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: record has 'messages' but the tokenizer has no chat template")
    segments = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not context.startswith(done) or not full.startswith(context):
            raise DataError(f"{where}: the chat template does not render turns as prefixes; cannot mask turns")
        segments.append((context[len(done):], False))
        segments.append((full[len(context):], True))
        done = full
    return segments


def encode_record(
    record: Dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    max_length: Optional[int],
    max_prompt_length: Optional[int],
    overlong: str,
    stats: EncodeStats,
) -> Optional[Dict[str, Any]]:
    stats.records += 1
    where = record.get("where", "record")
    if "messages" in record:
        ids: List[int] = []
        mask: List[int] = []
        for index, (text, trained) in enumerate(chat_segments(tokenizer, record["messages"], where)):
            piece = _prompt_ids(tokenizer, text) if index == 0 else _text_ids(tokenizer, text)
            ids += piece
            mask += [int(trained)] * len(piece)
        if not any(mask):
            stats.dropped_empty_response += 1
            return None
        prompt_length = mask.index(1)
        prompt_text = tokenizer.decode(ids[:prompt_length])
        response_text = ""
    else:
        prompt = _prompt_ids(tokenizer, record["prompt"])
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            prompt = prompt[-max_prompt_length:]
            stats.truncated_prompt += 1
        response_text = record.get("response")
        if response_text is None:  # prompt-only record (prediction)
            stats.kept += 1
            return {"input_ids": prompt, "loss_mask": [0] * len(prompt), "prompt_length": len(prompt),
                    "prompt": record["prompt"], "response": ""}
        body = _text_ids(tokenizer, response_text)
        if not body:
            stats.dropped_empty_response += 1
            return None
        response = body + [tokenizer.eos_token_id]
        ids = prompt + response
        mask = [0] * len(prompt) + [1] * len(response)
        prompt_length = len(prompt)
        prompt_text = record["prompt"]
    if max_length is not None and len(ids) > max_length:
        if overlong == "drop" or prompt_length >= max_length:
            stats.dropped_overlong += 1
            return None
        ids, mask = ids[:max_length], mask[:max_length]
        stats.truncated_response += 1
    stats.kept += 1
    stats.loss_tokens += sum(mask)
    return {"input_ids": ids, "loss_mask": mask, "prompt_length": prompt_length,
            "prompt": prompt_text, "response": response_text}


def encode_records(
    records: List[Dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: Optional[int] = None,
    max_prompt_length: Optional[int] = None,
    overlong: str = "truncate",
):
    """Encode ``records``; returns ``(examples, stats)``.

    Raises ``ValueError`` for a ``max_length`` or ``max_prompt_length`` below 1, and
    ``DataError`` naming the source (the file of the records' ``where``) and the reasons when
    records were given but every one was left out: an empty list teaches nothing, and the cause
    (a ``max_length`` shorter than every prompt, empty responses) is in the data or the limits.
    """
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{name} must be a number of tokens >= 1 (or None: no limit), got {value!r}")
    stats = EncodeStats()
    examples = []
    for record in records:
        example = encode_record(record, tokenizer, max_length, max_prompt_length, overlong, stats)
        if example is not None:
            examples.append(example)
    if stats.records and not examples:
        reasons = _drop_reasons(stats, max_length, overlong)
        raise DataError(f"{_source_of(records)}: every record was dropped ({reasons})")
    return examples, stats


def _source_of(records: List[Dict[str, Any]]) -> str:
    """The file (or task split) the records came from, from their ``where`` (``d.jsonl:3``,
    ``d.json record 2``, ``task modes train record 0``): one name, or the first one and a count."""
    names = []
    for record in records:
        where = str(record.get("where") or record.get("__where__") or "records")
        name = re.sub(r"(:\d+| record \d+)$", "", where)
        if name not in names:
            names.append(name)
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more sources)"


def _drop_reasons(stats: EncodeStats, max_length: Optional[int], overlong: str) -> str:
    reasons = []
    if stats.dropped_overlong:
        why = "longer than" if overlong == "drop" else "with a prompt that fills"
        reasons.append(f"{stats.dropped_overlong} {why} max_length={max_length}")
    if stats.dropped_empty_response:
        reasons.append(f"{stats.dropped_empty_response} with an empty response")
    return ", ".join(reasons) or f"{stats.records} records"
