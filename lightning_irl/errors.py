"""One line for every bad input: jsonargparse's option errors condensed to ``<key>: <reason>``
(``OptionError``), and any failure the input caused turned into ``(exit code, line)``
(``describe_failure``) for ``lightning_irl.cli.main``."""

from __future__ import annotations

import dataclasses
import difflib
import pickle
import re
from typing import Any, Dict, List, Optional

from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_irl.algorithms.engine import NonFiniteError
from lightning_irl.data import DataError
from lightning_irl.models.spec import SourceError
from lightning_irl.preflight import (
    SUBCOMMANDS,
    ConfigError,
    check_checkpoint,
    current_run,
    import_class,
    init_hints,
    one_line,
    type_hints,
    unwrap_optional,
)

class OptionError(Exception):
    """A command-line or config-file error reported by the parser. ``str()`` is one line (see
    ``condense_option_error``); ``report`` is jsonargparse's full text."""

    def __init__(self, line: str, report: str) -> None:
        super().__init__(line)
        self.report = report


_NOISE = re.compile(r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:$|Given value type: |"
                    r"Given value: |Expected a <class 'NoneType'>|Expected a <class 'bool'>$|"
                    r"Expected a collections\.abc\.Iterable)")
_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "dict": "a mapping", "list": "a list"}


def _expected(text: str) -> str:
    """``Expected a <class 'int'>. Got value: abc`` → ``expected an integer, got 'abc'``."""
    match = re.match(r"Expected an? (.*?)(?:\. Got value: (.*))?$", text, re.S)
    if not match:
        return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text
    kind, got = match.group(1), match.group(2)
    cls = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>", kind)
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", kind)
    if cls:
        kind = _TYPE_NAMES.get(cls.group(1), cls.group(1))
    elif literal:
        kind = "one of " + ", ".join(v.strip().strip("'\"") for v in literal.group(1).split(","))
    return f"expected {kind}" + (f", got {got.strip()!r}" if got is not None else "")


def _suggest(name: str, candidates: List[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _init_names(class_path: Optional[str], dotted: str) -> List[str]:
    """The option names next to ``dotted`` (``bogus`` or ``policy.bogus``) under ``class_path``."""
    cls = import_class(class_path)
    if cls is None:
        return []
    hints = init_hints(cls)
    names = list(hints)
    for part in dotted.split(".")[:-1]:
        tp = unwrap_optional(hints.get(part))
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return []
        hints = type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
    return [n for n in names if n not in ("self", "args", "kwargs")]


def _option_names(parser: Any) -> List[str]:
    """``--a.b.c`` flags of a jsonargparse parser, from its public defaults namespace."""
    try:
        return ["--" + key for key in parser.get_defaults().keys()]
    except Exception:  # a parser that cannot build its defaults: no suggestion, still one line
        return []


def condense_option_error(message: str, parser: Any = None) -> str:
    """One line from jsonargparse's error report: the option key and the reason, e.g.
    ``data.init_args.batch_size: expected an integer, got 'abc'``."""
    stack: List[tuple] = []  # (indent, key part)
    classes: List[tuple] = []  # (indent, class path) of "Problem with given class_path"
    reasons: List[tuple] = []  # (key, reason, class path)
    given = None
    for raw in message.splitlines():
        text = raw.strip()
        if not text:
            continue
        indent = len(raw) - len(raw.lstrip())
        if text.startswith("- "):
            text, indent = text[2:].strip(), indent + 2
        while stack and stack[-1][0] >= indent:
            stack.pop()
        while classes and classes[-1][0] >= indent:
            classes.pop()
        key = ".".join(part for _, part in stack)
        keyed = re.match(r'Parser key "([^"]+)":\s*(.*)$', text)
        if keyed:
            stack.append((indent, keyed.group(1)))
            if keyed.group(2):
                reasons.append((".".join(p for _, p in stack), keyed.group(2), None))
            continue
        problem = re.match(r"Problem with given class_path '([^']+)':\s*(.*)$", text)
        if problem:
            stack.append((indent, "init_args"))
            classes.append((indent, problem.group(1)))
            if problem.group(2):
                reasons.append((key + ".init_args", problem.group(2), problem.group(1)))
            if import_class(problem.group(1)) is None:  # the class itself is the problem, not its arguments
                stack[-1] = (indent, "class_path")
            continue
        if text.startswith("Given value: "):
            given = given or text[len("Given value: "):]
        if _NOISE.match(text):
            continue
        reasons.append((key, text, classes[-1][1] if classes else None))
    if not reasons:
        return " ".join(message.split())[:300]
    # the deepest key holds the real reason (the union's other branches are noise)
    depth = max(len(k) for k, _, _ in reasons)
    chosen = [(k, r, c) for k, r, c in reasons if len(k) == depth]
    key, reason, class_path = chosen[0]
    unknown = re.match(r"(?:Option '([^']+)' is not accepted|unrecognized arguments: (\S+))", reason)
    if unknown:
        name = (unknown.group(1) or unknown.group(2)).lstrip("-").split("=")[0]
        if class_path is not None:
            hint = _suggest(name.rsplit(".", 1)[-1], _init_names(class_path, name))
        else:
            hint = _suggest("--" + name, _option_names(parser))
        return f"{(key + '.' if key else '--') + name}: no such option{hint}"
    if reason.startswith("Expected a typing.Literal[") and len(chosen) > 1:
        values: List[str] = []
        for _, text, _ in chosen:
            literal = re.match(r"Expected a typing\.Literal\[(.*)\]", text)
            for value in (literal.group(1).split(",") if literal else []):
                value = value.strip().strip("'\"")
                if value not in values:
                    values.append(value)
        reason = f"expected one of {', '.join(values)}" + (f", got {given!r}" if given is not None else "")
    elif reason.startswith("Expected "):
        reason = _expected(reason)
    argument = re.match(r"argument (\S+): (.*)$", reason)
    if argument and not key:
        key, reason = argument.group(1), argument.group(2)
    required = re.match(r"the following arguments are required: (.*)$", reason)
    if required and not key:
        names = ", ".join(n.strip().split(".")[-1] for n in required.group(1).split(","))
        return f"command line: missing required options {names} (give them in a --config file or as --model / --data)"
    if key.endswith(".class_path") and class_path is not None:
        reason = f"cannot import {class_path} ({reason})"
    if key == "config":
        missing = re.match(r"File does not exist: '?([^']*)'?$", reason)
        if missing:
            return f"{missing.group(1)}: no such config file (--config)"
        key = "--config"
    return f"{key}: {reason}" if key else reason




# ---- the one line -------------------------------------------------------------------------------


def _innermost(err: BaseException) -> tuple:
    """(error, where) under jsonargparse's "Does not validate against any of the Union subtypes"
    wrappers of an error raised while instantiating the model or data module."""
    where = None
    while isinstance(err, ValueError) and str(err).startswith(("Does not validate", "Problem with given")) and (
            err.__cause__ is not None or err.__context__ is not None):
        if where is None:
            if "IRLModule" in str(err) or "LightningModule" in str(err):
                where = "model"
            elif "DataModule" in str(err):
                where = "data"
        err = err.__cause__ or err.__context__
    return err, where


def _state_dict_mismatch(text: str) -> str:
    """``missing reference.* (9 keys); unexpected discriminator.* (12 keys)`` from torch's
    ``load_state_dict`` report."""
    found = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict:(.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict:(.*)"),
                           ("shape mismatch in", r"size mismatch for ([^:]+):")):
        keys = [k for line in re.findall(pattern, text) for k in (re.findall(r'"([^"]+)"', line) or [line.strip()])]
        by_part: Dict[str, int] = {}
        for k in keys:
            by_part[k.split(".", 1)[0]] = by_part.get(k.split(".", 1)[0], 0) + 1
        found += [f"{label} {part}.* ({n} {'key' if n == 1 else 'keys'})" for part, n in sorted(by_part.items())]
    return "; ".join(found) or "its state dict does not load"


def describe_failure(err: BaseException, argv: List[str]) -> Optional[tuple]:
    """(exit code, one line) for a failure that is the input's fault (exit 2) or a non-finite
    training value (exit 1); None for anything else (a bug: the traceback is shown)."""
    subcommand = next((a for a in argv if a in SUBCOMMANDS), None)
    if isinstance(err, OptionError):
        return 2, f"{err}; see lightning_irl {subcommand + ' ' if subcommand else ''}--help"
    if isinstance(err, (ConfigError, DataError, SourceError)):
        return 2, one_line(str(err))
    if isinstance(err, NonFiniteError):
        return 1, one_line(str(err))
    if isinstance(err, MisconfigurationException):
        return 2, f"trainer: {one_line(str(err))}"
    record = current_run()
    if record is not None and record.ckpt_path and isinstance(err, (RuntimeError, OSError, EOFError,
                                                                       pickle.UnpicklingError)):
        try:  # Lightning could not load the checkpoint (e.g. `--ckpt_path last` resolved to a bad file)
            check_checkpoint(record.ckpt_path, record.model_cls)
        except ConfigError as bad:
            return 2, one_line(str(bad))
        if isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in str(err):
            model = re.search(r"state_dict for (\w+)", str(err))
            return 2, (f"{record.ckpt_path}: checkpoint does not fit {model.group(1) if model else 'the model'}: "
                       f"{_state_dict_mismatch(str(err))} (--ckpt_path)")
    inner, where = _innermost(err)
    if isinstance(inner, SourceError):
        return 2, one_line(str(inner))
    if isinstance(inner, (DataError, ValueError, FileNotFoundError)) or inner is not err and isinstance(
            inner, (OSError, TypeError)):
        text = one_line(str(inner))
        return 2, f"{where}: {text}" if where else text
    return None
