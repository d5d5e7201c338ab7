"""One request's inputs, checked: JSON bodies, base64 and data URLs, images, the
task, the OpenAI chat messages, and the prompt they become.

Pure functions (no Ray, no I/O): each refusal is a ``RequestError`` with the
status, a stable code and what to fix, and never echoes the input (it may be
note text).

Every check here runs before a request joins a batch, so one hostile request
is refused on its own and never fails the others. The classes covered:

- numbers: every whole number, in a JSON body, a form field or a header, goes
  through ``whole_number`` (ASCII digits, at most ``MAX_DIGITS``);
- JSON: nesting deeper than ``MAX_JSON_DEPTH``, ``NaN``/``Infinity``, and text
  that cannot be encoded (lone surrogates such as ``"\\ud800"``, valid JSON that
  no tokenizer takes) are refused wherever they are in the body (``check_json``);
- text: a note may not carry the chat template's control tokens
  (``check_control_tokens``), and its prompt must fit the model (``check_prompt_tokens``);
- images: any failure to decode is the image's fault (400), never the server's.
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
from mint_ray.tasks import TASKS, Task, render_chat

# Longer numbers than any count or size this API takes; int() on thousands of
# digits is slow and raises past 4300 (sys.get_int_max_str_digits).
MAX_DIGITS = 18
# The request bodies are at most 5 levels deep (chat: messages -> content -> image_url).
MAX_JSON_DEPTH = 32
_DIGITS = re.compile(r"[0-9]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
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


def whole_number(text: str | bytes, max_digits: int = MAX_DIGITS) -> int | None:
    """``text`` as a whole number when it is 1 to ``max_digits`` ASCII digits, else None.

    The one parser of numbers a client sends: ``str.isdigit`` is true for '²' and
    other digits ``int`` refuses, and ``int`` of thousands of digits raises."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    text = text.strip()
    if not 0 < len(text) <= max_digits or not _DIGITS.fullmatch(text):
        return None
    return int(text)


def _json_int(text: str) -> int:
    value = whole_number(text.removeprefix("-"))
    if value is None:
        raise RequestError(422, "number_too_large", f"a number in the body has more than {MAX_DIGITS} digits")
    return -value if text.startswith("-") else value


def _json_constant(name: str) -> Any:
    raise RequestError(400, "malformed_json", f"request body is not valid JSON: {name} is not a JSON number")


def check_text(text: str, param: str) -> str:
    """``text``, which must encode as UTF-8: JSON's ``"\\ud800"`` escapes decode to lone
    surrogates that no tokenizer (nor any log or database) takes."""
    if _SURROGATE.search(text):
        raise RequestError(400, "invalid_text", f"{param} holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                           "which is not text: send valid Unicode", param)
    return text


def check_json(data: Any) -> None:
    """Every string (keys included) encodes as UTF-8 and nothing is nested deeper than
    ``MAX_JSON_DEPTH``, wherever it is in the body (ignored fields included). Iterative:
    a deep body cannot exhaust the stack here."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            check_text(value, ".".join(path) or "body")
        elif isinstance(value, dict | list):
            if len(path) >= MAX_JSON_DEPTH:
                raise RequestError(400, "too_deep", f"the body is nested deeper than {MAX_JSON_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                name = check_text(key, ".".join(path) or "body") if isinstance(key, str) else str(key)
                stack.append((item, (*path, name)))


def parse_json(body: bytes, model: type[BaseModel]) -> Any:
    """Body bytes -> ``model``: 400 for bytes that are not JSON (or too deep, or not text),
    422 for the wrong shape or types."""
    try:
        data = json.loads(body, parse_int=_json_int, parse_constant=_json_constant)
    except RecursionError:
        raise RequestError(400, "too_deep", f"the body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, "malformed_json", f"request body is not valid JSON: {err}") from None
    except ValueError:  # json's other refusals (e.g. a UTF-16 body cut mid-character)
        raise RequestError(400, "malformed_json", "request body is not valid JSON") from None
    check_json(data)
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
    except Exception:  # a decoder's own error on hostile bytes (zlib, struct, ...): the image's fault
        raise RequestError(400, "invalid_image", f"{param} is not a decodable image", param) from None


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


def control_token_pattern(tokens: list[str]) -> re.Pattern[str] | None:
    """A pattern for the tokenizer's special tokens (``<|eot_id|>``, ``<|image|>``...)."""
    tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None


def check_control_tokens(text: str, pattern: re.Pattern[str] | None, param: str) -> None:
    """A note may not carry the chat template's control tokens: the tokenizer would read
    them as structure (end the user turn, start an assistant turn) and let the note
    rewrite the prompt the model was trained with."""
    found = pattern.search(text) if pattern is not None else None
    if found is not None:
        raise RequestError(422, "invalid_text", f"{param} contains {found.group()!r}, a control token of the "
                           "model's chat template: remove it", param)


def prompt_tokens(tokenizer: Any, messages: list[dict[str, Any]]) -> int:
    """How many tokens ``messages`` are as the model reads them (chat template and
    generation header, as ``Generator.generate`` renders them)."""
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_prompt_tokens(n_tokens: int, limit: int) -> None:
    if n_tokens > limit:
        raise RequestError(413, "prompt_too_long", f"the prompt is {n_tokens} tokens, over this model's limit "
                           f"of {limit} (its context less the answer, or limits.max_prompt_tokens): send a "
                           "shorter note", "note")


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
