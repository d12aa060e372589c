"""Reading demonstration records from files, folders or the Hub, with errors a user can act on.

A record is either ``{prompt, response}`` (field names configurable) or ``{messages: [{role,
content}, ...]}``. Every problem names the file, the line or record number and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional


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
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises its own types (ArrowInvalid, ...) for a bad file
            raise DataError(f"{path}: not a readable Parquet file ({_first_line(err)})") from None
        return _from_dataset(frame.to_dict("records"), path)
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


def validate_record(
    record: Dict[str, Any], prompt_field: str, response_field: str, messages_field: str, require_response: bool = True
) -> Dict[str, Any]:
    """Check one record's fields and types; return ``{prompt, response}`` or ``{messages}``."""
    where = record.get("__where__", "record")
    if messages_field in record and record[messages_field] is not None:
        messages = record[messages_field]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field {messages_field!r} must be a non-empty list of {{role, content}}")
        for turn, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
                message.get("content"), str
            ):
                raise DataError(
                    f"{where}: {messages_field}[{turn}] must be an object with string 'role' and 'content'"
                )
        if require_response and not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: {messages_field} has no assistant turn to learn from")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages], "where": where}
    if prompt_field not in record:
        present = sorted(k for k in record if k != "__where__")
        raise DataError(
            f"{where}: missing field {prompt_field!r} (or {messages_field!r}); the record has {present}"
        )
    prompt = record[prompt_field]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field {prompt_field!r} must be a string, got {type(prompt).__name__}")
    out: Dict[str, Any] = {"prompt": prompt, "where": where}
    if response_field in record and record[response_field] is not None:
        response = record[response_field]
        if not isinstance(response, str):
            raise DataError(f"{where}: field {response_field!r} must be a string, got {type(response).__name__}")
        out["response"] = response
    elif require_response:
        raise DataError(f"{where}: missing field {response_field!r}")
    return out


def validate_records(records: Iterable[Dict[str, Any]], **fields: Any) -> List[Dict[str, Any]]:
    return [validate_record(r, **fields) for r in records]
