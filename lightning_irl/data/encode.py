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

Conversations (``messages``, or a conversational prompt/completion) are rendered with the
tokenizer's chat template and tokenized turn by turn (``encode_chat``): the loss is on the
assistant turns (the completion's, for a prompt/completion pair), each up to and including its
end-of-turn token; the template's own text (headers, a BOS, a default system prompt) is context.
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


def _render(tokenizer: PreTrainedTokenizerBase, messages: List[Dict[str, str]], where: str,
            add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja2's TemplateError, or a template's raise_exception
        text = str(err).strip().splitlines()
        raise DataError(f"{where}: the tokenizer's chat template cannot render this conversation "
                        f"({text[0] if text else type(err).__name__})") from None


def chat_segments(tokenizer: PreTrainedTokenizerBase, messages: List[Dict[str, str]], where: str,
                  train_from: int = 0):
    """Split a rendered chat into (text, is_assistant_turn) segments via the chat template.

    Each assistant turn k (from ``train_from`` on; earlier ones are context) contributes
    ``render(messages[:k], add_generation_prompt=True)`` as context and the rest of
    ``render(messages[:k+1])`` as its turn: the assistant's words, its end-of-turn marker and
    whatever the template writes after it (``encode_chat`` trains up to the end-of-turn
    token). Template text before the first turn (a BOS, a default system prompt) is context.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: record has a conversation but the tokenizer has no chat template")
    segments = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or k < train_from:
            continue
        context = _render(tokenizer, messages[:k], where, add_generation_prompt=True)
        full = _render(tokenizer, messages[: k + 1], where)
        if not context.startswith(done) or not full.startswith(context):
            raise DataError(f"{where}: the chat template does not render turns as prefixes; cannot mask turns")
        segments.append((context[len(done):], False))
        segments.append((full[len(context):], True))
        done = full
    return segments


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set:
    """Ids of special tokens: the named ones (BOS, EOS, ...) and added tokens marked special
    (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    return ids


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: List[Dict[str, str]], where: str,
                train_from: int = 0):
    """``(input_ids, loss_mask)`` of a conversation rendered by the tokenizer's chat template.

    As ``apply_chat_template(tokenize=True)`` does (and TRL), the rendered text is tokenized
    without the tokenizer's own special tokens: the template writes any BOS itself (Llama 3's
    ``<|begin_of_text|>`` appears once). Trained (mask 1): each assistant turn from
    ``train_from`` on, its words and its end-of-turn token, the turn's last special token
    (``<|im_end|>``, ``<|eot_id|>``, ``</s>``; the whole turn when it holds none), so the model
    learns to stop. Context (mask 0): everything else, the template's text after an end-of-turn
    token included (ChatML's newline); the sequence ends at the last trained token.
    """
    special = _special_ids(tokenizer)
    ids: List[int] = []
    mask: List[int] = []
    for text, trained in chat_segments(tokenizer, messages, where, train_from):
        piece = _text_ids(tokenizer, text)
        ids += piece
        if trained:
            end = max((i for i, t in enumerate(piece) if t in special), default=len(piece) - 1) + 1
            mask += [1] * end + [0] * (len(piece) - end)
        else:
            mask += [0] * len(piece)
    if 1 in mask:
        end = len(mask) - mask[::-1].index(1)
        ids, mask = ids[:end], mask[:end]
    return ids, mask


def _chat_prompt(record, tokenizer, max_prompt_length, stats):
    """A conversation to answer: rendered with the assistant's header (``add_generation_prompt``)."""
    text = _render(tokenizer, record["chat_prompt"], record.get("where", "record"), add_generation_prompt=True)
    prompt = _text_ids(tokenizer, text)
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
        stats.truncated_prompt += 1
    stats.kept += 1
    return {"input_ids": prompt, "loss_mask": [0] * len(prompt), "prompt_length": len(prompt),
            "prompt": text, "response": ""}


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
    if "chat_prompt" in record:
        return _chat_prompt(record, tokenizer, max_prompt_length, stats)
    if "messages" in record:
        messages, train_from = record["messages"], record.get("train_from", 0)
        trained = [m for m in messages[train_from:] if m["role"] == "assistant"]
        if all(not m["content"].strip() for m in trained):
            stats.dropped_empty_response += 1
            return None
        ids, mask = encode_chat(tokenizer, messages, where, train_from)
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
