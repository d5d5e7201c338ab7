"""Paired differences between the arms of a report, with McNemar's exact test on top-1. Pure.

Every arm against the reference arms (``reference_arms``: the SFT
arm, or the first arm without one, and the base arm when present), on the same cases
matched by ``sample_id``: the mean difference of each headline metric (top-1, top-k,
MRR) with its paired bootstrap interval, and McNemar's exact test on top-1. Two per-arm
intervals that overlap say little; the paired interval is what says whether one arm
beats another on these cases. An arm missing any of the reference's cases is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mint_ray.errors import MintError
from mint_ray.evaluation.tables import ScoredRecord, _by_arm, _markdown, headline_metrics
from mint_ray.metrics import Estimate, McNemar, case_values, k_values, mcnemar_exact, paired_difference
from mint_ray.tasks.base import Task


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
