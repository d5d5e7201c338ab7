"""Row validation: is a cohort row usable, and if not, the one reason why.

Pure functions (no Ray, no storage): the pipeline reads the row and the image
bytes, these decide. Each unusable row gets exactly one reason, checked in the
order below, so counts per reason add up to the rows set aside.

Quarantined (bad input, stage ``validate``; ``teacher_error`` at stage ``teacher``):

- ``wrong_type``      a field of the wrong type (e.g. ``label`` stored as int64) or an
                      empty ``sample_id``
- ``duplicate_id``    a ``sample_id`` seen earlier in the cohort (the first one is kept)
- ``wrong_task``      the row belongs to another task
- ``unknown_split``   ``split`` is not train / validation / test
- ``unknown_label``   a ground truth the teacher does not score
- ``empty_note``      a text task (or a teacher that needs the note) without a note
- ``missing_image``   no ``image_uri`` where one is required, or no file at it
- ``image_too_large`` the file is over ``max_image_bytes`` (checked before reading it)
- ``unsupported_image_format`` not PNG or JPEG (the one allow-list, :mod:`mint_ray.images`)
- ``too_many_pixels`` width x height over ``max_image_pixels`` (read from the header,
                      before decoding, so a decompression bomb is never expanded)
- ``truncated_image`` the file ends early
- ``corrupt_image``   not a decodable image
- ``teacher_error``   the teacher failed on this row alone, or gave non-finite scores

Filtered (usable, left out by an option, stage ``filter``):

- ``split_not_selected`` the row's split is not in the configured ``splits``
- ``low_margin``         every pair of the case is below ``pairs.min_margin``
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mint_ray.images import ImageLimits, ImageRejected, check_size, decode_rgb

SPLITS = ("train", "validation", "test")

QUARANTINE_REASONS = (
    "wrong_type", "duplicate_id", "wrong_task", "unknown_split", "unknown_label", "empty_note",
    "missing_image", "image_too_large", "unsupported_image_format", "too_many_pixels", "truncated_image",
    "corrupt_image", "teacher_error",
)
FILTER_REASONS = ("split_not_selected", "low_margin")

@dataclass(frozen=True)
class Verdict:
    """Why a row is set aside: ``stage`` (validate / teacher / filter), ``reason`` and a
    short ``detail`` that never quotes the note."""

    reason: str
    detail: str = ""
    stage: str = "validate"


@dataclass(frozen=True)
class Rules:
    """What a usable row looks like for one task, teacher and config."""

    task: str
    labels: frozenset[str]
    splits: frozenset[str]
    needs_note: bool
    needs_image: bool
    max_image_bytes: int
    max_image_pixels: int


def check_row(row: Mapping[str, Any], rules: Rules) -> Verdict | None:
    """Checks that need no image bytes; None when the row may go on to the image checks.

    ``row`` holds the cohort fields plus ``type_error`` and ``duplicate`` (set by
    the reader, which sees column types and every id).
    """
    if row.get("type_error"):
        return Verdict("wrong_type", str(row["type_error"]))
    for name in ("sample_id", "task", "split", "note", "image_uri", "label"):
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            return Verdict("wrong_type", f"{name}: {type(value).__name__}")
    if not row.get("sample_id"):
        return Verdict("wrong_type", "sample_id: empty")
    if row.get("duplicate"):
        return Verdict("duplicate_id", "sample_id seen earlier in the cohort")
    if row.get("task") != rules.task:
        return Verdict("wrong_task", f"task {row.get('task')!r}, expected {rules.task!r}")
    split = row.get("split")
    if split not in SPLITS:
        return Verdict("unknown_split", f"split {split!r}, expected one of {', '.join(SPLITS)}")
    if split not in rules.splits:
        return Verdict("split_not_selected", f"split {split}", stage="filter")
    label = row.get("label")
    if label is not None and label not in rules.labels:
        return Verdict("unknown_label", f"label {label!r} is not one of the teacher's "
                                        f"{len(rules.labels)} labels")
    if rules.needs_note and not (row.get("note") or "").strip():
        return Verdict("empty_note", "no note text")
    if rules.needs_image and not row.get("image_uri"):
        return Verdict("missing_image", "no image_uri")
    return None


def image_limits(rules: Rules) -> ImageLimits:
    return ImageLimits(max_bytes=rules.max_image_bytes, max_pixels=rules.max_image_pixels)


def check_image_size(num_bytes: int, rules: Rules) -> Verdict | None:
    """The byte limit, checked from the file's size before it is read."""
    try:
        check_size(num_bytes, image_limits(rules))
    except ImageRejected as err:
        return Verdict(err.reason, err.detail)
    return None


def decode_checked(data: bytes, rules: Rules) -> tuple[np.ndarray | None, Verdict | None]:
    """Image bytes -> (HxWx3 uint8 RGB, None), or (None, why not), by :mod:`mint_ray.images`
    (header first: the pixel limit holds before any memory is spent on pixels)."""
    try:
        return decode_rgb(data, image_limits(rules)), None
    except ImageRejected as err:
        return None, Verdict(err.reason, err.detail)
