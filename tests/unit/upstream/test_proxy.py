"""The proxy against a real upstream socket: what MLflow receives and what the caller gets back."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.app import build_gateway
from guard.config import load_settings
from tests.conftest import free_port
from tests.servers import ServerThread, read_request_body, send_response

TOKEN = "mlg_" + "t" * 43
ENV = {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": TOKEN, "MLFLOW_GUARD_SECRET_KEY": "s" * 40}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GZIPPED = gzip.compress(b'{"compressed": true}')


class FakeMlflow:
    """Answers under any path; the query parameter ``mode`` picks the behaviour."""

    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []
        self.version = b"3.17.2"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_request_body(receive)
        if scope["path"] == "/version":
            await send_response(send, 200, self.version)
            return
        if scope["path"] == "/api/3.0/mlflow/server-info":  # the version gate's other read
            await send_response(send, 200, b'{"workspaces_enabled": false}')
            return
        name = dict(
            part.split("=", 1) for part in scope["query_string"].decode().split("&") if "=" in part
        ).get("mode", "")
        record = {
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            "body": body.hex(),
        }
        self.seen.append(record)
        headers = [(b"content-type", b"application/json")]
        payload = json.dumps(record).encode()
        if name == "slow":
            await asyncio.sleep(3)
        if name == "gzip":
            headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
            payload = GZIPPED
        headers += [
            (b"set-cookie", b"upstream_session=secret; Path=/"),
            (b"access-control-allow-origin", b"*"),
            (b"x-frame-options", b"ALLOWALL"),
            (b"server", b"fake-mlflow"),
        ]
        await send_response(send, 200, payload, headers)


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[ServerThread, FakeMlflow]]:
    fake = FakeMlflow()
    with ServerThread(fake, lifespan="off") as server:
        yield server, fake


def start_gateway(tmp_path: Path, upstream_url: str, **flags: object) -> ServerThread:
    settings = load_settings(
        {
            "upstream.url": upstream_url,
            "storage.data_dir": str(tmp_path),
            "gateway.max_body_size": "1KiB",
            "upstream.read_timeout": "1s",
            "upstream.pool_timeout": "0.5s",
            "upstream.max_connections": "2",
            **flags,
        },
        {},
        None,
    )
    assert settings.problems == []
    return ServerThread(build_gateway(settings.settings, ENV))


@pytest.fixture
def gateway(tmp_path: Path, upstream: tuple[ServerThread, FakeMlflow]) -> Iterator[str]:
    with start_gateway(tmp_path, upstream[0].url) as server:
        yield server.url


def raw_request(gateway: str, request_line: str, extra: str = "", body: str = "") -> str:
    """Send bytes no HTTP client would, and return the raw reply."""
    with socket.create_connection(("127.0.0.1", int(gateway.rsplit(":", 1)[1]))) as sock:
        sock.sendall(
            f"{request_line} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"{extra}Connection: close\r\n\r\n{body}".encode()
        )
        return sock.recv(65536).decode("latin-1")


def last(fake: FakeMlflow) -> dict[str, object]:
    """The last request forwarded for a client (not a lookup of the gateway's own)."""
    forwarded = [r for r in fake.seen if "x-forwarded-for" in header_names(r)]
    return forwarded[-1]


def header_names(record: dict[str, object]) -> list[str]:
    return [k for k, _ in record["headers"]]  # type: ignore[attr-defined]


def test_what_mlflow_receives(gateway: str, upstream: tuple[ServerThread, FakeMlflow]) -> None:
    server, fake = upstream
    spoofed = {
        "Host": "localhost:5000",
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Host": "evil.com",
        "X-Forwarded-Proto": "https",
        "Forwarded": "for=6.6.6.6",
        "X-Real-IP": "6.6.6.6",
        "X-MLflow-Assistant-Delegation": "x",
        "X-MLflow-Authorization": "Basic eA==",
        "X-MLFLOW-WORKSPACE": "other",
        "X_Forwarded_For": "6.6.6.6",
        "Origin": "http://localhost:5000",
        "Cookie": "mlflow_guard_session=abc; keep=1",
        "X-Request-Id": "spoofed",
        "X-Mlflow-Client-Version": "3.17.2",
    }
    body = b'{"experiment_id": "1", "x": "\\u00e9"}  \n'
    response = httpx.post(
        f"{gateway}/api/2.0/mlflow/runs/log-metric?b=2&a=1&a=3",
        headers={**AUTH, **spoofed, "Content-Type": "application/json"},
        content=body,
    )
    assert response.status_code == 200
    seen = last(fake)
    headers = dict(seen["headers"])  # type: ignore[arg-type]
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-host"] == "localhost:5000"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-request-id"] == response.headers["x-request-id"] != "spoofed"
    assert "cookie" not in headers  # MLflow reads no cookie; the gateway's are credentials
    assert headers["x-mlflow-client-version"] == "3.17.2"
    dropped = (
        "authorization", "forwarded", "x-real-ip", "x-mlflow-assistant-delegation",
        "x-mlflow-authorization", "x-mlflow-workspace", "x_forwarded_for", "origin",
    )  # fmt: skip
    for name in dropped:
        assert name not in headers, name
    assert header_names(seen).count("x-forwarded-for") == 1
    assert bytes.fromhex(seen["body"]) == body  # type: ignore[arg-type]
    assert headers["content-length"] == str(len(body))
    assert seen["query"] == "b=2&a=1&a=3"  # untouched, duplicates and order kept


def test_nothing_is_invented_for_mlflow(
    gateway: str, upstream: tuple[ServerThread, FakeMlflow]
) -> None:
    _, fake = upstream
    assert raw_request(gateway, "GET /api/2.0/mlflow/runs/get").startswith("HTTP/1.1 200")
    names = header_names(last(fake))
    for invented in ("user-agent", "accept", "accept-encoding", "content-type"):
        assert invented not in names
    reply = raw_request(
        gateway, "POST /api/2.0/mlflow/runs/log-metric", "Content-Length: 2\r\n", "{}"
    )
    assert reply.startswith("HTTP/1.1 200")
    assert "content-type" not in header_names(last(fake))
    assert bytes.fromhex(last(fake)["body"]) == b"{}"  # type: ignore[arg-type]


def test_what_the_caller_gets_back(gateway: str) -> None:
    response = httpx.get(f"{gateway}/api/2.0/mlflow/runs/get", headers=AUTH)
    assert response.status_code == 200
    assert "set-cookie" not in response.headers
    assert "access-control-allow-origin" not in response.headers
    assert response.headers["x-frame-options"] == "SAMEORIGIN"
    assert response.headers.get_list("x-frame-options") == ["SAMEORIGIN"]
    assert "server" not in response.headers
    assert response.headers["x-request-id"]


def test_no_cookie_jar_between_callers(
    gateway: str, upstream: tuple[ServerThread, FakeMlflow]
) -> None:
    _, fake = upstream
    # The upstream sets a cookie on every answer; the next caller must not carry it.
    with httpx.Client(headers=AUTH) as first, httpx.Client(headers=AUTH) as second:
        first.get(f"{gateway}/api/2.0/mlflow/runs/get")
        second.get(f"{gateway}/api/2.0/mlflow/runs/get")
        first.get(f"{gateway}/api/2.0/mlflow/runs/get")
    assert all("cookie" not in header_names(r) for r in fake.seen[-3:])


def test_encoded_paths_reach_mlflow_as_the_same_path(
    gateway: str, upstream: tuple[ServerThread, FakeMlflow]
) -> None:
    _, fake = upstream
    # (A path still percent-encoded after one decoding is refused: guard/edge/artifactpaths.py.)
    url = f"{gateway}/api/2.0/mlflow-artifacts/artifacts/0/r/artifacts/a%20b%25zz/%C3%A9/echo"
    assert httpx.get(url, headers=AUTH).status_code == 200
    assert last(fake)["path"] == "/api/2.0/mlflow-artifacts/artifacts/0/r/artifacts/a b%zz/é/echo"


@pytest.mark.parametrize(
    "path",
    [
        "/api/2.0/mlflow/../../ajax-api/3.0/mlflow/assistant/message",
        "/api/2.0/mlflow/%2e%2e/%2e%2e/ajax-api/3.0/mlflow/assistant/message",
        "/api/2.0/mlflow%2F..%2F..%2Fajax-api/3.0/mlflow/assistant/message",
        "//api/2.0/mlflow/runs/get",
        "/api/2.0/mlflow//runs/echo",
    ],
)
def test_traversal_never_reaches_mlflow(
    gateway: str, upstream: tuple[ServerThread, FakeMlflow], path: str
) -> None:
    _, fake = upstream
    before = len(fake.seen)
    reply = raw_request(gateway, f"GET {path}")
    assert reply.startswith("HTTP/1.1 400"), reply
    assert "path_not_canonical" in reply
    assert len(fake.seen) == before


def test_absolute_uri_request_line_cannot_choose_the_upstream_host(
    gateway: str, upstream: tuple[ServerThread, FakeMlflow]
) -> None:
    # httptools hands over only the path of an absolute-form target; the Host header is what
    # gets checked, and MLflow sees the gateway's fixed Host, never the target's authority.
    server, fake = upstream
    reply = raw_request(gateway, "GET http://evil.com/api/2.0/mlflow/runs/get")
    assert reply.startswith("HTTP/1.1 200"), reply
    headers = dict(last(fake)["headers"])  # type: ignore[arg-type]
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert headers["x-forwarded-host"] == "localhost"
    assert "evil.com" not in json.dumps(last(fake))


def test_refused_routes_never_reach_mlflow(
    gateway: str, upstream: tuple[ServerThread, FakeMlflow]
) -> None:
    _, fake = upstream
    before = len(fake.seen)
    for path in (
        "/ajax-api/3.0/mlflow/assistant/message",
        "/ajax-api/3.0/jobs/",
        "/metrics",
        "/gateway/x",
    ):
        response = httpx.post(f"{gateway}{path}", headers=AUTH, json={})
        assert response.status_code == 403, path
        assert response.json()["reason"] == "route_not_classified"
    trace = httpx.request("TRACE", f"{gateway}/api/2.0/mlflow/runs/get", headers=AUTH)
    assert trace.json()["reason"] == "route_not_classified"
    assert len(fake.seen) == before


def test_unauthenticated_requests_never_reach_mlflow(
    gateway: str, upstream: tuple[ServerThread, FakeMlflow]
) -> None:
    _, fake = upstream
    before = len(fake.seen)
    response = httpx.get(f"{gateway}/api/2.0/mlflow/runs/get")
    assert response.status_code == 401
    assert response.headers.get_list("www-authenticate")[0].startswith("Basic realm=")
    response = httpx.get(f"{gateway}/api/2.0/mlflow/runs/get", auth=("admin", "wrong"))
    assert response.json()["reason"] == "invalid_credentials"
    assert len(fake.seen) == before


def test_basic_with_token_name_as_user(gateway: str) -> None:
    assert httpx.get(f"{gateway}/api/2.0/mlflow/runs/get", auth=("admin", TOKEN)).status_code == 200
    assert httpx.get(f"{gateway}/api/2.0/mlflow/runs/get", auth=("root", TOKEN)).status_code == 401


def test_body_limit(gateway: str, upstream: tuple[ServerThread, FakeMlflow]) -> None:
    _, fake = upstream
    before = len(fake.seen)
    response = httpx.post(
        f"{gateway}/api/2.0/mlflow/runs/log-metric", headers=AUTH, content=b"x" * 1025
    )
    assert response.status_code == 413
    assert response.json()["reason"] == "body_too_large"

    def chunks() -> Iterator[bytes]:
        for _ in range(5):
            yield b"y" * 300

    response = httpx.post(
        f"{gateway}/api/2.0/mlflow/runs/log-metric", headers=AUTH, content=chunks()
    )
    assert response.status_code == 413
    assert len(fake.seen) == before
    exact = httpx.post(
        f"{gateway}/api/2.0/mlflow/runs/log-metric", headers=AUTH, content=b"z" * 1024
    )
    assert exact.status_code == 200


def test_artifact_uploads_are_not_limited_and_arrive_intact(
    gateway: str, upstream: tuple[ServerThread, FakeMlflow]
) -> None:
    _, fake = upstream
    payload = bytes(range(256)) * 4096  # 1 MiB, far over the 1 KiB buffered limit

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    url = f"{gateway}/api/2.0/mlflow-artifacts/artifacts/0/r/artifacts/echo"
    assert httpx.put(url, headers=AUTH, content=payload).status_code == 200
    assert bytes.fromhex(last(fake)["body"]) == payload  # type: ignore[arg-type]
    assert dict(last(fake)["headers"])["content-length"] == str(len(payload))  # type: ignore[arg-type]
    assert httpx.put(url, headers=AUTH, content=chunks()).status_code == 200
    assert bytes.fromhex(last(fake)["body"]) == payload  # type: ignore[arg-type]
    assert dict(last(fake)["headers"])["transfer-encoding"] == "chunked"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: 4\r\nContent-Length: 5\r\n",
    ],
)
def test_conflicting_framing_is_refused(
    gateway: str, upstream: tuple[ServerThread, FakeMlflow], framing: str
) -> None:
    _, fake = upstream
    before = len(fake.seen)
    reply = raw_request(
        gateway, "POST /api/2.0/mlflow/runs/log-metric", framing, "4\r\nabcd\r\n0\r\n\r\n"
    )
    assert reply.startswith("HTTP/1.1 400"), reply
    assert len(fake.seen) == before


def test_content_encoding_passes_through_untouched(gateway: str) -> None:
    with httpx.stream(
        "GET", f"{gateway}/api/2.0/mlflow/runs/get?mode=gzip", headers=AUTH
    ) as response:
        raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert raw == GZIPPED


def test_head(gateway: str) -> None:
    response = httpx.head(f"{gateway}/api/2.0/mlflow/runs/get", headers=AUTH)
    assert response.status_code == 200
    assert response.content == b""


def test_upstream_timeout_is_504(gateway: str) -> None:
    response = httpx.get(f"{gateway}/api/2.0/mlflow/runs/get?mode=slow", headers=AUTH, timeout=10)
    assert response.status_code == 504
    assert response.json() | {"request_id": ""} == {
        "error_code": "DEADLINE_EXCEEDED",
        "message": "The MLflow server did not answer in time.",
        "reason": "upstream_timeout",
        "request_id": "",
    }


def test_pool_exhaustion_is_503_not_a_hang(
    tmp_path: Path, upstream: tuple[ServerThread, FakeMlflow]
) -> None:
    server, _ = upstream
    with start_gateway(tmp_path, server.url, **{"upstream.read_timeout": "10s"}) as gw:

        async def run() -> list[int]:
            async with httpx.AsyncClient(headers=AUTH, timeout=20) as client:
                slow = [client.get(f"{gw.url}/api/2.0/mlflow/runs/get?mode=slow") for _ in range(2)]
                tasks = [asyncio.ensure_future(c) for c in slow]
                await asyncio.sleep(0.5)
                quick = await client.get(f"{gw.url}/api/2.0/mlflow/runs/get")
                return [quick.status_code, *[(await t).status_code for t in tasks]]

        quick, *slow = asyncio.run(run())
    assert quick == 503
    assert slow == [200, 200]


def test_upstream_down_is_502(tmp_path: Path) -> None:
    with start_gateway(tmp_path, f"http://127.0.0.1:{free_port()}") as gw:
        response = httpx.get(f"{gw.url}/api/2.0/mlflow/runs/get", headers=AUTH)
        assert response.status_code == 502
        assert response.json()["reason"] == "upstream_unreachable"
        ready = httpx.get(f"{gw.url}/guard/ready")
        assert ready.status_code == 503
        assert "upstream: upstream_unreachable" in ready.json()["message"]
        assert httpx.get(f"{gw.url}/guard/health").json() == {"status": "ok"}


def test_guard_routes(gateway: str) -> None:
    assert httpx.get(f"{gateway}/guard/ready").json()["status"] == "ready"
    # Under /guard/ only a probe's GET answers strangers; the rest is behind authentication.
    assert httpx.get(f"{gateway}/guard/nope").json()["reason"] == "unauthenticated"
    assert httpx.get(f"{gateway}/guard/nope", headers=AUTH).json()["reason"] == "not_found"
    response = httpx.post(f"{gateway}/guard/health", headers=AUTH)
    assert response.json()["reason"] == "method_not_allowed"
    # Probes answer whatever Host an orchestrator uses; everything else checks it.
    assert (
        httpx.get(f"{gateway}/guard/health", headers={"Host": "10.1.2.3:5000"}).status_code == 200
    )
    response = httpx.get(f"{gateway}/api/2.0/mlflow/runs/get", headers={**AUTH, "Host": "evil.com"})
    assert response.json()["reason"] == "host_not_allowed"


def test_unverified_mlflow_releases_are_refused_unless_allowed(
    tmp_path: Path, upstream: tuple[ServerThread, FakeMlflow]
) -> None:
    server, fake = upstream
    fake.version = b"9.9.9"
    try:
        with start_gateway(tmp_path / "a", server.url) as gw:
            response = httpx.get(f"{gw.url}/api/2.0/mlflow/runs/get", headers=AUTH)
            assert response.status_code == 503
            assert response.json()["reason"] == "upstream_unverified"
            assert "9.9.9" in response.json()["message"]
            # not ready either: a load balancer must stop sending traffic here
            ready = httpx.get(f"{gw.url}/guard/ready")
            assert ready.status_code == 503
            assert "upstream: MLflow 9.9.9 is not a verified release" in ready.json()["message"]
        flags = {"upstream.allow_unverified_mlflow": "true"}
        with start_gateway(tmp_path / "b", server.url, **flags) as gw:
            assert httpx.get(f"{gw.url}/api/2.0/mlflow/runs/get", headers=AUTH).status_code == 200
            assert httpx.get(f"{gw.url}/guard/ready").status_code == 200
        # upstream.workspaces on, MLflow without them: every request would be refused
        fake.version = b"3.17.2"
        with start_gateway(tmp_path / "c", server.url, **{"upstream.workspaces": "true"}) as gw:
            assert httpx.get(f"{gw.url}/guard/ready").status_code == 503  # before any request
            response = httpx.get(f"{gw.url}/api/2.0/mlflow/runs/get", headers=AUTH)
            assert response.json()["reason"] == "upstream_misconfigured"
            ready = httpx.get(f"{gw.url}/guard/ready")
            assert ready.status_code == 503
            assert "upstream.workspaces is on but MLflow runs without" in ready.json()["message"]
    finally:
        fake.version = b"3.17.2"
