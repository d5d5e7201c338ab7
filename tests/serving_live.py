"""A live Ray Serve for the serving tests: a Ray cluster started here, Serve on a free
127.0.0.1 port, and two applications of tiny students registered in a real MLflow
server (``/text``: rare_disease, API key, CORS, alias polled every second;
``/vision``: tissue_type, no key). ``start_serving`` is what each test module's own
module-scoped fixture calls (a Ray cluster per module, stopped at its end)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from mint_ray.serving.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from tests.conftest import free_port
from tests.serving_inputs import SMALL

KEY_ENV = "MINT_TEST_SERVE_KEY"
KEY = f"k-{uuid.uuid4().hex}"
NOTE = "Tall stature, arachnodactyly and ectopia lentis since childhood."


@dataclass
class Served:
    base: str
    text: httpx.Client  # /text: rare_disease, key required, CORS on, alias polled every second
    vision: httpx.Client  # /vision: tissue_type, no key, no CORS
    tracking_uri: str
    text_name: str
    vision_name: str
    text_uri: str
    vision_uri: str
    tmp: Path
    logs_dir: Path
    cache: Path  # the replicas' MINT_RAY_CACHE
    gcs_address: str  # for a second driver (``mint-ray serve --address``)


def register(tracking_uri: str, model_dir: Path, name: str, alias: str | None = "champion") -> str:
    import mlflow
    from mlflow import MlflowClient

    from mint_ray.registry import log_student

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("serving-tests")
    with mlflow.start_run():
        version = log_student(model_dir, name, {"task": "test"})["version"]
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version)
    return version


def error_code(resp: httpx.Response) -> str:
    """The code of an error in the one error shape (which this checks)."""
    body = resp.json()
    assert set(body) == {"error", "request_id"} and body["request_id"] == resp.headers["x-request-id"]
    return body["error"]["code"]


@contextmanager
def start_serving(mlflow_server: str, tmp: Path, **common: Any) -> Iterator[Served]:
    """Serve the two applications; ``common`` overrides their shared args (limits, deployment...)."""
    import ray
    from ray import serve

    from mint_ray.serving.app import build_app
    from tests.tinymodels import make_student_dir

    suffix = uuid.uuid4().hex[:6]
    text_name, vision_name = f"serve-text-{suffix}", f"serve-vision-{suffix}"
    register(mlflow_server, make_student_dir(tmp / "text1", "rare_disease"), text_name)
    register(mlflow_server, make_student_dir(tmp / "vision1", "tissue_type"), vision_name)
    if ray.is_initialized():
        ray.shutdown()
    # Before ray.init: replicas inherit the raylet's environment.
    os.environ[KEY_ENV] = KEY
    cache, cache_before = tmp / "node-cache", os.environ.get("MINT_RAY_CACHE")
    os.environ["MINT_RAY_CACHE"] = str(cache)
    callback_before = os.environ.get(PROXY_CALLBACK_ENV)
    os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK  # the proxy's header guard
    ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"tracking_uri": mlflow_server, "max_new_tokens": 6, "limits": SMALL.model_dump(),
            "deployment": {"num_cpus": 0.25}, **common}
    text_uri, vision_uri = f"models:/{text_name}@champion", f"models:/{vision_name}@champion"
    serve.run_many([
        serve.RunTarget(build_app({**args, "model_uri": text_uri, "task": "rare_disease", "api_key_env": KEY_ENV,
                                   "alias_poll_s": 1, "cors_origins": ["http://allowed.example"]}),
                        name="text", route_prefix="/text"),
        serve.RunTarget(build_app({**args, "model_uri": vision_uri}), name="vision", route_prefix="/vision")])
    base = f"http://127.0.0.1:{port}"
    node = ray._private.worker._global_node
    logs = Path(node.get_logs_dir_path())
    text = httpx.Client(base_url=f"{base}/text", timeout=120, headers={"Authorization": f"Bearer {KEY}"})
    vision = httpx.Client(base_url=f"{base}/vision", timeout=120)
    try:
        yield Served(base, text, vision, mlflow_server, text_name, vision_name, text_uri, vision_uri, tmp, logs,
                     cache, node.gcs_address)
    finally:
        text.close()
        vision.close()
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(KEY_ENV, None)
        for name, before in (("MINT_RAY_CACHE", cache_before), (PROXY_CALLBACK_ENV, callback_before)):
            if before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = before


def files_holding(logs_dir: Path, secrets: list[str]) -> list[str]:
    """The files under ``logs_dir`` (the Ray session's logs: Serve's replica, proxy and
    controller logs, workers' stdout/stderr) that hold any of ``secrets``."""
    found = []
    for path in logs_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s[:12]}..." for s in secrets if s.encode() in data]
    return found
