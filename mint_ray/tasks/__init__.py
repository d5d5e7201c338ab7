"""The task registry: one module per task (see ``base.Task``)."""

from mint_ray.errors import ConfigError
from mint_ray.tasks.base import ParsedAnswer, Task
from mint_ray.tasks.rare_disease import RARE_DISEASE
from mint_ray.tasks.tissue_type import TISSUE_TYPE, TISSUE_TYPES

TASKS: dict[str, Task] = {t.name: t for t in (RARE_DISEASE, TISSUE_TYPE)}


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name is a config error listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}") from None


__all__ = ["RARE_DISEASE", "TASKS", "TISSUE_TYPE", "TISSUE_TYPES", "ParsedAnswer", "Task", "get_task"]
