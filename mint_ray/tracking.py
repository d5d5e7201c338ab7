"""MLflow: one run per stage, config as params, lineage as tags.

The only module (with the registry helpers that later stages add) that imports
mlflow. Params come from the typed config, which never holds note text; keys
that look like secrets are masked before logging.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mint_ray import storage
from mint_ray.config import TrackingConfig

_SECRET_WORDS = ("key", "secret", "token", "password", "credential")
# MLflow caps a param value at 6000 characters; long lists are truncated, not dropped.
_MAX_PARAM = 500


def resolve_tracking_uri(cfg: TrackingConfig, data_root: str) -> str:
    """Config, then ``MLFLOW_TRACKING_URI``, then a SQLite store beside the data."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base = Path(data_root) if not storage.is_s3(data_root) else Path("mint-data")
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(base / 'mlflow.db').absolute()}"


def flatten_params(config: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted params from a config; secret-looking keys are masked."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{name}."))
            continue
        if value is not None and any(w in key.lower() for w in _SECRET_WORDS):
            out[name] = "***"
            continue
        text = json.dumps(value) if not isinstance(value, str) else value
        out[name] = storage.redact(text)[:_MAX_PARAM]
    return out


def code_version() -> str:
    """The git commit of the code (with ``-dirty``), or the package version outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, check=True,
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return f"mint-ray=={version('mint-ray')}"


class StageRun:
    """A live MLflow run (or a no-op when tracking is disabled)."""

    def __init__(self, run: Any | None) -> None:
        self._run = run

    @property
    def run_id(self) -> str | None:
        return self._run.info.run_id if self._run else None

    @property
    def tracking_uri(self) -> str | None:
        """Where the run lives, for processes (Ray workers) that log into it."""
        if not self._run:
            return None
        import mlflow

        return mlflow.get_tracking_uri()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._run:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self._run:
            import mlflow

            mlflow.set_tags({k: storage.redact(str(v)) for k, v in tags.items()})

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        if self._run:
            import mlflow

            mlflow.log_dict(data, name)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._run:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self._run:
            import mlflow

            mlflow.log_text(text, name)

    def set_lineage(self, role: str, uri: str, manifest: storage.Manifest | None) -> None:
        """Tag an input or output dataset: ``<role>.uri`` and ``<role>.content_hash``."""
        tags = {f"{role}.uri": uri}
        if manifest is not None:
            tags[f"{role}.content_hash"] = manifest.content_hash
            tags[f"{role}.num_rows"] = manifest.num_rows
        self.set_tags(tags)


@contextlib.contextmanager
def stage_run(cfg: TrackingConfig, stage: str, config: BaseModel, data_root: str,
              run_name: str | None = None, tags: dict[str, Any] | None = None) -> Iterator[StageRun]:
    """Open an MLflow run for one stage; it is marked FAILED if the body raises."""
    if not cfg.enabled:
        yield StageRun(None)
        return
    import mlflow

    uri = resolve_tracking_uri(cfg, data_root)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(cfg.experiment) is None:
        # A local store keeps its artifacts beside the database, not in the CWD.
        db_dir = Path(uri[len("sqlite:///"):]).parent
        mlflow.create_experiment(cfg.experiment, artifact_location=(db_dir / "mlartifacts").as_uri())
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(run_name=run_name or stage) as run:
        mlflow.log_params(flatten_params(config))
        mlflow.set_tags({"mint.stage": stage, "mint.code_version": code_version(),
                         **{k: storage.redact(str(v)) for k, v in (tags or {}).items()}})
        yield StageRun(run)

