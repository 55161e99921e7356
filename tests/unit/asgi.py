"""A minimal ASGI harness: call an app with an exact scope (duplicate headers and all)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass
class Result:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def reason(self) -> str | None:
        return self.header("x-guard-reason")


@dataclass
class Recorder:
    """An inner app that answers 200 and remembers the scope it was given."""

    scopes: list[Scope] = field(default_factory=list)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send({"type": "http.response.body", "body": b"ok"})


def call(
    app: ASGIApp,
    *,
    method: str = "GET",
    path: str = "/",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    client: tuple[str, int] = ("203.0.113.7", 40000),
    scheme: str = "http",
    query: bytes = b"",
) -> Result:
    if headers is None:
        headers = [("host", "localhost")]
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": client,
        "server": ("127.0.0.1", 5000),
        "scheme": scheme,
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }
    sent: list[Message] = []
    chunks = [body]

    async def receive() -> Message:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(), "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return Result(
        status=start["status"],
        headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in start["headers"]],
        body=b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"),
    )
