"""What runs in Ray Serve's HTTP proxy, in front of every application on the cluster.

The proxy reads some request headers itself, before any application sees the
request (``x-request-id``, ``x-request-timeout-seconds``, the session and
multiplexed-model ids), and decodes them as UTF-8: a client sending other bytes
there gets the proxy's own 500. ``HeaderGuard`` answers 400 first, in this API's
error shape, for any header value that is not UTF-8.

The proxy also answers by itself when no replica can: a replica that died with the
request in flight (no answer at all, which uvicorn turns into a plain-text 500), every
replica busy (503/429) or the proxy's request timeout (408). ``ServeErrorShape`` turns
those into this API's JSON error shape, with a status and ``Retry-After`` a client can
act on: the request never reached an answer, so sending it again is safe.

Ray installs it from the environment the cluster starts with:
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=mint_ray.serving.proxy:middlewares``
(``mint-ray serve`` sets it for a cluster it starts; a long-running cluster or a
RayService sets it in its nodes' environment). Imported by the proxy: Starlette only.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass

from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mint_ray.serving.schemas import error_body

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "mint_ray.serving.proxy:middlewares"


def undecodable_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The name of the first header whose value is not UTF-8, or None."""
    for key, value in headers:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return key.decode("latin-1")
    return None


class HeaderGuard:
    """Pure ASGI middleware: a 400 for a header value that is not UTF-8."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = undecodable_header(scope.get("headers", [])) if scope["type"] == "http" else None
        if name is None:
            await self.app(scope, receive, send)
            return
        # The client's x-request-id may be the bad header: this answer gets an id of its own.
        request_id = uuid.uuid4().hex
        body = error_body(400, "invalid_header", f"header {name!r} is not UTF-8 text", request_id, name)
        await JSONResponse(body, status_code=400, headers={"X-Request-ID": request_id})(scope, receive, send)


@dataclass(frozen=True)
class ProxyError:
    status: int
    code: str
    message: str


def proxy_error(status: int) -> ProxyError:
    """What a client gets for a status that Serve's proxy sent without any application."""
    if status == 408:
        return ProxyError(408, "request_timeout", "the request ran past the server's time limit; send it again")
    if status in (429, 503):
        return ProxyError(503, "overloaded", "every replica of this model is busy; retry after Retry-After seconds")
    return ProxyError(503, "replica_unavailable",
                      "the replica answering this request stopped before it answered; send it again "
                      "(Serve is starting a new one)")


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and b"json" in v.lower() for k, v in headers)


class ServeErrorShape:
    """Pure ASGI middleware: the proxy's own errors become this API's error shape; 5xx ones
    a retryable 503 with ``Retry-After``.

    Two kinds: a plain-text (not an application's JSON) 5xx/408/429 that the proxy sends,
    and no answer at all. For a replica that died mid-request Serve's proxy sends nothing
    and returns, and uvicorn then answers its own plain-text 500 outside every middleware:
    this one answers first."""

    RETRY_AFTER_S = 1

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith("/-/"):  # Serve's own health routes
            await self.app(scope, receive, send)
            return
        started = replaced = False
        client_id = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"x-request-id"),
                         None)

        async def shaped_send(message: Message) -> None:
            nonlocal started, replaced
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                status = message["status"]
                if (status >= 500 or status in (408, 429)) and not _is_json(headers):
                    replaced = True
                    await self._send_shaped(status, headers, send, client_id)
                    return
            elif replaced:  # the proxy's plain-text body: already answered
                return
            await send(message)

        try:
            await self.app(scope, receive, shaped_send)
        except Exception:
            if not started:
                with contextlib.suppress(Exception):  # a client that has left gets nothing
                    await self._send_shaped(500, [], send, client_id)
            raise
        if not started:
            with contextlib.suppress(Exception):
                await self._send_shaped(500, [], send, client_id)

    async def _send_shaped(self, status: int, headers: list[tuple[bytes, bytes]], send: Send,
                           client_id: str | None) -> None:
        error = proxy_error(status)
        request_id = next((v.decode("latin-1") for k, v in headers if k.lower() == b"x-request-id"),
                          client_id or uuid.uuid4().hex)
        body = json.dumps(error_body(error.status, error.code, error.message, request_id)).encode()
        retry_after = next((v for k, v in headers if k.lower() == b"retry-after"), str(self.RETRY_AFTER_S).encode())
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"x-request-id", request_id.encode("latin-1")), (b"retry-after", retry_after)]})
        await send({"type": "http.response.body", "body": body})


def middlewares() -> list[Middleware]:
    """The proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(ServeErrorShape), Middleware(HeaderGuard)]
