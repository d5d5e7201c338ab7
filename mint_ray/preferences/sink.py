"""The preference stage's Ray Data sink: pair rows and set-aside rows into two version folders."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa
from ray.data import Datasink
from ray.data.block import BlockAccessor

from mint_ray import storage
from mint_ray.preferences.accounting import Totals, empty_part, part_counts, split_union
from mint_ray.preferences.schemas import QUARANTINE_SCHEMA


class PreferenceSink(Datasink[dict[str, Any]]):
    """Writes each write task's rows as one pairs file and one quarantine file.

    File names come from the task index, so a retried task overwrites its own
    files instead of adding a second copy. ``min_rows_per_write`` makes files of
    about ``rows_per_file`` rows. Counts come back to the driver's instance.
    """

    def __init__(self, pairs_version: str, quarantine_version: str, schema: pa.Schema,
                 rows_per_file: int) -> None:
        self.pairs_version = pairs_version
        self.quarantine_version = quarantine_version
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.totals = Totals()

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return empty_part()
        table = pa.concat_tables(tables)
        name = f"part-{ctx.task_idx:05d}.parquet"
        pairs, rest = split_union(table)
        if pairs.num_rows:
            storage.write_table(self.pairs_version, pairs.select(self.schema.names).cast(self.schema), name)
        if rest.num_rows:
            storage.write_table(self.quarantine_version,
                                rest.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA), name)
        return part_counts(pairs, rest)

    def on_write_complete(self, write_result: Any) -> None:
        for part in write_result.write_returns:
            self.totals.add(part)
