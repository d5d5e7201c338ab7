"""Pairing rules: a teacher's scores for one case -> chosen / rejected label lists.

Pure functions (no Ray, no I/O). The texts are written elsewhere with the
task's ``answer_message``; here only the label lists are decided.

The rules, for a case whose labels the teacher ranked by descending score:

- ``chosen`` = the teacher's top ``k``. With ``force_truth``, a ground truth
  the teacher left out of its top ``k`` replaces the ``k``-th item (the rest of
  the teacher's order is kept), so the student is never taught to leave out
  the right answer.
- Pair ``j`` (``j = 0 .. pairs_per_case - 1``) rejects the ``j``-th slice of
  ``q`` labels counted from the bottom of the ranking without the chosen
  labels: pair 0 rejects the teacher's bottom ``q``, pair 1 the ``q`` above
  them, and so on. Slices never overlap each other or ``chosen``. Within a
  slice the labels keep the teacher's order (most likely first), as every
  answer in the task's format does.
- ``margin`` = the teacher's ``k``-th best score minus the best score inside
  the rejected slice: how clearly the teacher prefers all of its top ``k`` to
  all of that slice. Pairs below ``min_margin`` are dropped (a forced truth
  does not change the margin: it measures the teacher, not the correction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairRule:
    """How pairs are cut from a ranking. Defaults are the paper's (k = q = answers)."""

    k: int
    q: int
    pairs_per_case: int = 1
    min_margin: float | None = None
    force_truth: bool = False

    def check(self, n_labels: int) -> None:
        """Raise ValueError if ``n_labels`` cannot hold ``k`` chosen plus every rejected slice."""
        if min(self.k, self.q, self.pairs_per_case) < 1:
            raise ValueError(f"k, q and pairs_per_case must be at least 1 (got {self.k}, {self.q}, "
                             f"{self.pairs_per_case})")
        needed = self.k + self.pairs_per_case * self.q
        if needed > n_labels:
            raise ValueError(f"k={self.k} chosen + {self.pairs_per_case} x q={self.q} rejected need "
                             f"{needed} distinct labels but the teacher scores {n_labels}")


@dataclass(frozen=True)
class Ranking:
    """A case's labels by descending teacher score (ties keep the label order)."""

    labels: list[str]
    scores: list[float]

    def top(self, k: int) -> list[str]:
        return self.labels[:k]

    def bottom(self, q: int) -> list[str]:
        return self.labels[len(self.labels) - q:]

    def rank_of(self, label: str | None) -> int | None:
        """1-based rank of ``label``, None when it is not ranked (or None)."""
        return self.labels.index(label) + 1 if label in self.labels else None


@dataclass(frozen=True)
class Pair:
    pair_index: int
    chosen: list[str]
    rejected: list[str]
    margin: float
    truth_forced: bool


def rank(scores: np.ndarray | Sequence[float], labels: Sequence[str]) -> Ranking:
    """Sort ``labels`` by descending score; a stable sort makes ties deterministic."""
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != (len(labels),):
        raise ValueError(f"{values.shape} scores for {len(labels)} labels")
    order = np.argsort(-values, kind="stable")
    return Ranking([labels[i] for i in order], [float(values[i]) for i in order])


def build_pairs(ranking: Ranking, truth: str | None, rule: PairRule) -> tuple[list[Pair], list[Pair]]:
    """The case's pairs as ``(kept, dropped_for_low_margin)``, each in ``pair_index`` order."""
    rule.check(len(ranking.labels))
    score = dict(zip(ranking.labels, ranking.scores, strict=True))
    chosen = ranking.top(rule.k)
    forced = rule.force_truth and truth is not None and truth in score and truth not in chosen
    if forced:
        chosen = [*chosen[:-1], truth]
    rest = [label for label in ranking.labels if label not in chosen]
    kth_best = ranking.scores[rule.k - 1]
    kept: list[Pair] = []
    dropped: list[Pair] = []
    for j in range(rule.pairs_per_case):
        end = len(rest) - j * rule.q
        rejected = rest[end - rule.q:end]
        pair = Pair(pair_index=j, chosen=list(chosen), rejected=rejected,
                    margin=kth_best - max(score[label] for label in rejected), truth_forced=forced)
        (dropped if rule.min_margin is not None and pair.margin < rule.min_margin else kept).append(pair)
    return kept, dropped
