"""The ASGI middleware in front of every route: the API key, then the body's size
and arrival time.

The key (a bearer token) is read from the environment variable that config
names, compared in constant time and never logged. Probes carry no key.

A replica holds one of its request slots (Serve's ``max_ongoing_requests``)
while it reads a body, and the proxy queues everything else, ``/healthz``
included, behind full slots. So a body must arrive in time or the request is
answered 408 and its slot is free again:
- its first part within ``body_start_timeout_s``. The clock starts when the
  request reaches the replica, and the body then still has to come from Ray's
  proxy (an actor call, seconds when the node is busy), so this allowance is wide;
- from that first part on, ``min_body_bytes_per_s`` on average after
  ``body_grace_s``: clients trickling bytes hold a slot for about
  ``body_grace_s``, not for as long as they like;
- all of it within ``body_timeout_s``.
The rate is counted from the first part, not from the request: the hop from the
proxy is not the client's to pay. GET routes read no body.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mint_ray.errors import MintError
from mint_ray.serving.config import RequestLimitsConfig, ServeConfig
from mint_ray.serving.inputs import whole_number
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


# Why a body was not read (str, never bytes: told apart from a body by its type too).
DISCONNECT, TOO_LARGE, TIMEOUT = "disconnect", "too_large", "timeout"
# A wake-up this much past its deadline means the replica itself was stalled.
STALL_S = 0.05


async def arrived_in_time(part: asyncio.Future[Message], wait_s: float) -> bool:
    """Whether ``part`` is done within ``wait_s``. When this replica was stalled past the
    deadline (the GIL held by a generate thread, the CPU taken), a part that came
    meanwhile is still a few loop turns away: they run before the client is blamed."""
    loop = asyncio.get_running_loop()
    wait_s = max(wait_s, 0)
    due = loop.time() + wait_s
    await asyncio.wait({part}, timeout=wait_s)
    if not part.done() and loop.time() - due > STALL_S:
        await asyncio.wait({part}, timeout=STALL_S)
    return part.done()


class BodyDeadline:
    """When the next part of a body must have arrived: the first within ``start_s``,
    then ``min_rate`` bytes a second on average from the first part's arrival, after
    ``grace_s``; all of it within ``timeout_s`` of the start."""

    def __init__(self, timeout_s: float, start_s: float, grace_s: float, min_rate: int,
                 clock: Any = time.monotonic) -> None:
        self.timeout_s, self.start_s, self.grace_s, self.min_rate, self.clock = \
            timeout_s, start_s, grace_s, min_rate, clock
        self.start = clock()
        self.first_part: float | None = None

    def part_arrived(self) -> None:
        if self.first_part is None:
            self.first_part = self.clock()

    def wait_s(self, received: int) -> float:
        """Seconds left to receive the next part, having ``received`` bytes so far (<= 0: too late)."""
        now = self.clock()
        left = self.timeout_s - (now - self.start)
        if self.first_part is None:
            return min(left, self.start_s - (now - self.start))
        if self.min_rate > 0:
            left = min(left, self.grace_s + received / self.min_rate - (now - self.first_part))
        return left

    @classmethod
    def of(cls, limits: RequestLimitsConfig) -> BodyDeadline:
        return cls(limits.body_timeout_s, limits.body_start_timeout_s, limits.body_grace_s,
                   limits.min_body_bytes_per_s)


def body_timeout_message(limits: RequestLimitsConfig) -> str:
    return (f"the request body did not arrive in time: its first part within {limits.body_start_timeout_s:g} s, "
            f"then {limits.min_body_bytes_per_s} bytes/s after the first {limits.body_grace_s:g} s, "
            f"all of it within {limits.body_timeout_s:g} s")


class RequestGuard:
    """Pure ASGI middleware in front of every route: the bearer key, then the body limits
    (Content-Length, the bytes actually received, the time they take), then the app with
    the body replayed."""

    def __init__(self, app: ASGIApp, api_key: bytes | None, limits: RequestLimitsConfig) -> None:
        self.app, self.api_key, self.limits = app, api_key, limits

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

    async def _read_body(self, receive: Receive) -> bytes | str:
        """The whole body, or why not (``DISCONNECT``, ``TOO_LARGE``, ``TIMEOUT``)."""
        deadline = BodyDeadline.of(self.limits)
        body = bytearray()
        next_part = asyncio.ensure_future(receive())
        try:
            while True:
                if not await arrived_in_time(next_part, deadline.wait_s(len(body))):
                    return TIMEOUT
                message = next_part.result()
                if message["type"] == "http.disconnect":
                    return DISCONNECT
                deadline.part_arrived()
                body += message.get("body", b"")
                if len(body) > self.limits.max_body_bytes:  # chunked uploads declare no length
                    return TOO_LARGE
                if not message.get("more_body", False):
                    return bytes(body)
                next_part = asyncio.ensure_future(receive())
        finally:
            next_part.cancel()

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
        limit = self.limits.max_body_bytes
        too_large = f"request body is over the limit of {limit} bytes"
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None:
            digits = declared.strip()
            if not digits.isdigit():  # bytes.isdigit: ASCII digits only
                await self._refuse(scope, receive, send, 400, "bad_content_length", "Content-Length is not a number")
                return
            # More digits than the limit has is over the limit, however many there are.
            size = whole_number(digits.lstrip(b"0") or b"0", max_digits=len(str(limit)))
            if size is None or size > limit:
                await self._refuse(scope, receive, send, 413, "body_too_large", too_large)
                return
        body = await self._read_body(receive)
        if body == DISCONNECT:
            return
        if body == TOO_LARGE:
            await self._refuse(scope, receive, send, 413, "body_too_large", too_large)
            return
        if body == TIMEOUT:
            await self._refuse(scope, receive, send, 408, "body_timeout",
                               body_timeout_message(self.limits), {"Connection": "close"})
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
