"""A no-op upstream: answers every request at once, to show the gateway's own cost."""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

# Enough for the gateway's resolver to name a run's experiment (and cache it, as it would
# with MLflow): an answer without these is "unknown", which is never cached, so every request
# would cost a second, uncached lookup.
BODY = b'{"run": {"info": {"run_id": "x", "experiment_id": "0"}}}'
EXPERIMENT = b'{"experiment": {"experiment_id": "0", "name": "Default"}}'
# The gateway forwards only to MLflow releases its route table was verified against.
VERSION = b"3.17.2"
ANSWERS = {"/version": VERSION, "/api/2.0/mlflow/experiments/get": EXPERIMENT}


def _headers(body: bytes) -> list[tuple[bytes, bytes]]:
    content_type = [] if body is VERSION else [(b"content-type", b"application/json")]
    return [*content_type, (b"content-length", str(len(body)).encode())]


HEADERS = {body: _headers(body) for body in (BODY, *ANSWERS.values())}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    body = ANSWERS.get(scope["path"], BODY)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS[body]})
    await send({"type": "http.response.body", "body": body})
