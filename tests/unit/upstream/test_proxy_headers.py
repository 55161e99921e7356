"""Which request headers reach MLflow (an allowlist) and which response headers come back."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.types import Receive, Scope, Send

from guard.app import build_gateway
from guard.config import load_settings
from guard.edge.bodies import check_framing
from guard.upstream.proxy import FORWARDED, client_response_headers, upstream_request_headers
from tests.servers import ServerThread, read_request_body, send_response

TOKEN = "mlg_" + "h" * 43
ENV = {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": TOKEN, "MLFLOW_GUARD_SECRET_KEY": "s" * 40}
# What the gateway itself sends MLflow on every forwarded request.
COMPUTED = {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}

# Identity claims, network-position claims, MLflow selectors and credentials, hop-by-hop and
# connection-specific headers: none of them may reach MLflow, in any spelling.
HOSTILE = [
    "X-WebAuth-User", "Remote-User", "X-Remote-User", "X-Forwarded-User", "X-Forwarded-Email",
    "X-Forwarded-Preferred-Username", "X-Forwarded-Groups", "X-Auth-Request-User",
    "X-Auth-Request-Email", "X-Auth-Request-Groups", "X-Auth-Request-Access-Token", "X-User",
    "X-Email", "X-Authenticated-User", "X-Authenticated-Userid", "X-Ms-Client-Principal-Name",
    "Cf-Access-Authenticated-User-Email", "X-Goog-Authenticated-User-Email", "X-Amzn-Oidc-Identity",
    "X-Mlflow-Workspace", "X-MLflow-Assistant-Delegation", "X-MLflow-Authorization",
    "X-MLflow-Gateway-Caller", "X-MLflow-Guardrail-Bypass", "X-Mlflow-User", "X-Forwarded-For",
    "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Port", "X-Forwarded-Prefix",
    "Forwarded", "Via", "X-Real-IP", "True-Client-IP", "X-Client-IP", "X-Cluster-Client-IP",
    "Cf-Connecting-IP", "X-Original-URL", "X-Rewrite-URL", "X-Original-Forwarded-For",
    "X-HTTP-Method-Override", "X-Method-Override", "Cookie", "Origin", "Referer",
    "HTTP2-Settings", "Keep-Alive", "TE", "Trailer", "Proxy-Authorization", "Proxy-Connection",
    "Upgrade", "Expect", "Traceparent",
    # Underscore spellings become the dashed names in WSGI environments, MLflow's Flask app's.
    "X_WebAuth_User", "Remote_User", "X_Forwarded_User", "X_MLFLOW_WORKSPACE", "x_real_ip",
    "X_Mlflow_Experiment_Id", "Content_Type", "X_Forwarded_For",
    # Mixed and odd case.
    "x-webauth-user", "REMOTE-USER", "x-FoRwArDeD-uSeR", "X-mlflow-WORKSPACE",
]  # fmt: skip
# What MLflow reads, or its clients send it (guard/upstream/proxy.py says why each).
NEEDED = {
    "Accept": "application/json",
    "Accept-Encoding": "gzip",
    "Content-Type": "application/json",
    "Content-Encoding": "identity",
    "User-Agent": "mlflow-python-client/3.17.2",
    "X-MLflow-Client-Version": "3.17.2",
    "X-MLflow-Experiment-Id": "1",
    "X-MLflow-Run-Id": "r1",
    "Range": "bytes=0-9",
    "If-Range": '"etag"',
    "If-None-Match": '"etag"',
    "If-Modified-Since": "Sat, 05 Dec 2026 00:00:00 GMT",
    "If-Match": '"etag"',
    "If-Unmodified-Since": "Sat, 05 Dec 2026 00:00:00 GMT",
}


def enc(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_headers_are_not_forwarded(name: str) -> None:
    assert upstream_request_headers(enc([(name.lower(), "admin")]), []) == []
    assert upstream_request_headers(enc([(name, "admin")]), []) == []


def test_needed_headers_pass_in_any_case() -> None:
    assert {n.lower() for n in NEEDED} == FORWARDED
    headers = enc([(name.upper(), value) for name, value in NEEDED.items()])
    forwarded = upstream_request_headers(headers, [("host", "127.0.0.1:1")])
    assert forwarded == [
        *((name.lower(), value) for name, value in NEEDED.items()),
        ("host", "127.0.0.1:1"),
    ]


def test_headers_named_in_connection_are_dropped_even_when_allowed() -> None:
    headers = enc([("Connection", "range, keep-alive"), ("range", "bytes=0-1"), ("accept", "*/*")])
    assert upstream_request_headers(headers, []) == [("accept", "*/*")]


def test_response_headers_from_upstream_are_filtered() -> None:
    headers = tuple(enc([
        ("content-type", "application/json"), ("set-cookie", "a=b"), ("Set-Cookie", "c=d"),
        ("access-control-allow-origin", "*"), ("Access-Control-Allow-Credentials", "true"),
        ("server", "uvicorn"), ("date", "x"), ("connection", "close, x-internal"),
        ("x-internal", "1"), ("transfer-encoding", "chunked"), ("content-encoding", "gzip"),
        ("www-authenticate", "Basic realm=mlflow"), ("upgrade", "h2c"), ("http2-settings", "x"),
    ]))  # fmt: skip
    assert client_response_headers(headers) == [
        (b"content-type", b"application/json"),
        (b"content-encoding", b"gzip"),
    ]


@pytest.mark.parametrize(
    ("headers", "ok", "length", "chunked"),
    [
        ([], True, None, False),
        ([("content-length", "10")], True, 10, False),
        ([("content-length", "10"), ("content-length", "10")], True, 10, False),
        ([("transfer-encoding", "chunked")], True, None, True),
        ([("content-length", "10"), ("content-length", "11")], False, None, False),
        ([("content-length", "10"), ("transfer-encoding", "chunked")], False, None, False),
        ([("content-length", "-1")], False, None, False),
        ([("content-length", "1e3")], False, None, False),
        ([("content-length", "")], False, None, False),
        ([("transfer-encoding", "gzip, chunked")], False, None, False),
        ([("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")], False, None, False),
    ],
)
def test_check_framing(
    headers: list[tuple[str, str]], ok: bool, length: int | None, chunked: bool
) -> None:
    refusal, got_length, got_chunked = check_framing(enc(headers))
    assert (refusal is None) is ok
    if ok:
        assert (got_length, got_chunked) == (length, chunked)
    else:
        assert refusal is not None and refusal.reason == "invalid_body_framing"


# Through the whole gateway, over real sockets, against a fake MLflow that records headers.


class Recorder:
    def __init__(self) -> None:
        self.seen: list[list[tuple[str, str]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_request_body(receive)
        if scope["path"] == "/version":
            await send_response(send, 200, b"3.17.2")
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        if any(k == "x-forwarded-for" for k, _ in headers):  # a caller's, not a lookup
            self.seen.append(headers)
        await send_response(send, 200, b"{}", [(b"content-type", b"application/json")])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    data: Path = tmp_path_factory.mktemp("proxy-headers")
    with ServerThread(recorder, lifespan="off") as upstream:
        loaded = load_settings(
            {"upstream.url": upstream.url, "storage.data_dir": str(data)}, {}, None
        )
        assert loaded.problems == []
        with ServerThread(build_gateway(loaded.settings, ENV)) as gateway:
            yield gateway.url, recorder


def send(url: str, method: str, target: str, headers: list[tuple[str, str]]) -> int:
    """Send exactly these headers (duplicates, case and underscores kept)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in [("Host", "localhost"), ("Authorization", f"Bearer {TOKEN}"), *headers]:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def distinct(names: list[str]) -> list[str]:
    """One spelling per header: a repeated singular one would be refused (guard/edge/headers.py)."""
    kept: dict[str, str] = {}
    for name in names:
        kept.setdefault(name.lower().replace("_", "-"), name)
    return list(kept.values())


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_only_the_allowlist_and_the_gateways_own_headers_reach_mlflow(
    stack: tuple[str, Recorder], prefix: str, method: str
) -> None:
    url, recorder = stack
    # Not twice (a repeated singular header is refused), and no Origin on a cross-site write.
    skipped = (
        {"te", "upgrade"}
        | {n.lower() for n in NEEDED}
        | ({"origin"} if method == "POST" else set())
    )
    hostile = [
        (n, "admin") for n in distinct(HOSTILE) if n.lower().replace("_", "-") not in skipped
    ]
    hostile += [("TE", "trailers"), ("Upgrade", "h2c"), ("Connection", "Upgrade, HTTP2-Settings")]
    needed = list(NEEDED.items())
    target = (
        f"{prefix}/2.0/mlflow/runs/get?run_id=r1"
        if method == "GET"
        else f"{prefix}/2.0/mlflow/runs/log-metric"
    )
    if method == "POST":
        needed = [*needed, ("Content-Length", "0")]
    assert send(url, method, target, [*hostile, *needed]) == 200
    seen = recorder.seen[-1]
    names = [name for name, _ in seen]
    assert set(names) == {n.lower() for n in NEEDED} | COMPUTED | (
        {"content-length"} if method == "POST" else set()
    ), names
    assert len(names) == len(set(names))
    values = dict(seen)
    for name, value in NEEDED.items():
        assert values[name.lower()] == value
    assert "admin" not in values.values()


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
@pytest.mark.parametrize("name", HOSTILE)
def test_each_hostile_header_alone_never_reaches_mlflow(
    stack: tuple[str, Recorder], prefix: str, name: str
) -> None:
    url, recorder = stack
    assert send(url, "GET", f"{prefix}/2.0/mlflow/runs/get?run_id=r1", [(name, "admin")]) == 200
    assert {n for n, _ in recorder.seen[-1]} == COMPUTED
