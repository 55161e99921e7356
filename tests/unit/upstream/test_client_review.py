"""Adversarial review of the hand-written HTTP/1.1 upstream client (guard/upstream/client.py).

Every test talks to a real local asyncio server that answers with scripted bytes (the helpers
of test_client.py), on asyncio's loop and on uvloop. The review's eight findings (each test
says which) were strict xfails until the client was fixed; the tests at the end probe the edges
of each fix. The other tests are probes that found nothing: they pin the behaviour the review
relied on.

After every failure a test can provoke, the pool must be whole again: every slot given back
(``_slots``), no connection left in use (``_all`` holds only idle ones) and every dropped
connection's transport closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from guard.upstream.client import BUFFER_LIMIT, UpstreamClient, UpstreamError
from tests.unit.upstream.test_client import (
    LIMITS,
    OK,
    Handler,
    Seen,
    Server,
    answering,
    chunks,
    client_for,
    fetch,
    read_request,
    tls_server,
)

Run = Callable[[Awaitable[None]], None]
# What a poisoned answer would carry if it ever reached the wrong request.
EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    def runner(coroutine: Awaitable[None]) -> None:
        async def bounded() -> None:
            await asyncio.wait_for(coroutine, 20)

        if request.param == "uvloop":
            uvloop.run(bounded())
        else:
            asyncio.run(bounded())

    return runner


def assert_pool_whole(client: UpstreamClient) -> None:
    """Every slot is free and no connection is held by a finished request."""
    assert client._slots._value == client.limits.max_connections
    in_use = [c for c in client._all if c.busy]
    assert in_use == []
    assert set(client._idle) <= client._all


def script(*answers: bytes | Callable[[asyncio.StreamWriter], Awaitable[None]]) -> Handler:
    """Answer the n-th request (over all connections) with the n-th answer (the last repeats);
    an answer may be a coroutine function that writes whatever it likes."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        while (request := await read_request(reader, n)) is not None:
            seen.requests.append(request)
            answer = answers[min(len(seen.requests), len(answers)) - 1]
            if isinstance(answer, bytes):
                writer.write(answer)
                await writer.drain()
            else:
                await answer(writer)
        seen.closed.append(n)

    return handler


def later(
    first: bytes, then: bytes, pause: float = 0.05
) -> Callable[[asyncio.StreamWriter], Awaitable[None]]:
    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(first)
        await writer.drain()
        await asyncio.sleep(pause)
        writer.write(then)
        await writer.drain()

    return write


# Pool desynchronisation: an answer (or part of one) for one request never reaches another


@pytest.mark.parametrize("pause", [None, 0.05])
@pytest.mark.parametrize(
    "first",
    [
        OK,  # a whole answer, then a second one nobody asked for
        b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n" % len(EVIL),
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: %d\r\n\r\n" % len(EVIL),
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 100 Continue\r\n\r\n",
    ],
    ids=["pipelined", "204-with-body", "304-with-body", "304-chunked", "late-100"],
)
def test_bytes_after_an_answer_never_reach_the_next_request(
    run: Run, first: bytes, pause: float | None
) -> None:
    """A second answer, a body sent with a bodiless answer, or a late 100 Continue, in the same
    segment or while the connection is idle: the next request goes on a new connection."""

    async def main() -> None:
        answer = first + EVIL if pause is None else later(first, EVIL, pause)
        async with Server(script(answer, OK)) as server:
            client = client_for(server)
            await fetch(client)
            await asyncio.sleep(0.1)
            assert (await fetch(client))[2] == b"{}"
            assert_pool_whole(client)
            await client.close()
        assert server.seen.connections == 2

    run(main())


@pytest.mark.parametrize("pause", [None, 0.05])
@pytest.mark.parametrize(
    "first",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",  # body sent after HEAD anyway
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["length", "chunked", "zero"],
)
def test_a_body_sent_after_head_never_reaches_the_next_request(
    run: Run, first: bytes, pause: float | None
) -> None:
    async def main() -> None:
        answer = first + EVIL if pause is None else later(first, EVIL, pause)
        async with Server(script(answer, OK)) as server:
            client = client_for(server)
            status, _, data = await fetch(client, "HEAD")
            assert (status, data) == (200, b"")
            await asyncio.sleep(0.1)
            assert (await fetch(client))[2] == b"{}"
            assert_pool_whole(client)
            await client.close()
        assert server.seen.connections == 2

    run(main())


CHUNKED_ABC = b"3\r\nabc\r\n0\r\n\r\n"
BROKEN_FRAMING = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_ABC,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n" + CHUNKED_ABC,
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 8\r\n\r\nabc" + b"HTTP/1.1",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length : 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
]


@pytest.mark.parametrize("answer", BROKEN_FRAMING)
def test_an_answer_with_broken_framing_is_refused_and_its_connection_dropped(
    run: Run, answer: bytes
) -> None:
    """Content-Length with Transfer-Encoding, duplicate or malformed lengths, overflowing chunk
    sizes, obs-fold, bare CR/LF, an unasked upgrade: 502 (before or during the body), and the
    connection is never reused whatever the server does next."""

    async def main() -> None:
        async with Server(script(answer + EVIL, OK)) as server:
            client = client_for(server, read_timeout=0.5)
            with pytest.raises(UpstreamError) as caught:
                await fetch(client)
            # chunked not last: read until MLflow closes, which it does not (504)
            assert caught.value.refusal.reason in {"upstream_unreachable", "upstream_timeout"}
            assert_pool_whole(client)
            assert (await fetch(client))[2] == b"{}"
            await client.close()
        assert server.seen.connections == 2

    run(main())


def test_trailers_end_a_chunked_answer_that_is_reused(run: Run) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-T: 1\r\nX-U: 2\r\n\r\n"
    )

    async def main() -> None:
        async with Server(script(answer, OK)) as server:
            client = client_for(server)
            status, headers, data = await fetch(client)
            assert (status, data) == (200, b"abc")
            assert (b"X-T", b"1") not in headers  # trailers are not answer headers
            assert (await fetch(client))[2] == b"{}"
            await client.close()
        assert server.seen.connections == 1

    run(main())


@pytest.mark.parametrize(
    "connection",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: Close\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: CLOSE\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close, keep-alive\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: foo ,\tclose \r\n",
        b"HTTP/1.1 200 OK\r\nConnection:\tclose\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\n",
        b"HTTP/1.0 200 OK\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: close\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: close, Keep-Alive\r\n",
    ],
)
def test_an_answer_that_says_close_is_never_reused(run: Run, connection: bytes) -> None:
    async def main() -> None:
        answer = connection + b"Content-Length: 2\r\n\r\n{}"
        async with Server(script(answer)) as server:  # the server itself keeps it open
            client = client_for(server)
            await fetch(client)
            await fetch(client)
            await client.close()
        assert server.seen.connections == 2

    run(main())


def test_a_request_cancelled_mid_headers_never_leaves_its_answer_to_the_next(run: Run) -> None:
    """The caller gives up while the head is half there: the rest of it (and the body) must
    not become the next request's answer."""

    async def rest_after_cancel(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(b"ngth: 5\r\n\r\nEVIL!")
        await writer.drain()

    async def main() -> None:
        async with Server(script(rest_after_cancel, OK)) as server:
            client = client_for(server, max_connections=1)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.request("GET", "/", [("host", "h")], None), 0.1)
            assert_pool_whole(client)
            assert (await fetch(client))[2] == b"{}"
            await asyncio.sleep(0.3)
            assert (await fetch(client))[2] == b"{}"
            await client.close()
        assert server.seen.connections == 2

    run(main())


def test_a_request_cancelled_mid_body_never_leaves_its_answer_to_the_next(run: Run) -> None:
    async def main() -> None:
        answer = later(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234", b"56789" + EVIL, 0.3)
        async with Server(script(answer, OK)) as server:
            client = client_for(server, max_connections=1)
            response = await client.request("GET", "/", [("host", "h")], None)

            async def read() -> None:
                async with response:
                    async for _ in response.body():
                        pass

            with pytest.raises(TimeoutError):
                await asyncio.wait_for(read(), 0.1)
            assert_pool_whole(client)
            assert (await fetch(client))[2] == b"{}"
            await asyncio.sleep(0.3)
            assert (await fetch(client))[2] == b"{}"
            await client.close()
        assert server.seen.connections == 2

    run(main())


@pytest.mark.parametrize("length", [True, False])
def test_a_request_cancelled_mid_upload_never_arrives_whole(run: Run, length: bool) -> None:
    """The caller goes away while its streamed body is being written to a server that reads it
    slowly: the slot comes back, the writer stops, MLflow never sees the request end."""
    ended: list[bool] = []

    async def slow_reader(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        if n == 1:
            await reader.readuntil(b"\r\n\r\n")
            received = b""
            while piece := await reader.read(65536):
                received += piece
                await asyncio.sleep(0.01)
            ended.append(received.endswith(b"0\r\n\r\n") or len(received) >= 8 * 1024 * 1024)
            return
        await answering(OK)(reader, writer, n, seen)

    async def main() -> None:
        async with Server(slow_reader) as server:
            client = client_for(server, max_connections=1)
            headers = [("host", "h")]
            if length:
                headers.append(("content-length", str(8 * 1024 * 1024)))
            body = chunks(*[b"u" * (1024 * 1024)] * 8)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.request("PUT", "/", headers, body), 0.2)
            assert_pool_whole(client)
            assert (await fetch(client))[2] == b"{}"
            await asyncio.sleep(0.2)
            await client.close()
        assert ended == [False]

    run(main())


def test_a_body_source_that_fails_after_an_early_answer_drops_the_connection(run: Run) -> None:
    """MLflow answers before the upload ends; then the caller's body fails: the answer is
    served, the connection is never reused (MLflow may still be reading the body)."""

    async def early(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        if n == 1:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(OK)
            await writer.drain()
            await reader.read()
            seen.closed.append(n)
            return
        await answering(OK)(reader, writer, n, seen)

    async def failing() -> AsyncIterator[bytes]:
        yield b"a"
        await asyncio.sleep(0.1)
        raise RuntimeError("the caller went away")

    async def main() -> None:
        async with Server(early) as server:
            client = client_for(server)
            response = await client.request("PUT", "/", [("host", "h")], failing())
            async with response:
                assert [c async for c in response.body()] == [b"{}"]
                await asyncio.sleep(0.2)
            assert_pool_whole(client)
            assert (await fetch(client))[2] == b"{}"
            await client.close()
        assert server.seen.connections == 2
        assert server.seen.closed[0] == 1

    run(main())


# The pool gives back every slot, whatever fails


def _failures() -> list[tuple[str, Handler, dict[str, float]]]:
    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        await read_request(reader, n)
        await reader.read()

    async def hang_up(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        await read_request(reader, n)
        writer.transport.abort()

    async def half_head(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        await read_request(reader, n)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-")
        await writer.drain()
        writer.close()

    return [
        ("silent", silent, {"read_timeout": 0.1}),
        ("hang-up", hang_up, {}),
        ("half-head", half_head, {}),
        ("garbage", answering(b"SSH-2.0-OpenSSH\r\n\r\n"), {}),
        ("truncated", answering(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab", close=True), {}),
        (
            "bad-chunk",
            answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            {},
        ),
    ]


@pytest.mark.parametrize(("name", "handler", "limits"), _failures(), ids=lambda v: str(v)[:12])
@pytest.mark.parametrize("body", [None, b"abc", "stream"])
def test_every_failure_gives_back_its_slot_and_connection(
    run: Run, name: str, handler: Handler, limits: dict[str, float], body: str | bytes | None
) -> None:
    async def main() -> None:
        async with Server(handler) as server:
            client = client_for(server, max_connections=2, **limits)
            for _ in range(3):  # more failures than slots: a leak would show as upstream_busy
                data = chunks(b"a", b"b") if body == "stream" else body
                with pytest.raises(UpstreamError) as caught:
                    await fetch(client, "POST", body=data)  # type: ignore[arg-type]
                assert caught.value.refusal.reason in {"upstream_unreachable", "upstream_timeout"}
                assert_pool_whole(client)
            dropped = list(client._all)
            await client.close()
        assert all(c.transport.is_closing() for c in dropped)
        assert name

    run(main())


def test_idle_connections_never_outnumber_the_pool(run: Run) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server, max_connections=3)
            for _ in range(5):
                await asyncio.gather(*(fetch(client) for _ in range(10)))
            assert len(client._idle) <= 3
            assert len(client._all) <= 3
            assert_pool_whole(client)
            await client.close()
        assert server.seen.connections <= 3

    run(main())


# Request smuggling: MLflow sees exactly the request that was authorized


def test_empty_chunks_of_a_streamed_body_never_end_it_early(run: Run) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            body = chunks(b"ab", b"", b"cd", b"", b"")
            assert (await fetch(client, "POST", body=body))[2] == b"{}"
            assert (await fetch(client, "POST", body=b"x"))[2] == b"{}"
            await client.close()
        first, second = server.seen.requests
        assert first.header(b"transfer-encoding") == b"chunked"
        assert first.body == b"abcd"
        assert (second.line, second.body) == (b"POST / HTTP/1.1", b"x")
        assert server.seen.connections == 1

    run(main())


def test_a_streamed_body_longer_than_declared_never_smuggles_a_second_request(run: Run) -> None:
    smuggled = b"GET /api/2.0/mlflow/users/delete HTTP/1.1\r\nHost: h\r\n\r\n"

    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            headers = [("host", "h"), ("content-length", "3")]
            with pytest.raises(UpstreamError):
                await fetch(client, "POST", headers=headers, body=chunks(b"abc" + smuggled))
            with pytest.raises(UpstreamError):
                await fetch(client, "POST", headers=headers, body=chunks(b"abc", smuggled))
            assert_pool_whole(client)
            await asyncio.sleep(0.1)
            await client.close()
        assert all(b"delete" not in r.line for r in server.seen.requests)

    run(main())


@pytest.mark.parametrize(
    "name",
    ["Transfer-Encoding ", "Content-Length\t", "x-a: b", "", "x a", "x-\u00e9", "host "],
)
def test_a_header_name_that_is_not_a_token_is_refused(run: Run, name: str) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            headers = [("host", "h"), (name, "chunked" if "ransfer" in name else "5")]
            with pytest.raises(UpstreamError) as caught:
                await fetch(client, "POST", headers=headers, body=b"abc")
            assert caught.value.refusal.reason == "malformed_request"
            await client.close()
        assert server.seen.requests == []

    run(main())


@pytest.mark.parametrize("length", ["\u00b2", "\u0661\u0662", "9" * 5000, "\uff13"])
def test_a_streamed_bodys_length_is_ascii_digits_only(run: Run, length: str) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            headers = [("host", "h"), ("content-length", length)]
            with pytest.raises(UpstreamError) as caught:
                await fetch(client, "POST", headers=headers, body=chunks(b"abc"))
            assert caught.value.refusal.reason == "invalid_body_framing"
            assert_pool_whole(client)
            await client.close()
        assert server.seen.requests == []

    run(main())


@pytest.mark.parametrize("target", ["/a?x=\x85", "/a?x=\xa0", "/a?x=\x9b", "/a\u00e9"])
def test_a_target_is_printable_ascii_only(run: Run, target: str) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            with pytest.raises(UpstreamError) as caught:
                await fetch(client, "GET", target)
            assert caught.value.refusal.reason == "malformed_request"
            await client.close()
        assert server.seen.requests == []

    run(main())


def _reads_then_hangs_up() -> Handler:
    """Answer the first request; read the second one whole on the same connection and close
    without a word (MLflow took it, then died or was restarted before answering)."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        while (request := await read_request(reader, n)) is not None:
            seen.requests.append(request)
            if n == 1 and len(seen.requests) == 2:
                writer.transport.abort()
                return
            writer.write(OK)
            await writer.drain()

    return handler


@pytest.mark.parametrize("method", ["POST", "PATCH", "PUT", "DELETE"])
def test_a_write_that_mlflow_may_have_received_is_never_sent_twice(run: Run, method: str) -> None:
    """Finding 1. PUT and DELETE are idempotent by RFC 9110, but a replay still applies a
    write MLflow may already have applied (and answers it differently): only reads go again."""

    async def main() -> None:
        async with Server(_reads_then_hangs_up()) as server:
            client = client_for(server)
            await fetch(client, method, body=b"first")
            with pytest.raises(UpstreamError) as caught:
                await fetch(client, method, body=b'{"run_id": "r", "key": "m", "value": 1}')
            assert caught.value.refusal.reason == "upstream_unreachable"
            await client.close()
        assert len(server.seen.requests) == 2  # MLflow saw the write once

    run(main())


@pytest.mark.parametrize(("method", "body"), [("GET", None), ("OPTIONS", None), ("GET", b"q")])
def test_a_read_is_retried_once_on_a_stale_connection(
    run: Run, method: str, body: bytes | None
) -> None:
    async def main() -> None:
        async with Server(_reads_then_hangs_up()) as server:
            client = client_for(server)
            await fetch(client, method)
            assert (await fetch(client, method, body=body))[0] == 200
            assert_pool_whole(client)
            await client.close()
        assert [r.connection for r in server.seen.requests] == [1, 1, 2]

    run(main())


# Resource exhaustion


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"a" * (4 * 1024 * 1024) + b"\r\n",
        b"".join(b"X-%d: v\r\n" % i for i in range(200_000)),
    ],
    ids=["one-4MB-header", "200k-headers"],
)
def test_an_answer_head_is_bounded(run: Run, headers: bytes) -> None:
    answer = b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\n{}"

    async def main() -> None:
        async with Server(answering(answer)) as server:
            client = client_for(server)
            with pytest.raises(UpstreamError) as caught:
                await fetch(client)
            assert caught.value.refusal.reason == "upstream_unreachable"
            assert_pool_whole(client)
            await client.close()

    run(main())


# Truncation


def _resets_mid_body(head: bytes) -> Handler:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        await read_request(reader, n)
        writer.write(head + b"partial")
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        # SO_LINGER 0: close() sends a RST, not a FIN (a crashed or killed MLflow worker)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    return handler


def test_a_reset_ends_an_answer_read_until_close_with_an_error(run: Run) -> None:
    async def main() -> None:
        async with Server(_resets_mid_body(b"HTTP/1.1 200 OK\r\n\r\n")) as server:
            client = client_for(server)
            response = await client.request("GET", "/", [("host", "h")], None)
            got: list[bytes] = []

            async def read() -> None:
                async with response:
                    async for chunk in response.body():
                        got.append(chunk)

            with pytest.raises(UpstreamError):
                await read()
            assert b"".join(got) == b"partial"
            await client.close()

    run(main())


def test_a_clean_close_ends_an_answer_read_until_close(run: Run) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        await read_request(reader, n)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nwhole")
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with Server(handler) as server:
            client = client_for(server)
            assert (await fetch(client))[2] == b"whole"
            assert_pool_whole(client)
            await client.close()

    run(main())


def test_a_reset_mid_framed_body_is_an_error(run: Run) -> None:
    async def main() -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
        async with Server(_resets_mid_body(head)) as server:
            client = client_for(server)
            with pytest.raises(UpstreamError):
                await fetch(client)
            assert_pool_whole(client)
            await client.close()

    run(main())


# Timeouts


@pytest.mark.parametrize("body", ["bytes", "stream"])
def test_a_stalled_upload_is_upstream_timeout(run: Run, body: str) -> None:
    """MLflow stops reading the request body and says nothing: the read timeout ends it."""

    async def stalled(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(3)

    async def main() -> None:
        async with Server(stalled) as server:
            client = client_for(server, read_timeout=0.3)
            big = b"s" * (32 * 1024 * 1024)
            data: bytes | AsyncIterator[bytes] = (
                big if body == "bytes" else chunks(*[b"s" * (1024 * 1024)] * 32)
            )
            with pytest.raises(UpstreamError) as caught:
                await asyncio.wait_for(fetch(client, "PUT", body=data), 2.5)
            assert caught.value.refusal.reason == "upstream_timeout"
            assert_pool_whole(client)
            await client.close()

    run(main())


def test_a_stream_of_informational_answers_is_bounded_by_nothing_but_progress(run: Run) -> None:
    """Documented behaviour (no total timeout, as with aiohttp's sock_read): an upstream that
    keeps talking without ever answering keeps the request open; the caller's own deadline is
    what ends it, and the slot comes back then."""

    async def chatty(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        await read_request(reader, n)
        for _ in range(40):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)

    async def main() -> None:
        async with Server(chatty) as server:
            client = client_for(server, read_timeout=0.2)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.request("GET", "/", [("host", "h")], None), 0.8)
            assert_pool_whole(client)
            await client.close()

    run(main())


# TLS


def test_tls_verifies_certificates_and_host_names_with_no_old_protocols() -> None:
    async def main() -> None:
        client = UpstreamClient("https://mlflow.internal:5000", LIMITS)
        client.open()
        context = client._ssl
        assert context is not None
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_COMPRESSION
        await client.close()

    asyncio.run(main())


def test_an_early_answer_to_an_unsent_upload_never_reuses_its_connection(run: Run) -> None:
    """MLflow answers after the head while most of a bytes body still waits in the gateway's
    send buffer (as a streamed body's unfinished writer already does): reusing the connection
    queues the next request behind an upload MLflow may never read, and a server that does not
    discard an unread body would take the rest of it for the next request."""

    async def early(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        if n == 1:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(OK)
            await writer.drain()
            await asyncio.sleep(3)  # never reads the body, never answers again
            return
        await answering(OK)(reader, writer, n, seen)

    async def main() -> None:
        async with Server(early) as server:
            client = client_for(server, read_timeout=0.5)
            assert (await fetch(client, "PUT", body=b"u" * (32 * 1024 * 1024)))[2] == b"{}"
            assert (await fetch(client))[2] == b"{}"
            assert_pool_whole(client)
            await client.close()
        assert server.seen.connections == 2

    run(main())


def test_a_crowd_racing_for_slots_leaves_the_pool_whole(run: Run) -> None:
    """Slot waits that time out just as a slot frees, and waits cancelled by the caller."""

    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server, max_connections=2, pool_timeout=0.002)

            async def one(i: int) -> None:
                try:
                    if i % 3 == 0:
                        await asyncio.wait_for(fetch(client), 0.001 * (i % 7))
                    else:
                        await fetch(client)
                except (UpstreamError, TimeoutError):
                    pass

            for _ in range(5):
                await asyncio.gather(*(one(i) for i in range(60)))
            assert_pool_whole(client)
            assert (await fetch(client))[2] == b"{}"
            await client.close()

    run(main())


def test_a_request_cancelled_while_connecting_gives_back_its_slot(run: Run) -> None:
    async def main() -> None:
        with socket.socket() as listener, socket.socket() as first:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)  # never accepts: once its backlog is full, SYNs go unanswered
            port = listener.getsockname()[1]
            first.connect(("127.0.0.1", port))
            client = UpstreamClient(f"http://127.0.0.1:{port}", LIMITS)
            client.open()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.request("GET", "/", [("host", "h")], None), 0.1)
            assert_pool_whole(client)
            assert client._all == set()
            await client.close()

    run(main())


@pytest.fixture
def tls_client(
    certificates: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Server], UpstreamClient]:
    """Opens a client of a ``tls_server`` that trusts the tests' CA only."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificates / "ca.crt"))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)

    def client(server: Server) -> UpstreamClient:
        opened = UpstreamClient(f"https://127.0.0.1:{server.port}", LIMITS)
        opened.open()
        return opened

    return client


def test_a_slow_reader_holds_a_bounded_buffer_over_tls(
    run: Run, certificates: Path, tls_client: Callable[[Server], UpstreamClient]
) -> None:
    size = 16 * 1024 * 1024
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"b" * size

    async def main() -> None:
        async with await tls_server(answering(answer), certificates) as server:
            client = tls_client(server)
            response = await client.request("GET", "/", [("host", "h")], None)
            total, largest = 0, 0
            async with response:
                async for chunk in response.body():
                    total += len(chunk)
                    largest = max(largest, len(chunk))
                    if total < 2 * 1024 * 1024:
                        await asyncio.sleep(0.01)
            await client.close()
        assert total == size
        assert largest <= BUFFER_LIMIT + 1024 * 1024

    run(main())


def test_a_tls_answer_read_until_close_needs_close_notify(
    run: Run, certificates: Path, tls_client: Callable[[Server], UpstreamClient]
) -> None:

    async def truncated(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        await read_request(reader, n)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.1)
        # FIN, no close_notify (through a duplicate: uvloop's transport socket has no shutdown)
        with socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno())) as raw:
            raw.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.5)

    async def main() -> None:
        async with await tls_server(truncated, certificates) as server:
            client = tls_client(server)
            response = await client.request("GET", "/", [("host", "h")], None)
            got: list[bytes] = []

            async def read() -> None:
                async with response:
                    async for chunk in response.body():
                        got.append(chunk)

            with pytest.raises(UpstreamError):
                await read()
            assert b"".join(got) == b"partial"
            await client.close()

    run(main())


def test_failures_leave_no_open_file_descriptors(run: Run) -> None:
    async def main() -> None:
        handlers = [handler for _, handler, _ in _failures()]
        servers = [Server(h) for h in handlers]
        for server in servers:
            await server.__aenter__()
        before = len(os.listdir("/proc/self/fd"))
        for server in servers:
            client = client_for(server, max_connections=2, read_timeout=0.1)
            for body in (None, b"abc", chunks(b"a", b"b")):
                with contextlib.suppress(UpstreamError):
                    await fetch(client, "POST", body=body)
            assert_pool_whole(client)
            await client.close()
        for server in servers:
            await server.__aexit__()
        await asyncio.sleep(0.1)
        servers_fds = len(servers)  # each listening socket is closed by __aexit__
        assert len(os.listdir("/proc/self/fd")) <= before - servers_fds

    run(main())


# The edges of the fixes


def test_a_tls_answer_read_until_close_ends_with_close_notify(
    run: Run, certificates: Path, tls_client: Callable[[Server], UpstreamClient]
) -> None:
    """Finding 3's other side: a server that closes TLS properly ends an unframed answer."""

    async def whole(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        await read_request(reader, n)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"w" * 300_000)
        await writer.drain()
        writer.close()  # close_notify, then FIN
        await writer.wait_closed()

    async def main() -> None:
        async with await tls_server(whole, certificates) as server:
            client = tls_client(server)
            assert (await fetch(client))[2] == b"w" * 300_000
            assert_pool_whole(client)
            await client.close()

    run(main())


def _fields(count: int, size: int = 8) -> bytes:
    return b"".join(b"X-%05d: %s\r\n" % (i, b"v" * size) for i in range(count))


@pytest.mark.parametrize(
    ("head", "served"),
    [
        (_fields(120, 400), True),  # ~50 KB in 120 fields
        (_fields(127), True),  # with Content-Length, 128 fields
        (_fields(128), False),
        (b"X-Big: " + b"a" * 70_000 + b"\r\n", False),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 2, True),
    ],
    ids=["50KB", "128-fields", "129-fields", "70KB-field", "two-103s"],
)
@pytest.mark.parametrize("pieces", [1, 97])
def test_an_answer_head_is_bounded_at_its_limits(
    run: Run, head: bytes, served: bool, pieces: int
) -> None:
    """Finding 2: heads up to the bounds are served whether they arrive at once or in pieces;
    one past them is 502 and the next request gets a new connection."""
    if head.startswith(b"HTTP/"):
        answer = head + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    else:
        answer = b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: 2\r\n\r\n{}"

    async def in_pieces(writer: asyncio.StreamWriter) -> None:
        step = -(-len(answer) // pieces)
        for start in range(0, len(answer), step):
            writer.write(answer[start : start + step])
            await writer.drain()
            await asyncio.sleep(0)

    async def main() -> None:
        async with Server(script(in_pieces, OK)) as server:
            client = client_for(server)
            if served:
                assert (await fetch(client))[2] == b"{}"
            else:
                with pytest.raises(UpstreamError) as caught:
                    await fetch(client)
                assert caught.value.refusal.reason == "upstream_unreachable"
            assert_pool_whole(client)
            assert (await fetch(client))[2] == b"{}"
            await client.close()
        assert server.seen.connections == (1 if served else 2)

    run(main())


def test_informational_answers_count_toward_the_head_bound(run: Run) -> None:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\nLink: </b>\r\n\r\n" * 70

    async def main() -> None:
        async with Server(answering(hints + OK)) as server:
            client = client_for(server)
            with pytest.raises(UpstreamError) as caught:
                await fetch(client)
            assert caught.value.refusal.reason == "upstream_unreachable"
            assert_pool_whole(client)
            await client.close()

    run(main())


def test_a_flood_of_trailers_fails_the_body(run: Run) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
        + _fields(200)
        + b"\r\n"
    )

    async def main() -> None:
        async with Server(answering(answer)) as server:
            client = client_for(server)
            response = await client.request("GET", "/", [("host", "h")], None)
            with pytest.raises(UpstreamError):
                async with response:
                    [chunk async for chunk in response.body()]
            assert_pool_whole(client)
            await client.close()

    run(main())


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\n: empty\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nX-\xc3\xa9: v\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nX(a): v\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nX\ta: v\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xd9\xa2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xef\xbc\x92\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\xc2\xa0\r\n\r\n{}",
    ],
    ids=["empty-name", "non-ascii-name", "separator-name", "tab-name", "arabic-2",
         "fullwidth-2", "nbsp-after-2"],
)  # fmt: skip
def test_an_answer_header_name_or_length_out_of_grammar_is_malformed(
    run: Run, answer: bytes
) -> None:
    """Findings 5 and 6 for answers: llhttp refuses these (pinned here)."""

    async def main() -> None:
        async with Server(script(answer, OK)) as server:
            client = client_for(server)
            with pytest.raises(UpstreamError) as caught:
                await fetch(client)
            assert caught.value.refusal.reason == "upstream_unreachable"
            assert_pool_whole(client)
            assert (await fetch(client))[2] == b"{}"
            await client.close()
        assert server.seen.connections == 2

    run(main())


def test_every_token_character_is_a_name_and_the_name_memo_is_bounded(run: Run) -> None:
    name = "x!#$%&'*+-.^_`|~09AZaz"

    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            assert (await fetch(client, headers=[("host", "h"), (name, "1")]))[0] == 200
            client._names.update(f"n{i}" for i in range(2000))  # a full memo
            with pytest.raises(UpstreamError) as caught:
                await fetch(client, headers=[("host", "h"), ("x y", "1")])
            assert caught.value.refusal.reason == "malformed_request"
            assert (await fetch(client, headers=[("host", "h"), ("x-new", "1")]))[0] == 200
            assert "x-new" not in client._names
            await client.close()
        first, second = server.seen.requests
        assert (name.encode(), b"1") in first.headers  # written as given
        assert (b"x-new", b"1") in second.headers

    run(main())


@pytest.mark.parametrize(
    ("length", "body"),
    [(" 3\u00a0", b"abc"), ("\u20070", None), ("\u00a03", "stream"), ("3\u3000", "stream")],
)
def test_a_length_padded_with_unicode_spaces_is_refused(
    run: Run, length: str, body: bytes | str | None
) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            data = chunks(b"abc") if body == "stream" else body
            headers = [("host", "h"), ("content-length", length)]
            with pytest.raises(UpstreamError) as caught:
                await fetch(client, "POST", headers=headers, body=data)  # type: ignore[arg-type]
            assert caught.value.refusal.reason == "invalid_body_framing"
            assert_pool_whole(client)
            await client.close()
        assert server.seen.requests == []

    run(main())


@pytest.mark.parametrize("target", ["", "/a b", "/a\tb", "/a\x7f", "/a\u2028"])
def test_a_target_with_a_space_or_nothing_is_refused(run: Run, target: str) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            with pytest.raises(UpstreamError) as caught:
                await fetch(client, "GET", target)
            assert caught.value.refusal.reason == "malformed_request"
            await client.close()
        assert server.seen.requests == []

    run(main())


def test_a_head_answer_that_says_keep_alive_and_close_is_never_reused(run: Run) -> None:
    answer = b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n"

    async def main() -> None:
        async with Server(script(answer)) as server:
            client = client_for(server)
            await fetch(client, "HEAD")
            await fetch(client, "HEAD")
            await client.close()
        assert server.seen.connections == 2

    run(main())


def test_a_read_that_mlflow_answered_in_part_is_not_sent_again(run: Run) -> None:
    """Finding 1's other bound: once a byte of the answer came, not even a read goes twice."""

    async def half_then_reset(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        while (request := await read_request(reader, n)) is not None:
            seen.requests.append(request)
            if len(seen.requests) == 2:
                writer.write(b"HTTP/1.1 200 OK\r\nCont")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.transport.abort()
                return
            writer.write(OK)
            await writer.drain()

    async def main() -> None:
        async with Server(half_then_reset) as server:
            client = client_for(server)
            await fetch(client)
            with pytest.raises(UpstreamError) as caught:
                await fetch(client)
            assert caught.value.refusal.reason == "upstream_unreachable"
            assert_pool_whole(client)
            await client.close()
        assert len(server.seen.requests) == 2

    run(main())


def test_a_small_upload_answered_after_it_was_read_keeps_its_connection(run: Run) -> None:
    """Finding 8's fix closes only connections with bytes left to send."""

    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            for size in (0, 10, 64 * 1024, 4 * 1024 * 1024):
                assert (await fetch(client, "PUT", body=b"u" * size))[2] == b"{}"
            await client.close()
        assert server.seen.connections == 1

    run(main())


def test_trailers_and_heads_are_counted_per_answer(run: Run) -> None:
    """Bounds apply to each answer: 100 trailers on one answer and 100 fields on the next one,
    on the same connection, are both served."""
    first = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
        + _fields(100)
        + b"\r\n"
    )
    second = b"HTTP/1.1 200 OK\r\n" + _fields(100) + b"Content-Length: 2\r\n\r\n{}"

    async def main() -> None:
        async with Server(script(first, second)) as server:
            client = client_for(server)
            assert (await fetch(client))[2] == b"abc"
            assert (await fetch(client))[2] == b"{}"
            assert (await fetch(client))[2] == b"{}"
            await client.close()
        assert server.seen.connections == 1

    run(main())


@pytest.mark.parametrize("chunks_before", [0, 1, 3000])
def test_a_trailer_that_never_ends_is_bounded(run: Run, chunks_before: int) -> None:
    """llhttp keeps a trailer's value whole until it ends (as a header's): the body fails and
    the connection is closed. (A chunk extension is skipped, not kept: it streams as body.)"""
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"3\r\nabc\r\n" * chunks_before
        + b"0\r\nX-Big: "
        + b"t" * (4 * 1024 * 1024)
        + b"\r\n\r\n"
    )

    async def main() -> None:
        async with Server(script(answer, OK)) as server:
            client = client_for(server)
            response = await client.request("GET", "/", [("host", "h")], None)
            with pytest.raises(UpstreamError) as caught:
                async with response:
                    [chunk async for chunk in response.body()]
            assert caught.value.refusal.reason == "upstream_unreachable"
            assert_pool_whole(client)
            assert (await fetch(client))[2] == b"{}"
            await client.close()
        assert server.seen.connections == 2

    run(main())


def test_many_small_chunks_are_not_framing_past_the_bound(run: Run) -> None:
    body = b"".join(b"1\r\n%c\r\n" % (97 + i % 26) for i in range(100_000))
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"

    async def main() -> None:
        async with Server(answering(answer)) as server:
            client = client_for(server)
            data = (await fetch(client))[2]
            assert len(data) == 100_000
            assert data[:3] == b"abc"
            assert (await fetch(client))[0] == 200
            await client.close()
        assert server.seen.connections == 1

    run(main())
