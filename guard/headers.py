"""Security headers on every response, replacing whatever an inner layer (or MLflow) set."""

from __future__ import annotations

from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Response headers the gateway owns; an upstream's values are dropped in favour of ours.
OWNED: Final = frozenset(
    {
        b"x-content-type-options",
        b"x-frame-options",
        b"content-security-policy",
        b"referrer-policy",
        b"strict-transport-security",
        b"cross-origin-opener-policy",
        b"x-xss-protection",
    }
)


class SecurityHeadersMiddleware:
    """Set nosniff, frame-ancestors (and X-Frame-Options), Referrer-Policy, and HSTS over TLS."""

    def __init__(self, app: ASGIApp, *, frame_ancestors: str, hsts_max_age: int) -> None:
        self.app = app
        headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"content-security-policy", f"frame-ancestors {frame_ancestors}".encode()),
            (b"referrer-policy", b"same-origin"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
        legacy = {"'self'": b"SAMEORIGIN", "'none'": b"DENY"}.get(frame_ancestors.strip())
        if legacy:
            headers.append((b"x-frame-options", legacy))
        self.headers = headers
        self.hsts = (b"strict-transport-security", f"max-age={hsts_max_age}".encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tls = scope["guard"].scheme == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in OWNED]
                kept.extend(self.headers)
                if tls:
                    kept.append(self.hsts)
                message["headers"] = kept
            await send(message)

        await self.app(scope, receive, send_with_headers)
