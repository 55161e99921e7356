"""The floor of any gateway written like this one: a hop and nothing else.

The gateway's own upstream client and header filtering behind uvicorn, with none of its layers
(no login, no authorization, no audit trail, no limits): what a Python proxy in front of MLflow
costs on this machine before the gateway decides or records anything. ``bench.proxy`` runs it
beside the gateway so each run shows how much of the gateway's cost is the hop itself. Not
something to deploy: it checks nothing. ``UPSTREAM`` names the upstream's URL.
"""

from __future__ import annotations

import os

from starlette.types import Message, Receive, Scope, Send

from guard.upstream.client import UpstreamClient, UpstreamLimits
from guard.upstream.proxy import client_response_headers, upstream_request_headers

client = UpstreamClient(
    os.environ.get("UPSTREAM", "http://127.0.0.1:5000"),
    UpstreamLimits(connect_timeout=5, read_timeout=60, pool_timeout=5, max_connections=64,
                   keepalive_expiry=30),
)  # fmt: skip


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    target = scope["path"]
    if query := scope["query_string"]:
        target += "?" + query.decode("latin-1")
    extra = [("host", client.host_header)]
    if body:
        extra.append(("content-length", str(len(body))))
    response = await client.request(
        scope["method"], target, upstream_request_headers(scope["headers"], extra), body or None
    )
    async with response:
        start: Message = {"type": "http.response.start", "status": response.status,
                          "headers": client_response_headers(response.headers)}  # fmt: skip
        await send(start)
        async for chunk in response.body():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            client.open()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await client.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
