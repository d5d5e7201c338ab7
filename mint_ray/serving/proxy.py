"""What runs in Ray Serve's HTTP proxy, in front of every application on the cluster.

The proxy reads some request headers itself, before any application sees the
request (``x-request-id``, ``x-request-timeout-seconds``, the session and
multiplexed-model ids), and decodes them as UTF-8: a client sending other bytes
there gets the proxy's own 500. ``HeaderGuard`` answers 400 first, in this API's
error shape, for any header value that is not UTF-8.

Ray installs it from the environment the cluster starts with:
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=mint_ray.serving.proxy:middlewares``
(``mint-ray serve`` sets it for a cluster it starts; a long-running cluster or a
RayService sets it in its nodes' environment). Imported by the proxy: Starlette only.
"""

from __future__ import annotations

import uuid

from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

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


def middlewares() -> list[Middleware]:
    """The proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(HeaderGuard)]
