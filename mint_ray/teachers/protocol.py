"""The teacher interface: score every label of a task for a batch of cases.

A teacher is a directory (local or ``s3://``) in Hugging Face style: weights in
safetensors, tokenizer/processor files, and ``mint_teacher.json`` (a
:class:`TeacherSpec`) naming its kind, name, version (a content hash of the
weights), task and labels. Kinds implement :class:`Teacher` and import only
this module and :mod:`mint_ray.teachers.inputs` (their CPU side);
:mod:`mint_ray.teachers.loader` finds a kind by its name, so no kind module
imports the loader and the loader imports kinds only on use.
Images are decoded by the caller (:mod:`mint_ray.images`).

Scoring is two steps, so they can run apart: ``prepare(cases)`` (a
:class:`Preprocessor`: tokenising, resizing, normalising, on CPU, no weights)
makes fixed-size arrays, and ``score_prepared(arrays)`` runs only the model.
``score(cases)`` is the two in turn.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mint_ray.errors import MintError

SPEC_FILE = "mint_teacher.json"


@dataclass(frozen=True)
class Case:
    """One case as a teacher sees it: the note and/or the decoded RGB image (HxWx3 uint8)."""

    note: str | None = None
    image: np.ndarray | None = None


@runtime_checkable
class Preprocessor(Protocol):
    """A teacher kind's CPU side: cases -> the fixed-size arrays its model takes.

    No weights and no model. Every array has one row per case, and the same row
    shape and dtype on every call (an empty call included), so prepared rows can
    be stored, sliced and batched as fixed-shape tensors. A case it cannot take
    raises (the caller then tries the cases one by one).

    ``min_image_side`` and ``max_image_aspect`` (None: any) say which decoded images
    make sense to it; callers set the others aside before ``prepare``.
    """

    kind: str
    min_image_side: int
    max_image_aspect: float | None

    def prepare(self, cases: Sequence[Case]) -> dict[str, np.ndarray]:
        ...


@runtime_checkable
class Teacher(Protocol):
    """Scores every label of a task; higher means more likely.

    ``requires`` names the inputs a case must carry ("note", "image"); the
    caller quarantines cases without them instead of calling ``score``.
    ``prepare`` is the kind's :class:`Preprocessor` (the same one
    :func:`mint_ray.teachers.loader.load_preprocessor` builds without weights);
    ``score(cases)`` equals ``score_prepared(prepare(cases))``.
    """

    kind: str
    name: str
    version: str
    task: str
    labels: tuple[str, ...]
    requires: tuple[str, ...]

    def prepare(self, cases: Sequence[Case]) -> dict[str, np.ndarray]:
        """The CPU step: arrays with one row per case."""
        ...

    def score_prepared(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The model alone, on ``prepare``'s arrays (any rows of them, in one batch):
        a float32 array ``[rows, len(labels)]``."""
        ...

    def score(self, cases: Sequence[Case]) -> np.ndarray:
        """A float32 array ``[len(cases), len(labels)]``."""
        ...


class SavableTeacher(Teacher, Protocol):
    """A teacher that can write itself (weights, tokenizer, processor) to a folder."""

    def save_pretrained(self, directory: Path) -> TeacherSpec:
        """Write the files into ``directory`` and return the spec (version = weights hash)."""
        ...


@dataclass(frozen=True)
class TeacherSpec:
    """The content of ``mint_teacher.json``. ``settings`` are kind-specific
    (model sizes, prompt template); ``lineage`` says what it was trained on;
    ``metrics`` hold its held-out accuracy."""

    kind: str
    name: str
    version: str
    task: str
    labels: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "labels": list(self.labels)}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> TeacherSpec:
        try:
            data = json.loads(text)
            spec = cls(**{**data, "labels": tuple(data["labels"])})
        except (ValueError, TypeError, KeyError) as err:
            raise MintError(f"{where}: {SPEC_FILE} is not a valid teacher spec ({err}); "
                            "re-save the teacher with `mint-ray teacher train`") from None
        return spec


def check_scores(scores: np.ndarray, n_cases: int, n_labels: int) -> np.ndarray:
    """Guard the protocol's output: shape ``[n_cases, n_labels]``, finite, float32."""
    out = np.asarray(scores, dtype=np.float32)
    if out.shape != (n_cases, n_labels):
        raise ValueError(f"teacher returned scores of shape {out.shape}, "
                         f"expected {(n_cases, n_labels)}")
    if not np.isfinite(out).all():
        raise ValueError("teacher returned non-finite scores")
    return out


def top_k_accuracy(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of rows whose true label index is among the ``k`` highest scores."""
    if len(truth) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(truth)[:, None]).any(axis=1).mean())


def score_all(teacher: Teacher, cases: Sequence[Case], batch_size: int = 64) -> np.ndarray:
    """Score ``cases`` in batches; ``[len(cases), len(teacher.labels)]``."""
    parts = [check_scores(teacher.score(cases[i:i + batch_size]),
                          len(cases[i:i + batch_size]), len(teacher.labels))
             for i in range(0, len(cases), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, len(teacher.labels)), np.float32)


def as_tensor(array: np.ndarray) -> Any:
    """A torch tensor over ``array``'s memory (no copy). Prepared arrays may be read-only
    views into Arrow buffers; a model only reads its inputs, so torch's warning about
    that is silenced."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def resolve_device(device: str) -> str:
    """``"auto"`` is CUDA when this process sees a GPU (a Ray actor with
    ``num_gpus`` > 0 does), else CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def weights_version(*weights_files: Path) -> str:
    """A teacher's version: the first 16 hex digits of the weights' SHA-256
    (over every shard, in the order given)."""
    digest = hashlib.sha256()
    for weights_file in weights_files:
        with open(weights_file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
