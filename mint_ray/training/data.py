"""Reading the preference rows a training run may use, and the answer it is taught.

``data.splits`` picks the rows (the preference stage keeps every split in one
table; evaluation reads the test split of the same table, so training must
never see it). ``data.filter`` and ``data.target`` then shape the rows:

- ``filter: with_ground_truth`` keeps the rows whose case has a label (the
  labelled cases L of a scarce-labels experiment);
- ``target: ground_truth`` replaces ``chosen`` with the case's label in the
  task's own answer format (``ground_truth_answer``): SFT on the truth instead
  of on the teacher's list. A row without a label cannot be taught its truth.

Rows left out are counted with their reason (``Selection``) and said in the log,
never dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mint_ray import storage
from mint_ray.errors import MintError
from mint_ray.tasks import Task, get_task
from mint_ray.training.config import DataConfig

log = logging.getLogger(__name__)

# Why a row of the selected splits is not trained on.
LEFT_OUT_REASONS = (
    "filtered_no_ground_truth",  # data.filter=with_ground_truth and the case has no label
    "no_ground_truth",           # data.target=ground_truth and the case has no label
)


def has_ground_truth(label: Any) -> bool:
    """Whether a row's ``label`` names its case's truth (null or blank: an unlabelled case)."""
    return isinstance(label, str) and bool(label.strip())


def ground_truth_labels(label: str) -> list[str]:
    """The answer list that teaches ``label``: the truth only, its first ``;``-separated name.

    The task's format asks for a numbered list of ``n_answers`` items, but a case has
    one truth. Filling the other places would need labels from somewhere: the
    teacher's list would make this arm SFT on the teacher again, and made-up or
    random labels would teach confident wrong answers. So the list holds the truth
    alone (the format's header and numbering are kept, and the evaluator's parser
    reads a one-item list); expect this arm's top-k to stay close to its top-1.
    Synonyms all match in scoring, so the first is enough to name the truth.
    """
    names = [part.strip() for part in label.split(";") if part.strip()]
    if not names:
        raise ValueError(f"label {label!r} names no truth")
    return names[:1]


def ground_truth_answer(task: Task, label: str) -> list[dict[str, Any]]:
    """The assistant message teaching ``label``, written by the task's own formatter."""
    return task.answer_message(ground_truth_labels(label))


@dataclass(frozen=True)
class Selection:
    """The rows a run trains on, and how many rows of its splits were left out and why."""

    rows: list[dict[str, Any]]
    in_splits: int
    left_out: dict[str, int] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, int]:
        """Flat counts for a summary or MLflow: every reason present, zero when unused."""
        return {"rows_in_splits": self.in_splits, "rows_selected": len(self.rows),
                **{f"left_out_{r}": self.left_out.get(r, 0) for r in LEFT_OUT_REASONS}}

    def summary(self) -> str:
        left = ", ".join(f"{r} {n}" for r, n in sorted(self.left_out.items())) or "none"
        return f"{self.in_splits} rows in the splits -> {len(self.rows)} selected; left out: {left}"


def select_rows(rows: Iterable[Mapping[str, Any]], data: DataConfig, task: Task | None = None) -> Selection:
    """Apply ``data.filter`` and ``data.target`` to rows already restricted to ``data.splits``.

    With ``target: ground_truth`` and a ``task``, each kept row's ``chosen`` becomes
    ``ground_truth_answer(task, label)``; without a task (a caller that reads no
    answers) the rows are only selected.
    """
    kept: list[dict[str, Any]] = []
    left_out: dict[str, int] = {}
    n = 0
    for row in rows:
        n += 1
        labelled = has_ground_truth(row.get("label"))
        reason = ("filtered_no_ground_truth" if data.filter == "with_ground_truth" and not labelled
                  else "no_ground_truth" if data.target == "ground_truth" and not labelled else None)
        if reason:
            left_out[reason] = left_out.get(reason, 0) + 1
            continue
        out = dict(row)
        if data.target == "ground_truth" and task is not None:
            out["chosen"] = ground_truth_answer(task, row["label"])
        kept.append(out)
    return Selection(kept, n, left_out)


def _task_of(uri: str) -> Task:
    """The task a preference dataset was written for (its manifest's ``task``)."""
    name = storage.require_manifest(uri).meta.get("task")
    if not name:
        raise MintError(f"data.target=ground_truth writes the label in the task's answer format, but "
                        f"{uri}'s manifest names no task: rebuild it with `mint-ray preferences`")
    return get_task(name)


def read_selection(data: DataConfig, columns: list[str] | None = None) -> Selection:
    """The rows of ``data.uri`` in ``data.splits`` (all rows when the table has no split
    column), filtered and targeted as ``data`` says; ``columns`` limits what is read
    (``split``, and ``label`` when the selection needs it, are always read)."""
    schema = storage.read_dataset_schema(data.uri)
    needs_label = data.filter != "all" or data.target != "chosen"
    if needs_label and "label" not in schema.names:
        raise MintError(f"data.filter={data.filter}, data.target={data.target} need the cases' labels, but "
                        f"{data.uri} has no label column")
    extra = {"split", "label"} if needs_label else {"split"}
    wanted = None if columns is None else sorted({*columns, *extra} & set(schema.names))
    table = storage.read_dataset(data.uri, columns=wanted)
    if "split" in table.column_names:
        table = table.filter(pc.is_in(table["split"], value_set=pa.array(data.splits, pa.string())))
    answers = data.target == "ground_truth" and (columns is None or "chosen" in columns)
    return select_rows(table.to_pylist(), data, _task_of(data.uri) if answers else None)


def training_rows(data: DataConfig, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows a run trains on (``read_selection``); rows left out are said in the log."""
    selection = read_selection(data, columns)
    if selection.left_out:
        log.warning("[data] %s: %s", data.uri, selection.summary())
    return selection.rows
