"""An answer's head goes out with its body in one send (``_CoalescingTransport`` in
guard.edge.protocol): held at most until the next write, the end of the event loop's turn or
the end of its answer; never reordered, never lost to a close that bypasses it, never a buffer
the writer may reuse, nothing after a refusal's FIN. Through a real uvicorn: a streamed
answer's head arrives before its body; HEAD, 100-continue and pipelined answers are whole."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from guard.edge import protocol
from guard.edge.protocol import HELD_BELOW, _CoalescingTransport
from tests.servers import ServerThread, read_request_body
from tests.unit.edge.test_protocol import ADMIN, Servers, connect

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


class Recording(asyncio.Transport):
    """A transport that records each call that would send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, list[bytes]]] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.sent.append(("write", [bytes(data)]))

    def writelines(self, data: Any) -> None:
        self.sent.append(("writelines", [bytes(d) for d in data]))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.sent.append(("close", []))
        self.closing = True


def coalescing() -> tuple[_CoalescingTransport, Recording]:
    transport = Recording()
    return _CoalescingTransport(transport, asyncio.get_running_loop()), transport


def test_a_head_goes_out_with_the_body_that_follows_it() -> None:
    asyncio.run(_test_a_head_goes_out_with_the_body_that_follows_it())


async def _test_a_head_goes_out_with_the_body_that_follows_it() -> None:
    answers, transport = coalescing()
    answers.write(HEAD)
    assert transport.sent == []
    answers.write(b"hello")
    assert transport.sent == [("writelines", [HEAD, b"hello"])]
    await asyncio.sleep(0)  # the flush scheduled for the head finds nothing left
    assert transport.sent == [("writelines", [HEAD, b"hello"])]


def test_a_head_alone_goes_out_when_the_turn_ends() -> None:
    asyncio.run(_test_a_head_alone_goes_out_when_the_turn_ends())


async def _test_a_head_alone_goes_out_when_the_turn_ends() -> None:
    answers, transport = coalescing()
    answers.write(HEAD)
    await asyncio.sleep(0)
    assert transport.sent == [("write", [HEAD])]
    answers.write(b"hello")  # (a body later: held for its own turn, in order)
    await asyncio.sleep(0)
    assert transport.sent == [("write", [HEAD]), ("write", [b"hello"])]


def test_large_writes_are_not_held_and_a_held_one_goes_first() -> None:
    asyncio.run(_test_large_writes_are_not_held_and_a_held_one_goes_first())


async def _test_large_writes_are_not_held_and_a_held_one_goes_first() -> None:
    answers, transport = coalescing()
    big = b"x" * HELD_BELOW
    answers.write(big)
    assert transport.sent == [("write", [big])]
    answers.write(HEAD)
    answers.write(big)
    assert transport.sent[1:] == [("writelines", [HEAD, big])]


def test_close_sends_what_is_held_first() -> None:
    asyncio.run(_test_close_sends_what_is_held_first())


async def _test_close_sends_what_is_held_first() -> None:
    answers, transport = coalescing()
    answers.write(HEAD)
    answers.close()
    assert transport.sent == [("write", [HEAD]), ("close", [])]
    await asyncio.sleep(0)
    assert transport.sent == [("write", [HEAD]), ("close", [])]


def test_a_held_buffer_is_copied_and_nothing_is_written_once_closing() -> None:
    asyncio.run(_test_a_held_buffer_is_copied_and_nothing_is_written_once_closing())


async def _test_a_held_buffer_is_copied_and_nothing_is_written_once_closing() -> None:
    answers, transport = coalescing()
    buffer = bytearray(HEAD)
    answers.write(buffer)
    buffer[:4] = b"XXXX"  # a writer may reuse its buffer once write returns
    await asyncio.sleep(0)
    assert transport.sent == [("write", [HEAD])]
    answers.write(HEAD)
    transport.closing = True  # the client went away meanwhile
    await asyncio.sleep(0)
    assert transport.sent == [("write", [HEAD])]
    answers.write(HEAD)  # and nothing is held for a transport that is closing
    assert answers.held is None
    assert transport.sent == [("write", [HEAD]), ("write", [HEAD])]


# Through a real uvicorn serving the gateway.

HEAD_READ = threading.Event()  # set by the test once a streamed answer's head has arrived
BODY_WAIT = 10.0  # seconds the fake MLflow waits for that before sending the body anyway


async def streaming_mlflow(scope: Scope, receive: Receive, send: Send) -> None:
    """Content-Length answers, but runs/get: its head at once, its body once the client has
    read the head (HEAD_READ), or after BODY_WAIT if it never does."""
    if scope["type"] != "http":
        return
    await read_request_body(receive)
    if not scope["path"].endswith("/runs/get"):
        body = b"3.17.2" if scope["path"] == "/version" else EXPERIMENT
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    deadline = time.monotonic() + BODY_WAIT
    while not HEAD_READ.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await send({"type": "http.response.body", "body": b'{"run": ', "more_body": True})
    await send({"type": "http.response.body", "body": b"{}}"})


EXPERIMENT = b'{"experiment": {"name": "e1"}}'


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with ServerThread(streaming_mlflow, lifespan="off") as upstream:
        servers = Servers(upstream, tmp_path_factory.mktemp("coalescing"))
        try:
            yield servers.start().port
        finally:
            servers.stop()


def request(method: str, target: str, *lines: str) -> bytes:
    head = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {ADMIN}"]
    return ("\r\n".join([*head, *lines]) + "\r\n\r\n").encode()


def read_until(sock: socket.socket, marker: bytes, data: bytes = b"") -> bytes:
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {marker!r}: {data!r}"
        data += chunk
    return data


def test_a_streamed_answers_head_arrives_before_its_body(gateway: int) -> None:
    HEAD_READ.clear()
    with connect(gateway) as sock:
        sock.settimeout(BODY_WAIT * 2)
        sock.sendall(request("GET", "/api/2.0/mlflow/runs/get?run_id=r1"))
        head = read_until(sock, b"\r\n\r\n")  # (a head held for its body: the body's wait)
        assert b'{"run": ' not in head, "the head waited for the body"
        HEAD_READ.set()
        assert head.startswith(b"HTTP/1.1 200 ")
        answer = read_until(sock, b"0\r\n\r\n", head)
        assert answer.index(b'{"run": ') < answer.index(b"{}}")


def test_plain_head_and_pipelined_answers_are_whole_and_in_order(gateway: int) -> None:
    target = "/api/2.0/mlflow/experiments/get?experiment_id=1"
    with connect(gateway) as sock:
        sock.sendall(request("GET", target) + request("HEAD", target) + request("GET", target))
        raw = b""
        deadline = time.monotonic() + 10
        while raw.count(b"HTTP/1.1 200 ") < 3 or not raw.endswith(b"}}"):
            assert time.monotonic() < deadline, raw
            raw += sock.recv(65536)
        answers = raw.split(b"HTTP/1.1 200 ")[1:]
        assert [a.endswith(b"\r\n\r\n" + EXPERIMENT) for a in answers] == [True, False, True]
        assert answers[1].endswith(b"\r\n\r\n")  # HEAD: the head alone


def test_100_continue_then_the_answer(gateway: int) -> None:
    body = b'{"experiment_id": "1", "new_name": "e2"}'
    with connect(gateway) as sock:
        sock.sendall(request("POST", "/api/2.0/mlflow/experiments/update", "Expect: 100-continue",
                             "Content-Type: application/json",
                             f"Content-Length: {len(body)}"))  # fmt: skip
        interim = read_until(sock, b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answer = read_until(sock, EXPERIMENT, interim.partition(b"\r\n\r\n")[2])
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.endswith(b"\r\n\r\n" + EXPERIMENT)


def test_every_answer_of_the_gateway_goes_through_it(
    gateway: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coalescing transport is the one answers are written to (not uvicorn's own)."""
    joined: list[list[bytes]] = []
    original = protocol._CoalescingTransport.write

    def write(self: _CoalescingTransport, data: Any) -> None:
        if self.held is not None and b"x-request-id:" in self.held:  # (not the fake MLflow's)
            joined.append([self.held, bytes(data)])
        original(self, data)

    monkeypatch.setattr(protocol._CoalescingTransport, "write", write)
    target = "/api/2.0/mlflow/experiments/get?experiment_id=1"
    with connect(gateway) as sock:
        sock.sendall(request("GET", target))
        read_until(sock, b"e1")
    assert len(joined) == 1
    head, body = joined[0]
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert body == EXPERIMENT


# Found by review: nothing held may be lost or reordered by what bypasses this transport.


class Plain(ServerThread):
    """uvicorn with the gateway's protocol serving ``app`` (no gateway in front)."""

    def __init__(self, app: Any) -> None:
        super().__init__(app, lifespan="off")


def read_all(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


SHUTTING: list[ServerThread] = []


async def shut_down_after(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers, then closes every connection as uvicorn's graceful shutdown does, in the same
    step: what happens when the shutdown lands in the turn an answer completes."""
    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}
    if scope["path"] == "/chunked":  # its end written a turn after the rest
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hello", "more_body": True})
        await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b""})
    elif scope["path"] == "/head":  # a HEAD's answer: the head, then an empty body
        await send(start)
        await send({"type": "http.response.body", "body": b""})
    else:  # as the proxy relays MLflow: the head, the body a turn later
        await send(start)
        await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"hello"})
    for connection in list(SHUTTING[0].server.server_state.connections):
        connection.shutdown()


@pytest.mark.parametrize(
    ("method", "path", "ending"),
    [
        ("GET", "/chunked", b"0\r\n\r\n"),
        ("GET", "/plain", b"hello"),
        ("HEAD", "/head", b"\r\n\r\n"),
    ],
)
def test_an_answer_is_whole_when_a_shutdown_closes_its_connection(
    method: str, path: str, ending: bytes
) -> None:
    with Plain(shut_down_after) as served, connect(served.port) as sock:
        SHUTTING[:] = [served]
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        raw = read_all(sock)
    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(ending), raw


async def slow_get_then_post(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["method"] == "GET":  # the body comes later; meanwhile a broken chunk arrives
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"5")]})  # fmt: skip
        await asyncio.sleep(0.3)
        await send({"type": "http.response.body", "body": b"hello"})
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_a_refusal_after_a_pipelined_answer_follows_it_whole() -> None:
    with Plain(slow_get_then_post) as served, connect(served.port) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n")  # fmt: skip
        time.sleep(0.05)
        sock.sendall(b"zz\r\n\r\n")  # a broken chunk: refused with 400
        raw = read_all(sock)
    first, _, _ = raw.partition(b"HTTP/1.1 400 ")
    assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"\r\n\r\nhello"), raw
    assert b"HTTP/1.1 400 " in raw


RECEIVED: list[Any] = []


async def busy_then_read(scope: Scope, receive: Receive, send: Send) -> None:
    time.sleep(0.3)  # (blocking the loop) the client's broken chunk arrives meanwhile
    try:
        RECEIVED.append(await receive())  # would send "100 Continue"
    except RuntimeError as exc:
        RECEIVED.append(exc)


async def wait_then_read(scope: Scope, receive: Receive, send: Send) -> None:
    await asyncio.sleep(0.4)  # (checking who is calling) the broken chunk is refused meanwhile
    try:
        RECEIVED.append(await receive())  # would send "100 Continue" after the refusal's FIN
    except RuntimeError as exc:
        RECEIVED.append(exc)


@pytest.mark.parametrize("app", [busy_then_read, wait_then_read])
def test_no_interim_answer_after_a_refusal_and_nothing_after_its_fin(
    app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The body's broken chunk is refused while the application has not read the body yet:
    either before its ``receive`` (which would answer 100 Continue) or after it."""
    RECEIVED.clear()
    with Plain(app) as served, connect(served.port) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        time.sleep(0.1)
        sock.sendall(b"zz\r\n\r\n")
        raw = read_all(sock)
        deadline = time.monotonic() + 10
        while not RECEIVED and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # (a flush scheduled by a late write would have run)
    final = raw.index(b"HTTP/1.1 400 ")  # (an interim answer before it is fine)
    assert b"100 Continue" not in raw[final:], raw
    assert RECEIVED == [{"type": "http.disconnect"}]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
