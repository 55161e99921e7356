import ipaddress

import pytest

from guard.edge.context import RequestContextMiddleware, build_context
from tests.unit.asgi import call

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


def scope(peer: str, headers: list[tuple[str, str]], scheme: str = "http") -> dict[str, object]:
    return {
        "type": "http",
        "client": (peer, 1234),
        "scheme": scheme,
        "headers": [(k.encode(), v.encode()) for k, v in headers],
    }


@pytest.mark.parametrize(
    ("peer", "headers", "client", "proto", "host"),
    [
        # Untrusted peer: every forwarding header is ignored (spoofing attempts).
        ("203.0.113.9", [("host", "a"), ("x-forwarded-for", "1.1.1.1")], "203.0.113.9", "http",
         "a"),
        ("203.0.113.9", [("host", "a"), ("x-forwarded-proto", "https")], "203.0.113.9", "http",
         "a"),
        ("203.0.113.9", [("host", "a"), ("x-forwarded-host", "b")], "203.0.113.9", "http", "a"),
        # Loopback is not trusted unless configured (uvicorn would trust it by default).
        ("127.0.0.1", [("host", "a"), ("x-forwarded-for", "1.1.1.1")], "127.0.0.1", "http", "a"),
        # Trusted peer: the first untrusted hop from the right is the client.
        ("10.0.0.2", [("host", "a"), ("x-forwarded-for", "198.51.100.4")], "198.51.100.4", "http",
         "a"),
        (
            "10.0.0.2",
            [("host", "a"), ("x-forwarded-for", "6.6.6.6, 198.51.100.4, 10.0.0.3")],
            "198.51.100.4", "http", "a",
        ),
        (
            "10.0.0.2",
            [("host", "a"), ("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "198.51.100.4")],
            "198.51.100.4", "http", "a",
        ),
        ("10.0.0.2", [("host", "a"), ("x-forwarded-for", "10.0.0.9")], "10.0.0.9", "http", "a"),
        ("10.0.0.2", [("host", "a"), ("x-forwarded-proto", "https")], "10.0.0.2", "https", "a"),
        ("10.0.0.2", [("host", "a"), ("x-forwarded-proto", "gopher")], "10.0.0.2", "http", "a"),
        ("10.0.0.2", [("host", "a"), ("x-forwarded-host", "ml.example.com")], "10.0.0.2", "http",
         "ml.example.com"),
        # Duplicate Host headers leave no host at all (refused later).
        ("203.0.113.9", [("host", "a"), ("host", "b")], "203.0.113.9", "http", None),
    ],
)  # fmt: skip
def test_build_context(
    peer: str, headers: list[tuple[str, str]], client: str, proto: str, host: str | None
) -> None:
    context = build_context(scope(peer, headers), TRUSTED)
    assert (context.client, context.scheme, context.host) == (client, proto, host)


def test_request_id_from_untrusted_peer_is_replaced() -> None:
    context = build_context(scope("203.0.113.9", [("x-request-id", "mine")]), TRUSTED)
    assert context.request_id != "mine"
    assert len(context.request_id) == 32


def test_request_id_from_trusted_proxy_is_kept_when_sane() -> None:
    assert build_context(scope("10.0.0.1", [("x-request-id", "lb-42")]), TRUSTED).request_id == (
        "lb-42"
    )
    assert build_context(scope("10.0.0.1", [("x-request-id", "a b\r\n")]), TRUSTED).request_id != (
        "a b\r\n"
    )


async def _boom(scope, receive, send):  # type: ignore[no-untyped-def]
    raise RuntimeError("secret internals")


def test_unhandled_exception_becomes_internal_error_without_trace() -> None:
    result = call(RequestContextMiddleware(_boom))
    assert result.status == 500
    assert result.reason == "internal_error"
    assert b"secret internals" not in result.body
    assert b"Traceback" not in result.body
    assert result.json()["request_id"] == result.header("x-request-id")
