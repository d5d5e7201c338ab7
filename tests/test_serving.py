"""Serving: a real Ray Serve on 127.0.0.1 serving tiny students registered in a real
MLflow server, spoken to over HTTP: every route, every 4xx, the API key, CORS, the logs,
``mint-ray serve``, and an alias move under load. The request checks themselves are
tested directly in ``test_serving_requests.py``."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from mint_ray.serving.config import ServeConfig
from mint_ray.serving.loading import parse_model_uri
from mint_ray.tasks import RARE_DISEASE, TISSUE_TYPES
from tests.conftest import free_port
from tests.serving_inputs import SMALL, b64, bomb_header, png

KEY_ENV = "MINT_TEST_SERVE_KEY"
KEY = f"k-{uuid.uuid4().hex}"


def test_model_uris() -> None:
    assert parse_model_uri("models:/m@champion").alias == "champion"
    ref = parse_model_uri("models:/m/3")
    assert (ref.name, ref.version, ref.alias) == ("m", "3", None)
    assert parse_model_uri("s3://b/students/x/model/").name == "model"


def test_a_loaded_model_is_prompted_as_its_metadata_records(tmp_path: Path) -> None:
    from mint_ray.model_folders import read_metadata, write_metadata
    from mint_ray.serving.inputs import prompt_for
    from mint_ray.serving.loading import load_model
    from tests.tinymodels import make_student_dir

    model_dir = make_student_dir(tmp_path / "student", "rare_disease")
    custom = replace(RARE_DISEASE, system_prompt="You are a careful geneticist.",
                     instruction="Name {n} diagnoses after {header}")
    write_metadata(model_dir, {**read_metadata(model_dir), "prompt": custom.prompt_record(n_answers=4)})
    model = load_model(ServeConfig(model_uri=str(model_dir)), parse_model_uri(str(model_dir)), None)
    assert prompt_for(model.task, "a note", 2) == custom.prompt_messages(note="a note", n_answers=4)


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


@pytest.fixture(scope="module")
def served(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    import ray
    from ray import serve

    from mint_ray.serving.app import build_app
    from tests.tinymodels import make_student_dir

    tmp = tmp_path_factory.mktemp("serving")
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
    ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"tracking_uri": mlflow_server, "max_new_tokens": 6, "limits": SMALL.model_dump(),
              "deployment": {"num_cpus": 0.25}}
    text_uri, vision_uri = f"models:/{text_name}@champion", f"models:/{vision_name}@champion"
    serve.run_many([
        serve.RunTarget(build_app({**common, "model_uri": text_uri, "task": "rare_disease", "api_key_env": KEY_ENV,
                                   "alias_poll_s": 1, "cors_origins": ["http://allowed.example"]}),
                        name="text", route_prefix="/text"),
        serve.RunTarget(build_app({**common, "model_uri": vision_uri}), name="vision", route_prefix="/vision")])
    base = f"http://127.0.0.1:{port}"
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    text = httpx.Client(base_url=f"{base}/text", timeout=120, headers={"Authorization": f"Bearer {KEY}"})
    vision = httpx.Client(base_url=f"{base}/vision", timeout=120)
    try:
        yield Served(base, text, vision, mlflow_server, text_name, vision_name, text_uri, vision_uri, tmp, logs,
                     cache)
    finally:
        text.close()
        vision.close()
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(KEY_ENV, None)
        if cache_before is None:
            os.environ.pop("MINT_RAY_CACHE", None)
        else:
            os.environ["MINT_RAY_CACHE"] = cache_before


NOTE = "Tall stature, arachnodactyly and ectopia lentis since childhood."


def error_code(resp: httpx.Response) -> str:
    body = resp.json()
    assert set(body) == {"error", "request_id"} and body["request_id"] == resp.headers["x-request-id"]
    return body["error"]["code"]


@pytest.mark.mlflow_server
def test_health_ready_and_models(served: Served) -> None:
    for client, name, task, kind in ((served.text, served.text_name, "rare_disease", "causal_lm"),
                                     (served.vision, served.vision_name, "tissue_type", "mllama")):
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["version"] == "1"
        (model,) = client.get("/v1/models").json()["data"]
        assert (model["name"], model["version"], model["alias"], model["task"], model["kind"]) == \
            (name, "1", "champion", task, kind)
        assert model["source"] == f"models:/{name}/1"
    assert served.vision.get("/v1/models").json()["data"][0]["label_ids"] == len(TISSUE_TYPES)
    assert "/v1/predict" in served.vision.get("/openapi.json").json()["paths"]


@pytest.mark.mlflow_server
def test_served_models_are_in_the_node_cache(served: Served) -> None:
    """Each served version is fetched once into the node-local model cache, complete
    (renamed into place), with nothing left half-written beside it."""
    from mint_ray.model_folders import METADATA_FILE, read_metadata

    registry = served.cache / "registry"
    assert {read_metadata(p.parent)["task"] for p in registry.rglob(METADATA_FILE)} == {"rare_disease", "tissue_type"}
    assert not [p for p in registry.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.mlflow_server
def test_predict_note(served: Served) -> None:
    resp = served.text.post("/v1/predict", json={"task": "rare_disease", "note": NOTE, "top_k": 3})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["task"] == "rare_disease" and isinstance(body["generation"], str) and body["generation"]
    assert body["model"] == {"name": served.text_name, "version": "1", "alias": "champion",
                             "uri": served.text_uri}
    assert isinstance(body["labels"], list) and len(body["labels"]) <= 3
    assert body["latency_ms"] > 0 and body["request_id"] == resp.headers["x-request-id"]


@pytest.mark.mlflow_server
def test_predict_image_json_data_url_and_multipart(served: Served) -> None:
    image = png((80, 60))
    answers = [
        served.vision.post("/v1/predict", json={"task": "tissue_type", "image": b64(image)}),
        served.vision.post("/v1/predict", json={"task": "tissue_type", "top_k": 2,
                                                "image": f"data:image/png;base64,{b64(image)}"}),
        served.vision.post("/v1/predict", data={"task": "tissue_type", "top_k": "2"},
                           files={"image": ("tile.png", image, "image/png")}),
    ]
    for resp in answers:
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["task"] == "tissue_type" and body["model"]["version"] == "1"
        assert all(set(lb) == {"rank", "label", "id"} for lb in body["labels"])
    # Greedy decoding: the same image gives the same answer by JSON and by upload.
    assert answers[0].json()["generation"] == answers[2].json()["generation"]


@pytest.mark.mlflow_server
def test_openai_chat_completions(served: Served) -> None:
    resp = served.text.post("/v1/chat/completions", json={
        "model": served.text_name, "temperature": 0.7,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": NOTE}]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == f"{served.text_name}/1"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert body["mint"]["task"] == "rare_disease"
    url = f"data:image/png;base64,{b64(png())}"
    resp = served.vision.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Which tissue?"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["mint"]["model"]["version"] == "1"
    wrong = served.text.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [
        {"role": "user", "content": NOTE}]})
    assert wrong.status_code == 404 and error_code(wrong) == "model_not_found"


@pytest.mark.mlflow_server
def test_api_key(served: Served) -> None:
    url = f"{served.base}/text/v1/predict"
    body = {"task": "rare_disease", "note": NOTE}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}):
        resp = httpx.post(url, json=body, headers=headers)
        assert resp.status_code == 401 and error_code(resp) == "unauthorized"
        assert resp.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{served.base}/text/v1/models").status_code == 401
    assert httpx.get(f"{served.base}/text/healthz").status_code == 200  # probes carry no key
    assert httpx.get(f"{served.base}/text/readyz").status_code == 200


def chunks(total: int) -> Iterator[bytes]:
    for _ in range(total // 65536 + 1):
        yield b" " * 65536


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("malformed-json", "text", {"content": b'{"task": "rare_disease", "note": ',
                                "headers": {"content-type": "application/json"}}, 400, "malformed_json"),
    ("not-an-object", "text", {"json": ["rare_disease"]}, 422, "invalid_body"),
    ("note-not-a-string", "text", {"json": {"task": "rare_disease", "note": 42}}, 422, "invalid_field"),
    ("top-k-a-string", "text", {"json": {"task": "rare_disease", "note": NOTE, "top_k": "3"}}, 422,
     "invalid_field"),
    ("top-k-too-big", "text", {"json": {"task": "rare_disease", "note": NOTE, "top_k": 50}}, 422,
     "invalid_field"),
    ("unknown-field", "text", {"json": {"task": "rare_disease", "note": NOTE, "colour": "red"}}, 422,
     "invalid_field"),
    ("unknown-task", "text", {"json": {"task": "cardiology", "note": NOTE}}, 422, "unknown_task"),
    ("wrong-task-text", "text", {"json": {"task": "tissue_type", "image": b64(png())}}, 422, "wrong_task"),
    ("wrong-task-vision", "vision", {"json": {"task": "rare_disease", "note": NOTE}}, 422, "wrong_task"),
    ("image-to-text-model", "text", {"json": {"task": "rare_disease", "note": NOTE, "image": b64(png())}}, 422,
     "wrong_input"),
    ("missing-note", "text", {"json": {"task": "rare_disease"}}, 422, "missing_note"),
    ("note-too-long", "text", {"json": {"task": "rare_disease", "note": "x" * 2001}}, 422, "note_too_long"),
    ("missing-image", "vision", {"json": {"task": "tissue_type"}}, 422, "missing_image"),
    ("body-too-large", "text", {"json": {"task": "rare_disease", "note": "x" * (2**20)}}, 413, "body_too_large"),
    ("chunked-too-large", "text", {"content": chunks(2**20 + 1), "headers": {"content-type": "application/json"}},
     413, "body_too_large"),
    ("not-base64", "vision", {"json": {"task": "tissue_type", "image": "%%%"}}, 400, "invalid_image"),
    ("undecodable-image", "vision", {"json": {"task": "tissue_type", "image": b64(b"GIF89a-no")}}, 400,
     "invalid_image"),
    ("bomb-header", "vision", {"json": {"task": "tissue_type", "image": b64(bomb_header())}}, 413,
     "image_too_many_pixels"),
    ("bomb-real", "vision", {"files": {"image": ("big.png", png((2000, 2000), "L"), "image/png")},
                             "data": {"task": "tissue_type"}}, 413, "image_too_many_pixels"),
    ("image-too-many-bytes", "vision", {"json": {"task": "tissue_type", "image": b64(png((300, 300), noise=True))}},
     413, "image_too_large"),
    ("gif", "vision", {"json": {"task": "tissue_type", "image": b64(png(fmt="GIF", mode="L"))}}, 415,
     "unsupported_image_format"),
    ("unknown-form-field", "vision", {"files": {"image": ("t.png", png(), "image/png")},
                                      "data": {"task": "tissue_type", "colour": "red"}}, 422, "invalid_field"),
    ("form-top-k-text", "vision", {"files": {"image": ("t.png", png(), "image/png")},
                                   "data": {"task": "tissue_type", "top_k": "two"}}, 422, "invalid_field"),
    ("wrong-content-type", "text", {"content": b"note", "headers": {"content-type": "text/plain"}}, 415,
     "unsupported_media_type"),
]


@pytest.mark.mlflow_server
@pytest.mark.parametrize(("app", "kwargs", "status", "code"), [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_clear_4xx(served: Served, app: str, kwargs: dict[str, Any], status: int,
                                    code: str) -> None:
    client = served.text if app == "text" else served.vision
    resp = client.post("/v1/predict", **kwargs)
    assert (resp.status_code, error_code(resp)) == (status, code), resp.text
    assert resp.json()["error"]["message"]


@pytest.mark.mlflow_server
def test_chat_errors(served: Served) -> None:
    post = served.text.post
    assert post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}
                ).status_code == 400
    assert post("/v1/chat/completions", json={"messages": []}).status_code == 422
    assert post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 3}]}).status_code == 422
    url = f"data:image/png;base64,{b64(png())}"
    resp = post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]})
    assert resp.status_code == 422 and error_code(resp) == "wrong_input"
    resp = served.vision.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(bomb_header())}"}}]}]})
    assert resp.status_code == 413 and error_code(resp) == "image_too_many_pixels"
    assert served.text.get("/v1/nothing").status_code == 404


@pytest.mark.mlflow_server
def test_cors_only_where_configured(served: Served) -> None:
    preflight = {"Origin": "http://allowed.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    resp = httpx.options(f"{served.base}/text/v1/predict", headers=preflight)
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == "http://allowed.example"
    denied = httpx.post(f"{served.base}/text/v1/predict", json={}, headers={"Origin": "http://allowed.example"})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://allowed.example"
    other = httpx.options(f"{served.base}/text/v1/predict", headers={**preflight, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    resp = served.vision.get("/healthz", headers={"Origin": "http://allowed.example"})
    assert "access-control-allow-origin" not in resp.headers


@pytest.mark.mlflow_server
def test_logs_hold_no_note_and_no_key(served: Served) -> None:
    marker = f"PRIVATE-NOTE-{uuid.uuid4().hex}"
    assert served.text.post("/v1/predict", json={"task": "rare_disease", "note": marker}).status_code == 200
    assert served.text.post("/v1/predict", json={"task": "rare_disease", "note": marker, "top_k": "x"}
                            ).status_code == 422
    assert served.text.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": marker}]}
                            ).status_code == 200
    assert httpx.post(f"{served.base}/text/v1/predict", json={"note": marker},
                      headers={"Authorization": f"Bearer {marker}"}).status_code == 401
    time.sleep(2)  # log files are flushed by their writers
    files = [p for p in served.logs_dir.rglob("*") if p.is_file()]
    serve_logs = [p for p in files if p.parent.name == "serve"]
    assert any("replica_text" in p.name for p in serve_logs)
    access = "\n".join(p.read_text(errors="replace") for p in serve_logs if "replica_text" in p.name)
    assert "POST /text/v1/predict 200" in access and "POST /text/v1/predict 401" in access
    for path in files:
        data = path.read_bytes()
        assert marker.encode() not in data, f"note text in {path}"
        assert KEY.encode() not in data, f"API key in {path}"


@pytest.mark.mlflow_server
def test_mint_ray_serve_cli_and_ask(served: Served) -> None:
    from ray import serve

    from mint_ray.cli import run_stage
    from mint_ray.serving.client import ask

    port = served.base.rsplit(":", 1)[1]
    summary = run_stage(["serve", "--model-uri", served.vision_uri, "--tracking-uri", served.tracking_uri,
                         "--port", port, "--set", "wait=false", "--set", "name=cli", "--set", "route_prefix=/cli",
                         "--set", "app.max_new_tokens=4", "--set", "app.deployment.num_cpus=0.25"])
    try:
        assert summary["url"] == f"{served.base}/cli"
        answer = ask(summary["url"], "tissue_type", image=png())
        assert answer["model"]["version"] == "1" and answer["task"] == "tissue_type"
        with pytest.raises(Exception, match="HTTP 422: this deployment serves task 'tissue_type'"):
            ask(summary["url"], "rare_disease", note=NOTE)
    finally:
        serve.delete("cli")


@pytest.mark.mlflow_server
def test_serve_and_ask_for_the_local_demo(served: Served) -> None:
    from ray import serve

    from mint_ray.serving.client import serve_and_ask
    from mint_ray.serving.config import HttpConfig

    port = int(served.base.rsplit(":", 1)[1])
    try:
        answers = serve_and_ask({"tissue_type": served.vision_uri}, {"tissue_type": {"image": png()}},
                                http=HttpConfig(port=port), tracking_uri=served.tracking_uri)
        assert answers["tissue_type"]["task"] == "tissue_type"
        assert answers["tissue_type"]["model"]["name"] == served.vision_name
    finally:
        serve.delete("mint-tissue_type")


@pytest.mark.mlflow_server
def test_serve_refuses_a_missing_alias(served: Served) -> None:
    from mint_ray.errors import MintError
    from mint_ray.serving.run import preflight

    with pytest.raises(MintError, match="no alias 'staging'"):
        preflight(ServeConfig(model_uri=f"models:/{served.text_name}@staging", tracking_uri=served.tracking_uri))


@pytest.mark.mlflow_server
def test_alias_move_switches_version_without_failures(served: Served) -> None:
    """Keep 4 clients busy, register version 2 and move the alias: every request is
    answered, the responses switch from version 1 to 2 and never go back."""
    from mlflow import MlflowClient

    from tests.tinymodels import make_student_dir

    results: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=served.text.base_url, headers=served.text.headers, timeout=120) as c:
            while not stop.is_set():
                resp = c.post("/v1/predict", json={"task": "rare_disease", "note": NOTE})
                version = resp.json().get("model", {}).get("version") if resp.status_code == 200 else None
                results.append((time.monotonic(), resp.status_code, version))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        version = register(served.tracking_uri, make_student_dir(served.tmp / "text2", "rare_disease", seed=1),
                           served.text_name, alias=None)
        assert version == "2"
        MlflowClient(served.tracking_uri).set_registered_model_alias(served.text_name, "champion", version)
        moved = time.monotonic()
        deadline = moved + 90
        while time.monotonic() < deadline and not any(v == "2" for _, _, v in results):
            time.sleep(0.2)
        time.sleep(2)  # keep the stream going after the swap
    finally:
        stop.set()
        for t in threads:
            t.join()
    statuses = [s for _, s, _ in results]
    assert statuses and set(statuses) == {200}, statuses
    versions = [v for _, _, v in sorted(results)]
    assert versions[0] == "1" and versions[-1] == "2"
    first_new = versions.index("2")
    # Requests already batched on version 1 may finish just after the first version-2
    # answer; after that no version-1 answer comes back.
    assert "1" not in versions[first_new + 8:], versions
    assert served.text.get("/v1/models").json()["data"][0]["version"] == "2"
