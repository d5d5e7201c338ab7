"""Finding, loading and saving teachers by kind.

The kinds are named here as ``module:class`` and imported on first use, so
``mint_ray.teachers.protocol`` stays free of torch and the kind modules never
import this one (no circle). A kind class provides
``from_pretrained(directory, spec, device, *, labels, prompt_template)``; its CPU
side (:mod:`mint_ray.teachers.inputs`, no torch) loads with
:func:`load_preprocessor` from the folder's spec and processor files alone.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mint_ray import model_folders, storage
from mint_ray.errors import MintError
from mint_ray.teachers.inputs import PREPROCESSORS
from mint_ray.teachers.protocol import (
    SPEC_FILE,
    Preprocessor,
    SavableTeacher,
    Teacher,
    TeacherSpec,
    resolve_device,
)

KINDS = {
    "fusion": "mint_ray.teachers.fusion:FusionTeacher",
    "clip": "mint_ray.teachers.clip:ClipTeacher",
}
# Model types that a bare Hugging Face directory (no SPEC_FILE) may hold.
HF_CLIP_TYPES = ("clip", "siglip")
# Files a preprocessor never reads: what load_preprocessor leaves behind on the store.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")


def _check_kind(kind: str, where: str) -> None:
    if kind not in KINDS:
        raise MintError(f"{where}: unknown teacher kind {kind!r} in {SPEC_FILE}; "
                        f"known kinds: {', '.join(KINDS)}")


def teacher_class(kind: str, where: str) -> Any:
    """The class of teacher ``kind``, imported now."""
    _check_kind(kind, where)
    module, _, name = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def read_spec(uri: str) -> TeacherSpec | None:
    """The spec of the teacher at ``uri``, or None where there is no ``mint_teacher.json``."""
    spec_uri = storage.join(uri, SPEC_FILE)
    if not storage.exists(spec_uri):
        return None
    spec = TeacherSpec.from_json(storage.read_bytes(spec_uri).decode(), uri)
    _check_kind(spec.kind, uri)
    return spec


def save_teacher_dir(teacher: SavableTeacher, uri: str, *, overwrite: bool = False,
                     lineage: dict[str, Any] | None = None,
                     metrics: dict[str, Any] | None = None,
                     extra_files: Mapping[str, bytes] | None = None) -> TeacherSpec:
    """Save ``teacher`` at ``uri`` (local path or ``s3://``) and return its spec.

    The teacher writes its files into a local folder (its version becomes the
    weights' hash), ``extra_files`` (name -> bytes: results that travel with the
    teacher) are added, the spec gets ``lineage``/``metrics``, then the folder is
    published to ``uri`` with the spec written last.
    """
    with tempfile.TemporaryDirectory(prefix="mint-teacher-") as tmp:
        local = Path(tmp)
        spec = teacher.save_pretrained(local)
        for name, data in (extra_files or {}).items():
            (local / name).write_bytes(data)
        spec = replace(spec, lineage={**spec.lineage, **(lineage or {})},
                       metrics={**spec.metrics, **(metrics or {})})
        (local / SPEC_FILE).write_text(spec.to_json())
        model_folders.publish_dir(local, uri, marker=SPEC_FILE, overwrite=overwrite)
    return spec


def load_teacher(uri: str, device: str = "auto", *, labels: Sequence[str] | None = None,
                 prompt_template: str | None = None, task: str | None = None) -> Teacher:
    """Load the teacher at ``uri`` (local path or ``s3://``, fetched once per node) onto ``device``.

    A directory written by ``save_teacher_dir`` carries its labels. A bare
    Hugging Face CLIP/SigLIP directory (no ``mint_teacher.json``) is scored
    zero-shot and needs ``labels``, ``prompt_template`` and ``task``. Passing
    ``labels`` to a saved CLIP teacher re-targets its prompts; a fusion
    teacher's labels are fixed by its classifier head.
    """
    device = resolve_device(device)
    spec = read_spec(uri)
    if spec is not None:
        local = model_folders.local_copy(uri, key_file=SPEC_FILE)
        return teacher_class(spec.kind, uri).from_pretrained(local, spec, device, labels=labels,
                                                             prompt_template=prompt_template)
    _check_bare_clip(uri)
    if not labels or not prompt_template or not task:
        raise MintError(f"{uri}: a bare CLIP/SigLIP directory needs labels, prompt_template "
                        "(e.g. 'an H&E image of {label} tissue nuclei') and task")
    local = model_folders.local_copy(uri, key_file="config.json")
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return teacher_class("clip", uri).from_hf_dir(local, name=name, task=task, labels=labels,
                                                  prompt_template=prompt_template, device=device)


def _check_bare_clip(uri: str) -> None:
    """A folder without a spec must be a Hugging Face CLIP-family checkpoint."""
    if not storage.exists(storage.join(uri, "config.json")):
        raise MintError(f"{uri}: no teacher here (neither {SPEC_FILE} nor a Hugging Face "
                        "config.json); train one with `mint-ray teacher train` or fix the URI")
    config = json.loads(storage.read_bytes(storage.join(uri, "config.json")))
    if config.get("model_type") not in HF_CLIP_TYPES:
        raise MintError(f"{uri}: model_type {config.get('model_type')!r} is not a CLIP-family "
                        f"model ({', '.join(HF_CLIP_TYPES)}); only those load without {SPEC_FILE}")


def load_preprocessor(uri: str) -> Preprocessor:
    """The CPU side of the teacher at ``uri`` (what its ``prepare`` does), from its spec and
    processor files alone: the weights are neither fetched nor loaded, so CPU-only workers
    can prepare a batch that a GPU actor then scores. A teacher re-targeted to other labels
    prepares the same inputs (labels only change the model side's prompts)."""
    spec = read_spec(uri)
    if spec is None:
        _check_bare_clip(uri)
    with _files_but_weights(uri) as directory:
        return PREPROCESSORS[spec.kind if spec else "clip"].from_pretrained(directory, spec)


@contextlib.contextmanager
def _files_but_weights(uri: str) -> Iterator[Path]:
    """A local folder with the teacher's files but its weights: a local teacher in place,
    a remote one's small files fetched into a temporary folder."""
    if not storage.is_s3(uri):
        yield model_folders.local_copy(uri)
        return
    prefix = uri.rstrip("/") + "/"
    with tempfile.TemporaryDirectory(prefix="mint-teacher-inputs-") as tmp:
        for file_uri in storage.list_files(uri):
            name = file_uri[len(prefix):]
            if not name.endswith(WEIGHT_SUFFIXES):
                target = Path(tmp) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(storage.read_bytes(file_uri))
        yield Path(tmp)
