"""Arrow schemas of the preference stage and the pure builders of its tables.

The stream's tables, in operator order: ``READ_SCHEMA`` (coerced cohort rows), a
prepared table (:func:`prepared_table`: the rows, their verdicts and the teacher's
prepared inputs as ``input.<name>`` tensor columns), ``SCORED_SCHEMA`` (rows with the
teacher's scores), the union of pair rows and set-aside rows (:func:`union_schema`), and
the two outputs: :func:`pair_schema` (TRL's conversational preference columns) and
``QUARANTINE_SCHEMA``. No Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mint_ray.preferences import validate
from mint_ray.preferences.validate import Verdict
from mint_ray.tasks import Task

INPUT_FIELDS = ("sample_id", "task", "split", "note", "image_uri", "label")
TEXT = pa.string()
# Where a row comes from: its file and its position there (an identity that needs no
# sample_id, for rows whose sample_id is unreadable).
SOURCE_FIELDS = [("source_file", TEXT), ("source_row", pa.int64())]
READ_SCHEMA = pa.schema([*((name, TEXT) for name in INPUT_FIELDS), *SOURCE_FIELDS,
                         ("invalid_utf8", TEXT), ("type_error", TEXT), ("duplicate", pa.bool_())])
VERDICT_FIELDS = [("stage", TEXT), ("reason", TEXT), ("detail", TEXT)]
ROW_FIELDS = [("sample_id", TEXT), ("split", TEXT), ("note", TEXT), ("image_uri", TEXT), ("label", TEXT),
              *SOURCE_FIELDS]
ROW_NAMES = tuple(name for name, _ in ROW_FIELDS)
VERDICT_NAMES = tuple(name for name, _ in VERDICT_FIELDS)
# A prepared table holds ROW_FIELDS, VERDICT_FIELDS and one column per prepared input array.
INPUT_PREFIX = "input."
SCORED_SCHEMA = pa.schema([*ROW_FIELDS, *VERDICT_FIELDS, ("scores", pa.list_(pa.float32())),
                           ("teacher_name", TEXT), ("teacher_version", TEXT), ("scored_at", pa.float64())])
QUARANTINE_SCHEMA = pa.schema([("sample_id", TEXT), ("split", TEXT), ("label", TEXT),
                               ("image_uri", TEXT), *VERDICT_FIELDS, *SOURCE_FIELDS])


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
    return pa.schema([*pairs, *VERDICT_FIELDS, *SOURCE_FIELDS, ("kind", TEXT), ("case_paired", pa.bool_()),
                      ("dropped_pairs", pa.int32()), ("scored_at", pa.float64())])


def _is_text(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_null(dtype)


def coerce_chunk(batch: pa.RecordBatch | pa.Table) -> tuple[pa.Table, list[str | None], list[str | None]]:
    """The contract's columns as strings; per row the text columns that are not UTF-8, and
    the fields of a wrong type (each None where there are none).

    A column of another type (``label`` as int64) becomes nulls, and so does a value that
    is not UTF-8 (Parquet writers do not check): only the rows that had such a value are
    marked. An absent column is all nulls. ``meta`` is checked for UTF-8 but not returned.
    """
    n = batch.num_rows
    columns: list[pa.Array] = []
    bad_text: list[list[str]] = [[] for _ in range(n)]
    errors: list[list[str]] = [[] for _ in range(n)]
    names = batch.schema.names
    for name in (*INPUT_FIELDS, *(f for f in validate.TEXT_COLUMNS if f not in INPUT_FIELDS)):
        if name not in names:
            columns.append(pa.nulls(n, TEXT))
            continue
        column = batch.column(names.index(name))
        if _is_text(column.type):
            text, invalid = valid_utf8(pc.cast(column, TEXT))
            columns.append(text)
            for i in invalid:
                bad_text[i].append(name)
            continue
        columns.append(pa.nulls(n, TEXT))
        if name in INPUT_FIELDS:
            for i in np.flatnonzero(np.asarray(column.is_valid())):
                errors[int(i)].append(f"{name}: {column.type}")
    table = pa.Table.from_arrays(columns[:len(INPUT_FIELDS)], names=list(INPUT_FIELDS))
    return table, [", ".join(e) if e else None for e in bad_text], ["; ".join(e) if e else None for e in errors]


def valid_utf8(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, list[int]]:
    """A string column with its values that are not UTF-8 made null, and their positions.

    Arrow checks the whole column at once; only a column that fails is looked at value by
    value (Python's decoder is what ``to_pylist`` uses, so it has the last word)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    try:
        column.validate(full=True)
        return column, []
    except pa.ArrowInvalid:
        pass
    invalid = []
    for i, raw in enumerate(column.view(pa.binary()).to_pylist()):
        if raw is None:
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            invalid.append(i)
    mask = np.zeros(len(column), dtype=bool)
    mask[invalid] = True
    return pc.if_else(pa.array(mask), pa.nulls(len(column), pa.binary()), column.view(pa.binary())).view(TEXT), invalid


def tensor_column(array: np.ndarray) -> pa.Array:
    """An array's rows as one column, without copying a C-contiguous array: a fixed-shape
    tensor column (Arrow's canonical extension type), or a plain one for one value a row."""
    if array.ndim == 1:
        return pa.array(array)
    if array.dtype == np.bool_:
        raise TypeError("Arrow tensors hold no booleans: prepare masks as uint8")
    array = np.ascontiguousarray(array)
    row = array.shape[1:]
    values = pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), int(np.prod(row)))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.from_numpy_dtype(array.dtype), list(row)),
                                          values)


def column_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A :func:`tensor_column` back as one array: a read-only view of a single chunk's
    buffer (several chunks are joined first)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if isinstance(column.type, pa.FixedShapeTensorType):
        return column.to_numpy_ndarray()
    return column.to_numpy(zero_copy_only=False)


def prepared_table(rows: pa.Table, verdicts: Sequence[Verdict | None], inputs: Mapping[str, np.ndarray]) -> pa.Table:
    """A teacher batch after the CPU stage: the row fields, each row's verdict (None: usable)
    and the teacher's prepared arrays (one row per table row) as ``input.<name>`` columns."""
    return pa.table({
        **{name: rows.column(name) for name in ROW_NAMES},
        **{name: pa.array([getattr(v, name) if v else None for v in verdicts], TEXT) for name in VERDICT_NAMES},
        **{INPUT_PREFIX + name: tensor_column(array) for name, array in inputs.items()},
    })


def input_names(table: pa.Table) -> list[str]:
    return [name for name in table.column_names if name.startswith(INPUT_PREFIX)]


def input_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """The teacher's prepared arrays from a prepared table (views where one chunk)."""
    return {name[len(INPUT_PREFIX):]: column_array(table.column(name)) for name in input_names(table)}


def input_bytes(table: pa.Table) -> int:
    """Bytes of the prepared inputs in a table (what ``block_bytes`` bounds)."""
    return sum(table.column(name).nbytes for name in input_names(table))


def row_bytes(inputs: Mapping[str, np.ndarray]) -> int:
    """Bytes of one row of prepared arrays (from any call's arrays, an empty one included)."""
    return sum(int(np.prod(array.shape[1:])) * array.dtype.itemsize for array in inputs.values())
