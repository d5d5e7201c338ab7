"""Cohort generators (``mint-ray data synth``) and the ``samples`` table contract.

Each task module (``rare_disease``, ``tissue_type``) builds a generator whose
``catalog`` lists its labels and whose ``case(label_index, rng)`` returns one
``Case``; ``synth`` assigns labels and splits, writes images and the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

# The cohort contract of ARCHITECTURE.md ("samples"): one row per case.
SAMPLES_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("note", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("label", pa.string()),
    pa.field("meta", pa.string(), nullable=False),
])


@dataclass(frozen=True)
class LabelInfo:
    """One label of a cohort: the name the student must answer and a stable id."""

    name: str
    id: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "id": self.id}


@dataclass(frozen=True)
class Case:
    """One generated case before it is written: note (or None), image pixels, meta."""

    label: LabelInfo
    note: str | None
    image: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


class Generator(Protocol):
    """What ``synth`` needs from a task's generator."""

    @property
    def catalog(self) -> list[LabelInfo]: ...

    def case(self, label_index: int, rng: np.random.Generator) -> Case: ...

    def describe(self) -> dict[str, Any]:
        """Generator facts for the manifest (versions, knobs); no patient data."""
        ...


__all__ = ["SAMPLES_SCHEMA", "Case", "Generator", "LabelInfo"]
