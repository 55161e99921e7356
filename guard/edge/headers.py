"""Headers at the edge: request headers that may appear once, and the security headers of every
response.

A repeated singular request header is refused (400 ``ambiguous_parameter``) before anything
reads it: MLflow (Starlette, Werkzeug) and the gateway's own layers would each pick one value,
not necessarily the same. Singular here means the names in ``SINGLE_VALUED`` and every
``X-MLflow-*``; an underscore spelling counts as the dashed name, as in WSGI. ``Content-Length``
and ``Transfer-Encoding`` are judged by the body framing check (identical repeated lengths are
allowed by RFC 9110).

Response security headers replace whatever an inner layer (or MLflow) set, except the
``Content-Security-Policy``: an inner policy (``sandbox`` on artifacts, a page's own policy) is
merged with the gateway's directives, which win where both name the same directive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.edge.memo import Memo
from guard.errors import Refusal, send_refusal

SINGLE_VALUED: Final = frozenset(
    {
        "host",
        "authorization",
        "content-type",
        "content-encoding",
        "origin",
        "user-agent",
        "x-request-id",
        "range",
        "if-range",
        "if-modified-since",
        "if-unmodified-since",
        "access-control-request-method",
    }
)
SINGLE_VALUED_PREFIX: Final = "x-mlflow-"
CSP: Final = b"content-security-policy"
# Response headers the gateway owns; an upstream's values are dropped in favour of ours.
OWNED: Final = frozenset(
    {
        b"x-content-type-options",
        b"x-frame-options",
        b"referrer-policy",
        b"strict-transport-security",
        b"cross-origin-opener-policy",
        b"x-xss-protection",
    }
)
_REPLACED: Final = OWNED | {CSP}
T = TypeVar("T")


class NameMemo(Memo[bytes, T]):
    """A memo of what a header name means (``classify(name)``), for names of at most 64 bytes,
    up to ``size`` of them: a request's header names are nearly always the same few, and one
    dict lookup costs less than decoding, lower-casing and comparing each of them again."""

    def __init__(self, classify: Callable[[bytes], T], size: int = 1024) -> None:
        super().__init__(classify, size, keep=_short)


def _short(name: bytes) -> bool:
    return len(name) <= 64


def singular_name(key: bytes) -> str | None:
    """The name a singular header goes by (lower case, dashes for underscores), or None for a
    header that may repeat."""
    name = key.decode("latin-1").lower().replace("_", "-")
    if name in SINGLE_VALUED or name.startswith(SINGLE_VALUED_PREFIX):
        return name
    return None


def first_repeated(headers: list[tuple[bytes, bytes]], names: NameMemo[str | None]) -> str | None:
    """The first singular header name (``singular_name``) that the headers repeat, if any."""
    seen: set[str] = set()
    for key, _ in headers:
        name = names[key]
        if name is None:
            continue
        if name in seen:
            return name
        seen.add(name)
    return None


class SingleValuedHeadersMiddleware:
    """Refuse a request that repeats a singular header (400 ``ambiguous_parameter``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.names = NameMemo(singular_name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and (name := first_repeated(scope["headers"], self.names)) is not None
        ):
            refusal = Refusal("ambiguous_parameter", f"The header {name} is repeated.")
            await send_refusal(scope, send, refusal)
            return
        await self.app(scope, receive, send)


def _directives(policy: bytes) -> list[tuple[bytes, bytes]]:
    """(lowercase name, directive) for each non-empty directive of one policy."""
    found = []
    for part in policy.split(b";"):
        directive = part.strip()
        if directive:
            found.append((directive.split(None, 1)[0].lower(), directive))
    return found


def merge_policies(own: bytes, inner: list[bytes]) -> list[bytes]:
    """The gateway's policy with the inner ones merged in: an inner directive the gateway also
    sets is dropped; an inner policy repeating a directive already merged stays a policy of its
    own (a browser enforces every policy, so nothing is loosened)."""
    own_directives = _directives(own)
    owned_names = {name for name, _ in own_directives}
    merged = [directive for _, directive in own_directives]
    names = set(owned_names)
    separate = []
    for policy in inner:
        kept = [(n, d) for n, d in _directives(policy) if n not in owned_names]
        if not kept:
            continue
        if names.isdisjoint(n for n, _ in kept):
            merged.extend(d for _, d in kept)
            names.update(n for n, _ in kept)
        else:
            separate.append(b"; ".join(d for _, d in kept))
    return [b"; ".join(merged), *separate]


class SecurityHeadersMiddleware:
    """Set nosniff, frame-ancestors (and X-Frame-Options), Referrer-Policy, and HSTS over TLS."""

    def __init__(self, app: ASGIApp, *, frame_ancestors: str, hsts_max_age: int) -> None:
        self.app = app
        headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"same-origin"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
        legacy = {"'self'": b"SAMEORIGIN", "'none'": b"DENY"}.get(frame_ancestors.strip())
        if legacy:
            headers.append((b"x-frame-options", legacy))
        self.headers = headers
        self.csp = f"frame-ancestors {frame_ancestors}".encode()
        self.hsts = (b"strict-transport-security", f"max-age={hsts_max_age}".encode())
        # What every answer ends with when it brings no policy of its own, per scheme.
        self.own = [*headers, (CSP, self.csp)]
        self.own_tls = [*self.own, self.hsts]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        own = self.own_tls if scope["guard"].scheme == "https" else self.own

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = self._replace(message.get("headers", ()), own)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _replace(
        self, headers: Iterable[tuple[bytes, bytes]], own: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        """A response's headers without those the gateway owns, then the gateway's (``own``:
        for this scheme, its policy last); an inner policy is merged into the gateway's."""
        headers = list(headers)
        kept = [(key, value) for key, value in headers if key.lower() not in _REPLACED]
        # Nothing owned and no inner policy is the common answer: no second look.
        inner = [] if len(kept) == len(headers) else [v for k, v in headers if k.lower() == CSP]
        if not inner:
            kept += own
            return kept
        kept.extend(self.headers)
        kept.extend((CSP, policy) for policy in merge_policies(self.csp, inner))
        if own is self.own_tls:
            kept.append(self.hsts)
        return kept
