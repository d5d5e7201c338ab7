"""The MLflow model registry: log a student directory as a model, register it,
resolve ``models:/`` URIs back to a local Hugging Face directory.

A student is logged as an MLflow pyfunc whose artifact ``model`` is the
consolidated Hugging Face directory (weights, tokenizer/processor and
``mint_model.json``). Loaders (evaluation, Ray Serve) download that directory
and use plain transformers; ``mlflow.pyfunc.load_model`` also works and
generates answers for a DataFrame of prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from mint_ray import model_folders
from mint_ray.errors import MintError
from mint_ray.model_folders import METADATA_FILE

MODEL_ARTIFACT = "model"
# The model's runtime needs; MLflow's inferred list would add torchvision (not
# installable with the CPU torch wheel) for transformers models.
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.23.0", "peft==0.21.2", "pillow==13.0.0",
                    "accelerate==1.15.0"]


class StudentModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: input rows with ``messages`` (chat) -> generated text."""

    def load_context(self, context: Any) -> None:
        from mint_ray.generation import load_generator  # torch: only where a model is loaded

        self._generator = load_generator(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        rows = model_input.to_dict("records")
        return self._generator.generate([r["messages"] for r in rows],
                                        [r.get("image") for r in rows], **(params or {}))


def log_student(model_dir: str | Path, name: str | None, tags: dict[str, str]) -> dict[str, str]:
    """Log ``model_dir`` as a model of the active run; register it under ``name`` if given.

    Returns ``{"model_uri", "name", "version"}`` (version empty when not registered).
    """
    metadata = model_folders.read_metadata(model_dir)
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


def alias_version(name: str, alias: str) -> str:
    """The version that ``name@alias`` points at now."""
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException as err:
        raise MintError(f"models:/{name}@{alias}: the registry has no alias {alias!r} on model {name!r} "
                        f"({str(err).splitlines()[0]})") from None


def local_model_dir(uri: str) -> Path:
    """A local Hugging Face directory for ``uri``: ``models:/name@alias``, ``models:/name/3``,
    ``models:/m-<id>``, an ``s3://`` directory or a local path.

    Registry models are downloaded once per node into the model cache
    (:mod:`mint_ray.model_folders`), keyed by the tracking server and the exact
    version (an alias is resolved first: it may move, a version does not).
    """
    if not uri.startswith("models:/"):
        return model_folders.local_copy(uri)
    parsed = parse_models_uri(uri)
    pinned = uri
    if parsed is not None and parsed[2] is not None:
        pinned = f"models:/{parsed[0]}/{alias_version(parsed[0], parsed[2])}"

    def download(target: Path) -> None:
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(target))
        except mlflow.exceptions.MlflowException as err:
            raise MintError(f"model URI {uri!r} does not resolve in the MLflow registry at "
                            f"{mlflow.get_tracking_uri()}: {str(err).splitlines()[0]}") from None

    entry = model_folders.cached("registry", model_folders.cache_key(mlflow.get_tracking_uri(), pinned), download)
    candidates = sorted(entry.rglob(METADATA_FILE))
    if not candidates:
        raise MintError(f"{uri} is not a mint-ray student (no {METADATA_FILE} in its artifacts)")
    return candidates[0].parent
