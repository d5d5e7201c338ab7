"""Evaluation: scoring of generations (``mint_ray.metrics``) and the comparison report."""

from mint_ray.evaluation.report import (
    Report,
    ScoredRecord,
    bar_chart_png,
    generations_jsonl,
    metrics_markdown,
    metrics_table,
    per_label_table,
    render_report,
    score_records,
    summarise_arms,
    summary_dict,
    to_csv,
    to_markdown,
    write_report,
)

__all__ = [
    "Report",
    "ScoredRecord",
    "bar_chart_png",
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
    "write_report",
]
