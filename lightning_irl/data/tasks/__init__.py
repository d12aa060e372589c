"""Registry of built-in known-expert tasks: ``get_task("modes")``, ``get_task("modes", weights=[1, 1, 1])``.

Options are the task class's constructor arguments (``ModesTask``: ``alphabet``, ``min_length``,
``max_length``, ``weights``; ``GrammarTask``: ``weights``, ``vocab_size``). In a config they are
``data.init_args.task_args``. Options that change the task's vocabulary (``tokenizer_options``:
the modes alphabet, the grammar BPE size) must also reach the model's tokenizer, spelled in the
tokenizer string: ``tokenizer: "task:modes?alphabet=abcdefghij"`` (``&`` between options,
``%26`` for a literal ``&``); ``KnownExpertTask.tokenizer_spec()`` writes that string.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple, Type
from urllib.parse import unquote

from lightning_irl.data.tasks.base import KnownExpertTask, normalize
from lightning_irl.data.tasks.grammar import GrammarTask
from lightning_irl.data.tasks.modes import ModesTask

TASKS: Dict[str, Type[KnownExpertTask]] = {
    "modes": ModesTask,
    "grammar": GrammarTask,
}


def _task_class(name: str) -> Type[KnownExpertTask]:
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown built-in task {name!r}; choose one of {sorted(TASKS)}") from None


def get_task(name: str, /, **options: Any) -> KnownExpertTask:
    """The built-in task ``name`` built with ``options`` (its constructor arguments).

    Every problem (unknown task or option name, wrong type, bad value) is one ``ValueError`` line.
    """
    cls = _task_class(name)
    valid = cls.option_defaults()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{name}: unknown option {unknown[0]!r}; the options are {', '.join(sorted(valid))}")
    return cls(**options)  # the constructors check types and values themselves


def parse_tokenizer_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """``"task:modes?alphabet=abc"`` (the ``task:`` prefix optional) → ``("modes", {"alphabet": "abc"})``.

    Only the task's ``tokenizer_options`` are accepted: any other option leaves the vocabulary as
    it is, so naming it here would suggest an effect it does not have (set it in
    ``data.task_args``). A value is taken as text for a text option and read as an integer for an
    integer one.
    """
    body = spec[len("task:"):] if spec.startswith("task:") else spec
    name, _, query = body.partition("?")
    cls = _task_class(name)
    defaults = cls.option_defaults()
    options: Dict[str, Any] = {}
    for item in query.split("&") if query else []:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ValueError(f"tokenizer {spec!r}: expected option=value after '?', got {item!r}")
        if key not in cls.tokenizer_options:
            allowed = ", ".join(cls.tokenizer_options) or "none"
            hint = "; set it in data.task_args" if key in defaults else ""
            raise ValueError(f"tokenizer {spec!r}: {key!r} does not choose the {name} vocabulary "
                             f"(tokenizer options: {allowed}){hint}")
        if key in options:
            raise ValueError(f"tokenizer {spec!r}: option {key!r} is given twice")
        value = unquote(raw)
        if isinstance(defaults[key], int) and not isinstance(defaults[key], bool):
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"tokenizer {spec!r}: {key} must be an integer, got {value!r}") from None
        options[key] = value
    return name, options


def task_tokenizer(spec: str):
    """The tokenizer of the task a ``task:<name>[?option=value&...]`` string names."""
    name, options = parse_tokenizer_spec(spec)
    return get_task(name, **options).build_tokenizer()


__all__ = ["GrammarTask", "KnownExpertTask", "ModesTask", "TASKS", "get_task", "normalize",
           "parse_tokenizer_spec", "task_tokenizer"]
