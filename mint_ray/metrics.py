"""The paper's evaluation metrics as pure functions (no I/O, no Ray).

Scoring follows the authors' evaluator (MINT.md, "Evaluation"):

- names are normalised (lowercase, punctuation removed, whitespace collapsed) and
  a prediction matches the truth when ``difflib.SequenceMatcher(None, truth,
  prediction).ratio() >= 0.8`` for any of the truth's ``;``-separated synonyms;
- answers are read with the task's one parser (``Task.parse_answer``); only the
  first ``task.n_answers`` items count, as the model was asked for that many;
- an unparseable answer (no header, or no numbered item under it) is a miss on
  every metric and is counted in the ``parseable`` share, never dropped;
- CAR (tissue task) = (1+l)*C*A / (l*C + A), l = 0.5, averaged over cases, with
  C = share of the answers inside the teacher's top-5 and A = 1 - share inside
  the teacher's bottom-5. The denominator of both shares is ``task.n_answers``
  (5), not the number of answers given, so a short answer cannot reach C = 1
  (the authors divide by the number of answers given). A repeated answer counts
  once, so repeating one good tissue does not raise C. Matching answers to the
  teacher's lists uses the same fuzzy match. C = A = 0 gives CAR 0; an
  unparseable answer gets C = A = CAR = 0, as in the authors' code.

Every accuracy comes with a percentile bootstrap interval, since the test sets
are small (tens to hundreds of cases). Two arms scored on the same cases are
compared paired: the bootstrap of their per-case differences
(``paired_difference``) and McNemar's exact test on a binary metric such as
top-1 (``mcnemar_exact``), which are far tighter than two per-arm intervals.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any

import numpy as np

from mint_ray.errors import MintError
from mint_ray.tasks.base import Task

THRESHOLD = 0.8
CAR_LAMBDA = 0.5

# Punctuation is removed (not replaced by a space), as the authors do; "_" is a
# word character to ``\w`` but punctuation to a reader, so it goes too.
_PUNCTUATION = re.compile(r"[^\w\s]|_")


def normalise(name: str) -> str:
    """Lowercase, drop punctuation, collapse spaces: "Wilson's  Disease." -> "wilsons disease"."""
    return " ".join(_PUNCTUATION.sub("", name.lower()).split())


def synonyms(truth: str) -> list[str]:
    """The truth's normalised synonyms (``;``-separated), empty ones left out."""
    return [s for s in (normalise(part) for part in truth.split(";")) if s]


def similarity(pred: str, truth: str) -> float:
    """The best SequenceMatcher ratio of ``pred`` against any synonym of ``truth``.

    The truth goes first, as in the authors' evaluator: ``ratio()`` is not
    always symmetric.
    """
    p = normalise(pred)
    if not p:
        return 0.0
    return max((SequenceMatcher(None, s, p).ratio() for s in synonyms(truth)), default=0.0)


def is_match(pred: str, truth: str, threshold: float = THRESHOLD) -> bool:
    """Whether ``pred`` names ``truth`` (or one of its ``;``-separated synonyms)."""
    return similarity(pred, truth) >= threshold


def first_match_rank(items: Sequence[str], truth: str, threshold: float = THRESHOLD) -> int | None:
    """The 1-based position of the first item matching ``truth``; None when none does."""
    for rank, item in enumerate(items, start=1):
        if is_match(item, truth, threshold):
            return rank
    return None


def car(c: float, a: float, lam: float = CAR_LAMBDA) -> float:
    """CAR = (1+l)*C*A / (l*C + A); 0 when C = A = 0 (the only zero denominator)."""
    denominator = lam * c + a
    return 0.0 if denominator == 0 else (1 + lam) * c * a / denominator


def coverage_avoidance(answers: Sequence[str], teacher_top: Sequence[str],
                       teacher_bottom: Sequence[str], n_answers: int,
                       threshold: float = THRESHOLD) -> tuple[float, float]:
    """(C, A) of the first ``n_answers`` answers against the teacher's top and bottom lists.

    C = (distinct answers matching a teacher top item) / n_answers,
    A = 1 - (distinct answers matching a teacher bottom item) / n_answers.
    """
    distinct: list[str] = []
    for answer in answers[:n_answers]:
        if not any(is_match(answer, seen, threshold) for seen in distinct):
            distinct.append(answer)

    def share_in(teacher: Sequence[str]) -> float:
        inside = sum(any(is_match(a, t, threshold) for t in teacher) for a in distinct)
        return inside / n_answers

    return share_in(teacher_top), 1.0 - share_in(teacher_bottom)


@dataclass(frozen=True)
class CaseScore:
    """One generation scored against its truth.

    ``rank`` is the 1-based position of the first matching answer among the
    first ``n_answers`` items, None for a miss or an unparseable answer;
    ``n_items`` is how many items the parser found (before the cut to
    ``n_answers``); ``c``, ``a``, ``car`` are None when no teacher lists were given.
    """

    parseable: bool
    rank: int | None
    n_items: int
    c: float | None = None
    a: float | None = None
    car: float | None = None

    def hit(self, k: int) -> bool:
        return self.rank is not None and self.rank <= k

    @property
    def reciprocal_rank(self) -> float:
        return 0.0 if self.rank is None else 1.0 / self.rank


def score_case(task: Task, generation: str, truth: str,
               teacher_top: Sequence[str] | None = None,
               teacher_bottom: Sequence[str] | None = None,
               threshold: float = THRESHOLD) -> CaseScore:
    """Parse ``generation`` with the task's parser and score it against ``truth``.

    Give both teacher lists to get CAR (tissue task), or neither.
    """
    if (teacher_top is None) != (teacher_bottom is None):
        raise MintError("teacher_top and teacher_bottom go together: give both lists "
                        "(for CAR) or neither")
    parsed = task.parse_answer(generation)
    answers = parsed.items[: task.n_answers] if parsed.parseable else []
    rank = first_match_rank(answers, truth, threshold)
    if teacher_top is None or teacher_bottom is None:
        return CaseScore(parsed.parseable, rank, len(parsed.items))
    c, a = (coverage_avoidance(answers, teacher_top, teacher_bottom, task.n_answers, threshold)
            if parsed.parseable else (0.0, 0.0))
    return CaseScore(parsed.parseable, rank, len(parsed.items), c, a, car(c, a))


def k_values(task: Task) -> tuple[int, ...]:
    """The top-k cut-offs the paper reports for ``task``: 1 and the list length (10 or 5)."""
    return (1, task.n_answers)


def case_values(scores: Sequence[CaseScore], ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-case metric values (one float per case), the input of means and bootstraps.

    Keys: ``parseable``, ``top{k}`` for each k, ``mrr`` (reciprocal rank), and
    ``car``, ``coverage``, ``avoidance`` when every case has teacher lists.
    """
    values = {"parseable": np.array([s.parseable for s in scores], dtype=float)}
    for k in ks:
        values[f"top{k}"] = np.array([s.hit(k) for s in scores], dtype=float)
    values["mrr"] = np.array([s.reciprocal_rank for s in scores], dtype=float)
    with_car = sum(s.car is not None for s in scores)
    if with_car and with_car != len(scores):
        raise MintError(f"{len(scores) - with_car} of {len(scores)} cases lack teacher_top/"
                        "teacher_bottom: give both lists for every case of an arm, or none")
    if with_car:
        values["car"] = np.array([s.car for s in scores], dtype=float)
        values["coverage"] = np.array([s.c for s in scores], dtype=float)
        values["avoidance"] = np.array([s.a for s in scores], dtype=float)
    return values


def aggregate(scores: Sequence[CaseScore], ks: Sequence[int]) -> dict[str, float]:
    """The mean of every metric of ``case_values`` (NaN for no cases)."""
    return {name: float(v.mean()) if v.size else float("nan")
            for name, v in case_values(scores, ks).items()}


def bootstrap_ci(values: Sequence[float] | np.ndarray,
                 stat: Callable[..., Any] = np.mean, n_resamples: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of ``stat`` over ``values``.

    ``stat`` is a numpy-style reduction taking ``axis=`` (np.mean, np.median),
    so all resamples are reduced at once. The same seed and length give the
    same resamples, so every metric of an arm is resampled over the same cases.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D sequence of values")
    if n_resamples < 1 or not 0 < alpha < 1:
        raise ValueError("bootstrap_ci needs n_resamples >= 1 and 0 < alpha < 1")
    rng = np.random.default_rng(seed)
    resampled = x[rng.integers(0, x.size, size=(n_resamples, x.size))]
    stats = np.asarray(stat(resampled, axis=1), dtype=float)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its bootstrap interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class ArmSummary:
    """One arm's (model's) metrics with intervals; unparseable answers are counted in ``n``."""

    arm: str
    n: int
    n_parseable: int
    metrics: dict[str, Estimate] = field(default_factory=dict)

    @property
    def n_unparseable(self) -> int:
        return self.n - self.n_parseable

    def as_dict(self) -> dict[str, float | int | str]:
        """Flat and JSON-able: ``top1``, ``top1_ci_low``, ``top1_ci_high``, ..."""
        out: dict[str, float | int | str] = {
            "arm": self.arm, "n": self.n, "n_parseable": self.n_parseable,
            "n_unparseable": self.n_unparseable}
        for name, est in self.metrics.items():
            out.update({name: est.value, f"{name}_ci_low": est.low, f"{name}_ci_high": est.high})
        return out


def summarise_arm(task: Task, cases: Sequence[CaseScore], arm: str = "",
                  n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> ArmSummary:
    """Every metric of ``task`` over ``cases`` with its percentile bootstrap interval."""
    if not cases:
        raise MintError(f"arm {arm!r} has no cases to score: check that its generations "
                        "were written")
    metrics = {
        name: Estimate(float(v.mean()), *bootstrap_ci(v, np.mean, n_resamples, seed, alpha))
        for name, v in case_values(cases, k_values(task)).items()
    }
    return ArmSummary(arm=arm, n=len(cases), n_parseable=sum(c.parseable for c in cases),
                      metrics=metrics)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                      n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> Estimate:
    """mean(a) - mean(b) over the same cases (``a[i]`` and ``b[i]`` score case i) with its
    paired percentile bootstrap interval.

    Each resample draws case indices once and applies them to both arms, so what the
    cases share (an easy case is easy for both) cancels; that is the bootstrap of the
    per-case differences.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired_difference needs both arms on the same cases: {x.shape} vs {y.shape}")
    diff = x - y
    return Estimate(float(diff.mean()), *bootstrap_ci(diff, np.mean, n_resamples, seed, alpha))


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test of two arms on the same cases for a binary metric.

    ``only_a`` / ``only_b``: cases only that arm got right (the discordant pairs; the
    cases both or neither got right carry no evidence); ``p_value``: two-sided.
    """

    only_a: int
    only_b: int
    p_value: float


def mcnemar_exact(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> McNemar:
    """Two-sided exact McNemar test: under "the arms are equally good", each discordant case
    is a fair coin, so the smaller discordant count is Binomial(n, 1/2) with n = only_a +
    only_b, and p = min(1, 2 * P(X <= min(only_a, only_b))) (1.0 when n = 0).

    Exact integer arithmetic (``math.comb``), as ``scipy.stats.binomtest(k, n, 0.5)`` gives.
    """
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"mcnemar_exact needs both arms on the same cases: {x.shape} vs {y.shape}")
    only_a, only_b = int((x & ~y).sum()), int((~x & y).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return McNemar(only_a, only_b, min(1.0, 2 * tail / 2**n))
