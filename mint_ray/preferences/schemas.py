"""Arrow schemas of the preference stage and the pure builders of its tables.

The stream's tables, in operator order: ``READ_SCHEMA`` (coerced cohort rows),
``PREPARED_SCHEMA`` (rows with their decoded pixels and verdicts), ``SCORED_SCHEMA``
(rows with the teacher's scores), the union of pair rows and set-aside rows
(:func:`union_schema`), and the two outputs: :func:`pair_schema` (TRL's
conversational preference columns) and ``QUARANTINE_SCHEMA``. No Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mint_ray.tasks import Task

INPUT_FIELDS = ("sample_id", "task", "split", "note", "image_uri", "label")
TEXT = pa.string()
READ_SCHEMA = pa.schema([*((name, TEXT) for name in INPUT_FIELDS),
                         ("type_error", TEXT), ("duplicate", pa.bool_())])
VERDICT_FIELDS = [("stage", TEXT), ("reason", TEXT), ("detail", TEXT)]
ROW_FIELDS = [("sample_id", TEXT), ("split", TEXT), ("note", TEXT), ("image_uri", TEXT), ("label", TEXT)]
PREPARED_SCHEMA = pa.schema([*ROW_FIELDS, ("pixels", pa.large_binary()), ("height", pa.int32()),
                             ("width", pa.int32()), *VERDICT_FIELDS])
SCORED_SCHEMA = pa.schema([*ROW_FIELDS, *VERDICT_FIELDS, ("scores", pa.list_(pa.float32())),
                           ("teacher_name", TEXT), ("teacher_version", TEXT), ("scored_at", pa.float64())])
QUARANTINE_SCHEMA = pa.schema([("sample_id", TEXT), ("split", TEXT), ("label", TEXT),
                               ("image_uri", TEXT), *VERDICT_FIELDS])


def messages_type(task: Task) -> pa.DataType:
    """Arrow type of a message list; image tasks use TRL's multimodal content parts."""
    content = (pa.list_(pa.struct([("type", TEXT), ("text", TEXT)])) if task.modality == "image"
               else TEXT)
    return pa.list_(pa.struct([("role", TEXT), ("content", content)]))


def pair_schema(task: Task) -> pa.Schema:
    """The preference rows: TRL's conversational columns, then provenance."""
    messages = messages_type(task)
    return pa.schema([
        ("sample_id", TEXT), ("split", TEXT), ("pair_index", pa.int32()),
        ("prompt", messages), ("chosen", messages), ("rejected", messages),
        ("label", TEXT), ("image_uri", TEXT),
        ("teacher_ranking", pa.list_(TEXT)), ("teacher_scores", pa.list_(pa.float32())),
        ("teacher_top", pa.list_(TEXT)), ("teacher_bottom", pa.list_(TEXT)),
        ("truth_rank", pa.int32()), ("truth_forced", pa.bool_()), ("margin", pa.float64()),
        ("teacher_name", TEXT), ("teacher_version", TEXT),
    ])


def union_schema(pairs: pa.Schema) -> pa.Schema:
    """What the pair operator emits: pair rows and set-aside rows in one stream.

    ``kind`` tells them apart; ``case_paired`` marks a case's first kept pair,
    ``dropped_pairs`` counts its pairs under the margin and ``scored_at`` says when the
    teacher finished its batch (for the run's counts and its steady rate).
    """
    return pa.schema([*pairs, *VERDICT_FIELDS, ("kind", TEXT), ("case_paired", pa.bool_()),
                      ("dropped_pairs", pa.int32()), ("scored_at", pa.float64())])


def _is_text(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_null(dtype)


def coerce_chunk(batch: pa.RecordBatch | pa.Table) -> tuple[pa.Table, list[str | None]]:
    """The contract's columns as strings, and per row the fields of a wrong type (or None).

    A column of another type (``label`` as int64) becomes nulls; the rows that had
    a value there are marked. An absent column is all nulls.
    """
    n = batch.num_rows
    columns: list[pa.Array] = []
    errors: list[list[str]] = [[] for _ in range(n)]
    names = batch.schema.names
    for name in INPUT_FIELDS:
        if name not in names:
            columns.append(pa.nulls(n, TEXT))
            continue
        column = batch.column(names.index(name))
        if _is_text(column.type):
            columns.append(pc.cast(column, TEXT))
            continue
        columns.append(pa.nulls(n, TEXT))
        for i in np.flatnonzero(np.asarray(column.is_valid())):
            errors[int(i)].append(f"{name}: {column.type}")
    table = pa.Table.from_arrays(columns, names=list(INPUT_FIELDS))
    return table, ["; ".join(e) if e else None for e in errors]


def pixel_column(images: Sequence[np.ndarray | None]) -> pa.Array:
    """Decoded images as one binary column, copied once into a single buffer (nulls where none)."""
    present = [image is not None for image in images]
    sizes = np.array([0 if image is None else image.nbytes for image in images], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    data = np.concatenate([image.reshape(-1) for image in images if image is not None]) if any(present) \
        else np.zeros(0, np.uint8)
    validity = pa.array(present, pa.bool_()).buffers()[1]
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(images),
                                            [validity, pa.py_buffer(offsets), pa.py_buffer(data)],
                                            null_count=present.count(False))


def image_views(column: pa.ChunkedArray | pa.Array, heights: list[int | None],
                widths: list[int | None]) -> list[np.ndarray | None]:
    """HxWx3 views into the pixel column's buffers (no copy)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    views: list[np.ndarray | None] = []
    for chunk in chunks:
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
        valid = np.asarray(chunk.is_valid())
        for j in range(len(chunk)):
            i = len(views)
            views.append(data[offsets[j]:offsets[j + 1]].reshape(heights[i], widths[i], 3) if valid[j] else None)
    return views
