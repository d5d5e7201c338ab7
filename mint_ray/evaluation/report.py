"""The comparison report across arms (base, SFT, DPO, ORPO, teacher...): its files rendered and stored.

Input: one record per generation, a mapping with ``arm``, ``sample_id``,
``label`` (the truth, ``;``-separated synonyms allowed), ``generation`` (the
raw text) and, for CAR, ``teacher_top`` / ``teacher_bottom`` (the teacher's
top-5 and bottom-5 lists). Output: the files of one report, rendered in memory
(``render_report``) and then stored by ``write_report`` through ``storage``:

- ``report.md``      the metrics table with intervals, the paired differences, the chart,
  the per-label table (and, from ``compare``, the Confounds and Training sections);
- ``metrics.csv``    one row per arm: every metric with ``_ci_low`` / ``_ci_high``;
- ``per_label.csv``  one row per (label, arm);
- ``accuracy.png``   grouped bars with bootstrap error bars, and a second panel with the
  paired differences against the reference arms;
- ``generations.jsonl`` every raw generation with its parse and score, the
  unparseable ones included;
- ``summary.json``   ``{arm: ArmSummary.as_dict()}``, for a stage's summary / MLflow;
- ``paired_differences.json`` when two or more arms: ``PairedComparison.as_dict()`` per
  (arm, reference) pair;
- ``training.csv``   when the caller gives each arm's training (``ArmTraining``): its
  data, NLL span, steps and tokens, and whether it kept the step budget (also in ``report.md``).

Its parts: ``tables`` (scoring, the metrics and per-label tables), ``paired`` (the paired
differences against the reference arms), ``training_report`` (the Training and Confounds
sections); here the chart and the report's assembly.

Everything except ``write_report`` is pure.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mint_ray import storage
from mint_ray.errors import MintError
from mint_ray.evaluation.paired import (
    PairedComparison,
    paired_comparisons,
    paired_explanation,
    paired_markdown,
    reference_arms,
)
from mint_ray.evaluation.tables import (
    ScoredRecord,
    _by_arm,
    _metric_names,
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
from mint_ray.evaluation.training_report import (
    ArmTraining,
    Confound,
    confounds_markdown,
    training_markdown,
    training_table,
)
from mint_ray.metrics import THRESHOLD, ArmSummary
from mint_ray.tasks.base import Task


def bar_chart_png(summaries: Sequence[ArmSummary], title: str,
                  paired: Sequence[PairedComparison] = ()) -> bytes:
    """Grouped bars (one group per metric, one bar per arm) with the CIs as error bars, and
    with ``paired`` a second panel: each arm's paired difference to its reference with
    its interval, around a zero line.

    Drawn on a bare ``Figure`` with the Agg canvas, so no pyplot global state or
    display is involved. Only metrics every arm has are drawn; MRR, coverage and
    avoidance stay in the tables.
    """
    names = [m for m in _metric_names(m for s in summaries for m in s.metrics)
             if m not in ("mrr", "coverage", "avoidance")
             and all(m in s.metrics for s in summaries)]
    # Wide enough for every bar plus the legend on the right.
    width_bars = 3.0 + len(names) * (0.6 + 0.4 * len(summaries))
    width_paired = 3.5 + len(paired[0].differences) * (0.5 + 0.15 * len(paired)) if paired else 0.0
    fig = Figure(figsize=(width_bars + width_paired, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1) if paired else fig.add_subplot()
    x = np.arange(len(names))
    width = 0.8 / max(1, len(summaries))
    for i, summary in enumerate(summaries):
        est = [summary.metrics[name] for name in names]
        values = np.array([e.value for e in est])
        # Clip at 0: a percentile interval need not contain the point estimate exactly.
        yerr = np.array([[max(0.0, e.value - e.low) for e in est],
                         [max(0.0, e.high - e.value) for e in est]])
        positions = x + (i - (len(summaries) - 1) / 2) * width
        ax.bar(positions, values, width, yerr=yerr, capsize=3,
               label=f"{summary.arm} (n={summary.n})")
        for xi, e in zip(positions, est, strict=True):
            # Above the error bar, so the value stays readable.
            ax.text(xi, max(e.value, e.high) + 0.02, f"{e.value:.2f}", ha="center", fontsize=7)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if paired:
        _paired_panel(fig.add_subplot(1, 2, 2), paired)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def _paired_panel(ax: Any, paired: Sequence[PairedComparison]) -> None:
    """One marker per (arm vs reference) and metric: the mean paired difference, its interval."""
    names = list(paired[0].differences)
    x = np.arange(len(names))
    step = 0.8 / max(1, len(paired))
    for i, comparison in enumerate(paired):
        est = [comparison.differences[name] for name in names]
        values = np.array([e.value for e in est])
        yerr = np.array([[max(0.0, e.value - e.low) for e in est], [max(0.0, e.high - e.value) for e in est]])
        ax.errorbar(x + (i - (len(paired) - 1) / 2) * step, values, yerr=yerr, fmt="o", capsize=3,
                    markersize=4, label=f"{comparison.arm} - {comparison.reference}")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, names)
    ax.set_ylabel("paired difference")
    ax.set_title(f"paired difference, {100 * (1 - paired[0].alpha):g}% CI")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _sample_set_note(scored: Sequence[ScoredRecord]) -> str:
    """A warning when arms were scored on different cases (their metrics do not compare)."""
    ids = {arm: {r.sample_id for r in records} for arm, records in _by_arm(scored).items()}
    common = set.intersection(*ids.values()) if ids else set()
    differing = [f"{arm} ({len(s - common)} extra)" for arm, s in ids.items() if s != common]
    if not differing:
        return ""
    return (f"**Warning:** the arms were scored on different cases ({len(common)} shared; "
            f"{', '.join(differing)}): compare their metrics with care.\n\n")


@dataclass(frozen=True)
class Report:
    """A rendered report: its summaries, its paired comparisons and its files (name -> content)."""

    summaries: list[ArmSummary]
    files: dict[str, bytes]
    paired: list[PairedComparison] = field(default_factory=list)


def render_report(task: Task, records: Iterable[Mapping[str, Any]], *, title: str | None = None,
                  n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05,
                  threshold: float = THRESHOLD, training: Sequence[ArmTraining] | None = None,
                  budget_steps: int | None = None, references: Sequence[str] | None = None,
                  varied: Sequence[str] = (), confounds: Sequence[Confound] = ()) -> Report:
    """Score ``records`` and render every file of the report in memory.

    With ``training``, a section and ``training.csv`` give each arm's data, NLL span, steps and
    tokens against ``budget_steps``, and the settings the comparison ``varied`` between arms.
    ``references``: the arms the paired differences are taken against; None: ``reference_arms``
    by the arms' kinds in ``training`` (without it, the first arm); empty: no paired table.
    ``confounds`` (settings the arms differ in beyond their objective, allowed by the recipe)
    get a loud section before the metrics.
    """
    scored = score_records(task, records, threshold)
    if not scored:
        raise MintError("no generations to report on: the evaluation wrote no records")
    summaries = summarise_arms(task, scored, n_resamples, seed, alpha)
    arms = [s.arm for s in summaries]
    if references is None:
        references = reference_arms(arms, {t.arm: t.kind for t in training or ()})
    paired = paired_comparisons(task, scored, references, n_resamples, seed, alpha) if len(arms) > 1 else []
    title = title or f"{task.name}: comparison of {len(summaries)} arms"
    level = f"{100 * (1 - alpha):g}%"
    metrics = metrics_table(summaries)
    per_label = per_label_table(task, scored)
    varied_text = (f"Settings the recipe varies between arms (`varied`): {', '.join(f'`{v}`' for v in varied)}."
                   "\n\n" if varied else "")
    markdown = (
        f"# {title}\n\n"
        f"Task `{task.name}`; top-k over the first {task.n_answers} answers. A prediction "
        f"matches when its SequenceMatcher ratio to the (normalised) truth or one of its "
        f"`;`-separated synonyms is >= {threshold}. Unparseable answers count as misses "
        f"(column `unparseable`). Intervals: {level} percentile bootstrap over cases, "
        f"{n_resamples} resamples, seed {seed}.\n\n"
        + _sample_set_note(scored)
        + (f"## Confounds\n\n{confounds_markdown(confounds)}\n" if confounds else "")
        + "## Metrics\n\n" + metrics_markdown(summaries)
        + (f"\n## Paired differences\n\n{paired_explanation(alpha, n_resamples)}\n\n{paired_markdown(paired)}"
           if paired else "")
        + "\n![metrics by arm](accuracy.png)\n\n"
        + (f"## Training\n\n{varied_text}{training_markdown(training, budget_steps)}\n" if training else "")
        + "## Per label\n\n" + to_markdown(per_label)
        + "\nFiles: `metrics.csv`, `per_label.csv`, `generations.jsonl` (every raw "
        "generation with its parse and score), `summary.json`"
        + (", `paired_differences.json`" if paired else "")
        + (", `training.csv`" if training else "") + ".\n"
    )
    files = {
        "report.md": markdown.encode(),
        "metrics.csv": to_csv(metrics).encode(),
        "per_label.csv": to_csv(per_label).encode(),
        "accuracy.png": bar_chart_png(summaries, f"{task.name}: {level} bootstrap CI", paired),
        "generations.jsonl": generations_jsonl(scored).encode(),
        "summary.json": json.dumps(summary_dict(summaries), indent=2).encode(),
    }
    if paired:
        files["paired_differences.json"] = json.dumps([p.as_dict() for p in paired], indent=2).encode()
    if training:
        files["training.csv"] = to_csv(training_table(training, budget_steps)).encode()
    return Report(summaries=summaries, files=files, paired=paired)


def write_report(report: Report, out_uri: str) -> list[str]:
    """Store the report's files under ``out_uri`` (a local folder or s3://...); their URIs."""
    uris = []
    for name, data in report.files.items():
        uri = storage.join(out_uri, name)
        storage.write_bytes(uri, data)
        uris.append(uri)
    return uris
