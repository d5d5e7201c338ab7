"""The guards, driven as plain ASGI apps (no Serve): the one in front of every route (the
body's declared size, its real size, and how long it takes to arrive), and the one in
Serve's proxy (header values that are not UTF-8)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mint_ray.serving.config import RequestLimitsConfig
from mint_ray.serving.guard import BodyDeadline, RequestGuard

LIMITS = RequestLimitsConfig(max_body_bytes=10_000, body_timeout_s=2, body_start_timeout_s=0.6, body_grace_s=0.3,
                            min_body_bytes_per_s=2000)


class Recorder:
    """The app behind the guard: records the body it was given and answers 200."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                      send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["method"] != "GET":
            message = await receive()
            self.bodies.append(message.get("body", b""))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(chunks: Callable[[], Awaitable[dict[str, Any]]], headers: list[tuple[bytes, bytes]] | None = None,
         method: str = "POST", limits: RequestLimitsConfig = LIMITS, path: str = "/v1/predict",
         api_key: bytes | None = None) -> tuple[int | None, dict[str, Any] | None, float, Recorder]:
    """(status, JSON body, seconds, app) of one request through the guard."""
    app = Recorder()
    guard = RequestGuard(app, api_key=api_key, limits=limits)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": "",
             "headers": [(b"x-request-id", b"rid-1"), *(headers or [])]}
    started = time.monotonic()
    asyncio.run(asyncio.wait_for(guard(scope, chunks, send), 30))
    elapsed = time.monotonic() - started
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    parsed = json.loads(body) if status not in (None, 200) else None
    return status, parsed, elapsed, app


def chain(*receives: Callable[[], Awaitable[dict[str, Any]]]) -> Callable[[], Awaitable[dict[str, Any]]]:
    """Parts from each ``trickle`` in turn (each ends with more to come but the last)."""
    left = list(receives)

    async def receive() -> dict[str, Any]:
        message = await left[0]()
        if not message.get("more_body", False) and len(left) > 1:
            left.pop(0)
            return {**message, "more_body": True}
        return message

    return receive


def trickle(parts: list[bytes], every_s: float, then: str = "end") -> Callable[[], Awaitable[dict[str, Any]]]:
    """A client sending ``parts`` one every ``every_s``; after them: the end of the body,
    nothing ever again ("stall"), or a disconnect."""
    queue = list(parts)

    async def receive() -> dict[str, Any]:
        if queue:
            await asyncio.sleep(every_s)
            part = queue.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(queue) or then != "end"}
        if then == "disconnect":
            return {"type": "http.disconnect"}
        if then == "stall":
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": b"", "more_body": False}

    return receive


def test_a_fast_body_in_many_parts_reaches_the_app_whole() -> None:
    status, _, _, app = call(trickle([b"x" * 100] * 50, 0.001))
    assert status == 200 and app.bodies == [b"x" * 5000]


def test_a_slow_but_steady_upload_is_read() -> None:
    # 40 parts of 200 bytes every 30 ms: ~6000 bytes/s, above the 2000 bytes/s floor, for over 1 s.
    status, _, elapsed, app = call(trickle([b"y" * 200] * 40, 0.03))
    assert status == 200 and app.bodies == [b"y" * 8000] and elapsed > 1.0


@pytest.mark.parametrize("then", ["stall", "end"])
def test_a_trickling_body_gets_408_after_the_grace(then: str) -> None:
    status, body, elapsed, app = call(trickle([b"{"] * 1000, 0.1, then))
    assert status == 408 and not app.bodies
    assert body is not None and body["error"]["code"] == "body_timeout" and body["request_id"] == "rid-1"
    assert "bytes/s" in body["error"]["message"]
    # One byte per 0.1 s is far under 2000 bytes/s: cut at the grace (0.3 s), not at body_timeout_s.
    assert elapsed < 1.0


def test_a_body_that_never_comes_gets_408_at_the_start_timeout() -> None:
    status, body, elapsed, _ = call(trickle([], 0, "stall"))
    assert status == 408 and body is not None and 0.55 < elapsed < 1.0


def test_a_body_late_from_the_proxy_is_read() -> None:
    """The first part comes 0.5 s after the request (Ray's hop from the proxy on a busy
    node), past the 0.3 s grace: the rate counts from that part, so the body is read."""
    status, _, elapsed, app = call(chain(trickle([b"a" * 300], 0.5), trickle([b"b" * 300], 0.1)))
    assert status == 200 and app.bodies == [b"a" * 300 + b"b" * 300] and elapsed > 0.6


def test_a_late_first_part_then_a_trickle_is_cut_at_the_grace_from_that_part() -> None:
    late_then_slow = trickle([b"{"], 0.5)
    status, body, elapsed, _ = call(chain(late_then_slow, trickle([b"x"] * 100, 0.1)))
    assert status == 408 and body is not None and body["error"]["code"] == "body_timeout"
    assert 0.75 < elapsed < 1.3  # 0.5 s to the first part, then the 0.3 s grace


def fetched_during_a_stall() -> Callable[[], Awaitable[dict[str, Any]]]:
    """Like Serve's receive: a fetch task puts the part on a queue that ``receive`` reads.
    The part lands 0.2 s after the first receive, but the event loop is blocked from
    0.1 s to 1.1 s (a thread holding the GIL)."""
    queue: asyncio.Queue[dict[str, Any]] | None = None
    fetchers: list[asyncio.Task[None]] = []  # a reference, or the task may be collected

    async def fetch() -> None:
        await asyncio.sleep(0.2)
        assert queue is not None
        queue.put_nowait({"type": "http.request", "body": b"{}", "more_body": False})

    async def receive() -> dict[str, Any]:
        nonlocal queue
        if queue is None:
            queue = asyncio.Queue()
            fetchers.append(asyncio.create_task(fetch()))
            asyncio.get_running_loop().call_later(0.1, time.sleep, 1.0)
        return await queue.get()

    return receive


def test_a_part_that_came_while_the_replica_was_stalled_is_read() -> None:
    """Past the 0.6 s start timeout when the loop runs again, the part must still be read, not refused."""
    status, _, elapsed, app = call(fetched_during_a_stall())
    assert status == 200 and app.bodies == [b"{}"] and elapsed > 1.0


def test_a_steady_body_still_ends_at_body_timeout_s() -> None:
    limits = LIMITS.model_copy(update={"max_body_bytes": 10**7, "body_timeout_s": 0.8})
    status, _, elapsed, _ = call(trickle([b"z" * 500] * 1000, 0.05), limits=limits)
    assert status == 408 and 0.7 < elapsed < 1.5


def test_a_client_that_leaves_gets_no_answer() -> None:
    status, _, _, app = call(trickle([b"{"], 0.01, "disconnect"))
    assert status is None and not app.bodies


def test_get_routes_read_no_body() -> None:
    """A probe is answered at once whatever its (never read) body does."""
    status, _, elapsed, _ = call(trickle([], 0, "stall"), method="GET", path="/healthz")
    assert status == 200 and elapsed < 0.5


@pytest.mark.parametrize(("value", "status", "code"), [
    (b"9" * 5000, 413, "body_too_large"),
    (b"10001", 413, "body_too_large"),
    ("²".encode(), 400, "bad_content_length"),
    (b"-1", 400, "bad_content_length"),
    (b"1e3", 400, "bad_content_length"),
    (b"", 400, "bad_content_length"),
    (b"0x10", 400, "bad_content_length"),
], ids=["5000-digits", "over", "superscript", "negative", "exponent", "empty", "hex"])
def test_content_length_is_read_with_the_bounded_parser(value: bytes, status: int, code: str) -> None:
    got, body, elapsed, app = call(trickle([b"{}"], 0), [(b"content-length", value)])
    assert (got, body and body["error"]["code"]) == (status, code) and not app.bodies and elapsed < 0.5


def test_leading_zeros_in_content_length_are_a_number() -> None:
    status, _, _, app = call(trickle([b"{}"], 0), [(b"content-length", b"0" * 40 + b"2")])
    assert status == 200 and app.bodies == [b"{}"]


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives() -> None:
    status, body, _, app = call(trickle([b"x" * 4000] * 5, 0.001))
    assert status == 413 and body is not None and body["error"]["code"] == "body_too_large" and not app.bodies


def test_the_key_is_checked_before_any_body_is_read() -> None:
    status, _, elapsed, _ = call(trickle([], 0, "stall"), api_key=b"secret")
    assert status == 401 and elapsed < 0.5


def test_body_deadline_arithmetic() -> None:
    now = [100.0]
    deadline = BodyDeadline(timeout_s=30, start_s=10, grace_s=2, min_rate=1000, clock=lambda: now[0])
    assert deadline.wait_s(0) == 10  # nothing yet: the start timeout
    now[0] = 104
    assert deadline.wait_s(0) == 6
    deadline.part_arrived()  # at 104: the rate counts from here
    assert deadline.wait_s(0) == 2  # the grace
    assert deadline.wait_s(5000) == 7  # 5000 bytes buy 5 s at 1000 bytes/s
    deadline.part_arrived()  # later parts move nothing
    now[0] = 114
    assert deadline.wait_s(5000) == -3  # too late
    assert deadline.wait_s(10**9) == 16  # fast enough: body_timeout_s is the bound
    no_rate = BodyDeadline(timeout_s=5, start_s=9, grace_s=0, min_rate=0, clock=lambda: 0.0)
    assert no_rate.wait_s(0) == 5
    no_rate.part_arrived()
    assert no_rate.wait_s(0) == 5


def test_the_proxy_guard_refuses_header_values_that_are_not_utf8() -> None:
    from mint_ray.serving.proxy import HeaderGuard, middlewares, undecodable_header

    assert undecodable_header([(b"x-request-id", "é".encode()), (b"accept", b"*/*")]) is None
    assert undecodable_header([(b"accept", b"*/*"), (b"x-request-id", b"\xff\xfe")]) == "x-request-id"
    for headers, expected in (([(b"x-request-timeout-seconds", b"\xff")], 400), ([(b"x-request-id", b"ok")], 200)):
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/healthz", "headers": headers}
        asyncio.run(HeaderGuard(Recorder())(scope, trickle([], 0), send))
        assert sent[0]["status"] == expected
        if expected == 400:
            body = json.loads(sent[1]["body"])
            assert body["error"]["code"] == "invalid_header" and body["error"]["param"] == headers[0][0].decode()
            assert (b"x-request-id", body["request_id"].encode()) in sent[0]["headers"]
    assert [m.cls.__name__ for m in middlewares()] == ["ServeErrorShape", "HeaderGuard"]


class Answers:
    """An app standing for Serve's proxy: answers ``status`` with ``headers`` and a body in two parts."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    async def __call__(self, scope: dict[str, Any], receive: Any,
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body[:5], "more_body": True})
        await send({"type": "http.response.body", "body": self.body[5:]})


PLAIN = [(b"content-type", b"text/plain; charset=utf-8"), (b"x-request-id", b"rid-7")]
JSON = [(b"content-type", b"application/json")]


@pytest.mark.parametrize(("status", "headers", "path", "expected", "code", "retry_after"), [
    # A replica that died mid-request: Serve's plain 500 carrying Ray's exception text.
    (500, PLAIN, "/vision/v1/predict", 503, "replica_unavailable", b"1"),
    (502, PLAIN, "/v1/chat/completions", 503, "replica_unavailable", b"1"),
    (503, [*PLAIN, (b"retry-after", b"3")], "/text/v1/predict", 503, "overloaded", b"3"),  # Serve's backpressure
    (429, PLAIN, "/text/v1/predict", 503, "overloaded", b"1"),
    (408, PLAIN, "/text/v1/predict", 408, "request_timeout", b"1"),
    # Not the proxy's own: an application's JSON, a plain 4xx/2xx, and Serve's health routes.
    (500, JSON, "/text/v1/predict", 500, None, None),
    (404, PLAIN, "/nowhere", 404, None, None),
    (200, PLAIN, "/text/v1/predict", 200, None, None),
    (503, PLAIN, "/-/healthz", 503, None, None),
])
def test_the_proxys_own_errors_get_the_api_shape(status: int, headers: list[tuple[bytes, bytes]], path: str,
                                                   expected: int, code: str | None, retry_after: bytes | None) -> None:
    from mint_ray.serving.proxy import ServeErrorShape

    original = b"ray.exceptions.ActorDiedError: The actor died unexpectedly"
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    asyncio.run(ServeErrorShape(Answers(status, headers, original))(scope, trickle([], 0), send))
    assert sent[0]["status"] == expected
    body = b"".join(m.get("body", b"") for m in sent[1:])
    if code is None:
        assert sent[0]["headers"] == headers and body == original
        return
    answer = dict(sent[0]["headers"])
    assert answer[b"content-type"] == b"application/json" and answer[b"retry-after"] == retry_after
    assert int(answer[b"content-length"]) == len(body)
    parsed = json.loads(body)
    assert parsed["error"]["code"] == code and parsed["request_id"] == answer[b"x-request-id"].decode() == "rid-7"
    assert parsed["error"]["type"] == ("server_error" if expected >= 500 else "invalid_request_error")
    assert b"ActorDiedError" not in body


class Silent:
    """An app standing for Serve's proxy when the replica died mid-request: it answers
    nothing (uvicorn would then send its own plain 500), or raises before answering."""

    def __init__(self, raises: bool) -> None:
        self.raises = raises

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.raises:
            raise RuntimeError("ActorDiedError: the replica died")


@pytest.mark.parametrize("raises", [False, True])
def test_a_proxy_that_answers_nothing_gets_a_retryable_503(raises: bool) -> None:
    from mint_ray.serving.proxy import ServeErrorShape

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/vision/v1/predict", "headers": [(b"x-request-id", b"c-1")]}
    if raises:
        with pytest.raises(RuntimeError):
            asyncio.run(ServeErrorShape(Silent(raises))(scope, trickle([], 0), send))
    else:
        asyncio.run(ServeErrorShape(Silent(raises))(scope, trickle([], 0), send))
    assert sent[0]["status"] == 503 and dict(sent[0]["headers"])[b"retry-after"] == b"1"
    body = json.loads(sent[1]["body"])
    assert body["error"]["code"] == "replica_unavailable" and body["request_id"] == "c-1"
