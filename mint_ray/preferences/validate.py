"""Row validation: is a cohort row usable, and if not, the one reason why.

Pure functions (no Ray, no storage): the pipeline reads the row and the image
bytes, these decide. Each unusable row gets exactly one reason, checked in the
order below, so counts per reason add up to the rows set aside.

Quarantined (bad input, stage ``validate``; ``teacher_error`` at stage ``teacher``):

- ``invalid_utf8``    a text column holds bytes that are not UTF-8 (Parquet writers do not
                      check): the detail names the column(s), never the bytes; such a
                      value is read as null, so a row whose ``sample_id`` is not UTF-8 is
                      known in the quarantine by ``source_file`` and ``source_row``
- ``wrong_type``      a field of the wrong type (e.g. ``label`` stored as int64) or an
                      empty ``sample_id``
- ``duplicate_id``    a ``sample_id`` seen earlier in the cohort (the first one is kept)
- ``wrong_task``      the row belongs to another task
- ``unknown_split``   ``split`` is not train / validation / test
- ``unknown_label``   a ground truth the teacher does not score
- ``empty_note``      a text task (or a teacher that needs the note) without a note
- ``note_too_long``   a note over ``max_note_chars`` (default: the task's limit,
                      :data:`mint_ray.tasks.MAX_NOTE_CHARS`, the one the server refuses
                      over). Quarantined in every task, never cut: a shortened note is a
                      different clinical question, and the contract's notes are ones a
                      student could be asked with
- ``missing_image``   no ``image_uri`` where one is required, or no file at it
- ``invalid_image_uri`` an ``image_uri`` no store can read: a NUL, a scheme other than a
                      path, ``file://`` or ``s3://``
- ``image_outside_cohort`` the URI, resolved against the cohort's folder (relative URIs are
                      allowed), leaves the image root (default: the cohort's folder):
                      ``..``, another absolute path, another bucket or prefix, or a
                      symlink leading out
- ``unreadable_image`` not a regular file (a folder, FIFO, device, socket), a symlink loop,
                      a name too long, no permission, a failing read of that object
- ``image_read_timeout`` the read took longer than ``image_read_timeout_s``
- ``image_too_large`` the file is over ``max_image_bytes`` (checked before reading it)
- ``unsupported_image_format`` not PNG or JPEG (the one allow-list, :mod:`mint_ray.images`)
- ``too_many_pixels`` width x height over ``max_image_pixels`` (read from the header,
                      before decoding, so a decompression bomb is never expanded)
- ``truncated_image`` the file ends early
- ``corrupt_image``   not a decodable image
- ``image_too_small`` a side shorter than the teacher's ``min_image_side`` (its CPU side
                      says: fewer pixels than its model has patches or cells a side)
- ``extreme_aspect_ratio`` long side / short side over the teacher's ``max_image_aspect``
                      (a CLIP processor scales the short side up and crops the centre)
- ``teacher_error``   the teacher failed on this row alone, or gave non-finite scores

Filtered (usable, left out by an option, stage ``filter``):

- ``split_not_selected`` the row's split is not in the configured ``splits``
- ``low_margin``         every pair of the case is below ``pairs.min_margin``

Details quote at most :data:`SHOWN_CHARS` characters of a value, and never the note.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mint_ray.images import ImageLimits, ImageRejected, check_size, decode_rgb
from mint_ray.tasks import MAX_NOTE_CHARS

SPLITS = ("train", "validation", "test")

QUARANTINE_REASONS = (
    "invalid_utf8", "wrong_type", "duplicate_id", "wrong_task", "unknown_split", "unknown_label", "empty_note",
    "note_too_long", "missing_image", "invalid_image_uri", "image_outside_cohort", "unreadable_image",
    "image_read_timeout", "image_too_large", "unsupported_image_format", "too_many_pixels", "truncated_image",
    "corrupt_image", "image_too_small", "extreme_aspect_ratio", "teacher_error",
)
FILTER_REASONS = ("split_not_selected", "low_margin")
# The cohort's text columns, checked for UTF-8 by the reader (``meta`` too, though unused).
TEXT_COLUMNS = ("sample_id", "task", "split", "note", "image_uri", "label", "meta")
# How much of a value (a task, split or label name) a detail may quote.
SHOWN_CHARS = 60


def shown(value: object) -> str:
    """A value for a detail: its repr, cut to :data:`SHOWN_CHARS` characters."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS - 3]}... ({len(str(value))} chars)"


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
    max_note_chars: int = MAX_NOTE_CHARS
    min_image_side: int = 1
    max_image_aspect: float | None = None


def check_row(row: Mapping[str, Any], rules: Rules) -> Verdict | None:
    """Checks that need no image bytes; None when the row may go on to the image checks.

    ``row`` holds the cohort fields plus ``invalid_utf8``, ``type_error`` and ``duplicate``
    (set by the reader, which sees the raw bytes, column types and every id).
    """
    if row.get("invalid_utf8"):
        return Verdict("invalid_utf8", f"not UTF-8: {row['invalid_utf8']}")
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
        return Verdict("wrong_task", f"task {shown(row.get('task'))}, expected {rules.task!r}")
    split = row.get("split")
    if split not in SPLITS:
        return Verdict("unknown_split", f"split {shown(split)}, expected one of {', '.join(SPLITS)}")
    if split not in rules.splits:
        return Verdict("split_not_selected", f"split {split}", stage="filter")
    label = row.get("label")
    if label is not None and label not in rules.labels:
        return Verdict("unknown_label", f"label {shown(label)} is not one of the teacher's "
                                        f"{len(rules.labels)} labels")
    if rules.needs_note and not (row.get("note") or "").strip():
        return Verdict("empty_note", "no note text")
    note_chars = len(row.get("note") or "")
    if note_chars > rules.max_note_chars:
        return Verdict("note_too_long", f"{note_chars} characters > max_note_chars {rules.max_note_chars}")
    if rules.needs_image and not (row.get("image_uri") or "").strip():
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


def check_image_shape(height: int, width: int, rules: Rules) -> Verdict | None:
    """The teacher's own needs of a decoded image: a short side of at least
    ``min_image_side`` and at most ``max_image_aspect`` between the sides."""
    short, long = min(height, width), max(height, width)
    if short < rules.min_image_side:
        return Verdict("image_too_small", f"{width}x{height}: a side under the teacher's minimum "
                                          f"{rules.min_image_side} px")
    if rules.max_image_aspect is not None and long > rules.max_image_aspect * short:
        return Verdict("extreme_aspect_ratio", f"{width}x{height}: sides over {rules.max_image_aspect:g}:1 "
                                               "apart, the teacher's limit")
    return None
