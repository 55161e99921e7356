import pytest

from guard.bodies import check_framing
from guard.proxy import client_response_headers, upstream_request_headers


def enc(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers]


@pytest.mark.parametrize(
    "name",
    [
        "authorization", "origin", "x-mlflow-workspace", "X-MLFLOW-WORKSPACE",
        "x-mlflow-assistant-delegation", "x-mlflow-authorization", "x-forwarded-for",
        "x-forwarded-host", "x-forwarded-proto", "x-forwarded-user", "x-forwarded-email",
        "forwarded", "x-real-ip", "via", "true-client-ip", "x-client-ip", "x-request-id",
        "x-auth-request-user", "x-remote-user", "connection", "keep-alive", "te", "trailer",
        "transfer-encoding", "upgrade", "proxy-authorization", "host", "content-length", "expect",
        # Underscore spellings turn into the dashed names in WSGI environments.
        "x_forwarded_for", "X_MLFLOW_WORKSPACE", "x_mlflow_assistant_delegation", "x_real_ip",
        "x_anything",
    ],
)  # fmt: skip
def test_identity_forwarding_and_hop_headers_are_not_forwarded(name: str) -> None:
    forwarded = upstream_request_headers(enc([(name.lower(), "spoof")]), [])
    assert forwarded == []


def test_connection_listed_headers_are_dropped() -> None:
    headers = enc([("connection", "x-secret, keep-alive"), ("x-secret", "1"), ("accept", "*/*")])
    assert upstream_request_headers(headers, []) == [("accept", "*/*")]


def test_ordinary_headers_and_the_gateways_own_pass() -> None:
    headers = enc([("content-type", "application/json"), ("user-agent", "mlflow-python-client"),
                   ("x-mlflow-client-version", "3.17.2"), ("accept-encoding", "gzip")])  # fmt: skip
    result = upstream_request_headers(
        headers, [("host", "127.0.0.1:1"), ("x-forwarded-for", "1.2.3.4")]
    )
    assert result == [
        ("content-type", "application/json"),
        ("user-agent", "mlflow-python-client"),
        ("x-mlflow-client-version", "3.17.2"),
        ("accept-encoding", "gzip"),
        ("host", "127.0.0.1:1"),
        ("x-forwarded-for", "1.2.3.4"),
    ]


def test_gateway_cookies_are_stripped_others_kept() -> None:
    headers = enc([("cookie", "mlflow_guard_session=abc; theme=dark; mlflow_guard_csrf=x")])
    assert upstream_request_headers(headers, []) == [("cookie", "theme=dark")]
    assert upstream_request_headers(enc([("cookie", "mlflow_guard_session=abc")]), []) == []


def test_response_headers_from_upstream_are_filtered() -> None:
    headers = tuple(enc([
        ("content-type", "application/json"), ("set-cookie", "a=b"), ("Set-Cookie", "c=d"),
        ("access-control-allow-origin", "*"), ("Access-Control-Allow-Credentials", "true"),
        ("server", "uvicorn"), ("date", "x"), ("connection", "close, x-internal"),
        ("x-internal", "1"), ("transfer-encoding", "chunked"), ("content-encoding", "gzip"),
        ("www-authenticate", "Basic realm=mlflow"),
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
