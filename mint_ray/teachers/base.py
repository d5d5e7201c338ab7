"""The teacher interface: score every label of a task for a batch of cases.

A teacher is a directory (local or ``s3://``) in Hugging Face style: weights in
safetensors, tokenizer/processor files, and ``mint_teacher.json`` naming its
kind, name, version (a content hash of the weights), task and labels. The
preference builder loads one with :func:`load_teacher` inside a Ray actor and
ranks labels by :meth:`Teacher.score`; images are decoded by the caller.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mint_ray import storage
from mint_ray.errors import MintError

SPEC_FILE = "mint_teacher.json"
KINDS = ("fusion", "clip")
# Model types that a bare Hugging Face directory (no SPEC_FILE) may hold.
HF_CLIP_TYPES = ("clip", "siglip")


@dataclass(frozen=True)
class Case:
    """One case as a teacher sees it: the note and/or the decoded RGB image (HxWx3 uint8)."""

    note: str | None = None
    image: np.ndarray | None = None


@runtime_checkable
class Teacher(Protocol):
    """Scores every label of a task; higher means more likely.

    ``requires`` names the inputs a case must carry ("note", "image"); the
    caller quarantines cases without them instead of calling ``score``.
    """

    kind: str
    name: str
    version: str
    task: str
    labels: tuple[str, ...]
    requires: tuple[str, ...]

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
        if spec.kind not in KINDS:
            raise MintError(f"{where}: unknown teacher kind {spec.kind!r} in {SPEC_FILE}; "
                            f"known kinds: {', '.join(KINDS)}")
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


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> HxWx3 uint8 RGB (what ``Case.image`` holds)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def score_all(teacher: Teacher, cases: Sequence[Case], batch_size: int = 64) -> np.ndarray:
    """Score ``cases`` in batches; ``[len(cases), len(teacher.labels)]``."""
    parts = [check_scores(teacher.score(cases[i:i + batch_size]),
                          len(cases[i:i + batch_size]), len(teacher.labels))
             for i in range(0, len(cases), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, len(teacher.labels)), np.float32)


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


# ---------------------------------------------------------------- save / load


def publish_dir(local_dir: Path, uri: str, *, overwrite: bool = False) -> str:
    """Copy a teacher directory to ``uri``; ``mint_teacher.json`` goes last, so a
    reader never sees a half-written teacher. An existing one is refused unless
    ``overwrite`` (then the old files are removed first)."""
    storage.check_reachable(uri)
    if storage.exists(storage.join(uri, SPEC_FILE)):
        if not overwrite:
            raise MintError(f"{uri} already holds a teacher: pass --overwrite "
                            "(storage.overwrite=true) or choose another output_uri")
        storage.delete_tree(uri)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.name == SPEC_FILE):
        storage.write_bytes(storage.join(uri, path.relative_to(local_dir).as_posix()),
                            path.read_bytes())
    return uri


def save_teacher_dir(teacher: SavableTeacher, uri: str, *, overwrite: bool = False,
                     lineage: dict[str, Any] | None = None,
                     metrics: dict[str, Any] | None = None) -> TeacherSpec:
    """Save ``teacher`` at ``uri`` (local path or ``s3://``) and return its spec.

    The teacher writes its files into a local folder (its version becomes the
    weights' hash), the spec gets ``lineage``/``metrics``, then the folder is
    published to ``uri``.
    """
    with tempfile.TemporaryDirectory(prefix="mint-teacher-") as tmp:
        local = Path(tmp)
        spec = teacher.save_pretrained(local)
        spec = replace(spec, lineage={**spec.lineage, **(lineage or {})},
                       metrics={**spec.metrics, **(metrics or {})})
        (local / SPEC_FILE).write_text(spec.to_json())
        publish_dir(local, uri, overwrite=overwrite)
    return spec


def _cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("MINT_RAY_CACHE") or "~/.cache/mint-ray"
    return Path(root).expanduser() / "teachers"


def _download(uri: str, key_file: str, cache_dir: str | None) -> Path:
    """Mirror ``uri`` into the local cache, keyed by the URI, the content of
    ``key_file`` (the spec, whose version is the weights' hash, or a bare
    model's config) and the file names, so a changed teacher is fetched again.
    Several actors on one node may race: each downloads into its own temporary
    folder and the first rename wins."""
    files = storage.list_files(uri)
    key_text = "\n".join([uri, *files]) + storage.read_bytes(storage.join(uri, key_file)).decode()
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    root = _cache_root(cache_dir)
    final = root / key
    if (final / ".complete").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    prefix = uri.rstrip("/") + "/"
    for file_uri in files:
        target = tmp / file_uri[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(file_uri))
    (tmp / ".complete").write_text(uri)
    try:
        tmp.rename(final)
    except OSError:
        # Another process finished first: use its copy.
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _local_dir(uri: str, key_file: str, cache_dir: str | None) -> Path:
    if storage.is_s3(uri):
        return _download(uri, key_file, cache_dir)
    _, path = storage.filesystem(uri)
    return Path(path)


def load_teacher(uri: str, device: str = "auto", *, labels: Sequence[str] | None = None,
                 prompt_template: str | None = None, task: str | None = None,
                 cache_dir: str | None = None) -> Teacher:
    """Load the teacher at ``uri`` (local path or ``s3://``) onto ``device``.

    A directory written by ``save_teacher_dir`` carries its labels. A bare
    Hugging Face CLIP/SigLIP directory (no ``mint_teacher.json``) is scored
    zero-shot and needs ``labels``, ``prompt_template`` and ``task``. Passing
    ``labels`` to a saved CLIP teacher re-targets its prompts; a fusion
    teacher's labels are fixed by its classifier head.
    """
    device = resolve_device(device)
    if storage.exists(storage.join(uri, SPEC_FILE)):
        spec = TeacherSpec.from_json(storage.read_bytes(storage.join(uri, SPEC_FILE)).decode(), uri)
        local = _local_dir(uri, SPEC_FILE, cache_dir)
        if spec.kind == "fusion":
            from mint_ray.teachers.fusion import FusionTeacher

            if labels is not None and tuple(labels) != spec.labels:
                raise MintError(f"{uri}: this fusion teacher scores its own {len(spec.labels)} "
                                "labels and cannot be re-targeted; train one on this label set")
            return FusionTeacher.from_pretrained(local, spec, device)
        from mint_ray.teachers.clip import ClipTeacher

        return ClipTeacher.from_pretrained(local, spec, device, labels=labels,
                                           prompt_template=prompt_template)
    if not storage.exists(storage.join(uri, "config.json")):
        raise MintError(f"{uri}: no teacher here (neither {SPEC_FILE} nor a Hugging Face "
                        "config.json); train one with `mint-ray teacher train` or fix the URI")
    config = json.loads(storage.read_bytes(storage.join(uri, "config.json")))
    if config.get("model_type") not in HF_CLIP_TYPES:
        raise MintError(f"{uri}: model_type {config.get('model_type')!r} is not a CLIP-family "
                        f"model ({', '.join(HF_CLIP_TYPES)}); only those load without {SPEC_FILE}")
    if not labels or not prompt_template or not task:
        raise MintError(f"{uri}: a bare CLIP/SigLIP directory needs labels, prompt_template "
                        "(e.g. 'an H&E image of {label} tissue nuclei') and task")
    from mint_ray.teachers.clip import ClipTeacher

    local = _local_dir(uri, "config.json", cache_dir)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return ClipTeacher.from_hf_dir(local, name=name, task=task, labels=labels,
                                   prompt_template=prompt_template, device=device)
