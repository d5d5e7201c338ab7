"""Registration by reference: a version's source is the published model folder, the
weights never go through the tracking server, and ``local_model_dir`` reads the folder."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from mint_ray import model_folders, registry
from mint_ray.errors import MintError


def _student(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(tag.encode() * 1000)
    model_folders.write_metadata(folder, {"task": "rare_disease", "objective": "orpo", "tag": tag})
    return folder


def _artifact_paths(run_id: str) -> set[str]:
    client = mlflow.MlflowClient()
    out, todo = set(), [""]
    while todo:
        for f in client.list_artifacts(run_id, todo.pop() or None):
            (todo.append(f.path) if f.is_dir else out.add(f.path))
    return out


@pytest.mark.s3
@pytest.mark.mlflow_server
def test_s3_folder_is_registered_by_reference(mlflow_server: str, s3_bucket: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINT_RAY_CACHE", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(mlflow_server)
    uri = f"{s3_bucket}/students/run-a/model"
    local = _student(tmp_path / "a", "a")
    model_folders.publish_dir(local, uri)
    mlflow.set_experiment("registry-by-reference")
    with mlflow.start_run() as run:
        out = registry.log_student(local, "by-ref-test", {"objective": "orpo"}, model_uri=uri)
    version = mlflow.MlflowClient().get_model_version("by-ref-test", out["version"])
    assert version.source == uri and version.run_id == run.info.run_id
    assert version.tags[registry.SOURCE_TAG] == uri and version.tags["objective"] == "orpo"
    # Only the metadata went to the server; no weights among the run's artifacts.
    assert _artifact_paths(run.info.run_id) == {f"model/{model_folders.METADATA_FILE}"}
    resolved = registry.local_model_dir(f"models:/by-ref-test/{out['version']}")
    assert (resolved / "model.safetensors").read_bytes() == b"a" * 1000
    mlflow.MlflowClient().set_registered_model_alias("by-ref-test", "champion", out["version"])
    assert registry.local_model_dir("models:/by-ref-test@champion") == resolved
    # The folder overwritten under the version: refused, not silently served.
    model_folders.publish_dir(_student(tmp_path / "b", "b"), uri, overwrite=True)
    with pytest.raises(MintError, match="was overwritten"):
        registry.local_model_dir(f"models:/by-ref-test/{out['version']}")


def test_local_folder_with_a_local_store_is_registered_in_place(tmp_path: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    local = _student(tmp_path / "m", "m")
    mlflow.set_experiment("registry-local")
    with mlflow.start_run():
        out = registry.log_student(local, "local-ref", {})
    assert mlflow.MlflowClient().get_model_version("local-ref", out["version"]).source == str(local)
    assert registry.local_model_dir(f"models:/local-ref/{out['version']}") == local
