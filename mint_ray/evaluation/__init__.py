"""Evaluation: scoring of generations (``mint_ray.metrics``) and the comparison report."""

from mint_ray.evaluation.report import Report, bar_chart_png, render_report, write_report
from mint_ray.evaluation.tables import (
    ScoredRecord,
    generations_jsonl,
    metrics_markdown,
    metrics_table,
    per_label_table,
    score_records,
    summarise_arms,
    summary_dict,
    to_csv,
    to_markdown,
)
from mint_ray.evaluation.training_report import ArmTraining, budget_marks, training_table

__all__ = [
    "ArmTraining",
    "Report",
    "ScoredRecord",
    "bar_chart_png",
    "budget_marks",
    "generations_jsonl",
    "metrics_markdown",
    "metrics_table",
    "per_label_table",
    "render_report",
    "score_records",
    "summarise_arms",
    "summary_dict",
    "to_csv",
    "to_markdown",
    "training_table",
    "write_report",
]
