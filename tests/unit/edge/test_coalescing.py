"""An answer's head goes out with its body in one send (guard.edge.protocol._Coalescing): held
at most until the next write or the end of the event loop's turn, never reordered, never past
a close, never a buffer the writer may reuse; through a real uvicorn, a streamed answer's head
still arrives before its slow body, and HEAD, 100-continue and pipelined answers are whole."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from guard.edge import protocol
from guard.edge.protocol import HELD_BELOW, _Coalescing
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


def coalescing() -> tuple[_Coalescing, Recording]:
    transport = Recording()
    return _Coalescing(transport, asyncio.get_running_loop()), transport


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

STREAM_PAUSE = 1.0  # seconds the fake MLflow waits before the body of a streamed answer


async def streaming_mlflow(scope: Scope, receive: Receive, send: Send) -> None:
    """Content-Length answers, but runs/get: its head at once, its body a while later."""
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
    await asyncio.sleep(STREAM_PAUSE)
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


def test_a_streamed_answers_head_arrives_before_its_slow_body(gateway: int) -> None:
    with connect(gateway) as sock:
        started = time.monotonic()
        sock.sendall(request("GET", "/api/2.0/mlflow/runs/get?run_id=r1"))
        head = read_until(sock, b"\r\n\r\n")
        assert time.monotonic() - started < STREAM_PAUSE * 0.8, "the head waited for the body"
        assert head.startswith(b"HTTP/1.1 200 ")
        answer = read_until(sock, b"0\r\n\r\n", head)
        assert b'{"run": ' in answer and b"{}}" in answer
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
    original = protocol._Coalescing.write

    def write(self: _Coalescing, data: Any) -> None:
        if self.held is not None and b"x-request-id:" in self.held:  # (not the fake MLflow's)
            joined.append([self.held, bytes(data)])
        original(self, data)

    monkeypatch.setattr(protocol._Coalescing, "write", write)
    target = "/api/2.0/mlflow/experiments/get?experiment_id=1"
    with connect(gateway) as sock:
        sock.sendall(request("GET", target))
        read_until(sock, b"e1")
    assert len(joined) == 1
    head, body = joined[0]
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert body == EXPERIMENT
