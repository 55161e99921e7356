"""MLflow 3.18 stopped ``Host: 10.evil.com`` matching its default allowed-hosts pattern ``10.*``.

The same idea tried on the gateway's own address checks: an IP pattern (allowed hosts, CORS
origins, trusted-proxy CIDRs) is matched only by that IP literal, never by a name or another
spelling that starts or ends with the same digits. The gateway has no prefix globs at all: an
IP-shaped glob is refused when the configuration is read, with every other problem.
"""

from __future__ import annotations

import ipaddress

import pytest

from guard.config import load_settings
from guard.edge.context import RequestContextMiddleware, build_context
from guard.edge.cors import parse_origin
from guard.edge.hosts import AllowedHostsMiddleware, parse_host_pattern, validate_host
from tests.unit.asgi import Recorder, call

IP_PATTERNS = ("10.0.0.1", "192.168.1.5:5000", "[fd00::1]", "127.0.0.1")
# Hosts that look like one of those IPs but are names, other spellings, or other addresses.
LOOKALIKES = [
    "10.evil.com", "10.evil.com:80", "10.0.0.1.evil.com", "10.0.0.1.nip.io", "10.0.0.1evil.com",
    "10.0.0.10", "110.0.0.1", "10.0.0.1.", "010.0.0.1", "10.0.0.01", "0x0a.0.0.1", "10.1",
    "167772161", "0.0.0.0", "10.0.0.1@evil.com", "evil.com@10.0.0.1", "10.0.0.1#.evil.com",
    "10.0.0.1%2eevil.com", "\uff11\uff10.0.0.1", "10\u30020.0.1", "192.168.evil.com:5000",
    "192.168.1.5.evil.com:5000", "192.168.1.5:50000", "[fd00::1].evil.com", "fd00::1",
    "[fd00::1%25eth0]", "[fd00::1:0]", "[::ffff:10.0.0.1]", "127.evil.com", "127.0.0.1.evil.com",
    "127.1", "2130706433", "localhost.evil.com",
]  # fmt: skip
IP_GLOBS = ["10.*", "192.168.*", "192.168.*:5000", "10.*.*.*", "172.16.*", "127.*", "fd00:*",
            "[fd00::*]", "10.0.0.*", "*.0.0.1:*", "*:5000", "10.0.0.1/8", "10.0.0.0/8"]  # fmt: skip


@pytest.mark.parametrize("host", LOOKALIKES, ids=ascii)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_ip_patterns_match_no_lookalike(host: str, scheme: str) -> None:
    patterns = tuple(parse_host_pattern(p) for p in IP_PATTERNS)
    assert not validate_host(host, scheme, patterns)


@pytest.mark.parametrize("host", ["10.0.0.1", "10.0.0.1:80", "192.168.1.5:5000", "[fd00::1]"])
def test_ip_patterns_match_their_own_literal(host: str) -> None:
    patterns = tuple(parse_host_pattern(p) for p in IP_PATTERNS)
    assert validate_host(host, "http", patterns)


@pytest.mark.parametrize("glob", IP_GLOBS)
def test_ip_shaped_globs_are_not_host_patterns(glob: str) -> None:
    with pytest.raises(ValueError, match=r"not a host pattern|wildcards apply to names"):
        parse_host_pattern(glob)


def test_ip_shaped_globs_are_refused_at_start_up() -> None:
    loaded = load_settings({"gateway.allowed_hosts": ",".join(IP_GLOBS[:3])}, {}, None)
    problems = "\n".join(loaded.problems)
    for glob in IP_GLOBS[:3]:
        assert f"{glob!r} is not a host pattern" in problems


@pytest.mark.parametrize("host", LOOKALIKES, ids=ascii)
def test_the_middleware_refuses_lookalikes_in_host_and_forwarded_host(host: str) -> None:
    host = wire(host)
    inner = Recorder()
    app = RequestContextMiddleware(
        AllowedHostsMiddleware(inner, allowed_hosts=IP_PATTERNS),
        trusted_proxies=("203.0.113.0/24",),
    )
    assert call(app, headers=[("host", host)]).reason == "host_not_allowed"
    # From a trusted proxy the forwarded host is what is checked; from anyone else it is ignored.
    forwarded = [("host", "10.0.0.1"), ("x-forwarded-host", host)]
    assert call(app, headers=forwarded).reason == "host_not_allowed"
    assert call(app, headers=forwarded, client=("198.51.100.1", 1)).status == 200
    assert all(scope["guard"].host == "10.0.0.1" for scope in inner.scopes)


@pytest.mark.parametrize("host", LOOKALIKES, ids=ascii)
def test_ip_origins_match_no_lookalike(host: str) -> None:
    allowed = {parse_origin("http://10.0.0.1"), parse_origin("https://192.168.1.5:5000")}
    for scheme in ("http", "https"):
        try:
            origin = parse_origin(f"{scheme}://{host}")
        except ValueError:
            continue
        assert origin not in allowed


def wire(text: str) -> str:
    """``text`` sent as UTF-8 bytes (headers are read as Latin-1, one character per byte)."""
    return text.encode().decode("latin-1")


# Trusted proxies: only an address inside a trusted CIDR is a proxy hop; a name or another
# spelling of one is the client itself, never skipped as a proxy. (A zone index,
# ``fd00::1%eth0``, is the same address as ``fd00::1`` and counts as it.)
TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
HOP_LOOKALIKES = [
    "10.evil.com", "10.0.0.1.evil.com", "010.0.0.1", "10.0.0.01", "0x0a.0.0.1", "10.1",
    "167772161", "\uff11\uff10.0.0.1", "10.0.0.1/8", "10.0.0.1:80", "[10.0.0.1]", "10.0.0.1%eth0",
    "[fd00::1]", "::ffff:10.0.0.1", "10.0.0.1.", "10.0.0.1\u200b",
]  # fmt: skip


def context_scope(peer: str, forwarded_for: str) -> dict[str, object]:
    headers = [(b"host", b"a"), (b"x-forwarded-for", forwarded_for.encode())]
    return {"type": "http", "client": (peer, 1234), "scheme": "http", "headers": headers}


@pytest.mark.parametrize("hop", HOP_LOOKALIKES, ids=ascii)
def test_a_lookalike_hop_is_the_client_not_a_trusted_proxy(hop: str) -> None:
    context = build_context(context_scope("10.0.0.2", f"6.6.6.6, {hop}"), TRUSTED)
    assert context.client == wire(hop)  # not 6.6.6.6, which the caller wrote further left


@pytest.mark.parametrize("peer", ["10.evil.com", "010.0.0.2", "::ffff:10.0.0.2", "10.0.0.2.x"])
def test_a_lookalike_peer_is_not_trusted(peer: str) -> None:
    context = build_context(context_scope(peer, "6.6.6.6"), TRUSTED)
    assert context.client == peer


def test_the_real_proxy_hop_is_still_skipped() -> None:
    context = build_context(context_scope("10.0.0.2", "6.6.6.6, 198.51.100.4, 10.9.9.9"), TRUSTED)
    assert context.client == "198.51.100.4"


@pytest.mark.parametrize("cidr", ["10.*", "10.evil.com", "10.0.0.*", "010.0.0.0/8", "10/8", "*"])
def test_lookalike_trusted_proxies_are_refused_at_start_up(cidr: str) -> None:
    loaded = load_settings({"gateway.trusted_proxies": cidr}, {}, None)
    assert any(f"{cidr!r} is not an IP address or CIDR" in p for p in loaded.problems), (
        loaded.problems
    )
