"""The task registry: one module per task (see ``base.Task``)."""

from typing import Annotated

from pydantic import AfterValidator

from mint_ray.errors import ConfigError
from mint_ray.tasks.base import CHAT_DATE, MAX_NOTE_CHARS, ParsedAnswer, Task, render_chat
from mint_ray.tasks.rare_disease import RARE_DISEASE
from mint_ray.tasks.tissue_type import TISSUE_TYPE, TISSUE_TYPES

TASKS: dict[str, Task] = {t.name: t for t in (RARE_DISEASE, TISSUE_TYPE)}


def _unknown(name: str) -> str:
    return f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}"


def _known_task(name: str) -> str:
    if name not in TASKS:  # ValueError: pydantic reports it with the field's path
        raise ValueError(_unknown(name))
    return name


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name is a config error listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(_unknown(name)) from None


# A config field holding a task name; an unknown one fails validation listing the known tasks.
TaskName = Annotated[str, AfterValidator(_known_task)]

__all__ = ["CHAT_DATE", "MAX_NOTE_CHARS", "RARE_DISEASE", "TASKS", "TISSUE_TYPE", "TISSUE_TYPES", "ParsedAnswer",
           "Task", "TaskName", "get_task", "render_chat"]
