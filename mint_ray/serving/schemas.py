"""The HTTP bodies: requests and responses (pydantic), and the one error shape.

``POST /v1/predict`` takes ``PredictRequest`` (or the same fields as a multipart
upload) and answers ``PredictResponse``; ``POST /v1/chat/completions`` takes the
OpenAI shape (``ChatRequest``). Every error, from any route or the guard in front
of them, is ``error_body``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class PredictRequest(BaseModel):
    """``POST /v1/predict`` (JSON). ``image``: base64, or a ``data:image/...;base64,`` URL."""

    model_config = ConfigDict(extra="forbid", strict=True)

    task: str = Field(min_length=1)
    note: str | None = None
    image: str | None = None
    top_k: int | None = Field(None, ge=1)


class RankedLabel(BaseModel):
    rank: int
    label: str
    id: str | None = None


class ModelInfo(BaseModel):
    name: str
    version: str | None
    alias: str | None
    uri: str


class PredictResponse(BaseModel):
    request_id: str
    task: str
    labels: list[RankedLabel]
    parseable: bool
    generation: str
    model: ModelInfo
    latency_ms: float


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    url: str


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    """The OpenAI chat-completions request; fields the server does not use are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    n: int = 1


class RequestError(Exception):
    """A client error: HTTP status, a stable code, a message that says what to fix."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.details = status, code, message, param, details


def error_body(status: int, code: str, message: str, request_id: str, param: str | None = None,
               details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One error shape for every route, OpenAI-compatible (``error.message/type/code/param``)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    error: dict[str, Any] = {"message": message, "type": kind, "code": code, "param": param}
    if details:
        error["details"] = details
    return {"error": error, "request_id": request_id}
