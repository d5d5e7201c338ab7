"""One request's inputs, checked: JSON bodies, base64 and data URLs, images, the
task, the OpenAI chat messages, and the prompt they become.

Pure functions (no Ray, no I/O): each refusal is a ``RequestError`` with the
status, a stable code and what to fix, and never echoes the input (it may be
note text).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from PIL import Image
from pydantic import BaseModel, ValidationError

from mint_ray import images
from mint_ray.images import ImageRejected, open_rgb
from mint_ray.serving.config import RequestLimitsConfig
from mint_ray.serving.schemas import ChatRequest, RequestError
from mint_ray.tasks import TASKS, Task

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
# mint_ray.images' reasons as HTTP statuses and this API's error codes.
_IMAGE_REFUSALS = {
    images.TOO_LARGE: (413, "image_too_large"),
    images.UNSUPPORTED_FORMAT: (415, "unsupported_image_format"),
    images.TOO_MANY_PIXELS: (413, "image_too_many_pixels"),
    images.TRUNCATED: (400, "invalid_image"),
    images.CORRUPT: (400, "invalid_image"),
}


def validation_details(err: ValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors without the offending input (it may be note text)."""
    return [{"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in err.errors()]


def parse_json(body: bytes, model: type[BaseModel]) -> Any:
    """Body bytes -> ``model``: 400 for bytes that are not JSON, 422 for the wrong shape or types."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, "malformed_json", f"request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise RequestError(422, "invalid_body", "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        details = validation_details(err)
        first = details[0]
        raise RequestError(422, "invalid_field", f"{first['loc']}: {first['msg']}", first["loc"],
                           details) from None


def decode_base64(text: str, limits: RequestLimitsConfig, param: str = "image") -> bytes:
    """Base64 or a ``data:`` URL -> bytes, bounded by ``max_image_bytes`` before decoding."""
    text = text.strip()
    if text.startswith("data:"):
        m = _DATA_URL.match(text)
        if m is None or not m.group("b64"):
            raise RequestError(400, "invalid_image", f"{param}: a data URL must be "
                               "'data:image/<format>;base64,<data>'", param)
        text = text[m.end():]
    # 4 base64 characters carry 3 bytes.
    if len(text) * 3 // 4 > limits.max_image_bytes + 3:
        raise RequestError(413, "image_too_large",
                           f"{param} is over the limit of {limits.max_image_bytes} bytes", param)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid_image", f"{param} is not valid base64", param) from None


def decode_image(data: bytes, limits: RequestLimitsConfig, param: str = "image") -> Image.Image:
    """Image bytes -> an RGB PIL image (:func:`mint_ray.images.open_rgb`), refusing oversized
    files, formats outside the allowed list, and images with too many pixels *before*
    their pixels are decoded."""
    try:
        return open_rgb(data, limits.image_limits())
    except ImageRejected as err:
        status, code = _IMAGE_REFUSALS[err.reason]
        raise RequestError(status, code, _image_message(err, len(data), limits, param), param) from None


def _image_message(err: ImageRejected, size: int, limits: RequestLimitsConfig, param: str) -> str:
    formats = ", ".join(limits.image_formats)
    if err.reason == images.TOO_LARGE:
        return f"{param} is {size} bytes, over the limit of {limits.max_image_bytes}"
    if err.reason == images.UNSUPPORTED_FORMAT:
        return f"{param} is {err.detail}"
    if err.reason == images.TOO_MANY_PIXELS:
        return f"{param} has more than {limits.max_image_pixels} pixels (max_image_pixels)"
    if err.reason == images.TRUNCATED:
        return f"{param} is truncated"
    return f"{param} is not a decodable image (allowed formats: {formats})"


def check_task(name: str, served: Task) -> Task:
    """The requested task, which must be the one this deployment's model does."""
    if name not in TASKS:
        raise RequestError(422, "unknown_task", f"unknown task {name!r}: choose one of "
                           f"{', '.join(sorted(TASKS))}", "task")
    if name != served.name:
        raise RequestError(422, "wrong_task", f"this deployment serves task {served.name!r}, not {name!r}: "
                           f"send {name} requests to a deployment of a {name} model", "task")
    return served


def prompt_for(task: Task, note: str | None, top_k: int) -> list[dict[str, Any]]:
    """The student's prompt (the same as its preference data's): ``task`` is the served
    model's task worded as its metadata records (``loading.served_task``); the note for
    text tasks, the candidate labels for image tasks. A smaller ``top_k`` than the
    trained count asks for the trained count and keeps the first ``top_k``."""
    n = max(top_k, task.n_answers)
    if task.modality == "text":
        return task.prompt_messages(note=note, n_answers=n)
    return task.prompt_messages(candidates=list(task.labels), n_answers=n)


def data_url_of(url: str) -> str:
    if not url.startswith("data:"):
        raise RequestError(422, "unsupported_image_url", "image_url must be a data: URL "
                           "(data:image/png;base64,...); the server fetches nothing", "messages")
    return url


def chat_inputs(request: ChatRequest) -> tuple[str, str | None]:
    """(text, image data URL) of the last user message of an OpenAI chat request."""
    if request.stream:
        raise RequestError(400, "unsupported_parameter", "stream=true is not supported", "stream")
    if request.n != 1:
        raise RequestError(400, "unsupported_parameter", "only n=1 is supported", "n")
    users = [m for m in request.messages if m.role == "user"]
    if not users:
        raise RequestError(422, "invalid_field", "messages has no user message", "messages")
    content = users[-1].content
    if content is None or isinstance(content, str):
        return content or "", None
    texts = [p.text or "" for p in content if p.type == "text"]
    images = [p.image_url.url for p in content if p.type == "image_url" and p.image_url is not None]
    if len(images) > 1:
        raise RequestError(422, "invalid_field", "send one image per request", "messages")
    return "\n".join(texts), data_url_of(images[0]) if images else None
