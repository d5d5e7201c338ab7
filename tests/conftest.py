"""Real services for the tests: a Ceph S3 gateway and an MLflow server on 127.0.0.1.

Each is started once per test session by the scripts in ``infra/local/`` (with
a bounded lifetime) and stopped by PID at the end. If ``AWS_ENDPOINT_URL`` and
keys are already set (a developer's long-running local S3), that one is used.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "infra" / "local"
# Services stop themselves after this even if the test session is killed.
SERVICE_LIFETIME_S = 3600

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The longest modules (minutes each) go first, so that under `pytest -n 2 --dist loadfile`
# the two workers finish together instead of one starting a long module near the end.
LONGEST_MODULES = ("test_training", "test_rehearsal", "test_evaluate", "test_hosts", "test_teachers",
                   "test_preferences", "test_serving_fuzz", "test_serving")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.stem
        return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)

    items.sort(key=rank)  # stable: the tests of a module keep their order


@pytest.fixture(autouse=True, scope="session")
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The node-local model cache of this test session (Ray workers inherit it), not ~/.cache."""
    saved = os.environ.get("MINT_RAY_CACHE")
    os.environ["MINT_RAY_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    yield
    if saved is None:
        os.environ.pop("MINT_RAY_CACHE", None)
    else:
        os.environ["MINT_RAY_CACHE"] = saved


@pytest.fixture(autouse=True, scope="module")
def _isolate_mlflow_uri() -> Iterator[None]:
    """``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` in the environment;
    restore it after each module (module scope: it must wrap the module's own fixtures)
    so one module's server does not become the next module's default."""
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(saved or "")
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def repo_copy(dest: Path, *paths: str) -> Path:
    """A copy of some of the repository's files and folders under ``dest`` (to plant a mistake in)."""
    import shutil

    for rel in paths:
        src, target = REPO / rel, dest / rel
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, target)
    return dest


def plant(path: Path, old: str, new: str) -> None:
    """Replace the first ``old`` in the file with ``new`` (``old`` must be there)."""
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=3)
        return True
    except Exception as err:  # an HTTP error status still means the server answered
        return hasattr(err, "code")


def exports(lines: str) -> dict[str, str]:
    """The ``export KEY=VALUE`` lines of a script's output (``s3.sh env``, ``hosts.sh env``)."""
    env = {}
    for line in lines.splitlines():
        if line.startswith("export "):
            for word in line[len("export "):].split():
                key, _, value = word.partition("=")
                env[key] = value
    return env


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set, restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """AWS_* variables of a live local S3 gateway, also set in ``os.environ``."""
    external = os.environ.get("AWS_ENDPOINT_URL")
    if external and os.environ.get("AWS_ACCESS_KEY_ID") and _reachable(external):
        yield {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        return
    state = tmp_path_factory.mktemp("ceph")
    mon = free_port()
    ports = {"S3_PORT": str(free_port()), "MON_PORT": str(mon), "MON2_PORT": str(free_port())}
    env = {**os.environ, **ports}
    try:
        subprocess.run([str(LOCAL / "s3.sh"), "start", str(state), str(SERVICE_LIFETIME_S)],
                       env=env, check=True, timeout=600)
        out = subprocess.run([str(LOCAL / "s3.sh"), "env", str(state)], env=env, check=True,
                             capture_output=True, text=True).stdout
        aws = exports(out)
        with environment(aws):
            yield aws
    finally:
        subprocess.run([str(LOCAL / "s3.sh"), "stop", str(state)], env=env, check=False)


def make_bucket(name_prefix: str = "t") -> str:
    import boto3

    name = f"{name_prefix}-{uuid.uuid4().hex[:10]}"
    # A session of its own: boto3's default session keeps the first keys it read, and a
    # module may point this process at another S3 server (the namespaced hosts' own).
    boto3.session.Session().client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(s3_env: dict[str, str]) -> str:
    """A fresh, empty bucket on the local gateway, as ``s3://name``."""
    return f"s3://{make_bucket()}"


@pytest.fixture(scope="session")
def mlflow_server(s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite store, artifacts on the local S3); yields its URI."""
    bucket = make_bucket("mlflow")
    state = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    try:
        subprocess.run([str(LOCAL / "mlflow.sh"), "start", str(state), str(port),
                        f"s3://{bucket}/artifacts", str(SERVICE_LIFETIME_S)], check=True, timeout=300)
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([str(LOCAL / "mlflow.sh"), "stop", str(state)], check=False)
