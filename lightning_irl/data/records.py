"""Reading demonstration records from files, folders or the Hub, with errors a user can act on.

A record holds a prompt and its expert response as text (``{prompt, completion}``: TRL's standard
prompt-completion, or ``{prompt, response}``), as lists of messages (``{prompt: [...],
completion: [...]}``: TRL's conversational prompt-completion), or a whole conversation
(``{messages: [{role, content}, ...]}``: TRL's conversational format; ShareGPT's
``{conversations: [{from, value}, ...]}`` too). The format is detected from a dataset's first
record unless the user names the fields (``detect_format``). Every problem names the file, the
line or record number and the field.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad demonstration input. The message is one line that says where and what."""


@dataclass
class Source:
    """Where records come from, for error messages."""

    name: str

    def at(self, index: int, line: bool = False) -> str:
        return f"{self.name}:{index}" if line else f"{self.name} record {index}"


def _decode_error(path: str, data: bytes, err: UnicodeDecodeError, first_line: int = 1) -> DataError:
    """``<path>:<line>: not UTF-8 text (...)`` for bytes that do not decode."""
    line = first_line + data.count(b"\n", 0, err.start)
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
                     "save the file as UTF-8")


def _read_text(path: str) -> str:
    """The whole file as text (UTF-8, an optional byte-order mark dropped), or a DataError naming
    the line of the first byte that is not UTF-8."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        err.start += bom  # utf-8-sig reports positions after the mark
        raise _decode_error(path, data, err) from None


def _read_jsonl(path: str) -> List[Dict[str, Any]]:
    records = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    err.start += 3
                raise _decode_error(path, raw, err, first_line=number) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            record["__where__"] = f"{path}:{number}"
            records.append(record)
    return records


def _read_json(path: str) -> List[Dict[str, Any]]:
    text = _read_text(path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records, or an object holding one list")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    out = []
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path} record {index}: expected a JSON object, got {type(record).__name__}")
        out.append({**record, "__where__": f"{path} record {index}"})
    return out


def _from_dataset(dataset, name: str) -> List[Dict[str, Any]]:
    return [{**row, "__where__": f"{name} record {i}"} for i, row in enumerate(dataset)]


def load_records(
    path: Optional[str] = None,
    hub_name: Optional[str] = None,
    hub_config: Optional[str] = None,
    split: str = "train",
) -> List[Dict[str, Any]]:
    """Raw records from a local file/folder or, when the user names one, a Hub dataset."""
    if hub_name is not None:
        import datasets

        dataset = datasets.load_dataset(hub_name, hub_config, split=split)
        records = _from_dataset(dataset, f"{hub_name}[{split}]")
        if not records:
            raise DataError(f"{hub_name}[{split}]: no records (the split is empty)")
        return records
    assert path is not None
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        import datasets

        try:
            loaded = datasets.load_from_disk(path)
        except FileNotFoundError:
            raise DataError(f"{path}: not a folder written by datasets.save_to_disk") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split {split!r} (has {sorted(loaded)})")
            loaded = loaded[split]
        records = _from_dataset(loaded, path)
        if not records:
            raise DataError(f"{path}: no records (the dataset is empty)")
        return records
    lower = path.lower()
    if not lower.endswith(_SUFFIXES):
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json, .parquet, .csv or a save_to_disk folder)")
    try:
        records = _read_file(path, lower)
    except (DataError, MemoryError):
        raise
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    if not records:
        raise DataError(f"{path}: no records" + (" (the file is empty)" if os.path.getsize(path) == 0 else ""))
    return records


_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv")


def _read_file(path: str, lower: str) -> List[Dict[str, Any]]:
    if lower.endswith((".jsonl", ".ndjson")):
        return _read_jsonl(path)
    if lower.endswith(".json"):
        return _read_json(path)
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:  # pyarrow, not pandas: list columns (conversations) come back as lists of dicts
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises its own types (ArrowInvalid, ...) for a bad file
            raise DataError(f"{path}: not a readable Parquet file ({_first_line(err)})") from None
        return _from_dataset(rows, path)
    import io

    import pandas as pd

    text = _read_text(path)
    if not text.strip():
        return []
    try:
        frame = pd.read_csv(io.StringIO(text), sep="\t" if lower.endswith(".tsv") else ",", keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise DataError(f"{path}: malformed CSV ({_first_line(err)})") from None
    # CSV line numbers: header is line 1, the first record line 2.
    return [{**row, "__where__": f"{path}:{i + 2}"} for i, row in enumerate(frame.to_dict("records"))]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ---- record formats ----------------------------------------------------------------------
# TRL's dataset formats (https://huggingface.co/docs/trl/dataset_formats) and ours. Detection
# looks for these names when the user names no field.
RESPONSE_NAMES = ("completion", "response")
MESSAGES_NAMES = ("messages", "conversations")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
EXPECTED = "expected prompt+completion, prompt+response or messages (TRL's formats)"
FLAGS = "--data.init_args.prompt_field/response_field (or messages_field)"


@dataclass(frozen=True)
class RecordFormat:
    """How a dataset's records hold a demonstration.

    ``kind``: ``text`` (``prompt`` and ``response`` fields hold strings: ours, TRL's standard
    prompt-completion), ``messages`` (one field holds the conversation: TRL's conversational
    format, or ShareGPT's ``conversations`` of ``{from, value}``), ``chat_pair`` (``prompt`` and
    ``response`` fields hold lists of messages: TRL's conversational prompt-completion; the loss
    is on the completion's assistant turns only). ``origin``: the record it was detected from.
    """

    kind: str
    prompt: Optional[str] = None
    response: Optional[str] = None
    messages: Optional[str] = None
    origin: str = ""

    def describe(self) -> str:
        if self.kind == "messages":
            return f"{self.messages!r} (a list of messages)"
        what = "text" if self.kind == "text" else "lists of messages"
        return f"{self.prompt!r}+{self.response!r} ({what})" if self.response else f"{self.prompt!r} ({what})"


def _fields_of(record: Dict[str, Any]) -> List[str]:
    return sorted(k for k in record if not str(k).startswith("__"))


def _present(record: Dict[str, Any], name: Optional[str]) -> bool:
    return name is not None and name in record and record[name] is not None


def _as_list(value: Any) -> Any:
    """A list column read back as a tuple or an array (pandas) is a list."""
    if isinstance(value, tuple):
        return list(value)
    return value.tolist() if type(value).__name__ == "ndarray" else value


def detect_format(
    record: Dict[str, Any],
    prompt_field: Optional[str] = None,
    response_field: Optional[str] = None,
    messages_field: Optional[str] = None,
    require_response: bool = True,
) -> RecordFormat:
    """The format of ``record``; a field named by the user (not None) is the one looked for.

    In order: a conversation (``messages_field``, else ``messages`` or ``conversations``; not
    looked for when the user named only prompt/response fields); a prompt (``prompt_field``,
    else ``prompt``) with a response (``response_field``, else ``completion`` or ``response``),
    both strings (``text``) or both lists of messages (``chat_pair``). A record that fits none
    raises a one-line DataError that says what was expected, with a hint for preference data
    (``chosen``/``rejected``) and language-modeling text.
    """
    where = record.get("__where__", "record")
    fields = _fields_of(record)
    named_pair = prompt_field is not None or response_field is not None
    if messages_field is not None or not named_pair:
        for name in (messages_field,) if messages_field else MESSAGES_NAMES:
            if _present(record, name):
                return RecordFormat("messages", messages=name, origin=where)
    prompt_name = prompt_field or "prompt"
    if not _present(record, prompt_name):
        if messages_field is not None:
            first, other = (prompt_name, messages_field) if named_pair else (messages_field, prompt_name)
            raise DataError(f"{where}: missing field {first!r} (or {other!r}); the record has {fields}")
        if named_pair:
            raise DataError(f"{where}: missing field {prompt_name!r}; the record has {fields}")
        raise DataError(f"{where}: {_no_format(record, fields)}")
    prompt = _as_list(record[prompt_name])
    if isinstance(prompt, str):
        kind = "text"
    elif isinstance(prompt, list):
        kind = "chat_pair"
    else:
        raise DataError(f"{where}: field {prompt_name!r} must be a string (or a list of messages), "
                        f"got {type(prompt).__name__}")
    names = (response_field,) if response_field else RESPONSE_NAMES
    response_name = next((n for n in names if _present(record, n)), None)
    if not require_response:  # prompts to answer: a response, if any, is not read
        return RecordFormat(kind, prompt=prompt_name, response=response_name, origin=where)
    if response_name is None:
        if response_field:
            raise DataError(f"{where}: missing field {response_field!r}; the record has {fields}")
        raise DataError(f"{where}: {_no_format(record, fields)}")
    response = _as_list(record[response_name])
    if not isinstance(response, str if kind == "text" else list):
        raise DataError(f"{where}: field {response_name!r} is {_kind_name(response)} but {prompt_name!r} is "
                        f"{_kind_name(prompt)}: give both as text or both as lists of messages")
    if response_name == "completion" and not response_field and isinstance(record.get("label"), bool):
        raise DataError(f"{where}: prompt+completion+label is TRL's unpaired preference format (KTO): a completion "
                        "labelled false is not an expert demonstration; keep the rows labelled true and drop "
                        "the 'label' field")
    return RecordFormat(kind, prompt=prompt_name, response=response_name, origin=where)


def _kind_name(value: Any) -> str:
    return "text" if isinstance(value, str) else "a list" if isinstance(value, list) else f"a {type(value).__name__}"


def _no_format(record: Dict[str, Any], fields: List[str]) -> str:
    """Why a record fits no format, with a hint for the formats we can name."""
    if _present(record, "chosen") and _present(record, "rejected"):
        if _present(record, "prompt"):
            hint = "to learn from the chosen answers, name them: --data.init_args.response_field chosen"
        elif isinstance(_as_list(record["chosen"]), list):
            hint = "to learn from the chosen conversations, name them: --data.init_args.messages_field chosen"
        else:
            hint = "the prompt is inside the chosen text: split it into prompt and completion fields"
        return (f"a preference dataset (TRL's chosen/rejected format) holds no demonstrations: {EXPECTED}, "
                f"got fields {fields}; {hint}")
    if _present(record, "text") and len(fields) == 1:
        return (f"TRL's language-modeling format ('text') has no prompt/response split to learn from: {EXPECTED}, "
                f"got fields {fields}; split each text into prompt and completion fields")
    if _present(record, "prompt"):
        return (f"missing field 'completion' (or 'response') next to 'prompt': {EXPECTED}, got fields {fields}; "
                f"name yours with {FLAGS}")
    return f"no known demonstration format: {EXPECTED}, got fields {fields}; name yours with {FLAGS}"


def _messages(value: Any, field: str, where: str) -> List[Dict[str, str]]:
    """``[{role, content}]`` from a list of messages (ShareGPT's ``{from, value}`` mapped)."""
    value = _as_list(value)
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of {{role, content}}")
    out = []
    for turn, message in enumerate(value):
        if isinstance(message, dict) and message.get("role") is None and message.get("from") is not None:
            speaker = message["from"]
            if speaker not in SHAREGPT_ROLES:
                raise DataError(f"{where}: {field}[{turn}] has speaker {speaker!r}; expected one of "
                                f"{sorted(SHAREGPT_ROLES)} (ShareGPT's 'from')")
            message = {"role": SHAREGPT_ROLES[speaker], "content": message.get("value")}
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
            message.get("content"), str
        ):
            raise DataError(f"{where}: {field}[{turn}] must be an object with string 'role' and 'content'")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def validate_record(
    record: Dict[str, Any],
    prompt_field: Optional[str] = None,
    response_field: Optional[str] = None,
    messages_field: Optional[str] = None,
    require_response: bool = True,
    fmt: Optional[RecordFormat] = None,
) -> Dict[str, Any]:
    """Check one record's fields and types against ``fmt`` (default: the record's own format,
    ``detect_format``). Returns ``{prompt, response}`` (``response`` absent when not required and
    not given), ``{messages, train_from}`` (a conversation; the loss is on the assistant turns
    from ``train_from`` on) or, when no response is required, ``{chat_prompt}`` (the
    conversation to answer)."""
    where = record.get("__where__", "record")
    if fmt is None:
        fmt = detect_format(record, prompt_field, response_field, messages_field, require_response)
    since = f" (the records are {fmt.describe()}, as in {fmt.origin})" if fmt.origin != where else ""
    if fmt.kind == "messages":
        if not _present(record, fmt.messages):
            raise DataError(f"{where}: missing field {fmt.messages!r}{since}; the record has {_fields_of(record)}")
        messages = _messages(record[fmt.messages], fmt.messages, where)
        if not require_response:
            while messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]  # the answer: ignored
            if not messages:
                raise DataError(f"{where}: {fmt.messages} has only assistant turns: nothing to answer")
            return {"chat_prompt": messages, "where": where}
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: {fmt.messages} has no assistant turn to learn from")
        return {"messages": messages, "train_from": 0, "where": where}
    if not _present(record, fmt.prompt):
        raise DataError(f"{where}: missing field {fmt.prompt!r}{since}; the record has {_fields_of(record)}")
    prompt = _as_list(record[fmt.prompt])
    has_response = _present(record, fmt.response)
    response = _as_list(record[fmt.response]) if has_response else None
    if fmt.kind == "text":
        if not isinstance(prompt, str):
            raise DataError(f"{where}: field {fmt.prompt!r} must be a string{since}, got {type(prompt).__name__}")
        out: Dict[str, Any] = {"prompt": prompt, "where": where}
        if has_response and (require_response or isinstance(response, str)):
            if not isinstance(response, str):
                raise DataError(f"{where}: field {fmt.response!r} must be a string{since}, "
                                f"got {type(response).__name__}")
            out["response"] = response
        elif require_response:
            raise DataError(f"{where}: missing field {fmt.response!r}{since}; the record has {_fields_of(record)}")
        return out
    prompt_messages = _messages(prompt, fmt.prompt, where)
    if not require_response:
        return {"chat_prompt": prompt_messages, "where": where}
    if not has_response:
        raise DataError(f"{where}: missing field {fmt.response!r}{since}; the record has {_fields_of(record)}")
    completion = _messages(response, fmt.response, where)
    if not any(m["role"] == "assistant" for m in completion):
        raise DataError(f"{where}: {fmt.response} has no assistant turn to learn from")
    return {"messages": prompt_messages + completion, "train_from": len(prompt_messages), "where": where}


def validate_records(
    records: Iterable[Dict[str, Any]],
    prompt_field: Optional[str] = None,
    response_field: Optional[str] = None,
    messages_field: Optional[str] = None,
    require_response: bool = True,
) -> List[Dict[str, Any]]:
    """Validate ``records`` (see ``validate_record``).

    With every field name given, each record is read by its own fields (a conversation where
    ``messages_field`` is set, else prompt/response). Otherwise the format is detected from the
    first record (``detect_format``, the given names taking precedence) and every record must fit
    it: one that does not is named, with the format and the record it was detected from.
    """
    records = list(records)
    if prompt_field is not None and response_field is not None and messages_field is not None:
        return [validate_record(r, prompt_field, response_field, messages_field, require_response) for r in records]
    if not records:
        return []
    fmt = detect_format(records[0], prompt_field, response_field, messages_field, require_response)
    if prompt_field is None and response_field is None and messages_field is None:
        log.info("%s: records are %s", re.sub(r"(:\d+| record \d+)$", "", fmt.origin), fmt.describe())
    return [validate_record(r, require_response=require_response, fmt=fmt) for r in records]
