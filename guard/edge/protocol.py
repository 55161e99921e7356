"""The HTTP/1.1 connection, below the ASGI app: what uvicorn's parser would refuse on its own.

``GuardHttpProtocol`` is uvicorn's httptools protocol with the gateway's limits. Whatever it
refuses (a request httptools cannot parse, a request head that is too large or too slow, a
WebSocket upgrade, one connection too many from an address) still becomes an ASGI request: a
scope carrying ``scope[REFUSAL_KEY] = reason``, run through the whole application, so that
``RequestContextMiddleware`` answers it in the gateway's error shape and the audit trail records
it through the usual path (a caller who did not log in: the flood summary applies). The
connection is closed after the answer; what the client is still sending is read and dropped for
a moment first, so it reads the answer rather than a reset.

The limits bite while parsing: httptools buffers a header's name and value until the line ends,
so the bytes of an unfinished request head are counted after every read, and a head is cut off
once it exceeds ``max_url_length + max_header_size`` (plus one read).

Answers are written through ``_CoalescingTransport``, which sends an answer's head together
with its body (uvicorn writes them apart). It replaces each request cycle's ``transport``, which
the cycle only writes to, closes and asks ``is_closing``; what uvicorn writes to or closes on
the connection itself (its shutdown, the keep-alive timeout) comes between answers, and nothing
is held then: an answer's last write goes out when it completes.

This module reaches into uvicorn's ``HttpToolsProtocol`` (its parser callbacks, ``cycle``,
``pipeline``, ``_start_asgi_task``) and ``RequestResponseCycle.transport``; pyproject.toml pins
uvicorn's minor version and tests/unit/edge/test_protocol.py fails if those assumptions break.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Final, cast

import httptools
from uvicorn._types import ASGI3Application, HTTPScope
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from guard.edge.requestid import new_request_id
from guard.errors import Refusal, render

REFUSAL_KEY: Final = "guard.protocol_refusal"
DETAIL_KEY: Final = "guard.protocol_detail"
# Request-line bytes beyond the target ("OPTIONS ", " HTTP/1.1\r\n") and the final CRLF.
HEAD_SLACK: Final = 1024
HELD_BELOW: Final = 16 * 1024  # an answer's write this small may wait for the next one
MAX_SHOWN_PATH: Final = 256
_METHOD: Final = re.compile(rb"[\r\n]*([!#$%&'*+.^_`|~0-9A-Za-z-]{1,20})")
_SHOWN_PATH: Final = re.compile(rb"/[\x21-\x7e]*")
# Parser errors about how the body is delimited: the request smuggling family.
_FRAMING: Final = re.compile(r"content-length|transfer-encoding|chunk", re.I)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ProtocolLimits:
    """What one connection may do before a request reaches the application."""

    header_timeout: float = 10.0
    max_header_count: int = 100
    max_header_size: int = 32 * 1024
    max_url_length: int = 16 * 1024
    max_query_params: int = 1000
    max_connections_per_client: int = 100
    trusted_proxies: tuple[str, ...] = ()
    # A refused connection: how long, and how much, of what the client still sends is read and
    # dropped after the answer, before the socket is closed.
    linger_seconds: float = 2.0
    linger_bytes: int = 1024**2


class ProtocolRefusal(Exception):
    """Raised inside a parser callback: httptools stops and reports it as the error's context."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def build_protocol(limits: ProtocolLimits) -> type[GuardHttpProtocol]:
    """A protocol class for one server: its limits, and its own count of connections per
    address (uvicorn is given the class and makes one instance per connection)."""

    class BoundHttpProtocol(GuardHttpProtocol):
        pass

    BoundHttpProtocol.limits = limits
    BoundHttpProtocol.trusted = tuple(
        ipaddress.ip_network(p, strict=False) for p in limits.trusted_proxies
    )
    BoundHttpProtocol.open_by_client = {}
    return BoundHttpProtocol


def classify_parser_error(exc: httptools.HttpParserError) -> Refusal:
    """The refusal for a request httptools could not parse."""
    if isinstance(exc.__context__, ProtocolRefusal):
        return Refusal(exc.__context__.reason, exc.__context__.detail)
    message = str(exc)
    # llhttp's own words about the caller's bytes; an error in uvicorn's callbacks (an unusual
    # URL) is not shown.
    callback = isinstance(exc, httptools.HttpParserCallbackError)
    detail = message if message.isascii() and message.isprintable() and not callback else ""
    reason = "invalid_body_framing" if _FRAMING.search(detail) else "malformed_request"
    return Refusal(reason, f"({detail[:100]})" if detail else "")


class GuardHttpProtocol(HttpToolsProtocol):
    limits: ClassVar[ProtocolLimits] = ProtocolLimits()
    trusted: ClassVar[tuple[Network, ...]] = ()
    open_by_client: ClassVar[dict[str, int]] = {}

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.counted: str | None = None  # the address this connection is counted under
        self.phase = "idle"  # idle (between requests), head, body (until the message ends)
        self.head_bytes = 0  # bytes read since the current head began (per read)
        self.uncertain_read = False  # this read began in a message body: not counted
        self.prefix = b""  # the first bytes of the current head, for the method
        self.prefix_open = False
        self.header_size = 0
        # Read per header: kept on the instance rather than looked up through ``limits``.
        self.max_header_count = self.limits.max_header_count
        self.max_header_size = self.limits.max_header_size
        self.message_has_cycle = False
        self.feeding = False
        self.deferred: list[tuple[RequestResponseCycle, ASGI3Application]] = []
        self.answers: _CoalescingTransport  # what answers are written to (connection_made)
        self.refused = False  # nothing more is parsed on this connection
        self.lingering = False
        self.discarded = 0
        # The head's deadline is kept as a time; one timer fires at or before it and looks
        # (re-armed while the deadline moved on), so a keep-alive request costs no timer.
        self.header_deadline: float | None = None
        self.header_timer: asyncio.TimerHandle | None = None
        self.linger_timer: asyncio.TimerHandle | None = None

    # The connection.

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.answers = _CoalescingTransport(transport, self.loop)
        address = self.client[0] if self.client else ""  # none on a Unix socket: not counted
        if address and not self._is_trusted(address):
            self.counted = address
            self.open_by_client[address] = open_now = self.open_by_client.get(address, 0) + 1
            if open_now > self.limits.max_connections_per_client:
                limit = self.limits.max_connections_per_client
                self._refuse_head(Refusal("too_many_connections", f"(limit {limit})"), False)
                return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.header_timer, self.linger_timer):
            if timer is not None:
                timer.cancel()
        self.header_timer = self.linger_timer = None
        self.header_deadline = None
        if self.counted is not None:
            left = self.open_by_client.get(self.counted, 1) - 1
            if left > 0:
                self.open_by_client[self.counted] = left
            else:
                self.open_by_client.pop(self.counted, None)
            self.counted = None
        super().connection_lost(exc)

    def eof_received(self) -> None:
        if self.lingering:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            self.discarded += len(data)
            if self.lingering and self.discarded > self.limits.linger_bytes:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        if self.phase == "idle":
            self.prefix, self.prefix_open = data[:24], True
        elif self.prefix_open and len(self.prefix) < 24:
            self.prefix += data[: 24 - len(self.prefix)]
        self.uncertain_read = self.phase == "body"
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An upgrade other than WebSocket (refused in on_headers_complete), or CONNECT
            # (refused there too): the request was served as plain HTTP/1.1, and the parser
            # reads nothing after it; the connection closes once it is answered.
            pass
        except httptools.HttpParserError as exc:
            self._parser_failed(classify_parser_error(exc))
        finally:
            self.feeding = False
        if self.deferred:
            deferred, self.deferred = self.deferred, []
            for cycle, app in deferred:
                super()._start_asgi_task(cycle, app)
        if self.refused or self.phase == "body" or self.uncertain_read:
            return
        self.head_bytes += len(data)
        if self.head_bytes > self.limits.max_url_length + self.limits.max_header_size + HEAD_SLACK:
            self._refuse_head(Refusal("headers_too_large", self._size_detail()), True)

    # Parser callbacks.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.phase = "head"
        self.header_size = 0
        self.message_has_cycle = False

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_length:
            limit = self.limits.max_url_length
            raise ProtocolRefusal("uri_too_long", f"(limit {limit} bytes)")

    def on_header(self, name: bytes, value: bytes) -> None:
        # The fields so far are uvicorn's list of them (emptied when a message begins).
        self.header_size = size = self.header_size + len(name) + len(value) + 4  # "name: value\r\n"
        if len(self.headers) >= self.max_header_count:
            limit = self.max_header_count
            raise ProtocolRefusal("headers_too_large", f"(limit {limit} header fields)")
        if size > self.max_header_size:
            raise ProtocolRefusal("headers_too_large", self._size_detail())
        HttpToolsProtocol.on_header(self, name, value)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self._validate_head()
        self.phase = "body"
        self.head_bytes = 0
        self.prefix_open = False
        super().on_headers_complete()
        self.cycle.transport = self.answers
        self.message_has_cycle = True
        if self.parser.should_upgrade():
            self.cycle.keep_alive = False  # the parser reads nothing after an upgrade request

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.phase = "idle"
        # The rest of this read starts the next request: not counted, and its method unknown.
        self.uncertain_read = True
        self.prefix, self.prefix_open = b"", False

    def on_response_complete(self) -> None:
        self.answers.flush()  # a complete answer is all in the transport, whoever closes it
        if self.refused:  # a refusal waits for the requests before it, then closes
            self.server_state.total_requests += 1
            if self.pipeline and not self.lingering:
                cycle, app = self.pipeline.pop()
                super()._start_asgi_task(cycle, app)
            return
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # A request whose head was parsed in this read starts only once the whole read parsed:
        # if the parser fails later in the same read (an invalid Transfer-Encoding is reported
        # after the head), the request is refused instead of served.
        if self.feeding:
            self.deferred.append((cycle, app))
        else:
            super()._start_asgi_task(cycle, app)

    # What the gateway adds.

    def _validate_head(self) -> None:
        url: bytes = self.url
        # Origin-form, or absolute-form (RFC 9112 3.2.2: a server must accept it; uvicorn keeps
        # only its path, and the Host header is what the gateway checks). Authority-form
        # (CONNECT) and asterisk-form (OPTIONS *) are for proxies and servers MLflow is not.
        if not url.startswith(b"/") and not url[:8].lower().startswith((b"http://", b"https://")):
            detail = "(the request target must be a path beginning with '/')"
            raise ProtocolRefusal("malformed_request", detail)
        if b"#" in url:
            raise ProtocolRefusal("malformed_request", "(the request target holds a '#')")
        if self.parser.get_http_version() not in ("1.0", "1.1"):
            raise ProtocolRefusal("malformed_request", "(only HTTP/1.0 and HTTP/1.1 are served)")
        query = url.partition(b"?")[2]
        if query and query.count(b"&") + 1 > self.limits.max_query_params:
            limit = self.limits.max_query_params
            raise ProtocolRefusal("too_many_parameters", f"(limit {limit})")
        if self.parser.should_upgrade():
            if self._get_upgrade() == b"websocket":
                raise ProtocolRefusal("websocket_not_served")
            # Another upgrade (h2c) is served as plain HTTP/1.1, but llhttp takes whatever
            # follows the head as the new protocol's bytes: a body would never reach the
            # application, which would see a different request than the one sent.
            if any(
                name == b"transfer-encoding" or (name == b"content-length" and value != b"0")
                for name, value in self.headers
            ):
                raise ProtocolRefusal("malformed_request", "(an upgrade request with a body)")

    def _should_upgrade(self) -> bool:
        return False  # MLflow serves no WebSocket; the request is refused, never handed over

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def _size_detail(self) -> str:
        return f"(limit {self.limits.max_header_size} bytes)"

    def _arm_header_timer(self) -> None:
        """The next request head must be complete ``header_timeout`` seconds from now."""
        self.header_deadline = deadline = self.loop.time() + self.limits.header_timeout
        if self.header_timer is None:  # a timer already set fires earlier, and looks again
            self.header_timer = self.loop.call_at(deadline, self._header_timer_fired)

    def _cancel_header_timer(self) -> None:
        self.header_deadline = None  # a timer still set finds no deadline when it fires

    def _header_timer_fired(self) -> None:
        self.header_timer = None
        deadline = self.header_deadline
        if deadline is None:
            return
        if self.loop.time() < deadline:  # re-armed since this timer was set
            self.header_timer = self.loop.call_at(deadline, self._header_timer_fired)
            return
        self._header_timeout()

    def _header_timeout(self) -> None:
        self.header_deadline = None
        if self.refused or self.transport.is_closing():
            return
        if self.phase != "head":  # nothing of a next request arrived: an idle connection
            self.transport.close()
            return
        detail = f"(limit {self.limits.header_timeout:g} s)"
        self._refuse_head(Refusal("header_timeout", detail), True)

    def _parser_failed(self, refusal: Refusal) -> None:
        """The parser stopped. Refuse the request it was reading: with its own scope if its head
        was complete, else with what is known of it."""
        if not self.message_has_cycle or self.phase == "idle":
            self._refuse_head(refusal, True)
            return
        cycle = self.cycle
        pending = [(c, a) for c, a in self.deferred if c is cycle]
        queued = [(c, a) for c, a in self.pipeline if c is cycle]
        if pending or queued:  # not started yet: refuse it instead of serving it
            self.deferred = [(c, a) for c, a in self.deferred if c is not cycle]
            for item in queued:
                self.pipeline.remove(item)
            self._refuse(dict(cycle.scope), refusal, queue=bool(queued))
            return
        # Its application is already running (a chunked body broke later): it sees the client
        # disconnect, and the refusal is sent here if no answer has started yet.
        self.refused = True
        self.flow.pause_reading()
        if cycle.response_started:
            self.answers.close()
            return
        scope = cast(dict[str, Any], cycle.scope)
        scope[REFUSAL_KEY] = refusal.reason
        scope[DETAIL_KEY] = refusal.detail
        cycle.response_started = cycle.response_complete = True
        cycle.disconnected = True
        cycle.message_event.set()
        guard = scope.get("guard")
        request_id = getattr(guard, "request_id", "") or new_request_id()
        self.answers.write(self._encode(refusal, request_id))
        self._linger()

    def _refuse_head(self, refusal: Refusal, with_request: bool) -> None:
        """Refuse a request whose head did not complete (or, without ``with_request``, before
        anything was read): a minimal scope, with the method and path as far as they parsed."""
        scope = self._fresh_scope()
        if with_request and self.phase == "head":
            scope["headers"] = list(self.headers)
            url: bytes = self.url
            if url:
                scope["method"] = self.parser.get_method().decode("ascii", "replace")
            elif match := _METHOD.match(self.prefix):
                scope["method"] = match.group(1).decode("ascii")
            if path := _SHOWN_PATH.match(url.partition(b"?")[0].partition(b"#")[0]):
                raw = path.group(0)[:MAX_SHOWN_PATH]
                scope["path"], scope["raw_path"] = raw.decode("ascii"), raw
        previous = self.cycle
        self._refuse(scope, refusal, queue=previous is not None and not previous.response_complete)

    def _fresh_scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": self.root_path,
            "headers": [],
            "state": self.app_state.copy(),
            "method": "",
            "path": "",
            "raw_path": b"",
            "query_string": b"",
        }

    def _refuse(self, scope: dict[str, Any], refusal: Refusal, *, queue: bool) -> None:
        """Run the application on ``scope`` marked as refused (after the requests before it, if
        ``queue``), then close the connection."""
        self.refused = True
        self._cancel_header_timer()
        self.flow.pause_reading()  # until the answer is out; then drained while lingering
        scope[REFUSAL_KEY] = refusal.reason
        scope[DETAIL_KEY] = refusal.detail
        cycle = RequestResponseCycle(
            scope=cast(HTTPScope, scope),
            transport=_LingeringTransport(self),
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=False,
            on_response=self.on_response_complete,
        )
        cycle.more_body = False
        self.cycle = cycle
        if queue:
            self.pipeline.appendleft((cycle, self.app))
        else:
            self._start_asgi_task(cycle, self.app)

    def _encode(self, refusal: Refusal, request_id: str) -> bytes:
        content_type, body = render(refusal, request_id, as_html=False)
        headers = [
            *self.server_state.default_headers,
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-guard-reason", refusal.reason.encode()),
            (b"x-request-id", request_id.encode()),
            (b"connection", b"close"),
        ]
        lines = [STATUS_LINE[refusal.status], *(k + b": " + v + b"\r\n" for k, v in headers)]
        return b"".join([*lines, b"\r\n", body])

    def _linger(self) -> None:
        """Send what is written and a FIN; read and drop what the client still sends for a
        moment (bounded in time and bytes), so it reads the answer rather than a reset."""
        if self.lingering or self.transport.is_closing():
            return
        self.lingering = True
        self.answers.end()
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()
        self.linger_timer = self.loop.call_later(self.limits.linger_seconds, self.transport.close)


class _LingeringTransport(asyncio.Transport):
    """The transport a refusal's answer is written to: closing it lingers (see ``_linger``)."""

    def __init__(self, protocol: GuardHttpProtocol) -> None:
        super().__init__()
        self.protocol = protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.protocol.answers.write(data)

    def is_closing(self) -> bool:
        return self.protocol.lingering or self.protocol.transport.is_closing()

    def close(self) -> None:
        self.protocol._linger()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.protocol.transport.get_extra_info(name, default)


class _CoalescingTransport(asyncio.Transport):
    """The transport a connection's answers are written to. uvicorn writes an answer's status
    line and headers on ``http.response.start`` and its body apart: with TCP_NODELAY two
    segments, two wakes of the client and a second ``send`` for every answer. Here a small
    write waits for the next one (its body) and both go out in one ``send``; or it goes out
    alone when the event loop's current turn ends, or when its answer is complete
    (``on_response_complete``), so nothing is held once uvicorn may close the connection
    itself (shutdown, the keep-alive timeout). At most one write waits. Once ``end`` is called
    (a refusal's FIN), nothing more is written."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.transport = transport
        self.loop = loop
        self.held: bytes | None = None
        self.ended = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.ended:
            return
        held = self.held
        if held is not None:
            self.held = None
            self.transport.writelines([held, data])
        elif len(data) < HELD_BELOW and not self.transport.is_closing():
            # Kept as bytes: a caller may reuse its buffer once write returns.
            self.held = data if isinstance(data, bytes) else bytes(data)
            self.loop.call_soon(self.flush)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        held, self.held = self.held, None
        if held is not None and not self.transport.is_closing():
            self.transport.write(held)

    def end(self) -> None:
        """What is held goes out; later writes are dropped."""
        self.flush()
        self.ended = True

    def is_closing(self) -> bool:
        return self.ended or self.transport.is_closing()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)
