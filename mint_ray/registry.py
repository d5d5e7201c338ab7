"""The MLflow model registry: register a student, resolve ``models:/`` URIs back to a
local Hugging Face directory.

Registration is by reference: a version's ``source`` is the model folder that training
published (``s3://<bucket>/students/<run>/model``, or a local folder), with the lineage as
version tags. The weights (6.4 GB for the 3B student, 21 GB for the 11B) never travel
through the tracking server; loaders (evaluation actors, Serve replicas) read the folder
with their own S3 access through the node-local model cache. The run keeps the small
``mint_model.json``.

A local folder cannot be the source of a version on a remote tracking server (the
server refuses local paths), so there, and only there, the folder is uploaded as a
pyfunc model (tiny local students); ``mlflow.pyfunc.load_model`` works for those.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from mint_ray import model_folders, storage
from mint_ray.errors import MintError
from mint_ray.model_folders import METADATA_FILE

MODEL_ARTIFACT = "model"
# Version tags of a registration by reference: the folder, and a fingerprint of its metadata
# (an overwritten folder no longer matches the version that named it).
SOURCE_TAG = "mint.model_uri"
FINGERPRINT_TAG = "mint.metadata_sha256"
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


def _remote_tracking() -> bool:
    return mlflow.get_tracking_uri().split(":", 1)[0] in ("http", "https", "databricks")


def _fingerprint(model_dir: str | Path) -> str:
    return hashlib.sha256((Path(model_dir) / METADATA_FILE).read_bytes()).hexdigest()


def _ensure_registered_model(client: mlflow.MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)


def log_student(model_dir: str | Path, name: str | None, tags: dict[str, str],
                model_uri: str | None = None) -> dict[str, str]:
    """Record the student of the active run and register it under ``name`` if given.

    ``model_dir`` is a local copy (its metadata is read); ``model_uri`` the published folder
    (default: ``model_dir``), which becomes the version's source. Returns ``{"model_uri",
    "name", "version"}`` (version empty when not registered).
    """
    source = storage.absolute(model_uri or str(model_dir))
    metadata = model_folders.read_metadata(model_dir)
    if storage.is_s3(source) or not _remote_tracking():
        run = mlflow.active_run()
        mlflow.log_dict(metadata, f"{MODEL_ARTIFACT}/{METADATA_FILE}")
        mlflow.set_tag(SOURCE_TAG, source)
        out = {"model_uri": source, "name": name or "", "version": ""}
        if name:
            client = mlflow.MlflowClient()
            _ensure_registered_model(client, name)
            version = client.create_model_version(
                name, source, run_id=run.info.run_id if run else None,
                tags={**tags, SOURCE_TAG: source, FINGERPRINT_TAG: _fingerprint(model_dir)})
            out["version"] = str(version.version)
        return out
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


def _referenced_folder(name: str, version: str) -> Path | None:
    """The local copy of the folder a version registered by reference names (None for a
    version whose model was uploaded to the tracking server)."""
    try:
        mv = mlflow.MlflowClient().get_model_version(name, version)
    except mlflow.exceptions.MlflowException as err:
        raise MintError(f"models:/{name}/{version} is not in the MLflow registry at {mlflow.get_tracking_uri()}: "
                        f"{str(err).splitlines()[0]}") from None
    tags = dict(mv.tags or {})
    if SOURCE_TAG not in tags:
        return None
    local = model_folders.local_copy(mv.source)
    expected = tags.get(FINGERPRINT_TAG)
    if expected and (local / METADATA_FILE).is_file() and _fingerprint(local) != expected:
        raise MintError(f"models:/{name}/{version}: the folder it names ({mv.source}) now holds another model "
                        f"({METADATA_FILE} changed since registration): it was overwritten; register the new "
                        "model as a new version")
    return local


def local_model_dir(uri: str) -> Path:
    """A local Hugging Face directory for ``uri``: ``models:/name@alias``, ``models:/name/3``,
    ``models:/m-<id>``, an ``s3://`` directory or a local path.

    A registered version's source folder (registration by reference) is read through the
    node-local model cache (:mod:`mint_ray.model_folders`); a version uploaded to the tracking
    server is downloaded once per node into the same cache, keyed by the tracking server and
    the exact version (an alias is resolved first: it may move, a version does not).
    """
    if not uri.startswith("models:/"):
        return model_folders.local_copy(uri)
    parsed = parse_models_uri(uri)
    pinned = uri
    if parsed is not None:
        name, version, alias = parsed
        if alias is not None:
            version = alias_version(name, alias)
        pinned = f"models:/{name}/{version}"
        if version and version.isdigit():
            referenced = _referenced_folder(name, version)
            if referenced is not None:
                return referenced

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
