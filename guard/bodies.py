"""Request bodies: framing checked, buffered up to a limit, or left to stream.

On buffered routes the whole body is read here, once, into ``scope["guard.body"]``: the
authorization layer decides on those bytes and the proxy forwards exactly them. Artifact uploads
are never buffered; their body streams from the client to MLflow.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from guard.errors import Refusal, send_refusal
from guard.proxy import ClientDisconnected


def too_large(limit: int) -> Refusal:
    return Refusal("body_too_large", f"The limit is {limit} bytes.")


def check_framing(headers: list[tuple[bytes, bytes]]) -> tuple[Refusal | None, int | None, bool]:
    """Validate Content-Length / Transfer-Encoding. Returns (refusal, length, chunked)."""
    lengths = {v.strip() for k, v in headers if k == b"content-length"}
    encodings = [v.strip().lower() for k, v in headers if k == b"transfer-encoding"]
    if encodings and (lengths or encodings != [b"chunked"]):
        return Refusal("invalid_body_framing"), None, False
    if len(lengths) > 1:
        return Refusal("invalid_body_framing"), None, False
    if lengths:
        (text,) = lengths
        if not text.isdigit():
            return Refusal("invalid_body_framing"), None, False
        return None, int(text), False
    return None, None, bool(encodings)


async def read_body(receive: Receive, limit: int) -> bytes | Refusal:
    """Read the whole request body, refusing past ``limit`` bytes."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class BodyMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_size: int) -> None:
        self.app = app
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal, length, chunked = check_framing(scope["headers"])
        if refusal is not None:
            await send_refusal(scope, send, refusal)
            return
        scope["guard.framing"] = (length, chunked)
        if scope["guard.route"].body == "stream":
            await self.app(scope, receive, send)
            return
        body = b""
        if length is not None and length > self.max_body_size:
            await send_refusal(scope, send, too_large(self.max_body_size))
            return
        if length or chunked:
            try:
                read = await read_body(receive, self.max_body_size)
            except ClientDisconnected:
                return
            if isinstance(read, Refusal):
                await send_refusal(scope, send, read)
                return
            body = read
        scope["guard.body"] = body
        await self.app(scope, receive, send)
