"""The MLflow model registry: log a student directory as a model, register it,
resolve ``models:/`` URIs back to a local Hugging Face directory.

A student is logged as an MLflow pyfunc whose artifact ``model`` is the
consolidated Hugging Face directory (weights, tokenizer/processor and
``mint_model.json``). Loaders (evaluation, Ray Serve) download that directory
and use plain transformers; ``mlflow.pyfunc.load_model`` also works and
generates answers for a DataFrame of prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from mint_ray import storage
from mint_ray.errors import MintError

MODEL_ARTIFACT = "model"
METADATA_FILE = "mint_model.json"
# The model's runtime needs; MLflow's inferred list would add torchvision (not
# installable with the CPU torch wheel) for transformers models.
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.23.0", "peft==0.21.2", "pillow==13.0.0",
                    "accelerate==1.15.0"]


class StudentModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: input rows with ``messages`` (chat) -> generated text."""

    def load_context(self, context: Any) -> None:
        from mint_ray.generation import load_generator

        self._generator = load_generator(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        rows = model_input.to_dict("records")
        return self._generator.generate([r["messages"] for r in rows],
                                        [r.get("image") for r in rows], **(params or {}))


def read_model_metadata(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise MintError(f"{model_dir} is not a mint-ray model directory (no {METADATA_FILE})")
    return json.loads(path.read_text())


def log_student(model_dir: str | Path, name: str | None, tags: dict[str, str]) -> dict[str, str]:
    """Log ``model_dir`` as a model of the active run; register it under ``name`` if given.

    Returns ``{"model_uri", "name", "version"}`` (version empty when not registered).
    """
    metadata = read_model_metadata(model_dir)
    info = mlflow.pyfunc.log_model(name=MODEL_ARTIFACT, python_model=StudentModel(),
                                   artifacts={MODEL_ARTIFACT: str(model_dir)},
                                   pip_requirements=PIP_REQUIREMENTS,
                                   metadata={"mint": metadata})
    out = {"model_uri": info.model_uri, "name": name or "", "version": ""}
    if name:
        version = mlflow.register_model(info.model_uri, name, tags=tags)
        out["version"] = str(version.version)
    return out


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """``models:/name/3`` -> (name, "3", None); ``models:/name@champion`` -> (name, None, "champion");
    None for anything else (a logged model ``models:/m-<id>``, a path)."""
    if not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, None, alias
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, version, None
    return None


def resolve_model_dir(uri: str, cache_dir: str | Path) -> Path:
    """A local Hugging Face directory for ``uri``: ``models:/name@alias``, ``models:/name/3``,
    an ``s3://`` directory or a local path."""
    if uri.startswith("models:/"):
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(cache_dir))
        except mlflow.exceptions.MlflowException as err:
            raise MintError(f"model URI {uri!r} does not resolve in the MLflow registry at "
                            f"{mlflow.get_tracking_uri()}: {str(err).splitlines()[0]}") from None
        candidates = sorted(Path(local).rglob(METADATA_FILE))
        if not candidates:
            raise MintError(f"{uri} is not a mint-ray student (no {METADATA_FILE} in its artifacts)")
        return candidates[0].parent
    if storage.is_s3(uri):
        return download_dir(uri, cache_dir)
    path = Path(uri)
    if not path.is_dir():
        raise MintError(f"model directory {uri!r} does not exist")
    return path


def download_dir(uri: str, cache_dir: str | Path) -> Path:
    """Copy every file under an s3:// (or local) directory into ``cache_dir``."""
    files = storage.list_files(uri)
    if not files:
        raise MintError(f"{uri}: no files there; check the URI")
    root = uri.rstrip("/")
    prefix = root[len("s3://"):] if storage.is_s3(root) else str(Path(root).absolute())
    out = Path(cache_dir)
    for f in files:
        rel = f[len("s3://"):] if storage.is_s3(f) else f
        target = out / rel[len(prefix):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(f))
    return out


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (local or s3://)."""
    base = Path(local_dir)
    for path in sorted(base.rglob("*")):
        if path.is_file():
            storage.write_bytes(storage.join(uri, str(path.relative_to(base))), path.read_bytes())
