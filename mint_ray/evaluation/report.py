"""The comparison report across arms (base, SFT, DPO, ORPO, teacher...).

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

Paired differences: every arm against the reference arms (``reference_arms``: the SFT
arm, or the first arm without one, and the base arm when present), on the same cases
matched by ``sample_id``: the mean difference of each headline metric (top-1, top-k,
MRR) with its paired bootstrap interval, and McNemar's exact test on top-1. Two per-arm
intervals that overlap say little; the paired interval is what says whether one arm
beats another on these cases. An arm missing any of the reference's cases is an error.

Everything except ``write_report`` is pure.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mint_ray import storage
from mint_ray.errors import MintError
from mint_ray.metrics import (
    THRESHOLD,
    ArmSummary,
    CaseScore,
    Estimate,
    McNemar,
    aggregate,
    case_values,
    k_values,
    mcnemar_exact,
    paired_difference,
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
class PairedComparison:
    """One arm against a reference arm on the same cases.

    ``differences``: per headline metric, mean(arm - reference) with its paired bootstrap
    interval; ``top1``: McNemar's exact test on top-1, significant when p < ``alpha``.
    """

    arm: str
    reference: str
    n: int
    differences: dict[str, Estimate]
    top1: McNemar
    alpha: float

    @property
    def significant(self) -> bool:
        return self.top1.p_value < self.alpha

    def as_dict(self) -> dict[str, float | int | str | bool]:
        """Flat and JSON-able: ``top1_diff``, ``top1_diff_ci_low``, ..., ``top1_mcnemar_p``."""
        out: dict[str, float | int | str | bool] = {"arm": self.arm, "reference": self.reference, "n": self.n}
        for name, est in self.differences.items():
            out.update({f"{name}_diff": est.value, f"{name}_diff_ci_low": est.low,
                        f"{name}_diff_ci_high": est.high})
        return {**out, "top1_only_arm": self.top1.only_a, "top1_only_reference": self.top1.only_b,
                "top1_mcnemar_p": self.top1.p_value, "top1_significant": self.significant}


def reference_arms(arms: Sequence[str], kinds: Mapping[str, str]) -> list[str]:
    """The arms every other arm is compared against: the first of kind ``sft`` (without
    one, the first arm), then the first of kind ``base`` when present."""
    sft = next((a for a in arms if kinds.get(a) == "sft"), arms[0] if arms else None)
    base = next((a for a in arms if kinds.get(a) == "base"), None)
    return [a for a in dict.fromkeys((sft, base)) if a is not None]


def paired_comparisons(task: Task, scored: Sequence[ScoredRecord], references: Sequence[str],
                       n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> list[PairedComparison]:
    """Every arm against each reference (``reference_arms``) on the cases matched by ``sample_id``.

    A pair both of whose arms are references is shown once, against the earlier reference
    (SFT - base, not base - SFT). An arm that lacks a case of the other is a ``MintError``
    naming it: a paired difference over different cases would compare different questions.
    """
    cases = {arm: {r.sample_id: r.score for r in records} for arm, records in _by_arm(scored).items()}
    unknown = [r for r in references if r not in cases]
    if unknown:
        raise MintError(f"reference arm(s) {', '.join(unknown)} have no records: compare against one of "
                        f"{', '.join(cases)}")
    ks = k_values(task)
    names = headline_metrics(task)
    out = []
    for ref in references:
        for arm in cases:
            if arm == ref or (arm in references and references.index(arm) > references.index(ref)):
                continue
            for lacking, other in ((arm, ref), (ref, arm)):
                missing = sorted(cases[other].keys() - cases[lacking].keys())
                if missing:
                    raise MintError(f"arm {lacking!r} lacks {len(missing)} of the cases of arm {other!r} (e.g. "
                                    f"{missing[0]!r}): paired differences need every arm answered on the same "
                                    "cases; evaluate it on the same split and max_cases")
            ids = sorted(cases[ref])
            ours = case_values([cases[arm][i] for i in ids], ks)
            theirs = case_values([cases[ref][i] for i in ids], ks)
            differences = {name: paired_difference(ours[name], theirs[name], n_resamples, seed, alpha)
                           for name in names}
            out.append(PairedComparison(arm, ref, len(ids), differences,
                                        mcnemar_exact(ours["top1"] > 0, theirs["top1"] > 0), alpha))
    return out


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}"


def paired_explanation(alpha: float, n_resamples: int) -> str:
    """How to read the paired-differences table."""
    return (f"Each arm minus the reference arm on the same cases (matched by case id): the mean "
            f"difference with its {100 * (1 - alpha):g}% paired bootstrap interval ({n_resamples} resamples; "
            f"each draws the case indices once for both arms), `*` where the interval excludes 0. Top-1 is "
            f"also tested with McNemar's exact two-sided test: `only arm / only ref` counts the cases only "
            f"one of the two got right; significant when p < {alpha:g}.")


def paired_markdown(paired: Sequence[PairedComparison], digits: int = 3, metrics: Sequence[str] | None = None) -> str:
    """The paired-differences table: one row per (arm, reference); every metric, or ``metrics``."""
    if not paired:
        return ""
    names = list(metrics) if metrics is not None else list(paired[0].differences)

    def cell(est: Estimate) -> str:
        excludes_zero = est.low > 0 or est.high < 0
        return (f"{_signed(est.value, digits)} [{_signed(est.low, digits)}, {_signed(est.high, digits)}]"
                + ("*" if excludes_zero else ""))

    rows = ([p.arm, p.reference, str(p.n), *(cell(p.differences[n]) for n in names),
             f"{p.top1.only_a} / {p.top1.only_b}", f"{p.top1.p_value:.3g}",
             "**yes**" if p.significant else "no"] for p in paired)
    return _markdown(["arm", "vs", "n", *(f"{n} diff" for n in names), "top1 only arm / only ref",
                      "McNemar p", "top1 significant"], rows)


@dataclass(frozen=True)
class Confound:
    """A setting in which trained arms differ although the recipe does not mark it as varied:
    ``values`` gives each arm's value, as text."""

    setting: str
    values: dict[str, str]


def confounds_markdown(confounds: Sequence[Confound]) -> str:
    """The loud section: every setting that differs between arms beyond their objective."""
    return ("**Warning: the trained arms differ in more than their objective.** The recipe set "
            "`allow_confounds: true`; the settings below differ between arms and are not in its "
            "`varied` list, so a difference between these arms may come from them and not from "
            "the objective.\n\n"
            + _markdown(["setting", "values"], ([c.setting, _cell("; ".join(f"{arm}: {v}" for arm, v in
                                                                            c.values.items()), 3)]
                                                for c in confounds)))


@dataclass(frozen=True)
class ArmTraining:
    """What one arm was trained on, for the training table.

    ``steps`` and ``tokens`` count from the base model, the arms it starts from
    included (``own_steps`` / ``own_tokens``: this arm's run alone); None where
    unknown (a given model). ``trained`` is False for an arm that trains nothing
    (base, RAG, the teacher): the step budget does not apply to it. ``nll_over``: the
    span of its NLL term (``response`` or ``sequence``), None without one (DPO, SimPO,
    untrained arms).
    """

    arm: str
    kind: str
    data: str
    trained: bool = True
    nll_over: str | None = None
    init_from: str | None = None
    own_steps: int | None = None
    steps: int | None = None
    own_tokens: int | None = None
    tokens: int | None = None


def budget_marks(training: Sequence[ArmTraining], budget: int | None) -> dict[str, str]:
    """Per arm, whether its total steps kept the budget: ``equal``, or a mark saying how it differs.

    Without a budget (steps set by epochs) the trained arms are held to the total
    most of them share. Arms that train nothing get ``n/a``.
    """
    trained = [t for t in training if t.trained]
    known = [t.steps for t in trained if t.steps is not None]
    reference = budget if budget is not None else max(set(known), key=known.count, default=None)
    what = "the budget" if budget is not None else "the other arms"
    marks: dict[str, str] = {}
    for t in training:
        if not t.trained:
            marks[t.arm] = "n/a"
        elif t.steps is None or reference is None:
            marks[t.arm] = "**unknown**"
        elif t.steps == reference:
            marks[t.arm] = "equal"
        else:
            marks[t.arm] = f"**differs: {t.steps} steps vs {reference} for {what}**"
    return marks


def training_table(training: Sequence[ArmTraining], budget: int | None) -> pa.Table:
    """One row per arm: its data, steps and tokens (own and in all) and its budget mark."""
    marks = budget_marks(training, budget)
    return pa.table({
        "arm": [t.arm for t in training], "kind": [t.kind for t in training],
        "data": [t.data for t in training], "nll_over": [t.nll_over for t in training],
        "starts_from": [t.init_from for t in training],
        "own_steps": pa.array([t.own_steps for t in training], pa.int64()),
        "steps": pa.array([t.steps for t in training], pa.int64()),
        "own_tokens": pa.array([t.own_tokens for t in training], pa.int64()),
        "tokens": pa.array([t.tokens for t in training], pa.int64()),
        "budget": [marks[t.arm] for t in training]})


def training_markdown(training: Sequence[ArmTraining], budget: int | None) -> str:
    """The training section: the budget rule in words, then the table."""
    rule = (f"Step budget: {budget} optimizer steps per trained arm, counting the steps of the arm it "
            "starts from." if budget is not None else
            "No step budget was set (train.optim.max_steps): the arms trained by epochs.")
    spans = {t.nll_over for t in training if t.nll_over is not None}
    nll_warning = (f"\n\n**Warning: the arms' NLL spans differ ({', '.join(sorted(spans))})**: an arm's NLL "
                   "over the prompt changes what it learns, not only its objective." if len(spans) > 1 else "")
    return (f"{rule} `steps` and `tokens` are totals from the base model (`own_*`: the arm's own "
            "run); tokens are those the model was run on (prompt once, chosen and rejected "
            "answer). An arm whose steps differ is marked in `budget`. `nll_over`: the span of the "
            "arm's NLL term (ORPO, SFT): `response` the answer only, `sequence` prompt and answer "
            f"(TRL's ORPO form); n/a: no NLL term.{nll_warning}\n\n"
            + to_markdown(training_table(training, budget)))


def summary_dict(summaries: Sequence[ArmSummary]) -> dict[str, dict[str, float | int | str]]:
    """``{arm: ArmSummary.as_dict()}``: JSON-able, for a stage's summary or MLflow metrics."""
    return {s.arm: s.as_dict() for s in summaries}


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
