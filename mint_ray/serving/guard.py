"""The ASGI middleware in front of every route: the API key, then the body size.

The key (a bearer token) is read from the environment variable that config
names, compared in constant time and never logged. Probes carry no key.
"""

from __future__ import annotations

import hmac
import os
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mint_ray.errors import MintError
from mint_ray.serving.config import ServeConfig
from mint_ray.serving.schemas import error_body

# Probes (Kubernetes, load balancers) carry no key.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def read_api_key(cfg: ServeConfig) -> bytes | None:
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise MintError(f"api_key_env is {cfg.api_key_env!r} but that environment variable is empty "
                        "on the replica: set it (or drop api_key_env to serve without a key)")
    return key.encode()


def route_path(scope: Scope) -> str:
    """The path inside the application (Serve passes the route prefix as root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def request_id_of(scope: Scope) -> str:
    for key, value in scope.get("headers", []):
        if key == b"x-request-id":
            return value.decode("latin-1")
    return ""


class RequestGuard:
    """Pure ASGI middleware in front of every route: the bearer key, then the body limit
    (Content-Length, and the bytes actually received), then the app with the body replayed."""

    def __init__(self, app: ASGIApp, api_key: bytes | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str,
                      headers: dict[str, str] | None = None) -> None:
        body = error_body(status, code, message, request_id_of(scope))
        await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["started"] = time.perf_counter()
        if self.api_key is not None and route_path(scope) not in OPEN_PATHS and not self._authorized(scope):
            await self._refuse(scope, receive, send, 401, "unauthorized",
                               "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               {"WWW-Authenticate": "Bearer"})
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_large = f"request body is over the limit of {self.max_body_bytes} bytes"
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(scope, receive, send, 400, "bad_content_length", "Content-Length is not a number")
                return
            if int(declared) > self.max_body_bytes:
                await self._refuse(scope, receive, send, 413, "body_too_large", too_large)
                return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:  # chunked uploads declare no length
                await self._refuse(scope, receive, send, 413, "body_too_large", too_large)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
