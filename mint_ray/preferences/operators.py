"""The Ray Data operators of the preference stage, in stream order.

1. ``read``     one task streams the ``samples`` table (``storage.iter_file_batches``) and
                coerces every chunk to the contract's types: a column of the wrong
                type becomes nulls plus a ``wrong_type`` mark, a value that is not
                UTF-8 a null plus an ``invalid_utf8`` mark, so files with drifting
                schemas or bad bytes never fail the run. Each row keeps its file and
                position there. One reader sees every ``sample_id``, so it also marks
                repeats (``duplicate_id``).
2. ``prepare``  CPU tasks check each row (``validate.check_row``), resolve its image URI
                against the cohort and read it (:mod:`mint_ray.preferences.fetch`:
                confined, under a deadline, ``io_threads`` threads: S3 GETs are
                latency-bound), decode it (``validate.decode_checked``), check it is an
                image the teacher can use (``validate.check_image_shape``) and run the
                teacher's CPU step on the usable rows (its
                :class:`~mint_ray.teachers.protocol.Preprocessor`, loaded without
                weights: tokenising, resizing, normalising) into fixed-size arrays,
                carried as tensor columns. Pairs name the resolved image URI.
3. ``score``    the teacher in an actor pool (``ActorPoolStrategy(size=num_actors)``,
                ``num_gpus_per_actor`` each; CPU threads when none) runs only the
                model (``score_prepared``) and scores every label.
4. ``pairs``    CPU tasks rank, cut pairs (``pairs.build_pairs``) and write the texts
                with the task's own ``prompt_messages`` / ``answer_message``.
5. ``write``    :class:`~mint_ray.preferences.sink.PreferenceSink` writes pair rows and
                set-aside rows into two version folders and sends counts back to the driver.

Plain functions and one actor class: :mod:`mint_ray.preferences.run` wires them into a
dataset; none of them imports Ray. Teachers are reached through the loader and the
protocol only, never a kind's module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mint_ray import storage
from mint_ray.errors import MintError
from mint_ray.preferences import validate
from mint_ray.preferences.fetch import ImageSource, fetch_images
from mint_ray.preferences.pairs import build_pairs, rank
from mint_ray.preferences.plan import PairPlan, TeacherInfo
from mint_ray.preferences.schemas import (
    ROW_NAMES,
    SCORED_SCHEMA,
    TEXT,
    VERDICT_NAMES,
    coerce_chunk,
    input_arrays,
    input_bytes,
    prepared_table,
)
from mint_ray.teachers.protocol import Case, Preprocessor

# One row's outcome of a batch step: (its result, None) or (None, why it failed alone).
Outcome = tuple[Any, str | None]

# ---------------------------------------------------------------- 1. read


def read_cohort(items: pa.Table, chunk_rows: int) -> Iterator[pa.Table]:
    """Stream the cohort at each item's ``uri`` as coerced chunks (a generator UDF)."""
    for uri in items.column("uri").to_pylist():
        seen: set[str] = set()
        position: dict[str, int] = {}  # rows read so far per file
        for file, batch in storage.iter_file_batches(uri, batch_size=chunk_rows):
            table, bad_text, type_errors = coerce_chunk(batch)
            start = position.get(file, 0)
            position[file] = start + batch.num_rows
            duplicate = []
            for sid in table.column("sample_id").to_pylist():
                duplicate.append(sid in seen)
                if sid:
                    seen.add(sid)
            columns = {"source_file": pa.repeat(pa.scalar(file, TEXT), batch.num_rows),
                       "source_row": pa.array(range(start, start + batch.num_rows), pa.int64()),
                       "invalid_utf8": pa.array(bad_text, TEXT), "type_error": pa.array(type_errors, TEXT),
                       "duplicate": pa.array(duplicate, pa.bool_())}
            for name, column in columns.items():
                table = table.append_column(name, column)
            yield table


# ---------------------------------------------------------------- 2. prepare


def batch_or_each_alone(step: Callable[[list[int]], list[Outcome]], n: int) -> list[Outcome]:
    """``step`` on rows ``0..n-1`` at once, or where that raises, on each row alone, so one
    bad row costs only itself. If every row fails alone too, the step is broken, not the
    rows: the batch's error is raised."""
    if not n:
        return []
    try:
        return step(list(range(n)))
    except Exception as batch_error:
        results: list[Outcome] = []
        for i in range(n):
            try:
                results.extend(step([i]))
            except Exception as err:
                results.append((None, f"{type(err).__name__}: {str(err)[:200]}"))
        if all(error for _, error in results):
            raise batch_error
        return results


def _rows_of(arrays: Mapping[str, np.ndarray], n: int) -> list[Outcome]:
    """Prepared arrays -> one outcome per row (that row of every array)."""
    if any(len(array) != n for array in arrays.values()):
        raise ValueError(f"the teacher prepared {[len(a) for a in arrays.values()]} rows for {n} cases")
    return [({name: array[i] for name, array in arrays.items()}, None) for i in range(n)]


def teacher_inputs(inputs: Preprocessor, cases: list[Case], rows: list[int],
                   n: int) -> tuple[dict[str, np.ndarray], list[str | None]]:
    """The teacher's CPU step for ``cases`` (rows ``rows`` of a batch of ``n``): arrays of
    ``n`` rows (zeros where a row is unusable or its case failed) and each case's error."""
    out = {name: np.zeros((n, *array.shape[1:]), array.dtype) for name, array in inputs.prepare([]).items()}
    outcomes = batch_or_each_alone(lambda idx: _rows_of(inputs.prepare([cases[j] for j in idx]), len(idx)),
                                   len(cases))
    errors: list[str | None] = []
    for i, (row, error) in zip(rows, outcomes, strict=True):
        if row is not None:
            for name, value in row.items():
                out[name][i] = value
        errors.append(error)
    return out, errors


def _prepare_rows(batch: pa.Table, rules: validate.Rules, source: ImageSource, inputs: Preprocessor,
                  io_threads: int) -> pa.Table:
    rows = batch.to_pylist()
    verdicts: list[validate.Verdict | None] = [validate.check_row(row, rules) for row in rows]
    resolved: list[str | None] = [None] * len(rows)
    wanted = []
    for i, row in enumerate(rows):
        if verdicts[i] is None and (row["image_uri"] or "").strip():
            resolved[i], verdicts[i] = source.resolve(row["image_uri"])
            if verdicts[i] is None:
                wanted.append(i)
    images: list[np.ndarray | None] = [None] * len(rows)
    # Threads only fetch; decoding holds the GIL, so it runs here: spread over the threads
    # it cost 3x the CPU in lock contention.
    fetched = fetch_images(source, [resolved[i] for i in wanted], rules, io_threads)  # type: ignore[misc]
    for i, (data, verdict) in zip(wanted, fetched, strict=True):
        images[i], verdicts[i] = validate.decode_checked(data, rules) if data is not None else (None, verdict)
        if images[i] is not None:
            verdicts[i] = validate.check_image_shape(*images[i].shape[:2], rules)  # type: ignore[union-attr]
    usable = [i for i, v in enumerate(verdicts) if v is None]
    cases = [Case(note=rows[i]["note"], image=images[i]) for i in usable]
    arrays, errors = teacher_inputs(inputs, cases, usable, len(rows))
    for i, error in zip(usable, errors, strict=True):
        if error is not None:
            verdicts[i] = validate.Verdict("teacher_error", f"prepare: {error}", stage="teacher")
    # Pairs name the image they were built from (resolved), the quarantine what the cohort
    # says; only usable rows carry their note on (a set-aside row's note is never written).
    usable_mask = pa.array([v is None for v in verdicts])
    uris = [resolved[i] if verdicts[i] is None and resolved[i] else row["image_uri"] for i, row in enumerate(rows)]
    rows_table = batch.set_column(batch.schema.get_field_index("image_uri"), "image_uri", pa.array(uris, TEXT))
    note_index = rows_table.schema.get_field_index("note")
    rows_table = rows_table.set_column(note_index, "note", pc.if_else(usable_mask, rows_table.column("note"),
                                                                      pa.nulls(len(rows), TEXT)))
    return prepared_table(rows_table, verdicts, arrays)


def prepare(batch: pa.Table, rules: validate.Rules, source: ImageSource, inputs: Preprocessor, io_threads: int,
            batch_rows: int, block_bytes: int) -> Iterator[pa.Table]:
    """Check rows, fetch and decode images (threads overlap the fetches) and run the teacher's
    CPU step, a teacher batch at a time; the decoded images are dropped once prepared.
    Yields blocks of whole teacher batches that hold about ``block_bytes`` of prepared
    inputs: large inputs make small blocks, so they never crowd the object store."""
    pending: list[pa.Table] = []
    size = 0
    for start in range(0, batch.num_rows, batch_rows):
        part = _prepare_rows(batch.slice(start, batch_rows), rules, source, inputs, io_threads)
        pending.append(part)
        size += input_bytes(part)
        if size >= block_bytes:
            yield pa.concat_tables(pending)
            pending, size = [], 0
    if pending:
        yield pa.concat_tables(pending)


# ---------------------------------------------------------------- 3. score


class TeacherScorer:
    """A Ray Data actor: loads the teacher once and runs its model on the prepared inputs
    of each batch's usable rows (the CPU tasks prepared them)."""

    def __init__(self, info: TeacherInfo, device: str, threads: int | None) -> None:
        from mint_ray.teachers.loader import load_teacher

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.teacher = load_teacher(info.uri, device, labels=info.load_labels,
                                    prompt_template=info.prompt_template, task=info.task)
        if tuple(self.teacher.labels) != info.labels:
            raise MintError(f"teacher {info.uri} loaded with labels different from its spec: "
                            "re-save the teacher")
        self.uri = info.uri
        self.takes = _row_types(self.teacher.prepare([]))

    def __call__(self, batch: pa.Table) -> pa.Table:
        n, n_labels = batch.num_rows, len(self.teacher.labels)
        usable = np.flatnonzero(np.asarray(batch.column("reason").is_null()))
        inputs = input_arrays(batch)
        if _row_types(inputs) != self.takes:
            raise MintError(f"teacher {self.uri}: the CPU tasks prepared {_row_types(inputs)}, the loaded "
                            f"teacher takes {self.takes}; its folder changed during the run: re-run")
        if len(usable) < n:
            inputs = {name: array[usable] for name, array in inputs.items()}
        values = np.zeros((n, n_labels), np.float32)
        scored = np.zeros(n, bool)
        verdicts = {name: batch.column(name).to_pylist() for name in VERDICT_NAMES}
        for i, (row_scores, error) in zip(usable, self._score(inputs, len(usable)), strict=True):
            if error is None:
                values[i], scored[i] = row_scores, True
            else:
                verdicts["stage"][i], verdicts["reason"][i], verdicts["detail"][i] = "teacher", "teacher_error", error
        scores = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), n_labels, mask=pa.array(~scored))
        return pa.table({
            **{name: batch.column(name) for name in ROW_NAMES},
            **{name: pa.array(v, TEXT) for name, v in verdicts.items()},
            "scores": scores.cast(pa.list_(pa.float32())),
            "teacher_name": pa.repeat(self.teacher.name, n), "teacher_version": pa.repeat(self.teacher.version, n),
            "scored_at": pa.repeat(time.time(), n),
        }, schema=SCORED_SCHEMA)

    def _score(self, inputs: Mapping[str, np.ndarray], n: int) -> list[Outcome]:
        """Scores per row of ``inputs``, or the error of a row that fails alone."""
        def step(rows: list[int]) -> list[Outcome]:
            batch = inputs if len(rows) == n else {name: array[rows] for name, array in inputs.items()}
            return self._rows(self.teacher.score_prepared(batch), len(rows))

        return batch_or_each_alone(step, n)

    def _rows(self, scores: np.ndarray, n: int) -> list[Outcome]:
        values = np.asarray(scores, dtype=np.float32)
        if values.shape != (n, len(self.teacher.labels)):
            raise ValueError(f"teacher returned scores of shape {values.shape}, "
                             f"expected {(n, len(self.teacher.labels))}")
        finite = np.isfinite(values).all(axis=1)
        return [(row, None) if ok else (None, "non-finite scores") for row, ok in zip(values, finite, strict=True)]


def _row_types(inputs: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each prepared array's row shape and dtype: what a teacher's model takes."""
    return {name: (tuple(array.shape[1:]), str(array.dtype)) for name, array in inputs.items()}


# ---------------------------------------------------------------- 4. pairs


def pair_rows(batch: pa.Table, plan: PairPlan) -> pa.Table:
    """Scored rows -> pair rows (TRL conversational) and set-aside rows, one stream."""
    rows: list[dict[str, Any]] = []
    for r in batch.to_pylist():
        if r["reason"] is not None:
            rows.append(_set_aside(r, r["stage"], r["reason"], r["detail"]))
            continue
        ranking = rank(r["scores"], plan.labels)
        kept, dropped = build_pairs(ranking, r["label"], plan.rule)
        if not kept:
            best = max(p.margin for p in dropped)
            rows.append({**_set_aside(r, "filter", "low_margin",
                                      f"best margin {best:.4g} < min_margin {plan.rule.min_margin:g}"),
                         "dropped_pairs": len(dropped)})
            continue
        prompt = plan.prompt(r["note"])
        common = {
            "sample_id": r["sample_id"], "split": r["split"], "label": r["label"],
            "image_uri": r["image_uri"], "prompt": prompt,
            "teacher_ranking": ranking.labels, "teacher_scores": ranking.scores,
            "teacher_top": ranking.top(plan.rule.k), "teacher_bottom": ranking.bottom(plan.rule.q),
            "truth_rank": ranking.rank_of(r["label"]), "teacher_name": r["teacher_name"],
            "teacher_version": r["teacher_version"], "kind": "pair", "scored_at": r["scored_at"],
        }
        for n, pair in enumerate(kept):
            rows.append({**common, "pair_index": pair.pair_index,
                         "chosen": plan.task.answer_message(pair.chosen),
                         "rejected": plan.task.answer_message(pair.rejected),
                         "truth_forced": pair.truth_forced, "margin": pair.margin,
                         "case_paired": n == 0, "dropped_pairs": len(dropped) if n == 0 else 0})
    return pa.Table.from_pylist(rows, schema=plan.union_schema)


def _set_aside(row: dict[str, Any], stage: str, reason: str, detail: str | None) -> dict[str, Any]:
    return {"sample_id": row["sample_id"], "split": row["split"], "label": row["label"],
            "image_uri": row["image_uri"], "stage": stage, "reason": reason, "detail": detail,
            "source_file": row["source_file"], "source_row": row["source_row"],
            "kind": "set_aside", "dropped_pairs": 0, "scored_at": row["scored_at"]}
