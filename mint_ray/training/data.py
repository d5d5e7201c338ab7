"""Reading the preference rows a training run may use."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mint_ray import storage
from mint_ray.training.config import DataConfig


def training_rows(data: DataConfig, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows of ``data.uri`` in ``data.splits`` (all rows when the table has no split column).

    The preference stage keeps every split in one table; evaluation reads the test
    split of the same table, so training must never see it.
    """
    schema = storage.read_dataset_schema(data.uri)
    wanted = None if columns is None else sorted({*columns, "split"} & set(schema.names))
    table = storage.read_dataset(data.uri, columns=wanted)
    if "split" in table.column_names:
        table = table.filter(pc.is_in(table["split"], value_set=pa.array(data.splits, pa.string())))
    return table.to_pylist()

