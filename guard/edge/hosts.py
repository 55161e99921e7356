"""Allowed hosts: refuse requests whose Host is not one of ours (DNS rebinding, cache poisoning).

Patterns are exact names (``mlflow.example.com``, any port), wildcard subdomains
(``*.example.com``: one or more labels below, not the apex) and ``host:port`` (that port only;
a Host without a port means the scheme's default port). Names compare case-insensitively, as
DNS does; anything that is not a syntactically valid host is refused, including a trailing dot.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from guard.edge.memo import Memo
from guard.errors import Refusal, send_refusal

_LABEL: Final = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_NAME: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def split_host(value: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` into a lower-case host and a port; ValueError if malformed."""
    text = value.strip().lower()
    if text != value.lower() or not text:
        raise ValueError(f"{value!r} is not a host")
    port_text = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{value!r} is not a host")
        host, rest = text[: end + 1], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{value!r} is not a valid IPv6 literal") from None
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{value!r} is not a host")
            port_text = rest[1:]
    else:
        host, sep, port_text_ = text.partition(":")
        port_text = port_text_ if sep else None
        if not _NAME.fullmatch(host):
            raise ValueError(f"{value!r} is not a valid host name")
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r} has an invalid port")
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class HostPattern:
    host: str  # a full name, or the suffix after "*." for wildcards
    port: int | None
    wildcard: bool

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


def parse_host_pattern(text: str) -> HostPattern:
    """Parse one allowed-hosts entry; ValueError with a fix-it hint if malformed."""
    wildcard = text.startswith("*.")
    try:
        host, port = split_host(text[2:] if wildcard else text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a host pattern (write name, *.domain or host:port)"
        ) from None
    if wildcard and host.startswith("["):
        raise ValueError(f"{text!r}: wildcards apply to names, not IP literals")
    return HostPattern(host, port, wildcard)


def default_allowed_hosts(bind_host: str) -> tuple[str, ...]:
    """localhost, 127.0.0.1, [::1] and the bind address when it names one interface."""
    hosts = ["localhost", "127.0.0.1", "[::1]"]
    bind = bind_host.strip("[]")
    if bind not in {"", "0.0.0.0", "::"}:  # noqa: S104 - these are excluded, not bound
        entry = f"[{bind}]" if ":" in bind else bind
        if entry not in hosts:
            hosts.append(entry)
    return tuple(hosts)


def validate_host(value: str | None, scheme: str, patterns: tuple[HostPattern, ...]) -> bool:
    """True when ``value`` (a Host header, or None if absent/duplicated) matches a pattern."""
    if value is None:
        return False
    try:
        host, port = split_host(value)
    except ValueError:
        return False
    effective_port = port if port is not None else DEFAULT_PORTS.get(scheme, 80)
    return any(p.matches(host, effective_port) for p in patterns)


class _Verdicts(Memo[tuple[str | None, str], bool]):
    """``validate_host`` for one set of patterns, remembered for up to 256 (host, scheme)
    pairs: a gateway is addressed by few names, so nearly every request is one lookup."""

    def __init__(self, patterns: tuple[HostPattern, ...]) -> None:
        super().__init__(lambda key: validate_host(*key, patterns), 256, keep=_plausible)
        self.patterns = patterns


def _plausible(key: tuple[str | None, str]) -> bool:
    return key[0] is None or len(key[0]) <= 300


class AllowedHostsMiddleware:
    """Answer 400 ``host_not_allowed`` unless the request's host is allowed."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_hosts: tuple[str, ...],
        exempt_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.patterns = tuple(parse_host_pattern(p) for p in allowed_hosts)
        self.verdicts = _Verdicts(self.patterns)
        # Orchestrator probes address the pod by IP; these paths reveal nothing and act on nothing.
        self.exempt_paths = exempt_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        context = scope["guard"]
        if not self.verdicts[context.host, context.scheme]:
            await send_refusal(scope, send, Refusal("host_not_allowed"))
            return
        await self.app(scope, receive, send)
