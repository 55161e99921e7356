"""The protocol layer (guard.edge.protocol) through a real uvicorn serving the gateway (fake
MLflow), driven with raw sockets: what httptools would refuse in plain text, the limits, the
deadline and the connection cap are answered in the gateway's error shape and recorded in the
audit trail."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from guard.app import Gateway, build_gateway, uvicorn_options
from guard.audit.store import AuditStore, Filters
from guard.config import load_settings
from guard.edge.context import RequestContextMiddleware
from guard.edge.protocol import DETAIL_KEY, REFUSAL_KEY, GuardHttpProtocol
from guard.errors import REASONS
from tests.conftest import free_port
from tests.servers import ServerThread, read_request_body, send_response

ADMIN = "mlg_" + "b" * 43
KEY = "k" * 40
API = "/api/2.0/mlflow/experiments/get?experiment_id=1"
AJAX = "/ajax-api/2.0/mlflow/experiments/get?experiment_id=1"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


# The uvicorn internals guard.edge.protocol relies on (pinned in pyproject.toml).


def test_the_pinned_versions_are_installed() -> None:
    assert uvicorn.__version__.startswith("0.55.")
    assert httptools.__version__.startswith("0.9.")


def test_uvicorn_internals_the_protocol_overrides_still_exist() -> None:
    for name in (
        "connection_made", "connection_lost", "eof_received", "data_received",
        "on_message_begin", "on_url", "on_header", "on_headers_complete", "on_message_complete",
        "on_response_complete", "_start_asgi_task", "_should_upgrade", "_get_upgrade",
        "_unset_keepalive_if_required",
    ):  # fmt: skip
        assert callable(getattr(HttpToolsProtocol, name)), name
    # Refusals are built as uvicorn builds a request's cycle.
    params = set(inspect.signature(RequestResponseCycle.__init__).parameters)
    assert params == {
        "self", "scope", "transport", "flow", "logger", "access_logger", "access_log",
        "default_headers", "message_event", "expect_100_continue", "keep_alive", "on_response",
    }  # fmt: skip
    assert 431 in httptools_impl.STATUS_LINE and 408 in httptools_impl.STATUS_LINE
    # The attributes read and written per connection and per request.
    source = inspect.getsource(HttpToolsProtocol)
    for attribute in (
        "self.parser =", "self.pipeline", "self.cycle =", "self.flow =", "self.url",
        "self.headers =", "self.scope =", "self.server_state", "self.app_state",
        "self.asgi_version", "self.root_path", "self.client =", "self.server =", "self.scheme =",
    ):  # fmt: skip
        assert attribute in source, attribute
    # Pipelined requests wait in self.pipeline (appendleft/pop) and start via _start_asgi_task.
    assert "self.pipeline.appendleft" in inspect.getsource(HttpToolsProtocol.on_headers_complete)
    assert "self._start_asgi_task(" in inspect.getsource(HttpToolsProtocol.on_headers_complete)
    assert "self.pipeline.pop()" in inspect.getsource(HttpToolsProtocol.on_response_complete)
    # A cycle sends on self.transport and closes it when not keep-alive; it asks nothing else
    # of it (the gateway hands it a transport of its own: _CoalescingTransport).
    send = inspect.getsource(RequestResponseCycle.send)
    assert "self.transport.close()" in send and "if self.disconnected:" in send
    used = set(re.findall(r"self\.transport\.(\w+)", inspect.getsource(RequestResponseCycle)))
    assert used == {"write", "close", "is_closing"}, used
    assert "ws_protocol_class is None" in inspect.getsource(HttpToolsProtocol._should_upgrade_to_ws)


def test_uvicorn_takes_the_protocol_class_as_is() -> None:
    settings = load_settings({}, {}, None).settings
    options = uvicorn_options(settings)
    config = uvicorn.Config(lambda: None, **options)  # type: ignore[arg-type]
    config.load()
    assert issubclass(config.http_protocol_class, GuardHttpProtocol)
    assert config.ws_protocol_class is None


def test_httptools_reports_a_callback_error_with_its_cause_and_buffers_partial_headers() -> None:
    class Boom(Exception):
        pass

    class Callbacks:
        seen = 0

        def on_header(self, name: bytes, value: bytes) -> None:
            raise Boom

    parser = httptools.HttpRequestParser(Callbacks())
    with pytest.raises(httptools.HttpParserCallbackError) as caught:
        parser.feed_data(b"GET / HTTP/1.1\r\nA: b\r\n\r\n")
    assert isinstance(caught.value.__context__, Boom)
    # A header line without its end is held by httptools, not handed to on_header: the
    # protocol must count the bytes of an unfinished head itself.
    calls: list[bytes] = []

    class Counting:
        def on_header(self, name: bytes, value: bytes) -> None:
            calls.append(name)

    parser = httptools.HttpRequestParser(Counting())
    parser.feed_data(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 100_000)
    assert calls == []


# The gateway under uvicorn, with the protocol uvicorn_options installs.


async def fake_mlflow(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await read_request_body(receive)
    body = b"3.17.2" if scope["path"] == "/version" else b'{"experiment": {"name": "e1"}}'
    await send_response(send, 200, body)


@dataclass
class Running:
    gateway: Gateway
    port: int

    def records(self, **filters: Any) -> list[dict[str, Any]]:
        store = AuditStore(self.gateway.engine)
        return [r for _, r in store.query(Filters(**filters), limit=10_000)]

    def outcome(self, request_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = self.records(request_id=request_id, kind="outcome")
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no outcome record for {request_id}")


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServerThread]:
    with ServerThread(fake_mlflow, lifespan="off") as server:
        yield server


class Servers:
    """Gateways under uvicorn, with the options (and so the protocol) the CLI uses."""

    def __init__(self, upstream: ServerThread, data_dir: Path) -> None:
        self.upstream = upstream
        self.data_dir = data_dir
        self.started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(self, **flags: str) -> Running:
        data_dir = self.data_dir / str(len(self.started))
        values = {"upstream.url": self.upstream.url, "storage.data_dir": str(data_dir)} | flags
        settings = load_settings(values, {}, None).settings
        gateway = build_gateway(
            settings, {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": ADMIN, "MLFLOW_GUARD_SECRET_KEY": KEY}
        )
        port = free_port()
        options = uvicorn_options(settings)
        config = uvicorn.Config(gateway, host="127.0.0.1", port=port, **options)  # type: ignore[arg-type]
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        self.started.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.02)
        return Running(gateway, port)

    def stop(self) -> None:
        for server, thread in self.started:
            server.should_exit = True
            thread.join(timeout=15)


@pytest.fixture
def serve(upstream: ServerThread, tmp_path: Path) -> Iterator[Any]:
    servers = Servers(upstream, tmp_path)
    yield servers.start
    servers.stop()


@pytest.fixture(scope="module")
def running(upstream: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One gateway for the tests that stay under the flood limit (set out of their way)."""
    servers = Servers(upstream, tmp_path_factory.mktemp("protocol"))
    yield servers.start(**{"gateway.failed_login_limit": "1000000"})
    servers.stop()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def refusal(self) -> dict[str, Any]:
        assert self.headers["content-type"] == "application/json"
        payload: dict[str, Any] = json.loads(self.body)
        assert set(payload) == {"error_code", "message", "reason", "request_id"}
        assert payload["reason"] == self.headers["x-guard-reason"]
        assert payload["request_id"] == self.headers["x-request-id"]
        info = REASONS[payload["reason"]]
        assert (self.status, payload["error_code"]) == (info.status, info.error_code)
        assert payload["message"].startswith(info.message)
        return payload


def parse(raw: bytes) -> list[Answer]:
    """Every response in ``raw`` (Content-Length framed, as the gateway's own answers are)."""
    answers = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        answers.append(Answer(status, headers, rest[:length]))
        raw = rest[length:]
    return answers


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_all(sock: socket.socket) -> bytes:
    """Until the gateway closes the connection (bounded by the socket's timeout)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def exchange(port: int, request: bytes) -> list[Answer]:
    with connect(port) as sock:
        sock.sendall(request)
        return parse(read_all(sock))


def refused(running: Running, request: bytes, reason: str, method: str = "") -> dict[str, Any]:
    """Send ``request`` alone on a connection: one refusal with ``reason``, closed after, and
    recorded as an unauthenticated outcome."""
    (answer,) = exchange(running.port, request)
    assert answer.headers["x-guard-reason"] == reason
    assert answer.headers["connection"] == "close"
    assert answer.status == REASONS[reason].status
    if method != "HEAD":
        answer.refusal()
    record = running.outcome(answer.headers["x-request-id"])
    assert record["reason"] == reason and record["status"] == answer.status
    assert record["principal"] == "" and record["client"] == "127.0.0.1"
    assert record["decision"] in ("deny", "error")
    return record


def head(method: str, target: str, *lines: str) -> bytes:
    text = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n" + "".join(f"{x}\r\n" for x in lines)
    return text.encode("latin-1") + b"\r\n"


# What httptools refuses: every one answered in the gateway's shape and recorded.

MALFORMED = {
    # Request smuggling: how the body is delimited must be unambiguous.
    "te_and_cl": ("POST", ["Content-Length: 5", "Transfer-Encoding: chunked"], b"0\r\n\r\n",
                  "invalid_body_framing"),
    "te_twice": ("POST", ["Transfer-Encoding: chunked", "Transfer-Encoding: identity"],
                 b"0\r\n\r\n", "invalid_body_framing"),
    "te_not_chunked_last": ("POST", ["Transfer-Encoding: chunked, gzip"], b"",
                            "invalid_body_framing"),
    "te_unknown": ("POST", ["Transfer-Encoding: xchunked"], b"0\r\n\r\n", "invalid_body_framing"),
    "te_space_before_colon": ("POST", ["Transfer-Encoding : chunked"], b"0\r\n\r\n",
                              "malformed_request"),
    "cl_twice": ("POST", ["Content-Length: 2", "Content-Length: 3"], b"abc",
                 "invalid_body_framing"),
    "cl_signed": ("POST", ["Content-Length: +3"], b"abc", "invalid_body_framing"),
    "cl_hex": ("POST", ["Content-Length: 0x3"], b"abc", "invalid_body_framing"),
    "bad_chunk_size": ("POST", ["Transfer-Encoding: chunked"], b"ZZ\r\nabc\r\n0\r\n\r\n",
                       "invalid_body_framing"),
    # Headers.
    "obsolete_folding": ("GET", ["X-A: b", " c"], b"", "malformed_request"),
    "control_char_in_value": ("GET", ["X-A: b\x01c"], b"", "malformed_request"),
    "control_char_in_name": ("GET", ["X\x01A: b"], b"", "malformed_request"),
    "nul_in_value": ("GET", ["X-A: b\x00c"], b"", "malformed_request"),
    "no_colon": ("GET", ["Authorization Bearer x"], b"", "malformed_request"),
    "bare_cr": ("GET", ["X-A: b\rX-B: c"], b"", "malformed_request"),
}  # fmt: skip


@pytest.mark.parametrize("prefix", [API, AJAX])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_are_refused_in_the_gateways_shape_and_recorded(
    running: Running, case: str, prefix: str
) -> None:
    method, lines, body, reason = MALFORMED[case]
    record = refused(running, head(method, prefix, *lines) + body, reason)
    assert record["method"] == method
    assert record["path"] == prefix.partition("?")[0]


@pytest.mark.parametrize("method", METHODS)
def test_folding_and_control_characters_are_refused_for_every_method(
    running: Running, method: str
) -> None:
    refused(running, head(method, API, "X-A: b", " c"), "malformed_request", method)
    refused(running, head(method, AJAX, "X-A: \x7f"), "malformed_request", method)


@pytest.mark.parametrize(
    ("request_line", "method"),
    [
        (b"GETX /api/2.0/mlflow/experiments/get HTTP/1.1", "GETX"),
        (b"G\x01T /api/2.0/mlflow/experiments/get HTTP/1.1", "G"),
        (b"GET api/2.0/mlflow/experiments/get HTTP/1.1", "GET"),
        (b"GET http://evil.example HTTP/1.1", "GET"),
        (b"GET ftp://evil.example/api/2.0/mlflow/experiments/get HTTP/1.1", "GET"),
        (b"GET //evil.example/api/2.0/mlflow/experiments/get#x HTTP/1.1", "GET"),
        (b"CONNECT evil.example:443 HTTP/1.1", "CONNECT"),
        (b"OPTIONS * HTTP/1.1", "OPTIONS"),
        (b"GET /ajax-api/2.0/mlflow/experiments/get#x HTTP/1.1", "GET"),
        (b"GET /api/2.0/mlflow/experiments/get\xff HTTP/1.1", "GET"),
        (b"GET /api/2.0/mlflow/experiments/get HTTP/1.2", "GET"),
        (b"GET /api/2.0/mlflow/experiments/get HTTP/0.9", "GET"),
        (b"GET /api/2.0/mlflow/experiments/get", "GET"),
        (b"PRI * HTTP/2.0", "PRI"),
        (b"GET /api/2.0/mlflow/experiments/get HTTP/1.1\nX-A: b", "GET"),
    ],
)
def test_bad_request_lines_are_refused_and_recorded(
    running: Running, request_line: bytes, method: str
) -> None:
    record = refused(running, request_line + b"\r\nHost: localhost\r\n\r\n", "malformed_request")
    assert record["method"] in (method, "")
    assert record["path"] == "" or record["path"].startswith("/")  # as far as it parsed


def test_a_websocket_upgrade_is_refused_and_recorded(running: Running) -> None:
    for prefix in (API, AJAX, "/"):
        upgrade = head(
            "GET", prefix, "Connection: Upgrade", "Upgrade: websocket",
            "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        )  # fmt: skip
        record = refused(running, upgrade, "websocket_not_served")
        assert record["method"] == "GET" and record["path"] == prefix.partition("?")[0]


def test_other_upgrades_are_served_as_http_and_the_connection_closes(running: Running) -> None:
    h2c = ["Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABk"]
    (answer,) = exchange(running.port, head("GET", "/guard/health", *h2c))
    assert answer.status == 200 and answer.headers["connection"] == "close"
    # With a body, llhttp would take the body for the new protocol's bytes: refused.
    for framing in ("Content-Length: 2", "Transfer-Encoding: chunked"):
        refused(running, head("POST", API, *h2c, framing) + b"{}", "malformed_request")


def test_a_malformed_request_after_a_good_one_on_the_same_connection(running: Running) -> None:
    good = head("GET", "/guard/health")
    first, second = exchange(running.port, good + b"GETX / HTTP/1.1\r\n\r\n")
    assert first.status == 200 and "connection" not in first.headers
    assert second.status == 400 and second.refusal()["reason"] == "malformed_request"
    running.outcome(second.headers["x-request-id"])
    # The same, with the bad request in a later read, and a bad body framing.
    with connect(running.port) as sock:
        sock.sendall(good)
        time.sleep(0.2)
        sock.sendall(head("POST", API, "Content-Length: 1", "Content-Length: 2") + b"ab")
        first, second = parse(read_all(sock))
    assert first.status == 200
    assert second.refusal()["reason"] == "invalid_body_framing"
    assert running.outcome(second.headers["x-request-id"])["path"] == API.partition("?")[0]


def test_a_broken_chunk_under_a_running_request_is_refused_and_recorded(running: Running) -> None:
    """The application is already reading the body when the parser fails: it sees the client
    go, the client gets the refusal, and the record says why (with who it was)."""
    with connect(running.port) as sock:
        sock.sendall(
            head("POST", "/api/2.0/mlflow/experiments/create", f"Authorization: Bearer {ADMIN}",
                 "Content-Type: application/json", "Transfer-Encoding: chunked")
            + b"5\r\n{\"nam\r\n"
        )  # fmt: skip
        time.sleep(0.3)
        sock.sendall(b"zz\r\n\r\n")
        (answer,) = parse(read_all(sock))
    assert answer.refusal()["reason"] == "invalid_body_framing"
    record = running.outcome(answer.headers["x-request-id"])
    assert record["reason"] == "invalid_body_framing" and record["status"] == 400
    assert record["principal"] == "token:admin"


# Limits: they bite while the head arrives.


def test_header_count_and_size_limits(serve: Any) -> None:
    running = serve(**{"gateway.max_header_count": "10", "gateway.max_header_size": "1KiB"})
    fields = [f"X-{i}: v" for i in range(9)]  # with Host: 10
    assert exchange(running.port, head("GET", "/guard/health", *fields))[0].status == 200
    record = refused(running, head("GET", API, *fields, "X-9: v"), "headers_too_large")
    assert record["path"] == "/api/2.0/mlflow/experiments/get"
    # Size: one large field, or many that add up; both route prefixes, every method.
    big = "X-Big: " + "a" * 1100
    for method in METHODS:
        refused(running, head(method, AJAX, big), "headers_too_large", method)
    refused(running, head("POST", API, *[f"X-{i}: {'a' * 120}" for i in range(9)]),
            "headers_too_large")  # fmt: skip
    fits = "X-Big: " + "a" * (1024 - 4 - len("X-Big: ") - len("host: localhost") - 4)
    assert exchange(running.port, head("GET", "/guard/health", fits))[0].status == 200


def stream_until_cut_off(sock: socket.socket, limit: int) -> int:
    """Send ``limit`` bytes at most; how many went out before the gateway cut the stream."""
    sent = 0
    try:
        while sent < limit:
            sock.sendall(b"a" * 16384)
            sent += 16384
    except OSError:  # reset once the gateway stops draining
        pass
    return sent


def test_an_endless_header_line_is_cut_off_while_it_arrives(serve: Any) -> None:
    running = serve(**{"gateway.max_header_size": "4KiB", "gateway.max_url_length": "1KiB"})
    with connect(running.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Endless: ")
        # It drains at most 1 MiB after answering; 64 MiB would be buffered without the limit.
        assert stream_until_cut_off(sock, 64 * 1024**2) < 16 * 1024**2


def test_the_url_length_limit(serve: Any) -> None:
    running = serve(**{"gateway.max_url_length": "1KiB"})
    for prefix in ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/"):
        target = prefix + "experiments/get?experiment_id=" + "1" * 1024
        record = refused(running, head("GET", target), "uri_too_long")
        assert record["path"].startswith(prefix) and "query" not in record
    fits = "/guard/health?" + "a" * (1024 - len("/guard/health?"))
    assert exchange(running.port, head("GET", fits))[0].status == 200


def test_the_query_parameter_limit(serve: Any) -> None:
    running = serve(**{"gateway.max_query_params": "20"})
    many = "&".join(f"experiment_id={i}" for i in range(21))
    for prefix in ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/"):
        for spelling in (many, many.replace("&", "&&"), "&" * 20 + "a=1"):
            record = refused(running, head("GET", f"{prefix}experiments/get?{spelling}"),
                             "too_many_parameters")  # fmt: skip
            assert "query" not in record  # thousands of parameters are not copied in
    twenty = "&".join(f"a={i}" for i in range(20))
    assert exchange(running.port, head("GET", f"/guard/health?{twenty}"))[0].status == 200


# The header deadline and the connection cap.


def test_a_slow_head_gets_408_and_an_idle_connection_is_closed(serve: Any) -> None:
    running = serve(**{"gateway.header_timeout": "0.5s"})
    with connect(running.port) as sock:
        sock.sendall(b"GET /api/2.0/mlflow/experiments/get HTTP/1.1\r\nHost: loc")
        (answer,) = parse(read_all(sock))
    assert answer.refusal()["reason"] == "header_timeout" and answer.status == 408
    record = running.outcome(answer.headers["x-request-id"])
    assert record["path"] == "/api/2.0/mlflow/experiments/get" and record["status"] == 408
    with connect(running.port) as sock:  # trickling does not extend the deadline
        for byte in b"GET /ajax-api/2.0/mlflow/experiments/get HTTP/1.1\r\nHost: localhost\r\n":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
        data = read_all(sock)
    assert parse(data)[0].headers["x-guard-reason"] == "header_timeout"
    with connect(running.port) as sock:  # nothing sent: closed, nothing to answer
        assert read_all(sock) == b""
    with connect(running.port) as sock:  # after a response, the next head has its own deadline
        sock.sendall(head("GET", "/guard/health"))
        time.sleep(0.3)
        sock.sendall(head("GET", "/guard/health", "Connection: close"))
        assert [a.status for a in parse(read_all(sock))] == [200, 200]


def read_one(sock: socket.socket) -> bytes:
    """One answer (with a Content-Length) from a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head_, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in head_.split(b"\r\n")[1:])
    while len(body) < int(fields[b"content-length"]):
        chunk = sock.recv(65536)
        assert chunk, data
        body += chunk
    return head_


def test_each_keep_alive_head_gets_the_whole_deadline_and_a_later_slow_head_a_408(
    serve: Any,
) -> None:
    """The header deadline moves with every answer (its timer re-arms, rather than being set
    anew for every request): requests past the first deadline are served, then a slow head on
    the same connection is still cut off."""
    running = serve(**{"gateway.header_timeout": "1s"})
    with connect(running.port) as sock:
        for _ in range(3):  # 0 s, ~0.6 s, ~1.2 s: the last one after the first deadline
            sock.sendall(head("GET", "/guard/health"))
            assert read_one(sock).startswith(b"HTTP/1.1 200 ")
            time.sleep(0.6)
        sock.sendall(b"GET /api/2.0/mlflow/experiments/get HTTP/1.1\r\nHost: loc")
        (answer,) = parse(read_all(sock))
    assert answer.refusal()["reason"] == "header_timeout" and answer.status == 408


def test_connections_per_address_are_capped(serve: Any) -> None:
    running = serve(**{"gateway.max_connections_per_client": "3"})
    held = [connect(running.port) for _ in range(3)]
    try:
        for sock in held:  # each works
            sock.sendall(head("GET", "/guard/health"))
        for sock in held:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(0.1)
        for path in (API, AJAX):
            (answer,) = exchange(running.port, head("GET", path))
            assert answer.refusal()["reason"] == "too_many_connections" and answer.status == 429
            record = running.outcome(answer.headers["x-request-id"])
            assert record["client"] == "127.0.0.1" and record["method"] == ""
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while exchange(running.port, head("GET", "/guard/health"))[0].status != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_trusted_proxies_are_not_capped(serve: Any) -> None:
    running = serve(
        **{"gateway.max_connections_per_client": "2", "gateway.trusted_proxies": "127.0.0.1/32"}
    )
    held = [connect(running.port) for _ in range(5)]
    try:
        for sock in held:
            sock.sendall(head("GET", "/guard/health", "X-Forwarded-For: 203.0.113.9"))
        for sock in held:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        # A refusal behind the proxy is recorded (and flood-counted) for the real client.
        (answer,) = exchange(running.port, head("GET", API, "X-Forwarded-For: 203.0.113.7",
                                                "X-A: \x01"))  # fmt: skip
        record = running.outcome(answer.headers["x-request-id"])
        assert record["client"] == "203.0.113.7" and record["peer"] == "127.0.0.1"
    finally:
        for sock in held:
            sock.close()


# Floods: the refusals count like failed logins; past the limit only a summary is recorded.


def test_a_flood_of_malformed_requests_is_summarized_not_recorded_one_by_one(serve: Any) -> None:
    running = serve(**{"gateway.failed_login_limit": "3", "gateway.failed_login_interval": "1s"})
    ids = []
    for i in range(8):
        (answer,) = exchange(running.port, head("GET", f"{API}&n={i}", "X-A: \x01"))
        assert answer.refusal()["reason"] == "malformed_request"
        ids.append(answer.headers["x-request-id"])
    for request_id in ids[:3]:
        running.outcome(request_id)
    # Once the window ends, a later request writes the summary.
    deadline = time.monotonic() + 10
    while not (
        summary := [
            r for r in running.records(kind="event") if r["event"] == "unauthenticated_refusals"
        ]
    ):
        assert time.monotonic() < deadline, "no flood summary"
        time.sleep(0.3)
        exchange(running.port, head("GET", API, "X-A: \x01"))
    # The 5 past the limit, and any the loop sent before the window ended.
    assert summary[0]["unrecorded"] >= 5 and summary[0]["client"] == "127.0.0.1"
    assert summary[0]["refused"] == summary[0]["unrecorded"] + 3
    for request_id in ids[3:]:
        assert running.records(request_id=request_id) == []


# The context layer: a WebSocket scope (served by some other ASGI server) is refused and recorded.


@pytest.mark.parametrize("denial_response", [True, False])
def test_a_websocket_scope_is_refused_and_recorded(denial_response: bool) -> None:
    completed: list[Scope] = []
    sent: list[dict[str, Any]] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("a WebSocket reached the application")

    app = RequestContextMiddleware(inner, on_complete=completed.append)
    extensions = {"websocket.http.response": {}} if denial_response else {}
    scope = {"type": "websocket", "path": "/ajax-api/2.0/mlflow/x", "headers": [],
             "client": ("127.0.0.1", 5), "extensions": extensions}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    if denial_response:
        assert sent[0]["type"] == "websocket.http.response.start" and sent[0]["status"] == 403
        assert json.loads(sent[1]["body"])["reason"] == "websocket_not_served"
    else:
        assert sent == [{"type": "websocket.close", "code": 1008}]
    (record,) = completed
    assert record["type"] == "http" and record["method"] == "GET"
    assert record["guard"].refusal.reason == "websocket_not_served"
    assert record["guard"].status == 403


def test_a_protocol_refusal_never_reaches_the_application() -> None:
    completed: list[Scope] = []
    sent: list[dict[str, Any]] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("a refused request reached the application")

    app = RequestContextMiddleware(inner, on_complete=completed.append)
    scope = {"type": "http", "method": "", "path": "", "headers": [], "query_string": b"",
             "client": ("127.0.0.1", 5), REFUSAL_KEY: "headers_too_large",
             DETAIL_KEY: "(limit 5 bytes)"}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 431
    assert (b"x-guard-reason", b"headers_too_large") in sent[0]["headers"]
    body = json.loads(sent[1]["body"])
    assert body["message"].endswith("(limit 5 bytes)")
    assert completed[0]["guard"].refusal.reason == "headers_too_large"
