"""The HTTP routes of one replica (FastAPI), built after its model is loaded.

- ``POST /v1/predict``: JSON ``{"task", "note" | "image" (base64 or data URL), "top_k"}``
  or a multipart upload (fields ``task``, ``top_k``, file ``image``) -> ranked labels
  (parsed with the task's one parser, ids where the label catalog knows them), the
  raw generation, the model's name/version/alias and the latency;
- ``POST /v1/chat/completions``: the OpenAI shape; the last user message's text is
  the note, its ``image_url`` (a ``data:`` URL) the image. The prompt is always the
  one the student was trained with (its metadata records it); client system
  messages and sampling parameters are ignored, decoding is greedy;
- ``GET /healthz`` (process up), ``GET /readyz`` (model loaded), ``GET /v1/models``.

Every error has one shape (:func:`mint_ray.serving.schemas.error_body`). Note text
is never logged (Serve's access log has method, route, status, latency and
request id only).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp

from mint_ray.serving.config import RequestLimitsConfig
from mint_ray.serving.guard import RequestGuard
from mint_ray.serving.inputs import MAX_DIGITS, chat_inputs, check_text, parse_json, validation_details, whole_number
from mint_ray.serving.labels import ranked_labels
from mint_ray.serving.schemas import ChatRequest, PredictRequest, PredictResponse, RequestError, error_body

if TYPE_CHECKING:  # the deployment builds its routes: imported for the annotation only
    from mint_ray.serving.deployment import MintStudent

# Serve routes the "ray.serve" logger into the replica's log file.
log = logging.getLogger("ray.serve")


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
    for key, value in fields.items():
        if isinstance(value, str):
            check_text(value, key)
    if isinstance(fields.get("top_k"), str):
        top_k = whole_number(fields["top_k"])
        if top_k is None:
            raise RequestError(422, "invalid_field", f"top_k must be a whole number of at most {MAX_DIGITS} "
                               "digits", "top_k")
        fields["top_k"] = top_k
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

    api.add_middleware(RequestGuard, api_key=service.api_key, limits=cfg.limits)
    if cfg.cors_origins:  # added last: outermost, so 401/413 answers carry CORS headers too
        api.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return api
