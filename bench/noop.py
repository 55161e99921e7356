"""A no-op upstream: answers every request at once, to show the gateway's own cost."""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

BODY = b'{"run": {"info": {"run_id": "x"}}}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
# The gateway forwards only to MLflow releases its route table was verified against.
VERSION = b"3.17.2"


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    body = VERSION if scope["path"] == "/version" else BODY
    headers = [(b"content-length", str(len(body)).encode())] if body is VERSION else HEADERS
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
