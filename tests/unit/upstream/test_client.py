"""The upstream client against a real local asyncio server that answers with scripted bytes:
what goes on the wire, how answers are framed and streamed, the pool, timeouts and failures.
Every test runs on asyncio's own loop and on uvloop (what uvicorn runs the gateway on)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from guard.upstream.client import BUFFER_LIMIT, UpstreamClient, UpstreamError, UpstreamLimits

LIMITS = UpstreamLimits(
    connect_timeout=2.0, read_timeout=5.0, pool_timeout=0.2, max_connections=4, keepalive_expiry=30
)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


@dataclass
class Request:
    line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    connection: int

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k.lower() == name]
        return values[0] if values else None


@dataclass
class Seen:
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)  # connections the client closed (EOF)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int, Seen], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader, connection: int) -> Request | None:
    """One request as the server reads it (None: the client closed the connection)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    line, *lines = head[:-4].split(b"\r\n")
    headers = [(k, v.strip()) for k, _, v in (raw.partition(b":") for raw in lines)]
    request = Request(line, headers, b"", connection)
    if (length := request.header(b"content-length")) is not None:
        request.body = await reader.readexactly(int(length))
    elif request.header(b"transfer-encoding") == b"chunked":
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            request.body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readexactly(2)
    return request


def answering(*answers: bytes, close: bool = False) -> Handler:
    """Answer the server's n-th request with the n-th of ``answers`` (the last repeats); with
    ``close``, close each connection after its first answer."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        while (request := await read_request(reader, n)) is not None:
            seen.requests.append(request)
            writer.write(answers[min(len(seen.requests), len(answers)) - 1])
            await writer.drain()
            if close:
                return
        seen.closed.append(n)

    return handler


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.seen = Seen()
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Server:
        if not hasattr(self, "server"):
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.seen.connections += 1
        self.writers.add(writer)
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await self.handler(reader, writer, self.seen.connections, self.seen)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aexit__(self, *exc: object) -> None:
        for writer in self.writers:
            writer.transport.abort()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        self.server.close()
        await asyncio.wait_for(self.server.wait_closed(), 5)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[None]], None]:
    def runner(coroutine: Awaitable[None]) -> None:
        async def bounded() -> None:
            await asyncio.wait_for(coroutine, 20)

        if request.param == "uvloop":
            uvloop.run(bounded())
        else:
            asyncio.run(bounded())

    return runner


def client_for(server: Server, **limits: float) -> UpstreamClient:
    values = {
        "connect_timeout": LIMITS.connect_timeout,
        "read_timeout": LIMITS.read_timeout,
        "pool_timeout": LIMITS.pool_timeout,
        "max_connections": LIMITS.max_connections,
        "keepalive_expiry": LIMITS.keepalive_expiry,
        **limits,
    }
    client = UpstreamClient(server.url, UpstreamLimits(**values))  # type: ignore[arg-type]
    client.open()
    return client


async def fetch(
    client: UpstreamClient,
    method: str = "GET",
    target: str = "/",
    headers: list[tuple[str, str]] | None = None,
    body: bytes | AsyncIterator[bytes] | None = None,
) -> tuple[int, tuple[tuple[bytes, bytes], ...], bytes]:
    response = await client.request(method, target, headers or [("host", "mlflow")], body)
    async with response:
        data = b"".join([chunk async for chunk in response.body()])
    return response.status, response.headers, data


async def chunks(*parts: bytes, pause: float = 0.0) -> AsyncIterator[bytes]:
    for part in parts:
        if pause:
            await asyncio.sleep(pause)
        yield part


# What goes on the wire


def test_the_request_is_written_as_given(run: Callable[[Awaitable[None]], None]) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            target = "/api/2.0/mlflow-artifacts/artifacts/a%2Fb%20c?x=%2F&x=2&y"
            headers = [("Host", "mlflow:5000"), ("x-request-id", "r1"), ("X-Mixed-Case", "v é")]
            status, answer, data = await fetch(client, "POST", target, headers, b"abc")
            await client.close()
        assert (status, data) == (200, b"{}")
        assert answer == ((b"Content-Length", b"2"),)
        [request] = server.seen.requests
        assert request.line == f"POST {target} HTTP/1.1".encode()
        assert request.headers == [
            (b"Host", b"mlflow:5000"),
            (b"x-request-id", b"r1"),
            (b"X-Mixed-Case", "v é".encode("latin-1")),  # the caller's bytes, not re-encoded
            (b"content-length", b"3"),
        ]
        assert request.body == b"abc"

    run(main())


@pytest.mark.parametrize(
    ("method", "length"),
    [("GET", None), ("HEAD", None), ("OPTIONS", None), ("POST", b"0"), ("PUT", b"0"),
     ("PATCH", b"0"), ("DELETE", b"0")],
)  # fmt: skip
def test_no_body(run: Callable[[Awaitable[None]], None], method: str, length: bytes) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            await fetch(client, method)
            await client.close()
        [request] = server.seen.requests
        assert request.header(b"content-length") == length
        assert request.header(b"transfer-encoding") is None
        # nothing invented: no User-Agent, Accept, Accept-Encoding, Content-Type, Connection
        assert [k for k, _ in request.headers] == [
            b"host",
            *([b"content-length"] if length else []),
        ]

    run(main())


def test_host_is_the_upstreams_when_the_caller_names_none(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            await fetch(client, headers=[("accept", "*/*")])
            await client.close()
        assert server.seen.requests[0].header(b"host") == f"127.0.0.1:{server.port}".encode()

    run(main())


INJECTIONS = [
    ("GET", "/a HTTP/1.1\r\nX-Evil: 1\r\n\r\nGET /b", [("host", "h")]),
    ("GET", "/a b", [("host", "h")]),
    ("GET", "/a\0", [("host", "h")]),
    ("GET", "/a\tb", [("host", "h")]),
    ("GET", "/a\x7f", [("host", "h")]),
    ("GÉT", "/", [("host", "h")]),
    ("GET\r\n", "/", [("host", "h")]),
    ("G T", "/", [("host", "h")]),
    ("GET", "/", [("host", "h\r\nX-Evil: 1")]),
    ("GET", "/", [("host", "h\nX-Evil: 1")]),
    ("GET", "/", [("host", "h\rX-Evil: 1")]),
    ("GET", "/", [("host", "h"), ("x-a", "1\r\n\r\nGET /smuggled HTTP/1.1")]),
    ("GET", "/", [("host", "h"), ("x-a\r\nx-evil", "1")]),
    ("GET", "/", [("host", "h"), ("x-a\n", "1")]),
    ("GET", "/", [("host", "h"), ("x-a", "1\0")]),
    ("GET", "/", [("host", "h"), ("x-a\0", "1")]),
    ("GET", "/", [("host", "h"), ("x-a", "\u2028 not latin-1 \u0100")]),
]


@pytest.mark.parametrize(("method", "target", "headers"), INJECTIONS)
@pytest.mark.parametrize("body", [None, b"x", "stream"])
def test_no_request_splitting(
    run: Callable[[Awaitable[None]], None],
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: str | bytes | None,
) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            data = chunks(b"x") if body == "stream" else body
            with pytest.raises(UpstreamError) as caught:
                await client.request(method, target, headers, data)  # type: ignore[arg-type]
            assert caught.value.refusal.reason == "malformed_request"
            await fetch(client)  # the slot was given back
            await client.close()
        assert server.seen.connections == 1
        assert [r.line for r in server.seen.requests] == [b"GET / HTTP/1.1"]

    run(main())


def test_framing_is_the_clients(run: Callable[[Awaitable[None]], None]) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            # A caller's Transfer-Encoding is never written; its Content-Length must agree.
            await fetch(client, "POST", headers=[("host", "h"), ("transfer-encoding", "chunked")])
            for body, length in ((b"abc", "4"), (None, "3"), (chunks(b"x"), "x1")):
                with pytest.raises(UpstreamError) as caught:
                    await client.request(
                        "POST", "/", [("host", "h"), ("content-length", length)], body
                    )
                assert caught.value.refusal.reason == "invalid_body_framing"
            await client.close()
        [request] = server.seen.requests
        assert request.header(b"transfer-encoding") is None
        assert request.header(b"content-length") == b"0"

    run(main())


# Streamed request bodies


def test_a_streamed_body_with_a_length_is_written_as_given(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            body = chunks(b"ab", b"", b"cde", pause=0.01)
            await fetch(client, "PUT", headers=[("host", "h"), ("content-length", "5")], body=body)
            await client.close()
        [request] = server.seen.requests
        assert request.header(b"content-length") == b"5"
        assert request.header(b"transfer-encoding") is None
        assert request.body == b"abcde"

    run(main())


def test_a_streamed_body_without_a_length_is_chunked(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            parts = [bytes([i]) * (1000 * i + 1) for i in range(20)]
            await fetch(client, "PUT", body=chunks(*parts, b""))
            await fetch(client, "PUT", body=chunks())  # an empty stream: just the last chunk
            await client.close()
        first, second = server.seen.requests
        assert first.header(b"transfer-encoding") == b"chunked"
        assert first.header(b"content-length") is None
        assert first.body == b"".join(parts)
        assert second.body == b""
        assert server.seen.connections == 1  # reused after a chunked upload

    run(main())


@pytest.mark.parametrize("parts", [(b"abc",), (b"abc", b"def", b"gh"), (b"abcdefghij",)])
def test_a_streamed_body_that_breaks_its_length_never_arrives_whole(
    run: Callable[[Awaitable[None]], None], parts: tuple[bytes, ...]
) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            headers = [("host", "h"), ("content-length", "7")]
            with pytest.raises(UpstreamError) as caught:
                await fetch(client, "PUT", headers=headers, body=chunks(*parts))
            assert caught.value.refusal.reason == "upstream_unreachable"
            assert client.connection_failures == 0  # the caller's fault, not MLflow's
            await fetch(client)
            await client.close()
        assert [r.line for r in server.seen.requests] == [b"GET / HTTP/1.1"]
        assert server.seen.connections == 2

    run(main())


class SourceFailed(Exception):
    pass


def test_a_failing_body_source_cuts_the_request(run: Callable[[Awaitable[None]], None]) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"abc"
        await asyncio.sleep(0.05)
        raise SourceFailed

    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            for headers in ([("host", "h")], [("host", "h"), ("content-length", "6")]):
                with pytest.raises(UpstreamError) as caught:
                    await client.request("PUT", "/", headers, failing())
                assert caught.value.refusal.reason == "upstream_unreachable"
                assert isinstance(caught.value.__cause__, SourceFailed)
            failures = client.connection_failures
            await client.close()
        assert server.seen.requests == []  # neither the chunked nor the sized body ended
        assert failures == 0  # the caller's body failed, not MLflow

    run(main())


def test_uploads_go_at_the_servers_pace(run: Callable[[Awaitable[None]], None]) -> None:
    produced = 0
    piece = b"u" * 65536

    async def endless() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(4096):  # 256 MiB if nothing held it back
            produced += 1
            yield piece

    async def slow_reader(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.5)  # not reading: the client must stop writing
        seen.closed.append(produced)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with Server(slow_reader) as server:
            client = client_for(server)
            status, _, _ = await fetch(client, "PUT", body=endless())
            await client.close()
        assert status == 413  # an early answer is served while the upload is cut
        [held] = server.seen.closed
        assert held * len(piece) < 64 * 1024 * 1024  # socket buffers, not the whole source

    run(main())


# Answers


def test_a_chunked_answer(run: Callable[[Awaitable[None]], None]) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nx-a: 2\r\n\r\n"
        b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
    )

    async def main() -> None:
        async with Server(answering(answer)) as server:
            client = client_for(server)
            status, headers, data = await fetch(client)
            await fetch(client)
            await client.close()
        assert (status, data) == (200, b"hello world")
        assert headers == ((b"Transfer-Encoding", b"chunked"), (b"X-A", b"1"), (b"x-a", b"2"))
        assert server.seen.connections == 1

    run(main())


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_an_answer_read_until_the_server_closes(
    run: Callable[[Awaitable[None]], None], version: bytes
) -> None:
    answer = b"HTTP/" + version + b" 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"z" * 100000

    async def main() -> None:
        async with Server(answering(answer, close=True)) as server:
            client = client_for(server)
            assert (await fetch(client))[2] == b"z" * 100000
            assert (await fetch(client))[2] == b"z" * 100000
            await client.close()
        assert server.seen.connections == 2

    run(main())


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
def test_no_reuse_after_connection_close(
    run: Callable[[Awaitable[None]], None], answer: bytes
) -> None:
    async def main() -> None:
        async with Server(answering(answer)) as server:
            client = client_for(server)
            for _ in range(3):
                assert (await fetch(client))[2] == b"{}"
            await client.close()
        assert server.seen.connections == 3

    run(main())


def test_http10_keep_alive_is_reused(run: Callable[[Awaitable[None]], None]) -> None:
    answer = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}"

    async def main() -> None:
        async with Server(answering(answer)) as server:
            client = client_for(server)
            for _ in range(3):
                await fetch(client)
            await client.close()
        assert server.seen.connections == 1

    run(main())


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n"),
        ("PUT", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"),
    ],
)
def test_answers_without_a_body(
    run: Callable[[Awaitable[None]], None], method: str, answer: bytes
) -> None:
    async def main() -> None:
        async with Server(answering(answer, OK)) as server:
            client = client_for(server)
            status, _, data = await fetch(client, method, body=b"x" if method == "PUT" else None)
            assert (status, data) == (int(answer.split(b" ")[1]) if method != "PUT" else 204, b"")
            assert (await fetch(client))[2] == b"{}"  # the connection stays in step
            await client.close()
        assert server.seen.connections == 1

    run(main())


def test_informational_answers_are_skipped(run: Callable[[Awaitable[None]], None]) -> None:
    answer = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    )

    async def main() -> None:
        async with Server(answering(answer)) as server:
            client = client_for(server)
            status, headers, data = await fetch(client, "POST", body=b"{}")
            await client.close()
        assert (status, headers, data) == (201, ((b"Content-Length", b"2"),), b"ok")

    run(main())


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",  # the garbage is in a second answer
    ],
)
def test_a_malformed_answer_is_upstream_unreachable(
    run: Callable[[Awaitable[None]], None], answer: bytes
) -> None:
    async def main() -> None:
        async with Server(
            answering(answer, b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
        ) as server:
            client = client_for(server)
            reasons = []
            for _ in range(2):
                try:
                    await fetch(client)
                    reasons.append("ok")
                except UpstreamError as exc:
                    reasons.append(exc.refusal.reason)
            await client.close()
        assert reasons[-1] == "upstream_unreachable"
        assert reasons[0] in {"ok", "upstream_unreachable"}
        assert reasons[0] == "ok" or answer is not OK

    run(main())


def test_a_chunked_answer_with_a_bad_chunk_fails_in_body(
    run: Callable[[Awaitable[None]], None],
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"

    async def main() -> None:
        async with Server(answering(answer)) as server:
            client = client_for(server)
            response = await client.request("GET", "/", [("host", "h")], None)
            with pytest.raises(UpstreamError) as caught:
                async with response:
                    [chunk async for chunk in response.body()]
            assert caught.value.refusal.reason == "upstream_unreachable"
            await client.close()

    run(main())


@pytest.mark.parametrize("chunked", [False, True])
def test_a_reset_mid_body_is_raised_from_body(
    run: Callable[[Awaitable[None]], None], chunked: bool
) -> None:
    framing = b"Transfer-Encoding: chunked\r\n\r\na\r\n0123456789" if chunked else (
        b"Content-Length: 1000\r\n\r\n0123456789"
    )  # fmt: skip

    async def main() -> None:
        async with Server(answering(b"HTTP/1.1 200 OK\r\n" + framing, OK, close=True)) as server:
            client = client_for(server)
            response = await client.request("GET", "/", [("host", "h")], None)
            got: list[bytes] = []

            async def read() -> None:
                async with response:
                    async for chunk in response.body():
                        got.append(chunk)

            with pytest.raises(UpstreamError) as caught:
                await read()
            assert caught.value.refusal.reason == "upstream_unreachable"
            assert b"".join(got) == b"0123456789"
            await fetch(client)
            await client.close()
        assert server.seen.connections == 2

    run(main())


def test_a_slow_reader_holds_a_bounded_buffer(run: Callable[[Awaitable[None]], None]) -> None:
    size = 32 * 1024 * 1024
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"b" * size

    async def main() -> None:
        async with Server(answering(answer)) as server:
            client = client_for(server)
            response = await client.request("GET", "/", [("host", "h")], None)
            total, largest = 0, 0
            async with response:
                async for chunk in response.body():
                    total += len(chunk)
                    largest = max(largest, len(chunk))
                    if total < 4 * 1024 * 1024:
                        await asyncio.sleep(0.01)  # a slow caller: the buffer must not grow
            await fetch(client)
            await client.close()
        assert total == size
        # what one read adds to a full buffer, never the answer
        assert largest <= BUFFER_LIMIT + 1024 * 1024
        assert server.seen.connections == 1

    run(main())


def test_an_answer_not_read_whole_is_not_reused(run: Callable[[Awaitable[None]], None]) -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 4000000\r\n\r\n" + b"b" * 4000000

    async def main() -> None:
        async with Server(answering(big, OK)) as server:
            client = client_for(server)
            response = await client.request("GET", "/", [("host", "h")], None)
            async with response:
                async for _ in response.body():
                    break
            assert (await fetch(client))[2] == b"{}"
            # A small answer that arrived whole is reused even when its body was not read.
            response = await client.request("GET", "/", [("host", "h")], None)
            response.close()
            assert (await fetch(client))[2] == b"{}"
            await client.close()
        assert server.seen.connections == 2

    run(main())


# The pool


def test_connections_are_reused(run: Callable[[Awaitable[None]], None]) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            for _ in range(5):
                await fetch(client)
            await asyncio.gather(*(fetch(client) for _ in range(4)))
            for _ in range(5):
                await fetch(client)
            await client.close()
            await asyncio.sleep(0.05)
        assert server.seen.connections == 4
        assert len(server.seen.requests) == 14
        assert sorted(server.seen.closed) == [1, 2, 3, 4]  # close() closes every connection

    run(main())


def test_idle_connections_expire(run: Callable[[Awaitable[None]], None]) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server, keepalive_expiry=0.05)
            await fetch(client)
            await asyncio.sleep(0.2)
            await fetch(client)
            await client.close()
        assert server.seen.connections == 2
        assert {r.connection for r in server.seen.requests} == {1, 2}

    run(main())


def test_a_connection_the_server_closed_while_idle_is_not_used(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def main() -> None:
        async with Server(answering(OK, close=True)) as server:
            client = client_for(server)
            await fetch(client)
            await asyncio.sleep(0.1)  # the server's FIN arrives while the connection is idle
            await fetch(client)
            await client.close()
        assert server.seen.connections == 2
        assert len(server.seen.requests) == 2

    run(main())


def test_stray_bytes_while_idle_end_the_connection(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def main() -> None:
        async with Server(
            answering(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
        ) as s:
            client = client_for(s)
            assert (await fetch(client))[2] == b"{}"
            await asyncio.sleep(0.05)
            assert (await fetch(client))[2] == b"{}"
            await client.close()
        assert s.seen.connections == 2

    run(main())


def _drops_the_second_request() -> Handler:
    """Answer the first request of the first connection, then take the next one and close
    without a word, as a server does whose keep-alive timeout ran out just then."""

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


@pytest.mark.parametrize("body", [None, b"abc"])
def test_a_stale_connection_is_retried_once_on_a_new_one(
    run: Callable[[Awaitable[None]], None], body: bytes | None
) -> None:
    async def main() -> None:
        async with Server(_drops_the_second_request()) as server:
            client = client_for(server)
            await fetch(client)
            assert (await fetch(client, body=body))[2] == b"{}"
            assert client.connection_failures == 0
            await client.close()
        assert [r.connection for r in server.seen.requests] == [1, 1, 2]
        assert server.seen.requests[2].body == (body or b"")

    run(main())


def test_a_streamed_body_is_never_sent_twice(run: Callable[[Awaitable[None]], None]) -> None:
    async def main() -> None:
        async with Server(_drops_the_second_request()) as server:
            client = client_for(server)
            await fetch(client)
            with pytest.raises(UpstreamError) as caught:
                await fetch(client, body=chunks(b"abc"))  # a read, but its body is gone
            assert caught.value.refusal.reason == "upstream_unreachable"
            assert client.connection_failures == 1
            await client.close()
        assert [r.connection for r in server.seen.requests] == [1, 1]

    run(main())


def test_a_new_connection_that_fails_is_not_retried(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def hang_up(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        if (request := await read_request(reader, n)) is not None:
            seen.requests.append(request)
        writer.transport.abort()

    async def main() -> None:
        async with Server(hang_up) as server:
            client = client_for(server)
            with pytest.raises(UpstreamError) as caught:
                await fetch(client)
            assert caught.value.refusal.reason == "upstream_unreachable"
            assert client.connection_failures == 1
            await client.close()
        assert server.seen.connections == 1

    run(main())


def test_a_full_pool_is_upstream_busy(run: Callable[[Awaitable[None]], None]) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server, max_connections=2, pool_timeout=0.1)
            held = [await client.request("GET", "/", [("host", "h")], None) for _ in range(2)]
            with pytest.raises(UpstreamError) as caught:
                await client.request("GET", "/", [("host", "h")], None)
            assert caught.value.refusal.reason == "upstream_busy"
            waiting = asyncio.ensure_future(fetch(client))
            await asyncio.sleep(0)
            held[0].close()  # a slot frees up: the waiting request goes ahead
            assert (await waiting)[0] == 200
            held[1].close()
            await asyncio.gather(*(fetch(client) for _ in range(6)))
            await client.close()
        assert server.seen.connections == 2

    run(main())


# Timeouts and failures to connect


def test_silence_is_upstream_timeout(run: Callable[[Awaitable[None]], None]) -> None:
    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        await read_request(reader, n)
        if n == 2:  # headers and a little of the body, then nothing
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        await reader.read()  # until the client gives up

    async def main() -> None:
        async with Server(silent) as server:
            client = client_for(server, read_timeout=0.2)
            with pytest.raises(UpstreamError) as caught:
                await client.request("GET", "/", [("host", "h")], None)
            assert caught.value.refusal.reason == "upstream_timeout"
            assert client.connection_failures == 1
            response = await client.request("GET", "/", [("host", "h")], None)
            with pytest.raises(UpstreamError) as caught:
                async with response:
                    [chunk async for chunk in response.body()]
            assert caught.value.refusal.reason == "upstream_timeout"
            await client.close()

    run(main())


def test_a_slow_caller_is_not_mlflows_silence(run: Callable[[Awaitable[None]], None]) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server, read_timeout=0.1)
            # The caller's body takes 0.4 s to come: MLflow waits for it, it is not silent.
            parts = chunks(b"a", b"b", b"c", b"d", pause=0.1)
            assert (await fetch(client, "PUT", body=parts))[2] == b"{}"
            await client.close()
        assert server.seen.requests[0].body == b"abcd"

    run(main())


def test_connection_refused_is_upstream_unreachable(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def main() -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # bound, not listening: refused
            client = UpstreamClient(f"http://127.0.0.1:{port}", LIMITS)
            client.open()
            for expected_failures in (1, 2):
                with pytest.raises(UpstreamError) as caught:
                    await client.request("GET", "/", [("host", "h")], None)
                assert caught.value.refusal.reason == "upstream_unreachable"
                assert client.connection_failures == expected_failures
            await client.close()

    run(main())


def test_not_open_or_closed_is_upstream_unreachable(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = UpstreamClient(server.url, LIMITS)
            with pytest.raises(UpstreamError):
                await client.request("GET", "/", [("host", "h")], None)
            client.open()
            await fetch(client)
            await client.close()
            with pytest.raises(UpstreamError) as caught:
                await client.request("GET", "/", [("host", "h")], None)
            assert caught.value.refusal.reason == "upstream_unreachable"

    run(main())


def test_no_reuse_after_the_request_said_connection_close(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server)
            await fetch(client, headers=[("host", "h"), ("Connection", "Close")])
            await fetch(client)
            await fetch(client)
            await client.close()
        assert server.seen.connections == 2

    run(main())


def test_a_bursts_extra_connections_are_closed_once_expired(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def main() -> None:
        async with Server(answering(OK)) as server:
            client = client_for(server, keepalive_expiry=0.3)
            await asyncio.gather(*(fetch(client) for _ in range(3)))
            # One connection stays in use; a release closes the oldest idle one once expired.
            for _ in range(40):
                await fetch(client)
                await asyncio.sleep(0.02)
            closed = len(server.seen.closed)
            await client.close()
        assert server.seen.connections == 3
        assert closed == 2
        assert len({r.connection for r in server.seen.requests[3:]}) == 1

    run(main())


# https upstreams


async def tls_server(handler: Handler, certificates: Path) -> Server:
    """A ``Server`` over TLS with the certificate ``certificates`` (conftest.py) has for
    127.0.0.1."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates / "server.crt", certificates / "server.key")
    server = Server(handler)
    server.server = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=context)
    return server


@pytest.mark.parametrize(
    ("ca", "host", "reason"),
    [
        ("ca.crt", "127.0.0.1", None),
        ("wrong-ca.crt", "127.0.0.1", "upstream_unreachable"),  # not signed by a trusted CA
        ("ca.crt", "localhost", "upstream_unreachable"),  # not the name in the certificate
    ],
)
def test_an_https_upstream_is_verified(
    run: Callable[[Awaitable[None]], None],
    certificates: Path,
    monkeypatch: pytest.MonkeyPatch,
    ca: str,
    host: str,
    reason: str | None,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificates / ca))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)

    async def main() -> None:
        async with await tls_server(answering(OK), certificates) as server:
            client = UpstreamClient(f"https://{host}:{server.port}", LIMITS)
            client.open()
            try:
                for _ in range(2):
                    assert (await fetch(client))[2] == b"{}"
                outcome = None
            except UpstreamError as exc:
                outcome = exc.refusal.reason
                assert client.connection_failures == 1
            await client.close()
        assert outcome == reason
        if reason is None:
            assert server.seen.connections == 1
            assert server.seen.requests[0].header(b"host") == b"mlflow"
        else:
            assert server.seen.requests == []

    run(main())


def test_a_connection_that_does_not_open_is_upstream_timeout(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def main() -> None:
        with socket.socket() as listener, socket.socket() as first:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)  # never accepts: once its backlog is full, SYNs go unanswered
            port = listener.getsockname()[1]
            first.connect(("127.0.0.1", port))
            client = UpstreamClient(
                f"http://127.0.0.1:{port}",
                UpstreamLimits(
                    connect_timeout=0.2, read_timeout=5, pool_timeout=1, max_connections=2,
                    keepalive_expiry=5,
                ),
            )  # fmt: skip
            client.open()
            with pytest.raises(UpstreamError) as caught:
                await client.request("GET", "/", [("host", "h")], None)
            assert caught.value.refusal.reason == "upstream_timeout"
            assert client.connection_failures == 1
            await client.close()

    run(main())


def test_a_cancelled_request_gives_back_its_slot_and_connection(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def first_silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int, seen: Seen
    ) -> None:
        if n == 1:
            await read_request(reader, n)
            await reader.read()  # no answer: the caller gives up (a readiness probe's deadline)
            seen.closed.append(n)
            return
        await answering(OK)(reader, writer, n, seen)

    async def main() -> None:
        async with Server(first_silent) as server:
            client = client_for(server, max_connections=1)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.request("GET", "/", [("host", "h")], None), 0.2)
            assert (await fetch(client))[2] == b"{}"  # the one slot is free again
            await asyncio.sleep(0.05)
            assert server.seen.closed == [1]  # the abandoned connection was closed
            await client.close()

    run(main())
