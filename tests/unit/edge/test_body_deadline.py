"""Request bodies that arrive too slowly (guard.edge.deadlines) through a real uvicorn serving the
gateway (fake MLflow), driven with raw sockets: a trickled buffered body is answered
408 body_timeout and recorded with who sent it, a trickled artifact upload is abandoned on its
way to MLflow (which never sees its end), and a slow but steady body goes through."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from starlette.types import Message, Receive, Scope, Send

from guard.app import Gateway, build_gateway, uvicorn_options
from guard.audit.store import AuditStore, Filters
from guard.config import load_settings
from guard.edge.deadlines import TIMED_OUT, BodyDeadlines, BodyTimeout, timed_receive
from guard.errors import REASONS
from tests.conftest import free_port
from tests.servers import ServerThread, send_response

ADMIN = "mlg_" + "b" * 43
KEY = "k" * 40
PREFIXES = ("/api", "/ajax-api")
SET_TAG = "/2.0/mlflow/runs/set-tag"
UPLOAD = "/2.0/mlflow-artifacts/artifacts/1/r1/artifacts/model.bin"
TAG_BODY = b'{"run_id": "r1", "key": "k", "value": "' + b"v" * 200 + b'"}'
# Small deadlines, so the tests wait seconds, not minutes.
SMALL = {
    "gateway.body_timeout": "2s",
    "gateway.body_idle_timeout": "1s",
    "gateway.min_upload_rate": "1KiB",
    "gateway.failed_login_limit": "1000000",
}


# The fake MLflow: how each forwarded body ended, by the gateway's request id.

ENDINGS: dict[str, tuple[str, int]] = {}


async def fake_mlflow(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    request_id = dict(scope["headers"]).get(b"x-request-id", b"").decode()
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # the gateway abandoned the request
            ENDINGS[request_id] = ("aborted", size)
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    ENDINGS[request_id] = ("complete", size)
    if scope["path"] == "/version":
        await send_response(send, 200, b"3.17.2")
        return
    answer = {
        "experiment": {"experiment_id": "1", "name": "e1"},
        "run": {"info": {"run_id": "r1", "experiment_id": "1"}},
    }
    await send_response(send, 200, json.dumps(answer).encode())


def ending(request_id: str) -> tuple[str, int]:
    deadline = time.monotonic() + 10
    while request_id not in ENDINGS:
        assert time.monotonic() < deadline, f"MLflow never saw the end of {request_id}"
        time.sleep(0.02)
    return ENDINGS[request_id]


@dataclass
class Running:
    gateway: Gateway
    port: int

    def outcome(self, request_id: str) -> dict[str, Any]:
        store = AuditStore(self.gateway.engine)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = [r for _, r in store.query(Filters(request_id=request_id, kind="outcome"))]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no outcome record for {request_id}")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with ServerThread(fake_mlflow, lifespan="off") as upstream:
        data_dir = tmp_path_factory.mktemp("deadline")
        values = {"upstream.url": upstream.url, "storage.data_dir": str(data_dir)} | SMALL
        settings = load_settings(values, {}, None).settings
        gateway = build_gateway(
            settings, {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": ADMIN, "MLFLOW_GUARD_SECRET_KEY": KEY}
        )
        port = free_port()
        config = uvicorn.Config(gateway, host="127.0.0.1", port=port, **uvicorn_options(settings))  # type: ignore[arg-type]
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.02)
        yield Running(gateway, port)
        server.should_exit = True
        thread.join(timeout=15)


# Raw HTTP/1.1.


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def parse(raw: bytes) -> Answer:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(lines[0].split()[1]), headers, rest[: int(headers["content-length"])])


def request_head(method: str, target: str, *lines: str) -> bytes:
    text = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {ADMIN}\r\n"
    return (text + "".join(f"{x}\r\n" for x in lines) + "\r\n").encode("latin-1")


def framed(body: bytes, chunked: bool) -> tuple[str, list[bytes]]:
    """The framing header and the body's pieces as sent (one byte of content each)."""
    if chunked:
        return "Transfer-Encoding: chunked", [b"1\r\n" + bytes([b]) + b"\r\n" for b in body]
    return f"Content-Length: {len(body)}", [bytes([b]) for b in body]


def trickle(sock: socket.socket, pieces: list[bytes], interval: float) -> bytes:
    """Send one piece per ``interval`` until the gateway answers or closes; then read all it
    sends until it closes (every wait bounded)."""
    for piece in pieces:
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            break
        try:
            sock.sendall(piece)
        except OSError:
            break
    else:
        raise AssertionError("the whole body was sent without an answer")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=15)


def assert_timed_out(running: Running, raw: bytes, path: str) -> dict[str, Any]:
    answer = parse(raw)
    payload = json.loads(answer.body)
    assert answer.status == 408 and payload["reason"] == "body_timeout"
    assert answer.headers["x-guard-reason"] == "body_timeout"
    assert payload["error_code"] == REASONS["body_timeout"].error_code
    assert answer.headers["connection"] == "close"  # and it was: trickle read until EOF
    record = running.outcome(answer.headers["x-request-id"])
    assert record["reason"] == "body_timeout" and record["status"] == 408
    assert record["decision"] == "error" and record["principal"] == "token:admin"
    assert record["path"] == path
    return record


# Buffered bodies (the reviewer's repro: one byte a second to set-tag).


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_trickled_buffered_body_is_refused_and_recorded(
    running: Running, prefix: str, chunked: bool
) -> None:
    framing, pieces = framed(TAG_BODY, chunked)
    with connect(running.port) as sock:
        sock.sendall(
            request_head("POST", prefix + SET_TAG, framing, "Content-Type: application/json")
        )
        raw = trickle(sock, pieces, 0.1)  # 10 bytes/s: slower than 1KiB/s
    record = assert_timed_out(running, raw, prefix + SET_TAG)
    assert record["upstream_status"] == 0  # nothing of it reached MLflow


def test_a_buffered_body_that_never_comes_is_refused(running: Running) -> None:
    with connect(running.port) as sock:
        sock.sendall(
            request_head(
                "POST", "/api" + SET_TAG, "Content-Length: 100", "Content-Type: application/json"
            )
        )
        raw = trickle(sock, [b""] * 100, 0.1)
    assert_timed_out(running, raw, "/api" + SET_TAG)


def test_the_whole_buffered_body_has_a_deadline_however_fast_it_trickles(
    running: Running,
) -> None:
    """Fast enough for min_upload_rate, never idle: body_timeout (2 s) still ends it."""
    body = b'{"run_id": "r1", "key": "k", "value": "' + b"v" * 100_000 + b'"}'
    with connect(running.port) as sock:
        sock.sendall(
            request_head("POST", "/ajax-api" + SET_TAG, f"Content-Length: {len(body)}",
                         "Content-Type: application/json")
        )  # fmt: skip
        pieces = [body[i : i + 2048] for i in range(0, len(body), 2048)]  # ~20 KiB/s
        raw = trickle(sock, pieces, 0.1)
    assert "for a body" in json.loads(parse(raw).body)["message"]
    assert_timed_out(running, raw, "/ajax-api" + SET_TAG)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_slow_but_steady_buffered_body_goes_through(running: Running, prefix: str) -> None:
    """Pieces 0.2 s apart over ~1.6 s: longer than body_idle_timeout in all, but never idle that
    long, faster than min_upload_rate, and whole within body_timeout."""
    body = b'{"run_id": "r1", "key": "k", "value": "' + b"v" * 3000 + b'"}'
    pieces = [body[i : i + 400] for i in range(0, len(body), 400)]  # 2 KB/s
    with connect(running.port) as sock:
        sock.sendall(
            request_head("POST", prefix + SET_TAG, f"Content-Length: {len(body)}",
                         "Content-Type: application/json", "Connection: close")
        )  # fmt: skip
        for piece in pieces:
            time.sleep(0.2)
            sock.sendall(piece)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    answer = parse(data)
    assert answer.status == 200, answer.body
    assert ending(answer.headers["x-request-id"]) == ("complete", len(body))


# The policy API reads its bodies under the same deadlines.


@pytest.mark.parametrize(
    ("method", "path", "content_type", "body"),
    [
        ("POST", "/guard/api/policy/changes", "application/json", b'{"add": [], "remove": []}'),
        ("PUT", "/guard/api/policy", "text/csv", b"subject,role,resource\n"),
    ],
)
def test_a_trickled_policy_api_body_is_refused_and_recorded(
    running: Running, method: str, path: str, content_type: str, body: bytes
) -> None:
    framing, pieces = framed(body, False)
    with connect(running.port) as sock:
        sock.sendall(request_head(method, path, framing, f"Content-Type: {content_type}"))
        raw = trickle(sock, pieces, 0.1)
    assert_timed_out(running, raw, path)


# Streamed artifact uploads: abandoned on their way to MLflow.


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_trickled_upload_is_abandoned_upstream_and_recorded(
    running: Running, prefix: str, chunked: bool
) -> None:
    """A fast start (forwarded to MLflow as it comes), then a trickle: MLflow sees the request
    end without its body's end, the caller gets 408 and a closed connection."""
    start, rest = b"x" * 1024, b"y" * 1000
    if chunked:
        framing, first = "Transfer-Encoding: chunked", b"400\r\n" + start + b"\r\n"
        pieces = framed(rest, True)[1]
    else:
        framing, first = f"Content-Length: {len(start) + len(rest)}", start
        pieces = framed(rest, False)[1]
    with connect(running.port) as sock:
        sock.sendall(request_head("PUT", prefix + UPLOAD, framing) + first)
        raw = trickle(sock, pieces, 0.1)
    record = assert_timed_out(running, raw, prefix + UPLOAD)
    state, size = ending(record["request_id"])
    assert state == "aborted" and len(start) <= size < len(start) + len(rest)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_stalled_upload_is_cut_off_after_the_idle_timeout(running: Running, prefix: str) -> None:
    body = b"z" * 4096
    with connect(running.port) as sock:
        sock.sendall(request_head("PUT", prefix + UPLOAD, f"Content-Length: {2 * len(body)}"))
        sock.sendall(body)
        raw = trickle(sock, [b""] * 100, 0.1)  # then nothing at all
    assert "nothing arrived for 1 s" in json.loads(parse(raw).body)["message"]
    record = assert_timed_out(running, raw, prefix + UPLOAD)
    assert ending(record["request_id"]) == ("aborted", len(body))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_slow_but_steady_upload_goes_through(
    running: Running, prefix: str, chunked: bool
) -> None:
    """1 KiB every 0.2 s for ~2.4 s: longer than body_timeout and body_idle_timeout in all, but
    never idle that long and above min_upload_rate. Uploads have no total deadline."""
    pieces = [bytes([65 + i]) * 1024 for i in range(12)]
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {12 * 1024}"
    with connect(running.port) as sock:
        sock.sendall(request_head("PUT", prefix + UPLOAD, framing, "Connection: close"))
        for piece in pieces:
            time.sleep(0.2)
            sock.sendall(b"400\r\n" + piece + b"\r\n" if chunked else piece)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    answer = parse(data)
    assert answer.status == 200, answer.body
    assert ending(answer.headers["x-request-id"]) == ("complete", 12 * 1024)
    record = running.outcome(answer.headers["x-request-id"])
    assert record["reason"] == "" and record["status"] == 200


# The clock itself, without a server.


def receiver(pieces: list[bytes], interval: float) -> Receive:
    queue = list(pieces)

    async def receive() -> Message:
        await asyncio.sleep(interval)
        piece = queue.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(queue)}

    return receive


def test_a_body_slower_than_the_minimum_rate_is_cut_off_though_never_idle() -> None:
    deadlines = BodyDeadlines(total=60, idle=0.5, min_rate=1000)
    scope: dict[str, Any] = {}
    timed = timed_receive(scope, receiver([b"x" * 10] * 1000, 0.05), deadlines, whole=False)

    async def drain() -> None:
        while (await timed()).get("more_body"):
            pass

    with pytest.raises(BodyTimeout) as caught:
        asyncio.run(asyncio.wait_for(drain(), 10))
    assert caught.value.refusal.detail == "(slower than 1000 bytes/s)"
    assert scope[TIMED_OUT] is caught.value.refusal


def test_a_fast_start_banks_no_more_than_the_idle_timeout() -> None:
    """100 kB at once, then a trickle: cut off once the slack (0.5 s) is used up, not after the
    100 s the first piece would have earned without the cap."""
    deadlines = BodyDeadlines(total=60, idle=0.5, min_rate=1000)
    pieces = [b"x" * 100_000] + [b"y"] * 10_000
    scope: dict[str, Any] = {}
    timed = timed_receive(scope, receiver(pieces, 0.05), deadlines, whole=False)

    async def drain() -> None:
        while (await timed()).get("more_body"):
            pass

    with pytest.raises(BodyTimeout) as caught:
        asyncio.run(asyncio.wait_for(drain(), 10))
    assert caught.value.refusal.detail == "(slower than 1000 bytes/s)"


@pytest.mark.parametrize(
    ("deadlines", "whole", "interval", "detail"),
    [
        (BodyDeadlines(total=60, idle=0.2, min_rate=1000), False, 5, "(nothing arrived for 0.2 s)"),
        (BodyDeadlines(total=0.3, idle=60, min_rate=0), True, 0.05, "(limit 0.3 s for a body)"),
        (BodyDeadlines(total=60, idle=0.2, min_rate=0), True, 5, "(nothing arrived for 0.2 s)"),
    ],
)
def test_each_deadline_names_itself(
    deadlines: BodyDeadlines, whole: bool, interval: float, detail: str
) -> None:
    """The refusal says which deadline passed (its words written only when one does)."""
    scope: dict[str, Any] = {}
    timed = timed_receive(scope, receiver([b"x"] * 1000, interval), deadlines, whole=whole)

    async def drain() -> None:
        while (await timed()).get("more_body"):
            pass

    with pytest.raises(BodyTimeout) as caught:
        asyncio.run(asyncio.wait_for(drain(), 10))
    assert caught.value.refusal.detail == detail


def test_a_complete_body_passes_through_untimed() -> None:
    """Once the body is in, receive only waits for the client to go: no deadline applies."""
    deadlines = BodyDeadlines(total=0.1, idle=0.1, min_rate=1000)
    messages: list[Message] = [
        {"type": "http.request", "body": b"ab", "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        if len(messages) == 1:
            await asyncio.sleep(0.3)  # longer than every deadline
        return messages.pop(0)

    timed = timed_receive({}, receive, deadlines, whole=True)

    async def both() -> list[Message]:
        return [await timed(), await timed()]

    assert [m["type"] for m in asyncio.run(both())] == ["http.request", "http.disconnect"]
    nothing = timed_receive({}, receiver([b""], 0.3), deadlines, whole=False, pending=False)

    async def one() -> Message:
        return await nothing()

    assert asyncio.run(one())["type"] == "http.request"
