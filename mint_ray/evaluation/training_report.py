"""The report's Training and Confounds sections: what each arm was trained on, whether it
kept the step budget, and the settings the trained arms differ in beyond their objective. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from mint_ray.evaluation.tables import _cell, _markdown, to_markdown


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
