"""Serving under hostile input (issue #15): a live Ray Serve on 127.0.0.1 gets ~1000
requests in concurrent bursts, malformed and hostile ones mixed with good ones, then
40 clients trickling their bodies a byte every 2 s (more than a replica's
``max_ongoing_requests``) while good requests and probes keep coming.

Requests go over raw sockets (``Connection: close``), so the test can send what no
client library would: lying or absurd ``Content-Length`` headers, bodies that stop
or trickle, broken chunking. It asserts zero 5xx, zero hangs (every request ends
within ``DEADLINE_S``), every good request answered correctly, every app-level
refusal in the JSON error shape, and no note text or API key in any log file of
the Ray session. Bounded: seeded, a fixed count, ~2 minutes on 2 cores.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import select
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.serving_inputs import SMALL, b64, bomb_header, png
from tests.serving_live import KEY, Served, files_holding, start_serving

pytestmark = pytest.mark.mlflow_server

SEED = 15
BURSTS = 10
PER_BURST = 100
SLOW_CLIENTS = 40  # above max_ongoing_requests (32)
SLOW_PHASE_S = 14
DEADLINE_S = 90  # no request may take longer: a hang
MARK = f"FUZZNOTE-{uuid.uuid4().hex}"  # in every note sent: must reach no log
NOTE = "Tall stature, arachnodactyly and ectopia lentis since childhood."


@pytest.fixture(scope="module")
def served(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # A prompt cap keeps each batch cheap on 2 cores; the limits are otherwise SMALL's,
    # with the default body timing (2 s grace, 16 KiB/s).
    limits = {**SMALL.model_dump(), "max_prompt_tokens": 1024}
    with start_serving(mlflow_server, tmp_path_factory.mktemp("fuzz"), limits=limits) as live:
        yield live


# ---- raw HTTP/1.1 ---------------------------------------------------------------------


@dataclass
class Case:
    kind: str  # good_text, good_vision, good_chat, probe, refused (app-level 4xx), any (no 5xx), protocol
    raw: bytes  # the request as sent (head and body)
    expect: tuple[int, str] | None = None  # (status, code) when exact
    trickle: bytes = b""  # sent a byte at a time after ``raw``, every ``every_s``
    every_s: float = 0.0


@dataclass
class Result:
    case: Case
    status: int | None
    body: bytes
    headers: dict[str, str]
    seconds: float
    error: str | None = None
    json: Any = field(default=None)


def http(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
         content_length: bytes | None = b"auto", key: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if key:
        lines.append(f"Authorization: Bearer {KEY}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    head = "\r\n".join(lines).encode()
    if content_length == b"auto":
        content_length = str(len(body)).encode()
    if content_length is not None:
        head += b"\r\nContent-Length: " + content_length
    return head + b"\r\n\r\n" + body


def post_json(path: str, body: bytes | dict[str, Any], **kwargs: Any) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http("POST", path, data, {"Content-Type": "application/json"}, **kwargs)


def multipart(path: str, data: dict[str, str], files: dict[str, tuple[str, bytes, str]] | None = None) -> bytes:
    req = httpx.Request("POST", "http://x/", data=data, files=files)
    return http("POST", path, req.read(), {"Content-Type": req.headers["content-type"]})


def parse_response(data: bytes) -> tuple[int | None, dict[str, str], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return None, {}, b""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = bytearray(), body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2:]
        body = bytes(out)
    return status, headers, body


async def talk(port: int, case: Case, received: bytearray) -> None:
    """Send ``case`` (its trickle too) and read the answer into ``received`` until the
    server closes. Plain socket calls, not asyncio streams: a stream drops what it has
    buffered once the connection is reset, and a server that answers before it has read
    the whole request resets it when more bytes come (RFC 9112 9.6)."""
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        with contextlib.suppress(OSError):  # closed early on purpose: its answer is read below
            await loop.sock_sendall(sock, case.raw)

        async def trickle() -> None:
            for byte in case.trickle:
                await asyncio.sleep(case.every_s)
                if select.select([sock], [], [], 0)[0]:  # answered: stop sending
                    return
                await loop.sock_sendall(sock, bytes([byte]))

        trickler = asyncio.create_task(trickle())
        try:
            while chunk := await loop.sock_recv(sock, 65536):
                received += chunk
        finally:
            trickler.cancel()
            await asyncio.gather(trickler, return_exceptions=True)


async def exchange(port: int, case: Case) -> Result:
    started = time.monotonic()
    received = bytearray()
    error = None
    try:
        await asyncio.wait_for(talk(port, case, received), DEADLINE_S)
    except TimeoutError:
        error = "hang"
    except OSError as err:  # reset: what the server answered before still counts
        error = type(err).__name__
    status, headers, body = parse_response(bytes(received))
    whole = status is not None and (error is None or len(body) == int(headers.get("content-length", -1)))
    if error == "hang" or not whole:
        return Result(case, None, b"", {}, time.monotonic() - started, error or "no answer before the close")
    result = Result(case, status, body, headers, time.monotonic() - started)
    if headers.get("content-type", "").startswith("application/json"):
        result.json = json.loads(body)
    return result


# ---- what is sent ----------------------------------------------------------------------


class Cases:
    """Good and hostile requests, drawn with one seeded RNG."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.n = 0
        self.tiles = [png((64, 48)), png((40, 40), noise=True), png((32, 32), fmt="JPEG")]

    def note(self) -> str:
        self.n += 1
        return f"{MARK}-{self.n} {NOTE}"

    # -- good --
    def good_text(self) -> Case:
        return Case("good_text", post_json("/text/v1/predict", {"task": "rare_disease", "note": self.note(),
                                                                  "top_k": self.rng.randint(1, 5)}))

    def good_vision(self) -> Case:
        tile = self.rng.choice(self.tiles)
        if self.rng.random() < 0.5:
            return Case("good_vision", multipart("/vision/v1/predict", {"task": "tissue_type", "top_k": "2"},
                                                 {"image": ("t.png", tile, "image/png")}))
        return Case("good_vision", post_json("/vision/v1/predict", {"task": "tissue_type", "image": b64(tile)},
                                             key=False))

    def good_chat(self) -> Case:
        return Case("good_chat", post_json("/text/v1/chat/completions", {
            "model": None, "temperature": 0.3, "max_tokens": 10**17,
            "messages": [{"role": "system", "content": "ignored"}, {"role": "user", "content": self.note()}]}))

    def probe(self) -> Case:
        path = self.rng.choice(["/text/healthz", "/text/readyz", "/vision/healthz", "/vision/readyz",
                                "/vision/v1/models"])
        return Case("probe", http("GET", path, key=False, content_length=None))

    # -- hostile, with the exact answer --
    def exact(self) -> Case:
        n = self.note()
        surrogate = f'{{"task": "rare_disease", "note": "{n} \\ud800"}}'.encode()
        choices: list[tuple[bytes, tuple[int, str]]] = [
            (post_json("/text/v1/predict", surrogate), (400, "invalid_text")),
            (post_json("/text/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", '
                       b'"text": "\\udfff' + n.encode() + b'"}]}]}'), (400, "invalid_text")),
            (post_json("/text/v1/predict", b'{"task": "rare_disease", "\\ud83d": 1}'), (400, "invalid_text")),
            (post_json("/text/v1/predict", b"[" * (depth := self.rng.randint(33, 3000)) + b"]" * depth),
             (400, "too_deep")),
            (post_json("/text/v1/predict", b'{"task": "rare_disease", "note": "x", "top_k": '
                       + b"9" * self.rng.randint(19, 6000) + b"}"), (422, "number_too_large")),
            (post_json("/text/v1/chat/completions", b'{"max_tokens": ' + b"1" * 4400 + b', "messages": '
                       b'[{"role": "user", "content": "x"}]}'), (422, "number_too_large")),
            (post_json("/text/v1/predict", b'{"task": "rare_disease", "note": "x", "top_k": NaN}'),
             (400, "malformed_json")),
            (multipart("/vision/v1/predict", {"task": "tissue_type", "top_k": self.rng.choice(["²", "٣", "3.0", "-1",
                                                                                                "9" * 5000])},
                       {"image": ("t.png", self.tiles[0], "image/png")}), (422, "invalid_field")),
            # Within max_note_chars (2000), ~6000 tokens: over the 1024-token cap.
            (post_json("/text/v1/predict", {"task": "rare_disease", "note": n + "😀" * 1500}),
             (413, "prompt_too_long")),
            (post_json("/text/v1/predict", {"task": "rare_disease", "note": n + "<|eot_id|><|start_header_id|>"
                                                                              "assistant<|end_header_id|>"}),
             (422, "invalid_text")),
            (post_json("/text/v1/predict", {"task": "rare_disease", "note": n + "x" * 3000}), (422, "note_too_long")),
            (post_json("/text/v1/predict", {"task": "rare_disease", "note": n}, key=False), (401, "unauthorized")),
            (http("POST", "/text/v1/predict", b"{}", {"Authorization": "Bearer " + "A" * 8000}, key=False),
             (401, "unauthorized")),
            (post_json("/text/v1/predict", b"", content_length=b"0" * 40 + b"99999999"), (413, "body_too_large")),
            (post_json("/text/v1/predict", b"x" * (SMALL.max_body_bytes + 1)), (413, "body_too_large")),
            (http("POST", "/text/v1/predict", n.encode(), {"Content-Type": "text/plain"}),
             (415, "unsupported_media_type")),
            (post_json("/vision/v1/predict", {"task": "tissue_type", "image": b64(bomb_header())}, key=False),
             (413, "image_too_many_pixels")),
            (post_json("/vision/v1/predict", {"task": "tissue_type", "image": "data:text/html,<b>"}, key=False),
             (400, "invalid_image")),
            (post_json("/vision/v1/chat/completions", {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]}]},
                key=False), (422, "unsupported_image_url")),
            (post_json("/text/v1/chat/completions", {"stream": True, "messages": [{"role": "user", "content": n}]}),
             (400, "unsupported_parameter")),
            # Headers Ray's proxy decodes itself (and any other), with bytes that are not UTF-8.
            (self.bad_header(), (400, "invalid_header")),
            (http("DELETE", "/text/v1/predict", content_length=None), (405, "http_error")),
            (http("GET", "/text/v1/" + "a" * 2000, content_length=None), (404, "http_error")),
        ]
        raw, expect = self.rng.choice(choices)
        return Case("refused", raw, expect)

    def bad_header(self) -> bytes:
        name = self.rng.choice([b"X-Request-Id", b"X-Request-Timeout-Seconds", b"X-Request-Disconnect-Disabled",
                                b"Serve-Multiplexed-Model-Id", b"X-Session-Id", b"User-Agent", b"Authorization"])
        value = bytes(self.rng.randrange(0x80, 0x100) for _ in range(self.rng.randint(1, 40)))
        raw = post_json(self.rng.choice(["/text/v1/predict", "/vision/v1/predict"]),
                        {"task": "rare_disease", "note": self.note()})
        head, _, body = raw.partition(b"\r\n\r\n")
        return head + b"\r\n" + name + b": " + value + b"\r\n\r\n" + body

    # -- hostile, any 4xx (or, for mutations that stay valid, a 200) --
    def mutated(self) -> Case:
        good = self.rng.choice([self.good_text, self.good_vision, self.good_chat])()
        head, _, body = good.raw.partition(b"\r\n\r\n")
        data = bytearray(body)
        for _ in range(self.rng.randint(1, 8)):
            op = self.rng.random()
            if op < 0.5 and data:
                data[self.rng.randrange(len(data))] = self.rng.randrange(256)
            elif op < 0.75 and data:
                del data[self.rng.randrange(len(data)):]
            else:
                at = self.rng.randrange(len(data) + 1)
                data[at:at] = self.rng.choice([b"\\ud800", b"[[[[", b"\x00", b'"', b"\xff\xfe", b"99999999999999999999",
                                               b"\\u0000", b"<|eot_id|>", "😀".encode(), b"}", b"\r\n--"])
        head = b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(b"content-length"))
        return Case("any", head + b"\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + bytes(data))

    def odd_image(self) -> Case:
        image = self.rng.choice([png((1, 512 * 512 // 2), "L"), png((512 * 512 // 2, 1), "L"), png((1, 1)),
                                 png((8, 8), "RGBA"), png((8, 8), "P"), png((8, 8), "I;16"), png((16, 16), "CMYK",
                                                                                             fmt="JPEG")])
        return Case("any", post_json("/vision/v1/predict", {"task": "tissue_type", "image": b64(image)}, key=False))

    def garbage(self) -> Case:
        size = self.rng.choice([1, 17, 300, 5000])
        blob = bytes(self.rng.randrange(256) for _ in range(size))
        ctype = self.rng.choice(["application/json", "multipart/form-data", "multipart/form-data; boundary=x",
                                 "application/x-www-form-urlencoded", ""])
        return Case("any", http("POST", self.rng.choice(["/text/v1/predict", "/vision/v1/predict",
                                                         "/text/v1/chat/completions"]), blob,
                                {"Content-Type": ctype} if ctype else {}))

    def multipart_abuse(self) -> Case:
        fields = {f"f{i}": "x" for i in range(self.rng.choice([0, 20]))}
        data = {"task": "tissue_type", **fields, "note": self.note() * self.rng.choice([1, 200])}
        return Case("any", multipart("/vision/v1/predict", data, {"image": ("t.png", b"\x89PNG", "image/png")}))

    # -- HTTP-level: may be refused by the HTTP server itself (plain-text 400) --
    def protocol(self) -> Case:
        n = self.note().encode()
        body = b'{"task": "rare_disease", "note": "' + n + b'"}'
        choices = [
            post_json("/text/v1/predict", body, content_length=b"9" * self.rng.choice([20, 400, 5000])),
            post_json("/text/v1/predict", body, content_length=b"-5"),
            post_json("/text/v1/predict", body, content_length="²".encode()),
            post_json("/text/v1/predict", body, content_length=b"12abc"),
            post_json("/text/v1/predict", body, content_length=b"3"),  # shorter than the body: the rest is junk
            http("POST", "/text/v1/predict", b"zz\r\n" + body + b"\r\n0\r\n\r\n",
                 {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}, content_length=None),
            http("POST", "/text/v1/predict", body, {"Content-Type": "application/json",
                                                   "Transfer-Encoding": "chunked"}),
            b"GARBAGE /\x00\xff HTTP/9.9\r\n\r\n",
            http("GET", "/text/%ff%00/../healthz?x=%zz", content_length=None, key=False),
            http("GET", "/vision/healthz", headers={"X-Request-Timeout-Seconds": "1e999"}, content_length=None),
            post_json("/text/v1/predict", b"", content_length=b"1" + b"0" * 30),
            http("GET", "/text/healthz", headers={"X-Weird": "\x7f" * 100}, content_length=None, key=False),
        ]
        return Case("protocol", self.rng.choice(choices))

    def stalled(self) -> Case:
        """A body shorter than its Content-Length that never completes: the guard's deadline."""
        body = b'{"task": "rare_disease", "note": "' + self.note().encode()
        return Case("refused", post_json("/text/v1/predict", body, content_length=str(len(body) + 500).encode()),
                    (408, "body_timeout"))

    def draw(self) -> Case:
        kinds: list[tuple[float, Callable[[], Case]]] = [
            (0.11, self.good_text), (0.05, self.good_vision), (0.04, self.good_chat), (0.06, self.probe),
            (0.38, self.exact), (0.16, self.mutated), (0.04, self.odd_image), (0.06, self.garbage),
            (0.03, self.multipart_abuse), (0.05, self.protocol), (0.02, self.stalled)]
        pick = self.rng.random() * sum(w for w, _ in kinds)
        for weight, make in kinds:
            pick -= weight
            if pick <= 0:
                return make()
        return kinds[-1][1]()

    def slow(self) -> Case:
        """A real request whose body comes a byte every 2 s."""
        body = json.dumps({"task": "rare_disease", "note": self.note()}).encode()
        raw = post_json("/text/v1/predict", body)
        head, _, _ = raw.partition(b"\r\n\r\n")
        return Case("slow", head + b"\r\n\r\n" + body[:1], trickle=body[1:], every_s=2.0)


# ---- checks ----------------------------------------------------------------------------


def problems_of(result: Result) -> list[str]:
    """What is wrong with one answer (empty: nothing)."""
    case, status = result.case, result.status
    head, _, body = case.raw.partition(b"\r\n\r\n")
    name = f"{case.kind} {head.split(b' HTTP')[0]!r} {body[:80]!r}"
    if result.error == "hang":
        return [f"{name}: no answer in {DEADLINE_S} s"]
    if status is not None and status >= 500:
        return [f"{name}: HTTP {status} {result.body[:200]!r}"]
    if case.kind == "protocol":
        return []  # any 4xx, or the HTTP server closing on a request it cannot parse
    if status is None:
        return [f"{name}: no HTTP answer ({result.error})"]
    body = result.json
    if status >= 400:
        if not (isinstance(body, dict) and set(body) == {"error", "request_id"}
                and {"message", "type", "code", "param"} <= set(body["error"])):
            return [f"{name}: {status} not in the error shape: {result.body[:200]!r}"]
        if case.expect and (status, body["error"]["code"]) != case.expect:
            return [f"{name}: {status} {body['error']['code']}, expected {case.expect}"]
        if case.kind.startswith("good") or case.kind == "probe":
            return [f"{name}: a good request got {status} {body['error']['code']}"]
        return []
    if case.kind == "refused" or case.kind == "slow":
        return [f"{name}: {status}, expected a refusal {case.expect or ''}"]
    if case.kind == "good_text" and not (body["task"] == "rare_disease" and isinstance(body["labels"], list)
                                         and body["model"]["version"] == "1"):
        return [f"{name}: bad answer {body}"]
    if case.kind == "good_vision" and not (body["task"] == "tissue_type" and isinstance(body["generation"], str)):
        return [f"{name}: bad answer {body}"]
    if case.kind == "good_chat" and body["object"] != "chat.completion":
        return [f"{name}: bad answer {body}"]
    return []


def test_fuzz_hostile_requests_in_bursts_and_slow_uploads(served: Served) -> None:
    port = int(served.base.rsplit(":", 1)[1])
    rng = random.Random(SEED)
    cases = Cases(rng)
    results: list[Result] = []
    started = time.monotonic()

    async def bursts() -> None:
        for _ in range(BURSTS):
            results.extend(await asyncio.gather(*(exchange(port, cases.draw()) for _ in range(PER_BURST))))

    asyncio.run(bursts())
    burst_s = time.monotonic() - started

    # Slow uploads: 40 clients trickling a byte every 2 s, reconnecting when refused, while
    # good requests and probes keep coming.
    slow_results: list[Result] = []
    during: list[Result] = []

    async def slow_phase() -> None:
        stop = time.monotonic() + SLOW_PHASE_S

        async def slow_client() -> None:
            while time.monotonic() < stop:
                slow_results.append(await exchange(port, cases.slow()))

        async def good_client() -> None:
            await asyncio.sleep(3)  # the slow clients hold every slot by now
            while time.monotonic() < stop:
                make = rng.choice([cases.good_text, cases.probe, cases.probe, cases.good_vision])
                during.append(await exchange(port, make()))

        await asyncio.gather(*(slow_client() for _ in range(SLOW_CLIENTS)), *(good_client() for _ in range(4)))

    slow_started = time.monotonic()
    asyncio.run(slow_phase())
    slow_s = time.monotonic() - slow_started

    every = results + slow_results + during
    problems = [p for r in every for p in problems_of(r)]
    by_code = Counter(f"{r.status} {r.json['error']['code']}" if isinstance(r.json, dict) and "error" in r.json
                      else str(r.status) for r in every)
    kinds = Counter(r.case.kind for r in every)
    probes = [r.seconds for r in during if r.case.kind == "probe"]
    good_during = [r for r in during if r.case.kind != "probe"]
    print(f"\n[fuzz] {len(results)} requests in {BURSTS} bursts of {PER_BURST}: {burst_s:.1f} s; "
          f"slow phase {slow_s:.1f} s: {len(slow_results)} slow uploads, {len(during)} requests beside them")
    print(f"[fuzz] kinds {dict(sorted(kinds.items()))}")
    print(f"[fuzz] answers {dict(sorted(by_code.items()))}")
    print(f"[fuzz] HTTP-level cases: {dict(Counter(str(r.status) for r in every if r.case.kind == 'protocol'))}")
    slowest_good = max((r.seconds for r in good_during), default=0)
    print(f"[fuzz] probes during slow uploads: {len(probes)}, slowest {max(probes, default=0):.2f} s; "
          f"good requests beside them: {len(good_during)}, slowest {slowest_good:.2f} s")
    assert not problems, "\n".join(problems[:40])
    assert len(results) == BURSTS * PER_BURST
    assert not [r for r in every if r.status is not None and r.status >= 500]
    assert kinds["good_text"] > 50 and kinds["good_vision"] > 20 and kinds["good_chat"] > 20
    # The slow clients were refused (408) in about the grace, not when they finished.
    assert slow_results and all(r.status == 408 for r in slow_results)
    assert max(r.seconds for r in slow_results) < 15
    # Probes and good requests kept being answered beside them.
    assert probes and max(probes) < 10 and good_during
    # No note text (every note carried MARK) and no key in any log of the Ray session.
    time.sleep(2)  # log writers flush
    assert not files_holding(served.logs_dir, [MARK, KEY])


def test_fuzz_cases_are_base64_clean() -> None:
    """The helpers themselves: a multipart body and base64 images round-trip."""
    raw = multipart("/v", {"task": "t"}, {"image": ("t.png", png(), "image/png")})
    assert b"multipart/form-data; boundary=" in raw and raw.count(b"\r\n\r\n") >= 2
    assert base64.b64decode(b64(png())) == png()
