"""Configs, storage (local and real S3) and tracking (real MLflow server)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pyarrow as pa
import pytest
import yaml

from mint_ray import storage
from mint_ray.config import StorageConfig, StrictModel, TrackingConfig, load_config, parse_overrides
from mint_ray.errors import ConfigError, StorageError
from mint_ray.tracking import flatten_params, stage_run


class _Inner(StrictModel):
    size: int = 3
    name: str = "x"


class _Stage(StrictModel):
    storage: StorageConfig = StorageConfig()
    inner: _Inner = _Inner()
    api_key: str | None = None


def test_overrides_parse_yaml_values() -> None:
    assert parse_overrides(["a.b=1", "a.c=true", "d=s3://b/p", "e=[1, 2]"]) == {
        "a": {"b": 1, "c": True}, "d": "s3://b/p", "e": [1, 2]}


def test_recipe_then_overrides(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"inner": {"size": 5, "name": "r"}}))
    cfg = load_config(_Stage, recipe, ["inner.size=7", "storage.root=s3://b/p"])
    assert (cfg.inner.size, cfg.inner.name, cfg.storage.root) == (7, "r", "s3://b/p")


@pytest.mark.parametrize(("override", "needle"), [
    ("inner.sise=3", "unknown key 'inner.sise'; allowed here: name, size"),
    ("storag.root=x", "unknown key 'storag'; allowed here: api_key, inner, storage"),
    ("inner.size=abc", "bad value for 'inner.size'"),
    ("inner", "is not KEY=VALUE"),
])
def test_bad_config_names_the_field(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_config(_Stage, None, [override])
    assert needle in str(err.value)


def test_missing_recipe_is_clear(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(_Stage, tmp_path / "nope.yaml")


def test_secret_params_are_masked() -> None:
    params = flatten_params(_Stage(api_key="hunter2"))
    assert params["api_key"] == "***" and params["inner.size"] == "3"


def _roundtrip(root: str) -> None:
    uri = storage.join(root, "ds")
    table = pa.table({"x": list(range(100)), "s": [str(i) for i in range(100)]})
    manifest = storage.write_dataset(uri, table)
    assert manifest.num_rows == 100
    assert storage.read_dataset(uri).equals(table)
    # A complete dataset is not replaced without overwrite, and nothing is left behind.
    with pytest.raises(StorageError, match="--overwrite"):
        storage.write_dataset(uri, table.slice(0, 5))
    assert len([f for f in storage.list_files(uri) if f.endswith(".parquet")]) == 1
    replaced = storage.write_dataset(uri, table.slice(0, 5), overwrite=True)
    assert storage.read_dataset(uri).num_rows == 5
    assert replaced.content_hash != manifest.content_hash
    # Re-running replaces, never adds: one version's files remain.
    assert [f for f in storage.list_files(uri) if f.endswith(".parquet")] == replaced.files


def test_dataset_roundtrip_local(tmp_path) -> None:
    _roundtrip(str(tmp_path))


def test_crash_mid_write_leaves_no_dataset(tmp_path) -> None:
    uri = str(tmp_path / "ds")
    version = storage.prepare_output(uri, overwrite=False)
    storage.write_table(version, pa.table({"x": [1]}))
    # The writer dies here: no commit. Readers must not see a dataset.
    assert storage.read_manifest(uri) is None
    with pytest.raises(StorageError, match="no complete dataset"):
        storage.read_dataset(uri)


def test_bad_scheme() -> None:
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.filesystem("gs://bucket/x")


@pytest.mark.s3
def test_dataset_roundtrip_s3(s3_bucket: str) -> None:
    _roundtrip(s3_bucket + "/prefix")


@pytest.mark.s3
def test_s3_errors_are_clear_and_secret_free(s3_bucket: str, monkeypatch) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        storage.check_reachable("s3://no-such-bucket-mint/x")
    secret = "wrong-secret-value-123"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(StorageError, match="refused the credentials") as err:
        storage.check_reachable(s3_bucket + "/x")
    assert secret not in str(err.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        storage.write_dataset(s3_bucket + "/y", pa.table({"x": [1]}))


@pytest.mark.mlflow_server
def test_stage_run_on_real_mlflow_server(mlflow_server: str, s3_bucket: str, tmp_path) -> None:
    uri = s3_bucket + "/ds"
    manifest = storage.write_dataset(uri, pa.table({"x": [1, 2]}))
    cfg = _Stage(api_key="topsecret")
    tracking = TrackingConfig(tracking_uri=mlflow_server, experiment="foundation-test")
    (tmp_path / "summary.txt").write_text("ok")
    with stage_run(tracking, "unit", cfg, s3_bucket) as run:
        run.log_metrics({"rows": 2})
        run.set_lineage("input", uri, manifest)
        run.log_artifact(tmp_path / "summary.txt")
    client = mlflow.MlflowClient(mlflow_server)
    got = client.get_run(run.run_id)
    assert got.data.params["api_key"] == "***"
    assert got.data.metrics["rows"] == 2
    assert got.data.tags["input.content_hash"] == manifest.content_hash
    assert got.data.tags["mint.stage"] == "unit"
    # The artifact went through the server to the real S3 store.
    local = client.download_artifacts(run.run_id, "summary.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "ok"
    assert "topsecret" not in str(got.data)


def test_local_default_tracking_is_sqlite(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "note.txt").write_text("x")
    with stage_run(TrackingConfig(experiment="local"), "unit", _Stage(), str(tmp_path)) as run:
        run.log_artifact(tmp_path / "note.txt")
    assert (tmp_path / "mlflow.db").exists()
    # Artifacts land beside the store, not in the working directory.
    assert list((tmp_path / "mlartifacts").rglob("note.txt"))


def test_access_denied_names_the_action_the_uri_and_who(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "When getting information for bucket 'b': AWS Error ACCESS_DENIED during HeadBucket operation: No body"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    role = str(storage._explain("s3://b/cohorts/x", OSError(text)))
    assert "s3:ListBucket on arn:aws:s3:::b (HeadBucket)" in role and "this node's role" in role
    assert "access key" not in role.lower() and "AWS_ACCESS_KEY_ID" not in role
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::1:role/mint-ray-ray-pods")
    get = "When reading information for key 'models/plip/config.json' in bucket 'b': AWS Error ACCESS_DENIED during " \
          "GetObject operation"
    irsa = str(storage._explain("s3://b/models/plip/config.json", OSError(get)))
    assert "s3:GetObject on arn:aws:s3:::b/models/plip/config.json" in irsa and "mint-ray-ray-pods" in irsa
    assert "access key" not in irsa.lower()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    keyed = str(storage._explain("s3://b/cohorts/x", OSError(text)))
    assert "AWS_ACCESS_KEY_ID" in keyed and "s3:ListBucket" in keyed
