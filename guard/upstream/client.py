"""The one connection pool to MLflow: a small HTTP/1.1 client on an asyncio protocol.

Why not a library: the gateway's CPU budget is 0.3 ms per request, all of it (identity,
authorization, audit and forwarding). httpx's client cost ~2 ms per request here, aiohttp's
~0.13-0.2 ms: measured with uvloop against a no-op upstream, uvicorn answering by itself took
0.08 ms CPU per request and uvicorn forwarding through an aiohttp ClientSession 0.27-0.28 ms.
Forwarding through this module took 0.16-0.19 ms in the same runs, so it costs ~0.09 ms where
aiohttp cost ~0.18 ms; the whole gateway went from 0.47 to 0.36 ms without the audit trail and
from 0.94 to 0.82 ms with it (medians of 5 interleaved runs, sequential keep-alive requests).
The saving is what aiohttp does for every request that a proxy in front of one known server
does not need: URL and header objects, cookie, redirect and auto-header logic, a StreamReader
and a writer task per request. What remains is httptools' llhttp parser (the one uvicorn parses
requests with), one future and one timer per exchange, and the socket calls.

It is as careful as the library it replaces:
- a request is written as given (method, a canonical target never re-quoted, the caller's
  headers and Host) and refused (400 ``malformed_request``) before any byte is written if a
  header name is not an RFC 9110 token, a name or value holds a CR, LF or NUL (request
  splitting), or the target is not printable ASCII without spaces (a C1 control or NBSP is a
  separator to some servers); the framing is this client's: Content-Length for bytes, the
  caller's Content-Length (ASCII digits only) or chunked for a streamed body (a body that is
  longer or shorter than it said cuts the connection), Content-Length: 0 for a method that
  carries a body but has none (as aiohttp sends it); a streamed body is written at MLflow's
  pace (flow control);
- an answer is parsed by llhttp (Content-Length of ASCII digits, chunked, or read until the
  server closes; none after HEAD, 1xx, 204 and 304; informational answers skipped; header
  names must be tokens) and its body is streamed with a bounded buffer: reading from MLflow
  pauses while ``BUFFER_LIMIT`` bytes wait for the caller. Its head, informational answers
  before it included, is bounded (``MAX_HEAD_SIZE`` bytes, ``MAX_HEAD_FIELDS`` fields, as the
  gateway bounds a request's), and so is a chunked answer's framing (a trailer llhttp would
  keep whole until it ends): more is a malformed answer. An answer read until the server
  closes ends only with a clean end of stream: a reset, or over TLS a FIN without close_notify
  (as far as the event loop tells them apart, see ``_Connection._clean_eof``), is a failure
  raised from ``body()``, never a shorter answer served as whole;
- the pool holds at most ``max_connections`` (a slot per request; waiting for one longer than
  ``pool_timeout`` is 503 ``upstream_busy``), reuses the most recently used idle connection,
  never one idle longer than ``keepalive_expiry`` or one the server closed or sent stray bytes
  on: a connection goes back to the pool only when the request went out whole (its body
  written, nothing left in the send buffer: an answer that came before the upload ended closes
  it), its answer was read whole and neither side said ``Connection: close`` (HTTP/1.0: unless
  it said keep-alive and not close). A request whose reused connection dies before any byte of
  the answer (MLflow closed it just as the request went out, or took it and died) is sent once
  more on a new connection only when it is a read (GET, HEAD, OPTIONS) whose body can be sent
  again (bytes or none): never a streamed body, and never POST, PUT, PATCH or DELETE, which
  MLflow may already have applied (logged a metric, created a run) and would apply twice;
- ``connect_timeout`` bounds opening a connection; ``read_timeout`` bounds each silence of
  MLflow while the gateway waits for it (aiohttp's ``sock_read``), not the time the caller
  takes to send its body or take the answer; there is no total timeout;
- an https upstream is verified as aiohttp verifies it by default (the system's CAs, as
  OpenSSL finds them, SSL_CERT_FILE included, and the host name).
Failures map as before: refused, reset or malformed -> 502 ``upstream_unreachable``, MLflow
silent -> 504 ``upstream_timeout``, pool full -> 503 ``upstream_busy``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit

import httptools

from guard.errors import Refusal

logger = logging.getLogger("guard.upstream")

# Methods that carry no body: a request of any other method without one says Content-Length: 0
# (as aiohttp and browsers do; a server may otherwise wait for a body or answer 411).
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})
# Methods whose request may go twice: a stale connection's failure never sends anything else
# again (MLflow's POST, PUT, PATCH and DELETE change state, and may have been applied).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
# Bytes of an answer buffered before reading from MLflow pauses until the caller takes them.
BUFFER_LIMIT = 256 * 1024
# A request body this large is written after its head rather than copied into one buffer.
_JOIN_BELOW = 16 * 1024
# A request target is printable ASCII without spaces: a C1 control or a non-ASCII space (NEL,
# NBSP) is a separator to servers that split the request line with str.split().
_UNSAFE_TARGET = re.compile(r"[^\x21-\x7e]")
# A header name is an RFC 9110 token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Header names found to be tokens are remembered (per client, up to this many).
_KNOWN_NAMES = 1024
# An answer's head (informational answers before it included) is bounded as the gateway bounds
# a request's (gateway.max_header_size, 32 KiB, and max_header_count, 100), with room to spare:
# more is a malformed answer, and the connection is closed.
MAX_HEAD_SIZE = 64 * 1024
MAX_HEAD_FIELDS = 128


class UpstreamError(Exception):
    """The upstream failed before answering; carries the refusal to send instead."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    connect_timeout: float
    read_timeout: float
    pool_timeout: float
    max_connections: int
    keepalive_expiry: float


class _Closed(Exception):
    """The connection ended (reset, closed, or aborted by us) before the answer did."""


class _Malformed(Exception):
    """The answer is not valid HTTP/1.1."""


class _LengthMismatch(Exception):
    """A streamed body is longer or shorter than the Content-Length it was sent with."""


class _Connection(asyncio.Protocol):
    """One connection to MLflow and the state of the exchange in flight on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self.loop = loop
        self.read_timeout = read_timeout
        self.transport: asyncio.Transport  # set by connection_made, before anything else
        self.parser = httptools.HttpResponseParser(self)
        self.alive = True  # neither closed nor at EOF
        self.busy = False  # an exchange is in flight
        self.idle_since = 0.0
        self.head = False  # the request was HEAD: the answer has no body whatever it says
        self.last_use = False  # the request said Connection: close
        self.informational = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.received = False  # some byte of the answer arrived
        self.head_read = 0  # bytes read until the answer's head was whole (a bound on its size)
        self.head_fields = 0  # fields and size of the informational answers' heads, then trailers
        self.head_size = 0
        self.chunked = False  # a chunk header was read: what is not body is counted
        self.framing = 0  # bytes read since the last chunk header that were not body
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.reading_paused = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.last_progress = 0.0
        self.writer: asyncio.Task[None] | None = None
        self.sourcing = False  # the writer waits for the caller's body, not for MLflow
        self.writing_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self.keep_alive = False
            self.alive = False
            if not self.busy:
                self.transport.close()
            return
        self.received = True
        self.last_progress = self.loop.time()
        if not self.headers_done:
            self.head_read += len(data)
        elif self.chunked:
            self.framing += len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.fail(_Malformed(str(exc)))
            return
        if not self.headers_done and self.head_read > MAX_HEAD_SIZE:
            # Every byte so far belongs to a head: llhttp keeps an unfinished field whole, so
            # the head is bounded here as it arrives, not only once a field ends.
            self.fail(_Malformed(f"an answer head larger than {MAX_HEAD_SIZE} bytes"))
            return
        if self.framing > MAX_HEAD_SIZE:
            # A chunk extension or a trailer that never ends: llhttp would keep it whole.
            self.fail(_Malformed(f"chunk framing larger than {MAX_HEAD_SIZE} bytes"))
            return
        self._wake()

    def eof_received(self) -> bool:
        self._ended(None, self._clean_eof())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc, False)
        drain = self.drain_waiter
        if drain is not None and not drain.done():
            drain.set_exception(_Closed("connection lost"))

    def _ended(self, exc: BaseException | None, clean: bool) -> None:
        self.alive = False
        if not self.busy or self.complete or self.error is not None:
            return
        if clean and self.headers_done and not self._framed():
            # An answer read until the server closes ends with a clean end of stream only: a
            # reset, or a TLS connection closed without close_notify, cut it short.
            self._message_complete()
            self.keep_alive = False
        else:
            self.error = _Closed(str(exc) if exc else "closed by MLflow")
        self._wake()

    def _clean_eof(self) -> bool:
        """Whether the end of stream just received is one the server meant to send.

        Over TLS, only a close_notify is. uvloop calls ``eof_received`` for a close_notify only
        (a bare TCP FIN goes straight to ``connection_lost``); asyncio's own loop calls it for
        both, a close_notify while its SSL protocol is still wrapped (or flushing) and a bare
        FIN once it is shut down, which is all a protocol can tell them apart by.
        """
        ssl_protocol = getattr(self.transport, "_ssl_protocol", None)
        if ssl_protocol is None:
            return True  # plain TCP, or uvloop's TLS transport
        state = getattr(ssl_protocol, "_state", None)
        return getattr(state, "name", "SHUTDOWN") != "SHUTDOWN"

    def _framed(self) -> bool:
        """Whether the answer said how long its body is (else it ends when MLflow closes)."""
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                return True
            if lowered == b"transfer-encoding" and b"chunked" in value.lower():
                return True
        return False

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        drain = self.drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.headers_done:  # a second answer to one request: the framing is broken
            self.keep_alive = False
            self.alive = False

    # llhttp refuses a header name that is not a token, a value with a control character and a
    # Content-Length that is not ASCII digits; the number and size of fields is bounded here. An
    # exception raised in a callback comes out of feed_data as an HttpParserCallbackError.

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:
            self.headers.append((name, value))
            return
        # A trailer: never kept, but bounded as a head is.
        self.head_fields += 1
        self.head_size += len(name) + len(value) + 4
        if self.head_fields > MAX_HEAD_FIELDS or self.head_size > MAX_HEAD_SIZE:
            raise _Malformed("too many or too large trailers")

    def on_headers_complete(self) -> None:
        if self.headers_done:
            return
        headers = self.headers
        fields = self.head_fields + len(headers)
        if fields > MAX_HEAD_FIELDS or (
            # The bytes read so far bound the head's size; only when they exceed the limit
            # (a large first read holds body bytes too) are the fields measured.
            self.head_read > MAX_HEAD_SIZE and self.head_size + _size(headers) > MAX_HEAD_SIZE
        ):
            raise _Malformed("an answer head with too many or too large fields")
        status = self.parser.get_status_code()
        if status == 101:  # never asked for: the connection would stop speaking HTTP
            raise _Malformed("an upgrade nobody asked for")
        if status < 200:
            self.informational = True  # 100 Continue, 103 Early Hints: the answer follows
            self.head_fields = fields
            self.head_size += _size(headers)
            self.headers = []
            return
        self.head_fields = self.head_size = 0  # from now on, the trailers'
        self.status = status
        self.headers_done = True
        if self.head:
            self.keep_alive = self._keeps_alive()
            self._message_complete()
            # The parser still expects the body the headers announce: a fresh one reads the
            # next answer, and any byte this one sees is stray (see on_body).
            self.parser = httptools.HttpResponseParser(self)

    def on_chunk_header(self) -> None:
        # Counted from here, framing is bounded to a read's worth of body beyond the limit.
        self.chunked = True
        self.framing = 0

    def on_body(self, body: bytes) -> None:
        if self.complete:  # after an answer to HEAD
            self.keep_alive = False
            return
        if self.chunked:
            self.framing -= len(body)
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > BUFFER_LIMIT and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.complete:
            return
        self.keep_alive = self._keeps_alive()
        self._message_complete()

    def _keeps_alive(self) -> bool:
        """Whether the answer lets the connection be used again (neither side said close)."""
        parser = self.parser
        if self.last_use or not parser.should_keep_alive():
            return False
        if parser.get_http_version() != "1.1":
            # llhttp keeps an HTTP/1.0 connection that says keep-alive even when it also says
            # close (for HTTP/1.1 it reads close among any tokens).
            for name, value in self.headers:
                if name.lower() == b"connection" and any(
                    token.strip(b" \t") == b"close" for token in value.lower().split(b",")
                ):
                    return False
        return True

    def _message_complete(self) -> None:
        self.complete = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # the exchange

    def begin(self, head: bool, close: bool) -> None:
        """Start an exchange: the read timeout runs from now."""
        self.busy = True
        self.head = head
        self.last_use = close
        self.last_progress = self.loop.time()
        self.timer = self.loop.call_at(self.last_progress + self.read_timeout, self._check_silence)

    def _check_silence(self) -> None:
        self.timer = None
        if self.complete or self.error is not None:
            return
        now = self.loop.time()
        waiting = self.waiter is not None and not self.sourcing
        due = self.last_progress + self.read_timeout
        if not waiting or due > now:
            # Nobody waits for MLflow (the caller is slow to take the answer or to send its
            # body), or MLflow spoke meanwhile: look again later.
            self.timer = self.loop.call_at(
                max(due, now + self.read_timeout / 8), self._check_silence
            )
            return
        self.fail(TimeoutError())

    def fail(self, exc: BaseException) -> None:
        """End the exchange with ``exc``; the connection is never used again."""
        if self.error is None:
            self.error = exc
        self.alive = False
        self.keep_alive = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Wait until something arrives (or the exchange fails)."""
        waiter = self.waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self.waiter = None

    async def drain(self) -> None:
        if not self.writing_paused:
            return
        if not self.alive:
            raise _Closed("closed while writing")
        drain = self.drain_waiter = self.loop.create_future()
        try:
            await drain
        finally:
            self.drain_waiter = None

    def reset(self) -> None:
        """Forget the finished exchange; the connection goes back to the pool."""
        self.busy = False
        self.status = 0
        self.headers = []
        self.headers_done = self.complete = self.received = self.chunked = False
        self.head_read = self.head_fields = self.head_size = self.framing = 0
        if self.chunks:
            self.chunks.clear()
        self.buffered = 0
        self.writer = None
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def sent(self) -> bool:
        """Whether the request went out whole: its body written and nothing left to send."""
        writer = self.writer
        return (
            writer is None
            or (writer.done() and not writer.cancelled() and writer.exception() is None)
        ) and self.transport.get_write_buffer_size() == 0

    def close(self) -> None:
        writer = self.writer
        finished = not self.busy or (self.complete and self.error is None and self.sent())
        self.alive = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if writer is not None and not writer.done():
            writer.cancel()
        if finished:
            self.transport.close()
        else:
            self.transport.abort()  # an unfinished exchange must not look finished


def _size(headers: list[tuple[bytes, bytes]]) -> int:
    """The bytes these header fields took on the wire, give or take their spaces."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


def _refusal(exc: BaseException) -> Refusal:
    if isinstance(exc, TimeoutError):
        return Refusal("upstream_timeout")
    return Refusal("upstream_unreachable")  # refused, reset, closed early, malformed answer


class UpstreamResponse:
    """An upstream answer whose body has not been read; iterate ``body()`` or ``close()``."""

    __slots__ = ("_client", "_conn", "_slot", "headers", "status")

    def __init__(self, client: UpstreamClient, conn: _Connection, slot: asyncio.Semaphore) -> None:
        self.status = conn.status
        self.headers: tuple[tuple[bytes, bytes], ...] = tuple(conn.headers)
        self._client = client
        self._conn: _Connection | None = conn
        self._slot: asyncio.Semaphore | None = slot

    async def body(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        chunks = conn.chunks
        while True:
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                conn.buffered = 0
                if conn.reading_paused:
                    conn.reading_paused = False
                    conn.transport.resume_reading()
                yield data
            elif conn.complete:
                return
            elif conn.error is not None:
                raise UpstreamError(_refusal(conn.error)) from conn.error
            else:
                await conn.wait()

    def close(self) -> None:
        """Return the connection to the pool if the answer was read whole, else drop it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client._release(conn)
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class UpstreamClient:
    """Sends requests to one MLflow base URL. Create it inside the running event loop."""

    def __init__(self, base_url: str, limits: UpstreamLimits) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self.host_header = parts.netloc  # a Host MLflow allows, never the caller's
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = parts.scheme == "https"
        self.limits = limits
        self._slots = asyncio.Semaphore(limits.max_connections)
        self._idle: deque[_Connection] = deque()
        self._all: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None
        self._opened = False
        self._names: set[str] = set()  # request header names known to be tokens
        # Connections to MLflow that failed: the version gate reads /version again after one.
        self.connection_failures = 0

    def open(self) -> None:
        """Get ready to connect; call from inside the running event loop."""
        self._opened = True
        if self._tls and self._ssl is None:
            # Verified as aiohttp does by default: the system's CAs (SSL_CERT_FILE and
            # SSL_CERT_DIR honoured by OpenSSL), the host name checked, HTTP/1.1 offered.
            self._ssl = ssl.create_default_context()
            self._ssl.set_alpn_protocols(["http/1.1"])

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """Send a request; ``target`` is the path plus query, sent as it is. Raises
        UpstreamError."""
        if not self._opened:
            raise UpstreamError(Refusal("upstream_unreachable", "The gateway is not started."))
        head, declared, close = self._head(method, target, headers, body)
        slot = self._slots
        if slot.locked():  # only a full pool pays for a timed wait
            try:
                await asyncio.wait_for(slot.acquire(), self.limits.pool_timeout)
            except TimeoutError:
                raise UpstreamError(Refusal("upstream_busy")) from None
        else:
            await slot.acquire()
        try:
            conn = await self._exchange(method, head, body, declared, close)
        except BaseException:
            slot.release()
            raise
        return UpstreamResponse(self, conn, slot)

    def _head(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> tuple[bytes, int | None, bool]:
        """The request's head, the body length it declares (None: chunked) and whether it asks
        the server to close the connection."""
        lines = [f"{method} {target} HTTP/1.1\r\n"]
        host = close = False
        length: str | None = None
        names = self._names
        for name, value in headers:
            if name not in names:
                if _TOKEN.fullmatch(name) is None:
                    raise UpstreamError(Refusal("malformed_request"))
                if len(names) < _KNOWN_NAMES:
                    names.add(name)
            lowered = name.lower()
            if lowered == "host":
                host = True
            elif lowered == "content-length":
                length = value
                continue  # written below, from the body itself
            elif lowered == "transfer-encoding":
                continue  # the framing is this client's
            elif lowered == "connection":
                close = close or "close" in value.lower()
            lines.append(f"{name}: {value}\r\n")
        if not host:
            lines.append(f"host: {self.host_header}\r\n")
        declared: int | None
        if isinstance(body, bytes):
            declared = len(body)
            if length is not None and length.strip(" \t") != str(declared):
                raise UpstreamError(Refusal("invalid_body_framing"))
            lines.append(f"content-length: {declared}\r\n")
        elif body is None:
            declared = 0
            if length is not None and length.strip(" \t") != "0":
                raise UpstreamError(Refusal("invalid_body_framing"))
            if method not in _BODYLESS:
                lines.append("content-length: 0\r\n")
        elif length is not None:
            length = length.strip(" \t")
            if not (length.isascii() and length.isdigit()) or len(length) > 18:
                raise UpstreamError(Refusal("invalid_body_framing"))
            declared = int(length)
            lines.append(f"content-length: {declared}\r\n")
        else:
            declared = None
            lines.append("transfer-encoding: chunked\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        # Defence in depth against request splitting: every line break is one this method
        # wrote, and no space or control character hides in the request line.
        if (
            text.count("\n") != len(lines)
            or text.count("\r") != len(lines)
            or "\0" in text
            or not target
            or _UNSAFE_TARGET.search(target) is not None
            or not (method.isascii() and method.isalpha())
        ):
            raise UpstreamError(Refusal("malformed_request"))
        try:
            return text.encode("latin-1"), declared, close
        except UnicodeEncodeError:
            raise UpstreamError(Refusal("malformed_request")) from None

    async def _exchange(
        self,
        method: str,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        declared: int | None,
        close: bool,
    ) -> _Connection:
        """Send the request on a pooled (or new) connection and wait for the answer's head."""
        # Sent again only when it may be: an idempotent method, and a body it still holds.
        replayable = method in _IDEMPOTENT and (body is None or isinstance(body, bytes))
        conn = self._pooled()
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect()
            try:
                await self._send(conn, method, head, body, declared, close)
                return conn
            except _Closed as exc:
                self._drop(conn)
                if reused and replayable and not conn.received:
                    # MLflow closed the idle connection just as the request went out (or took
                    # the request and died): a read goes again once, on a new connection.
                    conn, reused = None, False
                    continue
                self.connection_failures += 1
                raise UpstreamError(_refusal(exc)) from exc
            except _Malformed as exc:
                self._drop(conn)
                raise UpstreamError(_refusal(exc)) from exc
            except TimeoutError as exc:
                self._drop(conn)
                self.connection_failures += 1
                raise UpstreamError(_refusal(exc)) from exc
            except BaseException:
                self._drop(conn)
                raise

    async def _send(
        self,
        conn: _Connection,
        method: str,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        declared: int | None,
        close: bool,
    ) -> None:
        conn.begin(method == "HEAD", close)
        transport = conn.transport
        if body is None:
            transport.write(head)
        elif isinstance(body, bytes):
            if len(body) < _JOIN_BELOW:
                transport.write(head + body)
            else:
                transport.writelines([head, body])
        else:
            transport.write(head)
            conn.writer = asyncio.ensure_future(_write_stream(conn, body, declared))
            conn.writer.add_done_callback(_retrieve)
        while not conn.headers_done:
            if conn.error is not None:
                writer = conn.writer
                if writer is not None and writer.done() and not writer.cancelled():
                    source = writer.exception()
                    if source is not None and not isinstance(source, (_Closed, TimeoutError)):
                        # The caller's body failed (too slow, caller gone, not the length it
                        # said), not MLflow.
                        raise UpstreamError(Refusal("upstream_unreachable")) from source
                raise conn.error
            await conn.wait()

    def _pooled(self) -> _Connection | None:
        """The most recently used idle connection that is still good, if any."""
        idle = self._idle
        if not idle:
            return None
        oldest = idle[-1].loop.time() - self.limits.keepalive_expiry
        while idle:
            conn = idle.pop()
            if conn.alive and conn.idle_since > oldest and not conn.transport.is_closing():
                return conn
            self._drop(conn)
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        read_timeout = self.limits.read_timeout
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, read_timeout),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except (OSError, TimeoutError) as exc:
            self.connection_failures += 1
            raise UpstreamError(_refusal(exc)) from exc
        self._all.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        # Reused only when the request went out whole, the answer was read whole and neither
        # said close: an answer that came before the upload ended leaves MLflow reading (or
        # not) the rest of it, and the next request would queue behind it.
        if (
            conn.complete
            and conn.keep_alive
            and conn.alive
            and conn.error is None
            and conn.sent()
            and self._opened
        ):
            conn.reset()
            idle = self._idle
            now = conn.idle_since = conn.loop.time()
            # The least recently used connection goes once it expires or dies, so a burst's
            # extra connections do not stay open behind the ones in use.
            if idle and (
                not idle[0].alive or idle[0].idle_since <= now - self.limits.keepalive_expiry
            ):
                self._drop(idle.popleft())
            idle.append(conn)
        else:
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._all.discard(conn)

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()
        self._opened = False


async def _write_stream(
    conn: _Connection, body: AsyncIterator[bytes], declared: int | None
) -> None:
    """Write a streamed request body: as given (Content-Length) or chunked, at MLflow's pace."""
    transport = conn.transport
    sent = 0
    try:
        conn.sourcing = True
        async for chunk in body:
            conn.sourcing = False
            if not conn.alive:  # cut while the caller's body was awaited
                raise _Closed("closed while writing")
            if chunk:
                sent += len(chunk)
                if declared is None:
                    transport.writelines([b"%x\r\n" % len(chunk), chunk, b"\r\n"])
                elif sent > declared:
                    raise _LengthMismatch(f"more than {declared} bytes")
                else:
                    transport.write(chunk)
                conn.last_progress = conn.loop.time()
                if conn.writing_paused:
                    await conn.drain()
                if not conn.alive:
                    raise _Closed("closed while writing")
            conn.sourcing = True
        conn.sourcing = False
        if declared is None:
            transport.write(b"0\r\n\r\n")
        elif sent != declared:
            raise _LengthMismatch(f"{sent} bytes, not {declared}")
    except BaseException as exc:
        conn.sourcing = False
        # The request must never reach MLflow looking whole: the connection is cut.
        conn.fail(exc if isinstance(exc, (_Closed, TimeoutError)) else _Closed(repr(exc)))
        raise


def _retrieve(task: asyncio.Task[None]) -> None:
    """The writer's failure is read through its connection; do not log it as unretrieved."""
    if not task.cancelled():
        task.exception()


VERSION_RECHECK = 60.0  # seconds between two reads of the upstream's /version


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.strip().split(".")[:2])


class VersionGate:
    """Forward only to an MLflow release the route table was verified against.

    The upstream's ``/version`` is read before the first forwarded request, again after any
    failed connection to MLflow (a restart may bring another release) and every
    ``recheck`` seconds. A verified release is served; an unverified patch release of a
    verified minor (3.18.1 when 3.18.0 is verified) is served with a loud warning unless
    ``strict``; any other release is refused with ``upstream_unverified`` unless the operator
    allowed it, which is logged loudly. ``on_change(old, new)`` is called when the release
    read differs from the last one (the app logs and audits it; the route classifier serves the
    new release's table from the next request on).
    """

    def __init__(
        self,
        verified: frozenset[str],
        allow_unverified: bool,
        *,
        strict: bool = False,
        recheck: float = VERSION_RECHECK,
        on_change: Callable[[str | None, str], None] | None = None,
        workspaces: bool = False,
    ) -> None:
        self.verified = verified
        self.workspaces = workspaces  # upstream.workspaces, compared with MLflow's server-info
        self.mismatch = ""  # why MLflow's workspaces disagree with the setting, if they do
        self.allow_unverified = allow_unverified
        self.strict = strict
        self.recheck = recheck
        self.on_change = on_change
        self.version: str | None = None
        self._read_at = -recheck
        self._failures_seen = 0
        self._lock = asyncio.Lock()

    def _stale(self, client: UpstreamClient) -> bool:
        return (
            self.version is None
            or client.connection_failures != self._failures_seen
            or time.monotonic() - self._read_at >= self.recheck
        )

    async def check(self, client: UpstreamClient) -> Refusal | None:
        if self._stale(client):
            async with self._lock:
                if self._stale(client):
                    failures = client.connection_failures
                    try:
                        version = await self._read(client)
                        self._compare_workspaces(await self._workspaces_enabled(client))
                    except UpstreamError as exc:
                        self._read_at = -self.recheck  # read again on the next request
                        return exc.refusal
                    self._failures_seen, self._read_at = failures, time.monotonic()
                    if version != self.version:
                        old, self.version = self.version, version
                        self._report()
                        if self.on_change is not None:
                            self.on_change(old, version)
        current = self.version
        if current is None:  # another request's first read failed meanwhile
            return Refusal("upstream_unreachable")
        if self.mismatch:
            return Refusal("upstream_misconfigured", self.mismatch)
        if self.accepts(current):
            return None
        return Refusal(
            "upstream_unverified",
            f"MLflow {current} is not a verified release "
            f"({', '.join(sorted(self.verified))}); see --allow-unverified-mlflow.",
        )

    def patch_of_verified(self, version: str) -> bool:
        """An unverified release of a verified minor (3.18.1 when 3.18.0 is verified)."""
        return version not in self.verified and _minor(version) in {
            _minor(v) for v in self.verified
        }

    def accepts(self, version: str) -> bool:
        if version in self.verified or self.allow_unverified:
            return True
        return self.patch_of_verified(version) and not self.strict

    @staticmethod
    async def _get(client: UpstreamClient, path: str) -> tuple[int, bytes]:
        """GET ``path`` from MLflow: its status and whole body."""
        response = await client.request("GET", path, [("host", client.host_header)], None)
        async with response:
            return response.status, b"".join([chunk async for chunk in response.body()])

    async def _read(self, client: UpstreamClient) -> str:
        status, body = await self._get(client, "/version")
        if status != 200:
            raise UpstreamError(Refusal("upstream_unverified", "MLflow has no /version."))
        return body.decode("utf-8", "replace").strip()

    async def _workspaces_enabled(self, client: UpstreamClient) -> bool:
        """Whether MLflow serves workspaces (server-info's ``workspaces_enabled``; an MLflow
        without the field, or without server-info, serves none)."""
        status, body = await self._get(client, "/api/3.0/mlflow/server-info")
        if status != 200:
            return False
        try:
            info = json.loads(body)
        except (ValueError, RecursionError):
            return False
        return isinstance(info, dict) and info.get("workspaces_enabled") is True

    def _compare_workspaces(self, enabled: bool) -> None:
        mismatch = ""
        if enabled and not self.workspaces:
            mismatch = (
                "MLflow runs with workspaces and upstream.workspaces is off: turn it on (and "
                "qualify the policy's grants) or start MLflow without --enable-workspaces."
            )
        elif self.workspaces and not enabled:
            mismatch = (
                "upstream.workspaces is on but MLflow runs without workspaces: start it with "
                "--enable-workspaces or turn the setting off."
            )
        if mismatch and mismatch != self.mismatch:
            logger.error("refusing to forward: %s", mismatch)
        elif self.mismatch and not mismatch:
            logger.info("MLflow's workspaces now match upstream.workspaces")
        self.mismatch = mismatch

    def _report(self) -> None:
        verified = ", ".join(sorted(self.verified))
        if self.version in self.verified:
            logger.info("upstream MLflow %s (verified)", self.version)
        elif self.version is not None and self.patch_of_verified(self.version) and not self.strict:
            logger.warning(
                "UPSTREAM MLFLOW %s IS NOT A VERIFIED RELEASE (verified: %s); forwarding because "
                "it is a patch release of a verified minor, with that release's route table: "
                "routes it added or changed may be misclassified (upstream.strict_version = true "
                "refuses it)", self.version, verified,
            )  # fmt: skip
        elif self.allow_unverified:
            logger.warning(
                "UPSTREAM MLFLOW %s IS NOT A VERIFIED RELEASE (verified: %s); forwarding anyway "
                "because --allow-unverified-mlflow is set: routes it added or changed may be "
                "misclassified", self.version, verified,
            )  # fmt: skip
        else:
            logger.error(
                "upstream MLflow %s is not a verified release (verified: %s); refusing to "
                "forward (start with --allow-unverified-mlflow to override)",
                self.version, verified,
            )  # fmt: skip
