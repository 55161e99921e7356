"""CORS for browser scripts on other origins, and a cross-site write guard for everyone else.

Only origins listed exactly (scheme, host and port) get CORS headers, always with credentials and
never a wildcard. A preflight is answered here and never reaches MLflow. A state-changing request
(POST, PUT, PATCH, DELETE) that carries an ``Origin`` which is neither listed nor the gateway's
own origin is refused: browsers attach cached Basic credentials to cross-site form posts, so
without this any web page could write to MLflow as the person visiting it.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.edge.hosts import DEFAULT_PORTS, split_host
from guard.errors import Refusal, send_refusal

ALLOWED_METHODS: Final = "GET, HEAD, POST, PUT, PATCH, DELETE"
UNSAFE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
EXPOSED_HEADERS: Final = "X-Request-Id, X-Guard-Reason"
PREFLIGHT_MAX_AGE: Final = "600"
_TOKEN_LIST: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


def parse_origin(text: str) -> str:
    """Normalize ``scheme://host[:port]``: lower case, default port dropped. ValueError if bad."""
    parts = urlsplit(text)
    if (
        parts.scheme not in DEFAULT_PORTS
        or parts.path
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
    ):
        raise ValueError(
            f"{text!r} is not an origin (write scheme://host[:port], e.g. https://ml.example.com;"
            " wildcards and 'null' are not allowed)"
        )
    try:
        host, port = split_host(parts.netloc)
    except ValueError:
        raise ValueError(f"{text!r} is not an origin (the host part is not valid)") from None
    if port is None or port == DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def _normalized(origin: str) -> str | None:
    try:
        return parse_origin(origin)
    except ValueError:
        return None


class CORSMiddleware:
    """Answer preflights, add CORS headers for listed origins, refuse cross-site writes."""

    def __init__(self, app: ASGIApp, *, allowed_origins: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = frozenset(parse_origin(o) for o in allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origins = [v for k, v in scope["headers"] if k == b"origin"]
        if not origins:
            await self.app(scope, receive, send)
            return
        origin_text = origins[0].decode("latin-1")
        origin = _normalized(origin_text) if len(origins) == 1 else None
        listed = origin is not None and origin in self.allowed
        method = scope["method"]
        if method == "OPTIONS" and any(
            k == b"access-control-request-method" for k, _ in scope["headers"]
        ):
            await self._preflight(scope, send, origin_text if listed else None)
            return
        if not listed:
            context = scope["guard"]
            own = _normalized(f"{context.scheme}://{context.host}") if context.host else None
            if method in UNSAFE_METHODS and (origin is None or origin != own):
                await send_refusal(scope, send, Refusal("cors_origin_not_allowed"))
                return
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["access-control-allow-origin"] = origin_text
                headers["access-control-allow-credentials"] = "true"
                headers["access-control-expose-headers"] = EXPOSED_HEADERS
                headers.add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, scope: Scope, send: Send, origin: str | None) -> None:
        requested = ""
        for key, value in scope["headers"]:
            if key == b"access-control-request-method":
                method = value.decode("latin-1").upper()
                if method not in ALLOWED_METHODS.split(", "):
                    origin = None
            elif key == b"access-control-request-headers":
                requested = value.decode("latin-1").strip()
        if requested and not _TOKEN_LIST.fullmatch(requested):
            origin = None
        if origin is None:
            await send_refusal(
                scope, send, Refusal("cors_origin_not_allowed"), [(b"vary", b"Origin")]
            )
            return
        headers = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-allow-methods", ALLOWED_METHODS.encode()),
            (b"access-control-max-age", PREFLIGHT_MAX_AGE.encode()),
            (b"vary", b"Origin"),
            (b"content-length", b"0"),
        ]
        if requested:
            headers.append((b"access-control-allow-headers", requested.encode("latin-1")))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
