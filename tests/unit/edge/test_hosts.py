import pytest

from guard.edge.context import RequestContextMiddleware
from guard.edge.hosts import (
    AllowedHostsMiddleware,
    _Verdicts,
    default_allowed_hosts,
    parse_host_pattern,
    split_host,
    validate_host,
)
from tests.unit.asgi import Recorder, call

PATTERNS = tuple(
    parse_host_pattern(p)
    for p in ("localhost", "127.0.0.1", "[::1]", "ml.example.com", "*.corp.example", "api.io:8443")
)


@pytest.mark.parametrize(
    ("host", "scheme", "allowed"),
    [
        ("localhost", "http", True),
        ("localhost:5000", "http", True),
        ("LocalHost:5000", "http", True),  # DNS names are case-insensitive
        ("127.0.0.1:5000", "http", True),
        ("[::1]:5000", "http", True),
        ("ml.example.com", "https", True),
        ("ML.EXAMPLE.COM", "https", True),
        ("a.corp.example", "http", True),
        ("a.b.corp.example:8080", "http", True),
        ("api.io:8443", "https", True),
        # Attempts to get around the check.
        ("localhost.", "http", False),  # trailing dot: not a valid host here
        ("ml.example.com.", "https", False),
        ("corp.example", "http", False),  # the apex is not *.corp.example
        ("evilcorp.example", "http", False),  # suffix without the dot
        ("corp.example.evil.com", "http", False),
        ("evil-example.com", "http", False),
        ("ml.example.com.evil.com", "http", False),
        ("api.io", "https", False),  # default port 443, not 8443
        ("api.io:443", "https", False),
        ("api.io:8443x", "https", False),
        ("localhost:0", "http", False),
        ("localhost:99999", "http", False),
        ("user@localhost", "http", False),
        ("localhost/evil", "http", False),
        (" localhost", "http", False),
        ("localhost ", "http", False),
        ("local host", "http", False),
        ("", "http", False),
        ("[::1", "http", False),
        ("[::2]", "http", False),
        ("[not-ip]", "http", False),
        ("127.0.0.1.nip.io", "http", False),
        ("-localhost", "http", False),
        (None, "http", False),  # missing or duplicated
    ],
)
def test_validate_host(host: str | None, scheme: str, allowed: bool) -> None:
    assert validate_host(host, scheme, PATTERNS) is allowed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", ("example.com", None)),
        ("Example.COM:80", ("example.com", 80)),
        ("[::1]:5000", ("[::1]", 5000)),
        ("10.0.0.1", ("10.0.0.1", None)),
    ],
)
def test_split_host(text: str, expected: tuple[str, int | None]) -> None:
    assert split_host(text) == expected


@pytest.mark.parametrize("bad", ["*", "*.", "http://x", "a..b", "*.[::1]", "x:y", ""])
def test_bad_patterns_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match=r"host pattern|IP literals"):
        parse_host_pattern(bad)


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("127.0.0.1", ("localhost", "127.0.0.1", "[::1]")),
        ("0.0.0.0", ("localhost", "127.0.0.1", "[::1]")),
        ("10.1.2.3", ("localhost", "127.0.0.1", "[::1]", "10.1.2.3")),
        ("fd00::5", ("localhost", "127.0.0.1", "[::1]", "[fd00::5]")),
    ],
)
def test_default_allowed_hosts(bind: str, expected: tuple[str, ...]) -> None:
    assert default_allowed_hosts(bind) == expected


def _stack(trusted: tuple[str, ...] = ()) -> tuple[RequestContextMiddleware, Recorder]:
    inner = Recorder()
    app = AllowedHostsMiddleware(
        inner, allowed_hosts=("localhost",), exempt_paths=frozenset({"/guard/health"})
    )
    return RequestContextMiddleware(app, trusted_proxies=trusted), inner


def test_middleware_refuses_bad_host_without_calling_inner() -> None:
    app, inner = _stack()
    result = call(app, headers=[("host", "evil.com")])
    assert result.status == 400
    assert result.reason == "host_not_allowed"
    assert result.json()["error_code"] == "BAD_REQUEST"
    assert result.header("x-request-id")
    assert not inner.scopes


def test_duplicate_host_is_refused() -> None:
    app, inner = _stack()
    result = call(app, headers=[("host", "localhost"), ("host", "evil.com")])
    assert result.reason == "host_not_allowed"
    assert not inner.scopes


def test_missing_host_is_refused() -> None:
    app, _ = _stack()
    assert call(app, headers=[]).reason == "host_not_allowed"


def test_x_forwarded_host_is_ignored_from_untrusted_peer() -> None:
    app, inner = _stack()
    assert (
        call(app, headers=[("host", "evil.com"), ("x-forwarded-host", "localhost")]).status == 400
    )
    result = call(app, headers=[("host", "localhost"), ("x-forwarded-host", "evil.com")])
    assert result.status == 200
    assert inner.scopes[-1]["guard"].host == "localhost"


def test_x_forwarded_host_from_trusted_proxy_is_what_gets_checked() -> None:
    app, _ = _stack(trusted=("203.0.113.0/24",))
    headers = [("host", "10.0.0.5:8080"), ("x-forwarded-host", "localhost")]
    assert call(app, headers=headers).status == 200
    headers = [("host", "localhost"), ("x-forwarded-host", "evil.com")]
    assert call(app, headers=headers).reason == "host_not_allowed"


def test_probe_paths_are_exempt() -> None:
    app, _ = _stack()
    assert call(app, path="/guard/health", headers=[("host", "10.0.0.9:5000")]).status == 200
    assert call(app, path="/guard/healthz", headers=[("host", "10.0.0.9")]).status == 400


def test_remembered_verdicts_start_over_when_full_and_stay_right() -> None:
    verdicts = _Verdicts(tuple(parse_host_pattern(p) for p in ["gateway.example.com"]))
    for number in range(300):  # a caller inventing Host values
        assert verdicts[f"h{number}.invalid", "https"] is False
    assert len(verdicts) <= 256
    assert verdicts["gateway.example.com", "https"] is True
    assert ("gateway.example.com", "https") in verdicts
