"""Scored records and the per-arm tables of a report: each generation parsed and scored,
the metrics and per-label tables, and their CSV and Markdown forms. Pure.

Input: one record per generation, a mapping with ``arm``, ``sample_id``, ``label`` and
``generation`` (and, for CAR, ``teacher_top`` / ``teacher_bottom``); ``report`` assembles
the files from these tables.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from mint_ray.errors import MintError
from mint_ray.metrics import (
    THRESHOLD,
    ArmSummary,
    CaseScore,
    aggregate,
    k_values,
    score_case,
    summarise_arm,
)
from mint_ray.tasks.base import Task

REQUIRED_FIELDS = ("arm", "sample_id", "label", "generation")
# Column order of the tables; metrics absent from every arm are left out.
METRIC_ORDER = ("top1", "top5", "top10", "mrr", "car", "coverage", "avoidance", "parseable")


@dataclass(frozen=True)
class ScoredRecord:
    """A generation with its parsed items and its score."""

    arm: str
    sample_id: str
    label: str
    generation: str
    items: list[str]
    score: CaseScore


def _teacher_list(record: Mapping[str, Any], key: str) -> list[str] | None:
    value = record.get(key)
    return None if value is None else [str(v) for v in value]


def score_records(task: Task, records: Iterable[Mapping[str, Any]],
                  threshold: float = THRESHOLD) -> list[ScoredRecord]:
    """Parse and score every record; bad records are a ``MintError`` naming the field."""
    scored: list[ScoredRecord] = []
    seen: set[tuple[str, str]] = set()
    for i, record in enumerate(records):
        missing = [f for f in REQUIRED_FIELDS if f not in record]
        if missing:
            raise MintError(f"record {i} lacks {', '.join(missing)}: every record needs "
                            f"{', '.join(REQUIRED_FIELDS)} (teacher_top/teacher_bottom for CAR)")
        arm, sample_id, label = str(record["arm"]), str(record["sample_id"]), str(record["label"])
        if not label.strip():
            raise MintError(f"record {i} (arm {arm!r}, sample {sample_id!r}) has an empty "
                            "label: give the true name (synonyms separated by ';')")
        if (arm, sample_id) in seen:
            raise MintError(f"arm {arm!r} has sample {sample_id!r} twice: give one generation "
                            "per arm and sample_id")
        seen.add((arm, sample_id))
        # A failed generation (None) is kept as an empty answer: a miss, not a gap.
        generation = record["generation"] or ""
        score = score_case(task, generation, label, _teacher_list(record, "teacher_top"),
                           _teacher_list(record, "teacher_bottom"), threshold)
        items = task.parse_answer(generation).items
        scored.append(ScoredRecord(arm, sample_id, label, generation, items, score))
    return scored


def _by_arm(scored: Sequence[ScoredRecord]) -> dict[str, list[ScoredRecord]]:
    """Records grouped by arm, arms in first-seen order (the order the caller chose)."""
    groups: dict[str, list[ScoredRecord]] = {}
    for record in scored:
        groups.setdefault(record.arm, []).append(record)
    return groups


def summarise_arms(task: Task, scored: Sequence[ScoredRecord], n_resamples: int = 1000,
                   seed: int = 0, alpha: float = 0.05) -> list[ArmSummary]:
    """One ``ArmSummary`` (metrics with bootstrap intervals) per arm, in first-seen order."""
    return [summarise_arm(task, [r.score for r in records], arm, n_resamples, seed, alpha)
            for arm, records in _by_arm(scored).items()]


def _metric_names(present: Iterable[str]) -> list[str]:
    present = set(present)
    return [m for m in METRIC_ORDER if m in present]


def metrics_table(summaries: Sequence[ArmSummary]) -> pa.Table:
    """One row per arm: ``arm, n, n_parseable, n_unparseable`` then each metric with its CI."""
    names = _metric_names(m for s in summaries for m in s.metrics)
    columns: dict[str, list[Any]] = {
        "arm": [s.arm for s in summaries], "n": [s.n for s in summaries],
        "n_parseable": [s.n_parseable for s in summaries],
        "n_unparseable": [s.n_unparseable for s in summaries]}
    for name in names:
        for suffix, attr in (("", "value"), ("_ci_low", "low"), ("_ci_high", "high")):
            columns[name + suffix] = [getattr(s.metrics[name], attr) if name in s.metrics
                                      else None for s in summaries]
    return pa.table(columns)


def per_label_table(task: Task, scored: Sequence[ScoredRecord]) -> pa.Table:
    """One row per (label, arm): counts and the mean of every metric (no intervals: n is tiny)."""
    arms = list(_by_arm(scored))
    groups: dict[tuple[str, str], list[CaseScore]] = {}
    for r in scored:
        groups.setdefault((r.label, r.arm), []).append(r.score)
    keys = sorted(groups, key=lambda key: (key[0].lower(), arms.index(key[1])))
    means = [aggregate(groups[key], k_values(task)) for key in keys]
    columns: dict[str, list[Any]] = {
        "label": [label for label, _ in keys], "arm": [arm for _, arm in keys],
        "n": [len(groups[key]) for key in keys],
        "n_parseable": [sum(s.parseable for s in groups[key]) for key in keys]}
    for name in _metric_names(m for row in means for m in row):
        columns[name] = [row.get(name) for row in means]
    return pa.table(columns)


def to_csv(table: pa.Table) -> str:
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    return buffer.getvalue().decode()


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_markdown(table: pa.Table, digits: int = 3) -> str:
    """Any table as a GitHub Markdown table; floats rounded, nulls shown as n/a."""
    return _markdown(table.column_names,
                     ([_cell(v, digits) for v in row.values()] for row in table.to_pylist()))


def headline_metrics(task: Task) -> list[str]:
    """The metrics a comparison is read by: top-1, the task's top-k, MRR."""
    return [*(f"top{k}" for k in k_values(task)), "mrr"]


def metrics_markdown(summaries: Sequence[ArmSummary], digits: int = 3, metrics: Sequence[str] | None = None) -> str:
    """The metrics table with each cell as ``value [low, high]``: every metric, or ``metrics``."""
    names = list(metrics) if metrics is not None else _metric_names(m for s in summaries for m in s.metrics)

    def cell(summary: ArmSummary, name: str) -> str:
        est = summary.metrics.get(name)
        if est is None:
            return "n/a"
        return f"{est.value:.{digits}f} [{est.low:.{digits}f}, {est.high:.{digits}f}]"

    return _markdown(["arm", "n", "unparseable", *names],
                     ([_cell(s.arm, digits), str(s.n), str(s.n_unparseable),
                       *(cell(s, name) for name in names)] for s in summaries))


def generations_jsonl(scored: Sequence[ScoredRecord]) -> str:
    """Every raw generation with its parse and score, one JSON object a line."""
    lines = []
    for r in scored:
        s = r.score
        lines.append(json.dumps({
            "arm": r.arm, "sample_id": r.sample_id, "label": r.label,
            "generation": r.generation, "items": r.items, "parseable": s.parseable,
            "rank": s.rank, "n_items": s.n_items, "car": s.car, "coverage": s.c,
            "avoidance": s.a}, ensure_ascii=False))
    return "\n".join(lines) + "\n" if lines else ""


def summary_dict(summaries: Sequence[ArmSummary]) -> dict[str, dict[str, float | int | str]]:
    """``{arm: ArmSummary.as_dict()}``: JSON-able, for a stage's summary or MLflow metrics."""
    return {s.arm: s.as_dict() for s in summaries}
