"""The plan of a preference run, decided on the driver before any Ray task starts.

What the teacher is (:class:`TeacherInfo`, read from its spec: no weights), its label
space, the pair rule (k, q and the options) and the validation rules; the pair
operator gets all it needs in one :class:`PairPlan`. Config errors surface here as
:class:`~mint_ray.errors.ConfigError` naming the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from mint_ray import storage
from mint_ray.errors import ConfigError
from mint_ray.preferences import validate
from mint_ray.preferences.config import Config
from mint_ray.preferences.pairs import PairRule
from mint_ray.tasks import Task, get_task
from mint_ray.teachers.protocol import Preprocessor


@dataclass(frozen=True)
class TeacherInfo:
    """What the driver knows of the teacher before any actor loads it."""

    uri: str
    task: str
    kind: str
    name: str
    version: str | None  # None for a bare HF directory: the actors report the weights' hash
    labels: tuple[str, ...]
    requires: tuple[str, ...]
    load_labels: tuple[str, ...] | None  # passed to load_teacher (re-target / bare directory)
    prompt_template: str | None


@dataclass(frozen=True)
class PairPlan:
    """Everything the pair operator needs (pickled to its tasks)."""

    task: Task
    labels: tuple[str, ...]
    rule: PairRule
    pair_schema: pa.Schema
    union_schema: pa.Schema

    def prompt(self, note: str | None) -> list[dict[str, Any]]:
        if self.task.modality == "text":
            return self.task.prompt_messages(note=note, n_answers=self.rule.k)
        return self.task.prompt_messages(candidates=list(self.labels), n_answers=self.rule.k)


def configured_task(cfg: Config) -> Task:
    """The task module's definition with the configured prompt overrides (never a copy)."""
    task = get_task(cfg.task)
    changes = {k: v for k, v in (("system_prompt", cfg.prompt.system_prompt),
                                 ("instruction", cfg.prompt.instruction)) if v is not None}
    return replace(task, **changes) if changes else task


def catalog_names(meta: dict[str, Any]) -> list[str]:
    """Label names from a cohort manifest (``label_catalog`` or synth's ``labels``)."""
    catalog = meta.get("label_catalog") or meta.get("labels") or []
    return [str(item["name"]) if isinstance(item, dict) else str(item) for item in catalog]


def describe_teacher(cfg: Config, task: Task, cohort_meta: dict[str, Any]) -> TeacherInfo:
    """Read the teacher's spec (no weights) and decide its label space."""
    from mint_ray.teachers.loader import read_spec

    uri, wanted = cfg.teacher.uri, cfg.teacher.labels
    spec = read_spec(uri)
    if spec is not None:
        if spec.task != task.name:
            raise ConfigError(f"teacher {uri} was trained for task {spec.task!r}, not {task.name!r}: "
                              "choose a teacher of this task")
        if wanted and spec.kind == "fusion" and tuple(wanted) != spec.labels:
            raise ConfigError(f"teacher {uri} is a fusion classifier over its own {len(spec.labels)} "
                              "labels: drop teacher.labels (only CLIP teachers can be re-targeted)")
        labels = tuple(wanted) if wanted else spec.labels
        info = TeacherInfo(uri, task.name, spec.kind, spec.name, spec.version, labels, (),
                           tuple(wanted) if wanted else None, None)
    elif storage.exists(storage.join(uri, "config.json")):
        labels = tuple(wanted or task.labels or catalog_names(cohort_meta))
        if not cfg.teacher.prompt_template:
            raise ConfigError(f"teacher {uri} is a bare CLIP/SigLIP directory: set "
                              "teacher.prompt_template (e.g. 'an H&E image of {label} tissue nuclei')")
        info = TeacherInfo(uri, task.name, "clip", uri.rstrip("/").rsplit("/", 1)[-1], None, labels, (),
                           labels, cfg.teacher.prompt_template)
    else:
        raise ConfigError(f"no teacher at {uri} (neither mint_teacher.json nor a Hugging Face "
                          "config.json): train one with `mint-ray teacher train` or fix teacher.uri")
    if len(set(info.labels)) < 2:
        raise ConfigError(f"teacher {uri} scores {len(set(info.labels))} distinct label(s): need at least 2")
    return replace(info, requires=_teacher_requires(info.kind))


def _teacher_requires(kind: str) -> tuple[str, ...]:
    """The inputs a teacher kind needs, from its class (imports torch, once, on the driver)."""
    from mint_ray.teachers.loader import teacher_class

    return teacher_class(kind, "teacher").requires


def pair_rule(cfg: Config, task: Task, n_labels: int) -> PairRule:
    p = cfg.pairs
    rule = PairRule(k=p.k or task.n_answers, q=p.q or task.n_answers, pairs_per_case=p.pairs_per_case,
                    min_margin=p.min_margin, force_truth=p.force_truth)
    try:
        rule.check(n_labels)
    except ValueError as err:
        raise ConfigError(f"{err}: lower pairs.k, pairs.q or pairs.pairs_per_case") from None
    return rule


def validation_rules(cfg: Config, task: Task, teacher: TeacherInfo,
                     inputs: Preprocessor | None = None) -> validate.Rules:
    """What a usable row is; ``inputs`` (the teacher's CPU side) adds the images it can use."""
    return validate.Rules(
        task=task.name, labels=frozenset(teacher.labels), splits=frozenset(cfg.splits),
        needs_note=task.modality == "text" or "note" in teacher.requires,
        needs_image=task.modality == "image" or "image" in teacher.requires,
        max_image_bytes=cfg.limits.max_image_bytes, max_image_pixels=cfg.limits.max_image_pixels,
        max_note_chars=cfg.limits.max_note_chars,
        min_image_side=getattr(inputs, "min_image_side", 1),
        max_image_aspect=getattr(inputs, "max_image_aspect", None))
