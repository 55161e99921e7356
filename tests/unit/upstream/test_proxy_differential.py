"""The proxy's header filters, request target and answer body against their former
implementations (kept here as the reference). Headers: many generated lists, any case,
underscores, repeated names, ``Connection`` lists naming headers (with whitespace that
``str.strip`` removes and ``bytes.strip`` does not), latin-1 bytes outside ASCII, and more names
than the memo keeps."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

from starlette.types import Message, Send

from guard.errors import Refusal
from guard.upstream.client import UpstreamError
from guard.upstream.proxy import (
    _PATH_SAFE,
    _PLAIN_PATH,
    FORWARDED,
    RESPONSE_DROPPED,
    ProxyApp,
    client_response_headers,
    upstream_request_headers,
)
from tests.unit.edge.test_edge_differential import CASES, Headers, random_headers


def old_upstream_request_headers(
    headers: Headers, extra: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    connection_listed: set[str] = set()
    for key, value in headers:
        if key.lower() == b"connection":
            connection_listed.update(t.strip().lower() for t in value.decode("latin-1").split(","))
    result = []
    for key, value in headers:
        name = key.decode("latin-1").lower()
        if name in FORWARDED and name not in connection_listed:
            result.append((name, value.decode("latin-1")))
    result.extend(extra)
    return result


def old_client_response_headers(headers: tuple[tuple[bytes, bytes], ...]) -> Headers:
    connection_listed: set[bytes] = set()
    for key, value in headers:
        if key.lower() == b"connection":
            connection_listed.update(t.strip().lower() for t in value.split(b","))
    result = []
    for key, value in headers:
        name = key.lower()
        if (
            name.decode("latin-1") in RESPONSE_DROPPED
            or name in connection_listed
            or name.startswith(b"access-control-")
        ):
            continue
        result.append((name, value))
    return result


EXTRA = [("host", "mlflow:5000"), ("x-request-id", "r1")]


def test_latin1_letters_never_lower_case_into_ascii() -> None:
    """What comparing lower-cased bytes with ASCII names rests on."""
    for code in range(256):
        lowered = chr(code).lower()
        assert lowered.isascii() == (code < 128)
        if code < 128:
            assert lowered.encode() == bytes([code]).lower()


def test_request_headers_match_the_former_function() -> None:
    for headers in CASES:
        assert upstream_request_headers(headers, EXTRA) == old_upstream_request_headers(
            headers, EXTRA
        ), headers
        assert upstream_request_headers(headers, []) == old_upstream_request_headers(headers, [])


def test_response_headers_match_the_former_function() -> None:
    for headers in CASES:
        answer = tuple(headers)
        assert client_response_headers(answer) == old_client_response_headers(answer), headers


def test_connection_lists_are_read_as_before() -> None:
    rng = random.Random(5)
    names = [b"Accept", b"accept", b"User-Agent", b"Range", b"X-MLflow-Run-Id", b"Date", b"Vary"]
    spaces = [b"", b" ", b"\t", b"\xa0", b"\x85", b"\x1c", b"\x0b"]
    for seed in range(2000):
        headers = random_headers(random.Random(seed))
        for _ in range(rng.randrange(1, 3)):
            listed = b",".join(
                rng.choice(spaces) + rng.choice(names) + rng.choice(spaces)
                for _ in range(rng.randrange(1, 4))
            )
            headers.insert(
                rng.randrange(len(headers) + 1),
                (rng.choice([b"connection", b"Connection"]), listed),
            )
        for name in names:
            headers.insert(rng.randrange(len(headers) + 1), (name, b"v"))
        assert upstream_request_headers(headers, EXTRA) == old_upstream_request_headers(
            headers, EXTRA
        ), headers
        answer = tuple(headers)
        assert client_response_headers(answer) == old_client_response_headers(answer), headers


# The request target: quoted only when it is not plain already.


def test_plain_paths_are_what_quote_makes_of_them() -> None:
    rng = random.Random(9)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + ["\x00", "\x7f", "\xe9", "\u2603", "%2F"]
    for _ in range(20000):
        path = "/" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        expected = quote(path, safe=_PATH_SAFE)
        assert (path if _PLAIN_PATH.fullmatch(path) else expected) == expected, path
    for c in map(chr, range(0x300)):
        assert bool(_PLAIN_PATH.fullmatch(c)) == (quote(c, safe=_PATH_SAFE) == c), repr(c)


# The answer's body: the same bytes, in one message fewer where a declared length ends it.


async def old_send_body(
    send: Send, chunks: AsyncIterator[bytes], headers: tuple[tuple[bytes, bytes], ...]
) -> None:
    """The former loop (its disconnect watcher aside: no answer here is watched)."""
    try:
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    except UpstreamError:
        pass


class Wire:
    """What uvicorn makes of the body messages (as its httptools protocol checks them)."""

    def __init__(self, declared: int | None) -> None:
        self.left = declared
        self.data = b""
        self.complete = False
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)
        if self.complete:
            raise RuntimeError("after response already completed")
        body = message.get("body", b"")
        if self.left is not None:
            if len(body) > self.left:
                raise RuntimeError("longer than Content-Length")
            self.left -= len(body)
        self.data += body
        if not message.get("more_body", False):
            if self.left not in (None, 0):
                raise RuntimeError("shorter than Content-Length")
            self.complete = True


async def pieces(parts: list[bytes], fail: bool) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part
    if fail:
        raise UpstreamError(Refusal("upstream_unreachable"))


def outcome(wire: Wire, error: BaseException | None) -> tuple[bytes, bool, str]:
    return wire.data, wire.complete, type(error).__name__ if error else ""


def test_body_messages_put_the_same_bytes_on_the_wire() -> None:
    rng = random.Random(13)
    proxy = ProxyApp(client=None, version=None)  # type: ignore[arg-type]
    scope: dict[str, Any] = {"guard": SimpleNamespace(request_id="r", refusal=None)}

    async def receive() -> Message:
        await asyncio.sleep(3600)
        raise AssertionError  # never asked: every declared answer here is small

    async def one(parts: list[bytes], headers: Headers, declared: int | None, fail: bool) -> None:
        old, new = Wire(declared), Wire(declared)
        old_error = new_error = None
        try:
            await old_send_body(old, pieces(parts, fail), tuple(headers))
        except RuntimeError as exc:
            old_error = exc
        try:
            await proxy._send_body(scope, receive, new, pieces(parts, fail), tuple(headers))
        except RuntimeError as exc:
            new_error = exc
        assert outcome(new, new_error) == outcome(old, old_error), (parts, headers, fail)
        assert len(new.messages) <= len(old.messages)
        if old.complete and declared and sum(map(len, parts)) == declared:
            assert new.messages[-1]["body"] == parts[-1] or not parts[-1]  # no empty tail

    async def main() -> None:
        for _ in range(3000):
            parts = [rng.randbytes(rng.randrange(0, 5)) for _ in range(rng.randrange(0, 5))]
            size = sum(map(len, parts))
            # Never fewer than the parts: the client's parser delivers no byte past the length.
            declared = rng.choice([None, size, size, size, size + 1, size + 3])
            headers: Headers = [(b"content-type", b"application/json")]
            if declared is not None:
                name = rng.choice([b"content-length", b"Content-Length", b"CONTENT-LENGTH"])
                value = rng.choice([str(declared).encode()] * 4 + [b"+1", b" 3", b""])
                headers.insert(rng.randrange(2), (name, value))
                if not value.isdigit():
                    declared = None  # what the proxy then does not rely on
            # The client fails only an unfinished answer: its body ends once the parser has
            # the message whole, which is with the last declared byte.
            fail = rng.random() < 0.2 and (declared is None or size < declared)
            await one(parts, headers, declared, fail)

    asyncio.run(main())
