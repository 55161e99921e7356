import pytest

from guard.context import RequestContextMiddleware
from guard.headers import SINGLE_VALUED, SecurityHeadersMiddleware, SingleValuedHeadersMiddleware
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
                     (b"content-security-policy", b"default-src *")]  # fmt: skip
    result = call(app)  # type: ignore[arg-type]
    assert result.all("x-frame-options") == ["DENY"]
    assert result.all("x-content-type-options") == ["nosniff"]
    assert result.all("content-security-policy") == ["frame-ancestors 'none'"]
    assert result.all("X-Content-Type-Options") == []


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
