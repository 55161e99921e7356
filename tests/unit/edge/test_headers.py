from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.types import Receive, Scope, Send

from guard.app import build_gateway
from guard.config import load_settings
from guard.edge.context import RequestContextMiddleware
from guard.edge.headers import (
    SINGLE_VALUED,
    SecurityHeadersMiddleware,
    SingleValuedHeadersMiddleware,
    merge_policies,
)
from tests.servers import ServerThread, read_request_body, send_response
from tests.unit.asgi import Recorder, call


def stack(
    frame_ancestors: str = "'self'", trusted: tuple[str, ...] = ()
) -> tuple[object, Recorder]:
    inner = Recorder()
    app = SecurityHeadersMiddleware(inner, frame_ancestors=frame_ancestors, hsts_max_age=600)
    return RequestContextMiddleware(app, trusted_proxies=trusted), inner


def test_security_headers_are_set() -> None:
    app, _ = stack()
    result = call(app)  # type: ignore[arg-type]
    assert result.header("x-content-type-options") == "nosniff"
    assert result.header("x-frame-options") == "SAMEORIGIN"
    assert result.header("content-security-policy") == "frame-ancestors 'self'"
    assert result.header("referrer-policy") == "same-origin"
    assert result.header("strict-transport-security") is None  # plain http


def test_upstream_security_headers_are_replaced_not_duplicated() -> None:
    app, inner = stack("'none'")
    inner.headers = [(b"x-frame-options", b"ALLOWALL"), (b"X-Content-Type-Options", b"off"),
                     (b"Content-Security-Policy", b"frame-ancestors *")]  # fmt: skip
    result = call(app)  # type: ignore[arg-type]
    assert result.all("x-frame-options") == ["DENY"]
    assert result.all("x-content-type-options") == ["nosniff"]
    assert result.all("content-security-policy") == ["frame-ancestors 'none'"]
    assert result.all("X-Content-Type-Options") == []
    assert result.all("Content-Security-Policy") == []


@pytest.mark.parametrize(
    ("inner", "merged"),
    [
        ([b"sandbox"], ["frame-ancestors 'self'; sandbox"]),
        ([b"Sandbox ;; "], ["frame-ancestors 'self'; Sandbox"]),
        # The gateway's directive wins over an inner one of the same name, in any case.
        ([b"FRAME-ANCESTORS *; sandbox"], ["frame-ancestors 'self'; sandbox"]),
        ([b"frame-ancestors *"], ["frame-ancestors 'self'"]),
        ([b""], ["frame-ancestors 'self'"]),
        ([b"sandbox", b"default-src 'self'"],
         ["frame-ancestors 'self'; sandbox; default-src 'self'"]),
        # Two policies naming the same directive: both stay (a browser enforces each).
        ([b"default-src 'self'", b"sandbox; default-src 'none'"],
         ["frame-ancestors 'self'; default-src 'self'", "sandbox; default-src 'none'"]),
    ],
)  # fmt: skip
def test_an_inner_policy_is_merged_with_the_gateways(inner: list[bytes], merged: list[str]) -> None:
    app, recorder = stack()
    recorder.headers = [(b"content-security-policy", value) for value in inner]
    assert call(app).all("content-security-policy") == merged  # type: ignore[arg-type]


def test_merge_policies_keeps_the_gateways_directives_first() -> None:
    own = b"default-src 'self'; frame-ancestors 'none'"
    assert merge_policies(own, [b"sandbox allow-downloads; default-src *"]) == [
        b"default-src 'self'; frame-ancestors 'none'; sandbox allow-downloads"
    ]


def test_hsts_over_tls_only() -> None:
    app, _ = stack()
    assert call(app, scheme="https").header("strict-transport-security") == "max-age=600"  # type: ignore[arg-type]


def test_hsts_when_a_trusted_proxy_terminated_tls() -> None:
    app, _ = stack(trusted=("203.0.113.0/24",))
    headers = [("host", "localhost"), ("x-forwarded-proto", "https")]
    assert call(app, headers=headers).header("strict-transport-security") == "max-age=600"  # type: ignore[arg-type]


def test_spoofed_proto_from_untrusted_peer_gives_no_hsts() -> None:
    app, _ = stack()
    headers = [("host", "localhost"), ("x-forwarded-proto", "https")]
    assert call(app, headers=headers).header("strict-transport-security") is None  # type: ignore[arg-type]


def test_other_frame_ancestors_send_no_legacy_header() -> None:
    app, _ = stack("https://portal.example.com")
    result = call(app)  # type: ignore[arg-type]
    assert result.header("x-frame-options") is None
    assert result.header("content-security-policy") == "frame-ancestors https://portal.example.com"


# Repeated singular request headers.


def edge() -> tuple[object, Recorder]:
    inner = Recorder()
    return RequestContextMiddleware(SingleValuedHeadersMiddleware(inner), trusted_proxies=()), inner


REPEATED = [
    *((name, name) for name in sorted(SINGLE_VALUED)),
    ("x-mlflow-workspace", "x-mlflow-workspace"),
    ("X-MLflow-Workspace", "x-mlflow-workspace"),
    ("x_mlflow_workspace", "X-MLFLOW-WORKSPACE"),
    ("X-Mlflow-Experiment-Id", "x-mlflow-experiment-id"),
    ("x-mlflow-run-id", "X_MLFLOW_RUN_ID"),
    ("x-mlflow-anything-new", "x-mlflow-anything-new"),
    ("Content-Type", "content_type"),
    ("Authorization", "AUTHORIZATION"),
]


@pytest.mark.parametrize(("first", "second"), REPEATED)
@pytest.mark.parametrize("path", ["/api/2.0/mlflow/runs/get", "/ajax-api/2.0/mlflow/runs/get",
                                  "/v1/traces", "/guard/health", "/guard/api/tokens"])  # fmt: skip
def test_a_repeated_singular_header_is_refused(first: str, second: str, path: str) -> None:
    app, inner = edge()
    headers = [("host", "localhost"), (first, "a"), (second, "a")]
    if first.lower() == "host" == second.lower():
        headers = headers[1:]
    result = call(app, path=path, headers=headers)  # type: ignore[arg-type]
    assert (result.status, result.reason) == (400, "ambiguous_parameter")
    assert inner.scopes == []


@pytest.mark.parametrize(
    "headers",
    [
        [("accept", "a"), ("accept", "b")],
        [("cookie", "a=1"), ("cookie", "b=2")],
        [("x-forwarded-for", "1.2.3.4"), ("x-forwarded-for", "5.6.7.8")],
        [("if-none-match", '"a"'), ("if-none-match", '"b"')],
        [("content-length", "0"), ("content-length", "0")],  # the framing check's to judge
        [("x-mlflow-workspace", "a"), ("x-mlflow-run-id", "a"), ("content-type", "a")],
    ],
)
def test_list_headers_and_distinct_singular_ones_pass(headers: list[tuple[str, str]]) -> None:
    app, inner = edge()
    assert call(app, headers=[("host", "localhost"), *headers]).status == 200  # type: ignore[arg-type]
    assert len(inner.scopes) == 1


# Through the whole gateway: what a caller gets back from MLflow's answers.

TOKEN = "mlg_" + "c" * 43
ENV = {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": TOKEN, "MLFLOW_GUARD_SECRET_KEY": "s" * 40}
DOWNLOADS = [
    "/get-artifact?run_id=r1&path=page.html",
    "/model-versions/get-artifact?name=m&version=1&path=page.html",
    "/ajax-api/2.0/mlflow/get-trace-artifact?request_id=tr-1",
    "/ajax-api/3.0/mlflow/get-trace-artifact?request_id=tr-1&path=page.html",
    "/ajax-api/2.0/mlflow/logged-models/m-1/artifacts/files?artifact_file_path=page.html",
    "/api/2.0/mlflow-artifacts/artifacts/1/r1/artifacts/page.html",
    "/ajax-api/2.0/mlflow-artifacts/artifacts/1/r1/artifacts/image.svg",
]


class Upstream:
    """Answers like MLflow's artifact handlers: HTML, an attachment, its own headers."""

    def __init__(self) -> None:
        self.csp: list[bytes] = []
        self.forwarded: list[tuple[str, list[tuple[bytes, bytes]]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_request_body(receive)
        if scope["path"] == "/version":
            await send_response(send, 200, b"3.17.2")
            return
        self.forwarded.append((scope["path"], scope["headers"]))
        headers = [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"content-disposition", b"attachment; filename=page.html"),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"ALLOWALL"),
            *((b"content-security-policy", value) for value in self.csp),
        ]
        await send_response(send, 200, b"<script>alert(1)</script>", headers)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Upstream]]:
    upstream = Upstream()
    data: Path = tmp_path_factory.mktemp("headers")
    with ServerThread(upstream, lifespan="off") as mlflow:
        loaded = load_settings(
            {"upstream.url": mlflow.url, "storage.data_dir": str(data)}, {}, None
        )
        assert loaded.problems == []
        with ServerThread(build_gateway(loaded.settings, ENV)) as server:
            yield server.url, upstream


def fetch(url: str, target: str, method: str = "GET",
          headers: list[tuple[str, str]] | None = None) -> http.client.HTTPResponse:  # fmt: skip
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest(method, target, skip_host=True)
    for name, value in [("Host", "localhost"), ("Authorization", f"Bearer {TOKEN}"),
                        *(headers or [])]:  # fmt: skip
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("target", DOWNLOADS)
def test_artifact_downloads_are_sandboxed_through_the_whole_stack(
    gateway: tuple[str, Upstream], target: str, method: str
) -> None:
    url, upstream = gateway
    upstream.csp = []
    response = fetch(url, target, method)
    assert response.status == 200
    assert response.headers.get_all("content-security-policy") == [
        "frame-ancestors 'self'; sandbox"
    ]
    assert response.headers.get_all("x-content-type-options") == ["nosniff"]
    assert response.headers.get_all("x-frame-options") == ["SAMEORIGIN"]
    # MLflow's own Content-Disposition is passed on untouched.
    assert response.headers["content-disposition"] == "attachment; filename=page.html"


def test_mlflows_own_policy_is_merged_not_lost(gateway: tuple[str, Upstream]) -> None:
    url, upstream = gateway
    upstream.csp = [b"default-src 'none'; frame-ancestors *"]
    try:
        response = fetch(url, DOWNLOADS[0])
    finally:
        upstream.csp = []
    assert response.headers.get_all("content-security-policy") == [
        "frame-ancestors 'self'; default-src 'none'; sandbox"
    ]


@pytest.mark.parametrize(
    "target",
    ["/api/2.0/mlflow/runs/get?run_id=r1", "/ajax-api/2.0/mlflow/artifacts/list?run_id=r1",
     "/api/2.0/mlflow-artifacts/artifacts?path=1/r1/artifacts", "/"],
)  # fmt: skip
def test_other_answers_are_not_sandboxed(gateway: tuple[str, Upstream], target: str) -> None:
    response = fetch(gateway[0], target)
    assert response.status == 200
    assert response.headers.get_all("content-security-policy") == ["frame-ancestors 'self'"]


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
@pytest.mark.parametrize(
    "headers",
    [
        [("X-MLflow-Workspace", "a"), ("X-MLflow-Workspace", "b")],
        [("X-MLflow-Workspace", "a"), ("X_MLflow_Workspace", "a")],
        [("Content-Type", "application/json"), ("content-type", "text/plain")],
        [("Range", "bytes=0-1"), ("Range", "bytes=2-3")],
        [("X-Mlflow-Experiment-Id", "1"), ("X-Mlflow-Experiment-Id", "2")],
    ],
)
def test_repeated_singular_headers_never_reach_mlflow(
    gateway: tuple[str, Upstream], prefix: str, headers: list[tuple[str, str]]
) -> None:
    url, upstream = gateway
    before = len(upstream.forwarded)
    response = fetch(url, f"{prefix}/2.0/mlflow-artifacts/artifacts/1/r1/artifacts/a.txt",
                     headers=headers)  # fmt: skip
    assert response.status == 400
    assert response.headers["x-guard-reason"] == "ambiguous_parameter"
    assert len(upstream.forwarded) == before
