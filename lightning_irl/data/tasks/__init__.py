"""Registry of built-in known-expert tasks: ``get_task("modes")``."""

from __future__ import annotations

from typing import Callable, Dict

from lightning_irl.data.tasks.base import KnownExpertTask, normalize
from lightning_irl.data.tasks.grammar import GrammarTask
from lightning_irl.data.tasks.modes import ModesTask

TASKS: Dict[str, Callable[[], KnownExpertTask]] = {
    "modes": ModesTask,
    "grammar": GrammarTask,
}


def get_task(name: str) -> KnownExpertTask:
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown built-in task {name!r}; choose one of {sorted(TASKS)}") from None


__all__ = ["GrammarTask", "KnownExpertTask", "ModesTask", "TASKS", "get_task", "normalize"]
