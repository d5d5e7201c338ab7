"""The run's counts, pure: what each write task reports, their sum on the driver, and the
checks before anything is published.

Every cohort row ends as exactly one of a paired case, a quarantined row (bad input or a
teacher failure) or a filtered case (left out by an option); :func:`check_accounting`
refuses to publish unless ``rows_in == cases_paired + quarantined + filtered``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mint_ray.errors import MintError
from mint_ray.preferences.plan import TeacherInfo


def split_union(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The pair operator's stream -> (pair rows, set-aside rows)."""
    is_pair = pc.equal(table.column("kind"), "pair")
    return table.filter(is_pair), table.filter(pc.invert(is_pair))


def empty_part() -> dict[str, Any]:
    return {"pairs": 0, "cases_paired": 0, "dropped_pairs": 0, "quarantined": {}, "filtered": {},
            "teachers": [], "scored": None}


def part_counts(pairs: pa.Table, rest: pa.Table) -> dict[str, Any]:
    """One write task's counts (JSON-able, summed by :meth:`Totals.add`): pairs, paired cases,
    pairs under the margin, set-aside rows per reason, the teachers seen and the span of
    ``scored_at``."""
    verdicts = Counter(zip(rest.column("stage").to_pylist(), rest.column("reason").to_pylist(),
                           strict=True))
    part = {**empty_part(),
            "pairs": pairs.num_rows,
            "cases_paired": int(pc.sum(pairs.column("case_paired")).as_py() or 0),
            "dropped_pairs": sum(int(pc.sum(t.column("dropped_pairs")).as_py() or 0) for t in (pairs, rest)),
            "quarantined": {reason: n for (stage, reason), n in verdicts.items() if stage != "filter"},
            "filtered": {reason: n for (stage, reason), n in verdicts.items() if stage == "filter"},
            "teachers": sorted(set(zip(pairs.column("teacher_name").to_pylist(),
                                       pairs.column("teacher_version").to_pylist(), strict=True)))}
    scored_at = pa.chunked_array([*pairs.column("scored_at").chunks, *rest.column("scored_at").chunks],
                                 pa.float64())
    scored = pc.min_max(scored_at).as_py()
    if scored["min"] is not None:
        part["scored"] = (scored["min"], scored["max"])
    return part


@dataclass
class Totals:
    """What the write tasks report, summed on the driver."""

    pairs: int = 0
    cases_paired: int = 0
    dropped_pairs: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    filtered: Counter[str] = field(default_factory=Counter)
    teachers: set[tuple[str, str]] = field(default_factory=set)
    first_scored: float = math.inf
    last_scored: float = -math.inf

    def add(self, part: dict[str, Any]) -> None:
        self.pairs += part["pairs"]
        self.cases_paired += part["cases_paired"]
        self.dropped_pairs += part["dropped_pairs"]
        self.quarantined.update(part["quarantined"])
        self.filtered.update(part["filtered"])
        self.teachers.update(tuple(t) for t in part["teachers"])
        if part["scored"]:
            self.first_scored = min(self.first_scored, part["scored"][0])
            self.last_scored = max(self.last_scored, part["scored"][1])


def speed(rows: int, started: float, ended: float, totals: Totals, batch_size: int) -> dict[str, float]:
    """End-to-end rows/s, the start-up until the first scored batch (actor start, model
    load), and the steady rows/s from then on (rows after the first batch / the time the
    teacher was streaming; left out for runs of fewer than 10 batches, where it is noise)."""
    seconds = ended - started
    rates = {"seconds": seconds, "rows_per_s": rows / seconds}
    if math.isfinite(totals.first_scored):
        rates["startup_s"] = totals.first_scored - started
    streaming = totals.last_scored - totals.first_scored
    if rows >= 10 * batch_size and streaming > 0:
        rates["steady_rows_per_s"] = (rows - batch_size) / streaming
    return rates


def teacher_identity(teacher: TeacherInfo, totals: Totals) -> dict[str, str]:
    """Name/version as the actors loaded it (one teacher for the whole run, or an error)."""
    if len(totals.teachers) > 1:
        raise MintError(f"the teacher at {teacher.uri} changed during the run "
                        f"({sorted(totals.teachers)}): re-run once it is stable")
    name, version = next(iter(totals.teachers), (teacher.name, teacher.version or "unknown"))
    if teacher.version and version != teacher.version:
        raise MintError(f"teacher {teacher.uri}: actors loaded version {version}, its spec says "
                        f"{teacher.version}; re-run once the teacher directory is stable")
    return {"name": name, "version": version, "kind": teacher.kind, "uri": teacher.uri}


def check_accounting(rows_in: int, totals: Totals) -> dict[str, Any]:
    """The run's counts; raises unless every cohort row is accounted for exactly once."""
    quarantined, filtered = sum(totals.quarantined.values()), sum(totals.filtered.values())
    line = (f"rows_in {rows_in} = cases_paired {totals.cases_paired} + quarantined {quarantined} "
            f"+ filtered {filtered}; pairs {totals.pairs}")
    if rows_in != totals.cases_paired + quarantined + filtered:
        raise MintError(f"rows unaccounted for ({line}): nothing was published; please report this")
    if totals.pairs == 0:
        reasons = ", ".join(f"{r}: {n}" for r, n in (totals.quarantined + totals.filtered).most_common())
        raise MintError(f"no pairs built: every row was set aside ({reasons}); nothing was published. "
                        "Check the cohort, the teacher's labels and the options")
    return {"rows_in": rows_in, "cases_paired": totals.cases_paired, "pairs": totals.pairs,
            "quarantined_total": quarantined, "filtered_total": filtered,
            "quarantined": dict(sorted(totals.quarantined.items())),
            "filtered": dict(sorted(totals.filtered.items())),
            "pairs_dropped_low_margin": totals.dropped_pairs, "accounting": line}
