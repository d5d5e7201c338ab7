"""Serve a registered student over HTTP with Ray Serve (``mint-ray serve``).

One application serves one model (so one task): ``models:/<name>@<alias>``, a
pinned ``models:/<name>/<version>``, an ``s3://`` or a local student directory.
The deployment ``MintStudent`` is a FastAPI ingress:

- ``POST /v1/predict``: JSON ``{"task", "note" | "image" (base64 or data URL), "top_k"}``
  or a multipart upload (fields ``task``, ``top_k``, file ``image``) -> ranked labels
  (parsed with the task's one parser, ids where the label catalog knows them), the
  raw generation, the model's name/version/alias and the latency;
- ``POST /v1/chat/completions``: the OpenAI shape; the last user message's text is
  the note, its ``image_url`` (a ``data:`` URL) the image. The prompt is always the
  task's own template (the one the student was trained on); client system
  messages and sampling parameters are ignored, decoding is greedy;
- ``GET /healthz`` (process up), ``GET /readyz`` (model loaded), ``GET /v1/models``.

Requests are batched with ``@serve.batch`` (size and wait from config, changed live
through ``user_config``). A replica that serves an alias polls the registry and,
when the alias moves, loads the new version beside the old one and swaps the
reference: a batch already running keeps the model object it started with, so no
request is dropped. The API key (a bearer token) is read from an environment
variable named in config, compared in constant time and never logged; note text
is never logged either (Serve's access log has method, route, status, latency and
request id only).

``serving/app.py`` is the entry for ``serve run``/``serve deploy``
(``serving.app:build_app``); the deployment class lives here so replicas need only
the installed package.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp

from mint_ray import storage
from mint_ray.config import RayConfig
from mint_ray.errors import MintError
from mint_ray.serving.config import Config, HttpConfig, RequestBatchingConfig, RequestLimitsConfig, ServeConfig
from mint_ray.serving.guard import RequestGuard, read_api_key
from mint_ray.serving.inputs import (
    chat_inputs,
    check_task,
    decode_base64,
    decode_image,
    parse_json,
    prompt_for,
    validation_details,
)
from mint_ray.serving.labels import ranked_labels
from mint_ray.serving.loading import LoadedModel, alias_version, load_model, parse_model_uri, pinned_version
from mint_ray.serving.schemas import ChatRequest, PredictRequest, PredictResponse, RequestError, error_body

DEPLOYMENT_NAME = "MintStudent"
# Serve routes the "ray.serve" logger into the replica's log file.
log = logging.getLogger("ray.serve")


CLI_FLAGS = {"model-uri": "app.model_uri", "task": "app.task", "tracking-uri": "app.tracking_uri",
             "api-key-env": "app.api_key_env", "host": "http.host", "port": "http.port",
             "address": "ray.address"}


# ============================================================== the deployment


@dataclass(frozen=True)
class Job:
    """One validated request, ready for the batch."""

    messages: list[dict[str, Any]]
    image: Image.Image | None
    top_k: int


@dataclass(frozen=True)
class Answer:
    text: str
    model: LoadedModel


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class MintStudent:
    """A replica: the model, the alias watcher, the batcher and the HTTP routes."""

    async def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = ServeConfig.model_validate(config)
        # PIL's own guard for any decode path, at the configured limit.
        Image.MAX_IMAGE_PIXELS = self.cfg.limits.max_image_pixels
        self.api_key = read_api_key(self.cfg)
        if self.cfg.tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(self.cfg.tracking_uri)
        self.ref = parse_model_uri(self.cfg.model_uri)
        version = await asyncio.to_thread(pinned_version, self.ref)
        self.model: LoadedModel = await asyncio.to_thread(load_model, self.cfg, self.ref, version)
        self.alias_error: str | None = None
        self.alias_checked_at: float | None = None
        self._watcher: asyncio.Task | None = None
        if self.ref.alias and self.cfg.alias_poll_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_alias())
        log.info("serving %s (version %s, task %s)", self.ref.uri, self.model.version, self.model.task.name)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return create_api(self)

    def __del__(self) -> None:
        """Serve calls this when it stops the replica: stop polling the alias."""
        if getattr(self, "_watcher", None) is not None:
            self._watcher.cancel()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``user_config`` carries the batching settings; Serve calls this on start and on
        every change, without restarting the replica."""
        batching = RequestBatchingConfig.model_validate(user_config or {})
        self._generate.set_max_batch_size(batching.max_batch_size)
        self._generate.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    @property
    def max_new_tokens(self) -> int:
        from mint_ray.generation import SAMPLING_TEXT, SAMPLING_VISION

        default = SAMPLING_TEXT if self.model.task.modality == "text" else SAMPLING_VISION
        return self.cfg.max_new_tokens or int(default["max_new_tokens"])

    async def _watch_alias(self) -> None:
        """Follow the alias: load a new version beside the old one, then swap the reference."""
        while True:
            await asyncio.sleep(self.cfg.alias_poll_s)
            try:
                version = await asyncio.to_thread(alias_version, self.ref)
                self.alias_checked_at, self.alias_error = time.time(), None
                if version == self.model.version:
                    continue
                log.info("alias %s moved to version %s: loading it", self.ref.uri, version)
                new = await asyncio.to_thread(load_model, self.cfg, self.ref, version)
                if new.task.name != self.model.task.name:
                    raise MintError(f"version {version} is a {new.task.name} model; this deployment serves "
                                    f"{self.model.task.name}: keeping version {self.model.version}")
                # Batches in flight hold the old model itself and finish on it.
                self.model = new
                log.info("now serving %s version %s", self.ref.name, new.version)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # keep serving the loaded version
                self.alias_error = storage.redact(str(err).splitlines()[0] if str(err) else type(err).__name__)
                log.warning("alias check of %s failed: %s", self.ref.uri, self.alias_error)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # replaced from config by reconfigure()
    async def _generate(self, jobs: list[Job]) -> list[Answer]:
        model = self.model  # one model for the whole batch, even if the alias moves now
        images = [j.image for j in jobs] if model.task.modality == "image" else None
        texts = await asyncio.to_thread(model.generator.generate, [j.messages for j in jobs], images,
                                        max_new_tokens=self.max_new_tokens)
        return [Answer(text, model) for text in texts]

    async def prepare(self, task_name: str, note: str | None, image: bytes | str | None,
                      top_k: int | None) -> Job:
        """Validate one request against the loaded model and the limits."""
        task = check_task(task_name, self.model.task)
        limits = self.cfg.limits
        k = top_k or task.n_answers
        if k > limits.max_top_k:
            raise RequestError(422, "invalid_field", f"top_k is at most {limits.max_top_k}", "top_k")
        if task.modality == "text":
            if image is not None:
                raise RequestError(422, "wrong_input", f"task {task.name} reads a clinical note, not an image",
                                   "image")
            if note is None or not note.strip():
                raise RequestError(422, "missing_note", f"task {task.name} needs a non-empty 'note'", "note")
            if len(note) > limits.max_note_chars:
                raise RequestError(422, "note_too_long", f"note is {len(note)} characters, over the limit of "
                                   f"{limits.max_note_chars}", "note")
            return Job(prompt_for(task, note, k), None, k)
        if image is None:
            raise RequestError(422, "missing_image", f"task {task.name} needs an 'image'", "image")
        raw = decode_base64(image, limits) if isinstance(image, str) else image
        pil = await asyncio.to_thread(decode_image, raw, limits)
        return Job(prompt_for(task, None, k), pil, k)

    async def answer(self, job: Job) -> Answer:
        return await self._generate(job)


async def _form_inputs(request: Request, limits: RequestLimitsConfig) -> tuple[dict[str, Any], bytes | str | None]:
    """Multipart fields (``task``, ``top_k``, ``note``) and the ``image`` file (or base64 field)."""
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=limits.max_note_chars * 4 + 1024)
    except Exception as err:  # python-multipart's errors, Starlette's limits
        raise RequestError(400, "malformed_form", f"multipart body could not be read: {err}") from None
    fields: dict[str, Any] = {}
    image: bytes | str | None = None
    for key, value in form.multi_items():
        if key == "image":
            image = value if isinstance(value, str) else await value.read()
        elif key in ("task", "note", "top_k"):
            fields[key] = value if isinstance(value, str) else None
        else:
            raise RequestError(422, "invalid_field", f"unknown form field {key!r}; use task, top_k, note, image",
                               key)
    if isinstance(fields.get("top_k"), str):
        if not fields["top_k"].strip().isdigit():
            raise RequestError(422, "invalid_field", "top_k must be a whole number", "top_k")
        fields["top_k"] = int(fields["top_k"])
    return fields, image


def create_api(service: MintStudent) -> ASGIApp:
    """The FastAPI app of one replica (built after the model is loaded)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware

    cfg = service.cfg
    api = FastAPI(title="mint-ray", description="MINT student served with Ray Serve", version="1")

    def rid(request: Request) -> str:
        return request.headers.get("x-request-id", "")

    @api.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(error_body(err.status, err.code, err.message, rid(request), err.param, err.details),
                            status_code=err.status)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(err.status_code, "http_error", str(err.detail), rid(request)),
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        details = [{"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]}
                   for e in err.errors()]
        return JSONResponse(error_body(422, "invalid_field", "invalid request", rid(request), details=details),
                            status_code=422)

    @api.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.error("request %s failed: %s", rid(request), type(err).__name__)
        return JSONResponse(error_body(500, "internal_error", "internal error; the request id is in the "
                                       "server's log", rid(request)), status_code=500)

    def elapsed_ms(request: Request) -> float:
        started = getattr(request.state, "started", None) or time.perf_counter()
        return round((time.perf_counter() - started) * 1000, 2)

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        model = getattr(service, "model", None)
        if model is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "model": model.ref.name, "version": model.version,
                             "task": model.task.name, "alias_checked_at": service.alias_checked_at,
                             "alias_error": service.alias_error})

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model.describe()]}

    predict_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": PredictRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "required": ["task", "image"], "properties": {
            "task": {"type": "string"}, "top_k": {"type": "integer"}, "note": {"type": "string"},
            "image": {"type": "string", "format": "binary"}}}}}}}

    @api.post("/v1/predict", response_model=PredictResponse, openapi_extra=predict_body)
    async def predict(request: Request) -> PredictResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        image: bytes | str | None
        if content_type == "multipart/form-data":
            fields, image = await _form_inputs(request, cfg.limits)
            try:
                req = PredictRequest.model_validate(fields)
            except ValidationError as err:
                details = validation_details(err)
                raise RequestError(422, "invalid_field", f"{details[0]['loc']}: {details[0]['msg']}",
                                   details[0]["loc"], details) from None
        elif content_type in ("application/json", ""):
            req = parse_json(await request.body(), PredictRequest)
            image = req.image
        else:
            raise RequestError(415, "unsupported_media_type", "send application/json or multipart/form-data")
        job = await service.prepare(req.task, req.note, image, req.top_k)
        answer = await service.answer(job)
        labels, parseable = ranked_labels(answer.model.task, answer.text, job.top_k, answer.model.ids)
        return PredictResponse(request_id=rid(request), task=answer.model.task.name, labels=labels,
                               parseable=parseable, generation=answer.text, model=answer.model.info(),
                               latency_ms=elapsed_ms(request))

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        req = parse_json(await request.body(), ChatRequest)
        model = service.model
        if req.model is not None and req.model not in model.names():
            raise RequestError(404, "model_not_found", f"model {req.model!r} is not served here; this "
                               f"deployment serves {model.ref.name!r} (see GET /v1/models)", "model")
        text, image = chat_inputs(req)
        job = await service.prepare(model.task.name, text if model.task.modality == "text" else None,
                                    image, None)
        answer = await service.answer(job)
        labels, parseable = ranked_labels(answer.model.task, answer.text, job.top_k, answer.model.ids)
        tokens = len(answer.model.generator.tokenizer(answer.text, add_special_tokens=False)["input_ids"])
        served = answer.model.info()
        return {"id": f"chatcmpl-{rid(request) or int(time.time() * 1000)}", "object": "chat.completion",
                "created": int(time.time()), "model": f"{served.name}/{served.version}" if served.version
                else served.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                             "finish_reason": "length" if tokens >= service.max_new_tokens else "stop"}],
                "mint": {"task": answer.model.task.name, "labels": [lb.model_dump() for lb in labels],
                         "parseable": parseable, "model": served.model_dump(),
                         "latency_ms": elapsed_ms(request)}}

    api.add_middleware(RequestGuard, api_key=service.api_key, max_body_bytes=cfg.limits.max_body_bytes)
    if cfg.cors_origins:  # added last: outermost, so 401/413 answers carry CORS headers too
        api.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return api


def build_app(args: dict[str, Any] | ServeConfig) -> serve.Application:
    """The Serve application for ``args`` (a ServeConfig or its dict: ``serve run`` args)."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args)
    dep = cfg.deployment
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": dep.num_cpus, "num_gpus": dep.num_gpus},
        "max_ongoing_requests": max(dep.max_ongoing_requests, cfg.batching.max_batch_size),
        "max_queued_requests": dep.max_queued_requests,
        "user_config": cfg.batching.model_dump(),
    }
    if dep.autoscaling is not None:
        options["autoscaling_config"] = dep.autoscaling.model_dump()
    else:
        options["num_replicas"] = dep.num_replicas
    # Batching and replica settings reach Serve as options and user_config, not as
    # constructor args: changing them is a light update (reconfigure, scale), never a restart.
    return MintStudent.options(**options).bind(cfg.model_dump(mode="json", exclude={"batching", "deployment"}))


# ============================================================== running it


def preflight(cfg: ServeConfig) -> None:
    """Fail on the driver, with the fix, before Serve retries a replica that cannot start."""
    if cfg.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(cfg.tracking_uri)
    ref = parse_model_uri(cfg.model_uri)
    if ref.registered:
        if ref.alias:
            alias_version(ref)
        elif ref.version:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException

            try:
                MlflowClient().get_model_version(ref.name, ref.version)
            except MlflowException:
                raise MintError(f"{ref.uri}: the registry has no version {ref.version} of {ref.name!r}") from None
    elif not storage.is_s3(ref.uri) and not Path(ref.uri).is_dir():
        raise MintError(f"model_uri {ref.uri!r} is neither models:/..., s3:// nor a local directory")
    read_api_key(cfg)


def deploy(apps: dict[str, tuple[ServeConfig, str]], http: HttpConfig, ray_cfg: RayConfig | None = None) -> str:
    """Start Serve (once per cluster) and run ``apps`` (name -> (config, route prefix));
    returns the base URL. Each call waits until its applications are RUNNING."""
    from mint_ray.ray_cluster import init_ray

    for cfg, _ in apps.values():
        preflight(cfg)
    init_ray(ray_cfg or RayConfig())
    serve.start(http_options={"host": http.host, "port": http.port})
    # One call: the applications' replicas start (download, load) side by side.
    serve.run_many([serve.RunTarget(build_app(cfg), name=name, route_prefix=prefix)
                    for name, (cfg, prefix) in apps.items()])
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    return f"http://{host}:{http.port}"


def ask(url: str, task: str, *, note: str | None = None, image: bytes | None = None, top_k: int | None = None,
        api_key: str | None = None, timeout_s: float = 120) -> dict[str, Any]:
    """One ``POST <url>/v1/predict`` (stdlib only); raises MintError with the server's message on 4xx/5xx."""
    body: dict[str, Any] = {"task": task}
    if note is not None:
        body["note"] = note
    if image is not None:
        body["image"] = base64.b64encode(image).decode()
    if top_k is not None:
        body["top_k"] = top_k
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(f"{url.rstrip('/')}/v1/predict", json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            detail = json.loads(err.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):  # not our JSON error (a proxy's page)
            detail = err.reason
        raise MintError(f"{url}: HTTP {err.code}: {detail}") from None


def serve_and_ask(models: dict[str, str], cases: dict[str, dict[str, Any]], *, http: HttpConfig | None = None,
                  tracking_uri: str | None = None, ray_cfg: RayConfig | None = None) -> dict[str, dict[str, Any]]:
    """The local demo's last step: serve each task's model (task -> model URI) as its own
    application under ``/<task>``, send one request per task (task -> ``{"note": ...}`` or
    ``{"image": png bytes}``) and return the answers. Serve keeps running; ``serve.shutdown()``
    (or the end of the process) stops it."""
    http = http or HttpConfig()
    apps = {f"mint-{task}": (ServeConfig(model_uri=uri, task=task, tracking_uri=tracking_uri), f"/{task}")
            for task, uri in models.items()}
    base = deploy(apps, http, ray_cfg)
    return {task: ask(f"{base}/{task}", task, **cases[task]) for task in models}


def run(cfg: Config) -> dict[str, Any]:
    """``mint-ray serve``: deploy one application and (by default) serve until Ctrl-C."""
    base = deploy({cfg.name: (cfg.app, cfg.route_prefix)}, cfg.http, cfg.ray)
    url = f"{base}{cfg.route_prefix.rstrip('/')}"
    summary = {"url": url, "app": cfg.name, "model_uri": cfg.app.model_uri,
               "routes": ["/v1/predict", "/v1/chat/completions", "/v1/models", "/healthz", "/readyz"]}
    if not cfg.wait:
        return summary
    print(f"[serve] {cfg.app.model_uri} at {url} (try {url}/v1/models); Ctrl-C stops", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    serve.shutdown()
    return {**summary, "stopped": True}
