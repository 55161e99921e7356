"""The innermost application: forward an authorized request to MLflow and stream the answer back.

What MLflow receives is decided here: the canonical path, a fixed ``Host`` it allows, forwarding
headers the gateway computed itself, and none of the caller's credentials or identity claims.
Request bodies are read whole up to a limit (so later checks decide on exactly these bytes),
except on artifact routes, which stream both ways and are never held in memory.

Request headers are forwarded by an allowlist (``FORWARDED``) of what MLflow 3.17.2's server
reads (``mlflow/server``: Flask handlers, the native FastAPI routes, ``otel_api``) and what its
clients send that it may use; every other header is dropped, whatever its spelling:

- ``Accept``, ``Accept-Encoding``: content negotiation of ordinary clients (harmless to pass).
- ``Content-Type``: Flask handlers check for ``application/json``; OTLP picks protobuf or JSON.
- ``Content-Encoding``: OTLP span export decompresses gzip/deflate bodies by it.
- ``User-Agent``: read by the OTLP endpoint; ``X-MLflow-Client-Version``: sent by every MLflow
  client, informational.
- ``X-MLflow-Experiment-Id``, ``X-MLflow-Run-Id``: where OTLP spans go (the gateway authorizes
  them; ``guard/authz/route_table.toml``).
- ``Range``, ``If-Range``, ``If-None-Match``, ``If-Modified-Since``, ``If-Match``,
  ``If-Unmodified-Since``: resumable and conditional artifact downloads (Werkzeug's
  ``make_conditional``, Starlette's ``FileResponse``).

The gateway then adds its own ``Host``, ``X-Forwarded-For``/``-Proto``/``-Host``,
``X-Request-Id``, ``Content-Length`` and, with workspaces on, ``X-MLflow-Workspace`` naming
the workspace the request was authorized in. Never forwarded, for instance: ``Authorization`` and
``Cookie`` (the gateway's credentials; MLflow reads no cookie), the caller's own
``X-MLflow-Workspace`` and every other ``X-MLflow-*`` selector or credential, identity claims
(``X-WebAuth-User``, ``Remote-User``, ``X-Forwarded-User``, ``X-Auth-Request-*`` ...), the
caller's forwarding headers, ``Origin`` (CORS is the gateway's), ``Expect``, and every hop-by-hop or
connection-specific header (``Connection`` and what it names, ``Keep-Alive``, ``TE``,
``Trailer``, ``Transfer-Encoding``, ``Upgrade``, ``HTTP2-Settings``, ``Proxy-*``): an allowed
name listed in ``Connection`` is dropped too. Names are matched case-insensitively; an
underscore spelling (``X_Forwarded_For``, which WSGI would read as the dashed one) is never
allowed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Final
from urllib.parse import quote

from starlette.types import Message, Receive, Scope, Send

from guard.edge.artifactpaths import DOWNLOADS
from guard.edge.bodies import ClientDisconnected
from guard.edge.deadlines import TIMED_OUT, BodyTimeout
from guard.edge.headers import NameMemo
from guard.errors import send_refusal
from guard.upstream.client import UpstreamClient, UpstreamError, VersionGate

logger = logging.getLogger("guard.proxy")

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# The only request headers MLflow sees from a caller (why each: the module docstring).
FORWARDED: Final = frozenset(
    {
        "accept",
        "accept-encoding",
        "content-type",
        "content-encoding",
        "user-agent",
        "x-mlflow-client-version",
        "x-mlflow-experiment-id",
        "x-mlflow-run-id",
        "range",
        "if-range",
        "if-none-match",
        "if-modified-since",
        "if-match",
        "if-unmodified-since",
    }
)
# The gateway answers with its own cookies, CORS and date; an upstream's are not passed on.
RESPONSE_DROPPED: Final = HOP_BY_HOP | {"set-cookie", "date", "server", "www-authenticate"}
ARTIFACT_CSP: Final = b"sandbox"
_PATH_SAFE: Final = "/!$&'()*+,;=:@-._~"
# A path that ``quote(path, safe=_PATH_SAFE)`` leaves as it is (ASCII letters, digits, safe).
_PLAIN_PATH: Final = re.compile(r"[A-Za-z0-9/!$&'()*+,;=:@\-._~]*")
_WATCH_DISCONNECT_ABOVE: Final = 1024 * 1024


_RESPONSE_DROPPED_BYTES: Final = frozenset(name.encode() for name in RESPONSE_DROPPED)


def _forwarded_name(key: bytes) -> str | None:
    """The name a request header is forwarded under (lower case), ``""`` for ``Connection``,
    None for any other. Compared in bytes: a latin-1 character outside ASCII never lower-cases
    into ASCII."""
    name = key.lower().decode("latin-1")
    if name in FORWARDED:
        return name
    return "" if name == "connection" else None


def _listed_forwarded(value: bytes) -> frozenset[str]:
    """The allowed names a request's ``Connection`` value lists (its tokens stripped and
    lower-cased as text): the only ones that can take a header out of the forwarded list."""
    return FORWARDED.intersection(t.strip().lower() for t in value.decode("latin-1").split(","))


# The marker the response memo answers for ``Connection`` (compared by identity).
_CONNECTION: Final = b"connection"


def _response_name(key: bytes) -> bytes | None:
    """The name a response header is passed on under (lower case), None if it is dropped,
    ``_CONNECTION`` itself for a ``Connection`` header (dropped too, its list read)."""
    name = key.lower()
    if name == _CONNECTION:
        return _CONNECTION
    if name in _RESPONSE_DROPPED_BYTES or name.startswith(b"access-control-"):
        return None
    return name


def _listed(value: bytes) -> frozenset[bytes]:
    """The names an answer's ``Connection`` value lists (tokens stripped and lower-cased)."""
    return frozenset(t.strip().lower() for t in value.split(b","))


# Memoized per header name, and per Connection value (all four functions are pure): see
# guard.edge.headers.NameMemo (bytes in, bounded in count and length).
_REQUEST_NAMES: Final = NameMemo(_forwarded_name)
_REQUEST_LISTED: Final = NameMemo(_listed_forwarded)
_RESPONSE_NAMES: Final = NameMemo(_response_name)
_RESPONSE_LISTED: Final = NameMemo(_listed)


def upstream_request_headers(
    headers: list[tuple[bytes, bytes]], extra: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The allowed inbound headers (``FORWARDED``) that ``Connection`` does not name, followed
    by the gateway's own."""
    names = _REQUEST_NAMES
    result = []
    listed: frozenset[str] = frozenset()
    for key, value in headers:
        name = names[key]
        if name:
            result.append((name, value.decode("latin-1")))
        elif name is not None:  # Connection
            listed |= _REQUEST_LISTED[value]
    if listed:
        result = [(name, value) for name, value in result if name not in listed]
    result.extend(extra)
    return result


def client_response_headers(headers: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """An upstream answer's headers, lower-cased, without ``RESPONSE_DROPPED``, CORS headers
    and whatever its ``Connection`` names."""
    names = _RESPONSE_NAMES
    result = []
    listed: frozenset[bytes] = frozenset()
    for key, value in headers:
        name = names[key]
        if name is None:
            continue
        if name is _CONNECTION:
            listed |= _RESPONSE_LISTED[value]
            continue
        result.append((name, value))
    if listed:
        result = [(name, value) for name, value in result if name not in listed]
    return result


async def stream_body(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives. ``receive`` is timed (guard.edge.deadlines): a body that
    comes too slowly raises ``BodyTimeout`` here, inside the upstream client's writer, which then
    abandons the request to MLflow without its end (no last chunk, fewer bytes than its
    Content-Length)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        if chunk := message.get("body", b""):
            yield chunk
        if not message.get("more_body", False):
            return


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class ProxyApp:
    """Forward to MLflow. Expects the route (``guard.route``) and, on buffered routes, the body
    (``guard.body``) from the layers above."""

    def __init__(self, *, client: UpstreamClient, version: VersionGate) -> None:
        self.client = client
        self.version = version

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = scope["guard"]
        if (refusal := await self.version.check(self.client)) is not None:
            await send_refusal(scope, send, refusal)
            return
        length, chunked = scope["guard.framing"]
        extra = [
            ("host", self.client.host_header),
            ("x-forwarded-for", context.client),
            ("x-forwarded-proto", context.scheme),
            ("x-forwarded-host", context.host or ""),
            ("x-request-id", context.request_id),
        ]
        if (workspace := scope.get("guard.workspace")) is not None:
            # The workspace the request was authorized in (guard.authz.workspaces), never the
            # caller's own header: MLflow acts in exactly that one.
            extra.append(("x-mlflow-workspace", workspace))
        body: bytes | AsyncIterator[bytes] | None
        if "guard.body" in scope:
            body = scope["guard.body"] or None
            if body is not None:
                extra.append(("content-length", str(len(body))))
        else:
            body = stream_body(receive) if chunked or length else None
            if length is not None:
                extra.append(("content-length", str(length)))
        try:
            await self._forward(scope, receive, send, body, extra)
        except ClientDisconnected:
            logger.info("request %s: client went away", context.request_id)
        except BodyTimeout as exc:  # the upload failed before the client took it over
            logger.info("request %s: upload too slow: %s", context.request_id, exc)
            await send_refusal(scope, send, exc.refusal)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes | AsyncIterator[bytes] | None,
        extra: list[tuple[str, str]],
    ) -> None:
        path = scope["path"]
        target = path if _PLAIN_PATH.fullmatch(path) else quote(path, safe=_PATH_SAFE)
        if query := scope["query_string"]:
            target += "?" + query.decode("latin-1")
        headers = upstream_request_headers(scope["headers"], extra)
        context = scope["guard"]
        method = scope.get("guard.forward_method", scope["method"])  # HEAD goes as GET (bodies.py)
        started = time.monotonic()
        try:
            response = await self.client.request(method, target, headers, body)
        except UpstreamError as exc:
            context.upstream_seconds = time.monotonic() - started
            # An upload that came too slowly made the request to MLflow fail: that is the answer.
            refusal = scope.get(TIMED_OUT) or exc.refusal
            logger.warning(
                "request %s: forwarding failed: %s", scope["guard"].request_id, refusal.reason
            )
            await send_refusal(scope, send, refusal)
            return
        context.upstream_seconds = time.monotonic() - started
        context.upstream_status = response.status
        async with response:
            answer = client_response_headers(response.headers)
            route = scope.get("guard.route")
            if route is not None and route.path in DOWNLOADS:
                # An artifact is the caller's content: opened in a browser, an HTML or SVG file
                # runs no script. The security-headers layer merges this with the gateway's CSP.
                answer.append((b"content-security-policy", ARTIFACT_CSP))
            start: Message = {
                "type": "http.response.start",
                "status": response.status,
                "headers": answer,
            }
            await send(start)
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return
            await self._send_body(scope, receive, send, response.body(), response.headers)

    async def _send_body(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        chunks: AsyncIterator[bytes],
        headers: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        names = _RESPONSE_NAMES  # content-length is never dropped: its lower-case name
        lengths = [v for k, v in headers if names[k] == b"content-length"]
        declared = int(lengths[0]) if lengths and lengths[0].isdigit() else None
        small = declared is not None and declared <= _WATCH_DISCONNECT_ABOVE
        # A large download whose reader hung up must stop pulling from MLflow; watching costs a
        # task, so small answers (nearly all API calls) do without.
        watcher = None if small else asyncio.ensure_future(_wait_for_disconnect(receive))
        # The chunk that completes a declared length ends the response (the same bytes on the
        # wire as an empty last message after it, one message fewer through every layer).
        remaining = declared
        ended = False
        try:
            async for chunk in chunks:
                if watcher is not None and watcher.done():
                    raise ClientDisconnected
                if ended:  # (the client ends a body at its declared length: nothing follows)
                    continue
                if remaining is not None:
                    remaining -= len(chunk)
                    if remaining == 0:
                        await send({"type": "http.response.body", "body": chunk})
                        ended = True
                        continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not ended:
                await send({"type": "http.response.body", "body": b""})
        except UpstreamError as exc:
            # Too late for an error response: the status line is out. Leaving the response
            # incomplete makes the server close the connection, so the client sees the failure.
            if (timed_out := scope.get(TIMED_OUT)) is not None:  # MLflow answered early
                scope["guard"].refusal = timed_out
            logger.warning(
                "request %s: upstream failed mid-answer: %s",
                scope["guard"].request_id,
                exc.refusal.reason,
            )
        finally:
            if watcher is not None:
                watcher.cancel()
