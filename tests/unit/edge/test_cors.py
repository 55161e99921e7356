import pytest

from guard.edge.context import RequestContextMiddleware
from guard.edge.cors import CORSMiddleware, parse_origin
from tests.unit.asgi import Recorder, call

ALLOWED = ("https://app.example.com", "http://localhost:3000")


def stack() -> tuple[RequestContextMiddleware, Recorder]:
    inner = Recorder()
    return RequestContextMiddleware(CORSMiddleware(inner, allowed_origins=ALLOWED)), inner


def preflight(origin: str, method: str = "POST", headers: str = "") -> list[tuple[str, str]]:
    h = [("host", "gw.example.com"), ("origin", origin), ("access-control-request-method", method)]
    if headers:
        h.append(("access-control-request-headers", headers))
    return h


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("https://App.Example.com", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://localhost:3000", "http://localhost:3000"),
    ],
)
def test_parse_origin(text: str, normalized: str) -> None:
    assert parse_origin(text) == normalized


@pytest.mark.parametrize(
    "bad", ["*", "null", "https://*.example.com", "https://a.com/path", "ftp://a.com", "a.com",
            "https://user@a.com", "https://a.com?x"],
)  # fmt: skip
def test_bad_origins_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="not an origin"):
        parse_origin(bad)


def test_preflight_from_listed_origin_is_answered_here() -> None:
    app, inner = stack()
    result = call(
        app, method="OPTIONS", headers=preflight("https://app.example.com", "PATCH", "content-type")
    )
    assert result.status == 204
    assert result.header("access-control-allow-origin") == "https://app.example.com"
    assert result.header("access-control-allow-credentials") == "true"
    assert "PATCH" in (result.header("access-control-allow-methods") or "")
    assert result.header("access-control-allow-headers") == "content-type"
    assert not inner.scopes


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.com",
        "null",
        "https://evil-app.example.com",  # suffix trick
        "https://app.example.com.evil.com",
        "https://app.example.comx",
        "http://app.example.com",  # scheme differs
        "https://app.example.com:8443",  # port differs
        "https://app.example.com/",
    ],
)
def test_preflight_from_other_origins_is_refused(origin: str) -> None:
    app, inner = stack()
    result = call(app, method="OPTIONS", headers=preflight(origin))
    assert result.status == 403
    assert result.reason == "cors_origin_not_allowed"
    assert result.header("access-control-allow-origin") is None
    assert not inner.scopes


def test_preflight_for_unlisted_method_is_refused() -> None:
    app, _ = stack()
    assert (
        call(app, method="OPTIONS", headers=preflight("https://app.example.com", "TRACE")).status
        == 403
    )


def test_preflight_with_garbage_headers_is_refused() -> None:
    app, _ = stack()
    result = call(
        app, method="OPTIONS", headers=preflight("https://app.example.com", "GET", "a\r\nb")
    )
    assert result.status == 403


def test_listed_origin_gets_cors_headers_and_no_wildcard() -> None:
    app, _inner = stack()
    result = call(app, headers=[("host", "gw.example.com"), ("origin", "https://app.example.com")])
    assert result.status == 200
    assert result.header("access-control-allow-origin") == "https://app.example.com"
    assert result.header("access-control-allow-credentials") == "true"
    assert "Origin" in (result.header("vary") or "")


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("origin", ["https://evil.com", "null", "https://evil-example.com"])
def test_cross_site_writes_are_refused(method: str, origin: str) -> None:
    app, inner = stack()
    result = call(app, method=method, headers=[("host", "gw.example.com"), ("origin", origin)])
    assert result.status == 403
    assert result.reason == "cors_origin_not_allowed"
    assert not inner.scopes


def test_cross_site_reads_pass_without_cors_headers() -> None:
    app, _inner = stack()
    result = call(app, headers=[("host", "gw.example.com"), ("origin", "https://evil.com")])
    assert result.status == 200
    assert result.header("access-control-allow-origin") is None


def test_same_origin_writes_pass() -> None:
    app, _inner = stack()
    headers = [("host", "gw.example.com:5000"), ("origin", "http://gw.example.com:5000")]
    assert call(app, method="POST", headers=headers).status == 200
    # The same host over the other scheme is another origin.
    headers = [("host", "gw.example.com:5000"), ("origin", "https://gw.example.com:5000")]
    assert call(app, method="POST", headers=headers).status == 403


def test_two_origin_headers_are_treated_as_unlisted() -> None:
    app, _ = stack()
    headers = [("host", "gw.example.com"), ("origin", "https://app.example.com"),
               ("origin", "https://evil.com")]  # fmt: skip
    assert call(app, method="POST", headers=headers).status == 403
