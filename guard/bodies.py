"""Request bodies: framing checked, buffered up to a limit, or left to stream.

On buffered routes the whole body is read here, once, into ``scope["guard.body"]``: the
authorization layer decides on those bytes and the proxy forwards exactly them. Artifact uploads
are never buffered; their body streams from the client to MLflow.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from guard.errors import Refusal, send_refusal
from guard.proxy import ClientDisconnected, check_framing, read_body


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
            limit = f"The limit is {self.max_body_size} bytes."
            await send_refusal(scope, send, Refusal("body_too_large", limit))
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
