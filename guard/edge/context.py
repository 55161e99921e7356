"""The outermost layer: who is on the other end of the socket, a request id, and the last resort.

``RequestContextMiddleware`` computes, once per request, what every inner layer needs (client
address, scheme and host as seen through trusted proxies only, a request id) and stores it in
``scope["guard"]``. It stamps ``X-Request-Id`` on every response and is the one place that
catches any exception: it logs it with the request id and answers ``internal_error``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.edge.protocol import DETAIL_KEY, REFUSAL_KEY
from guard.edge.requestid import new_request_id
from guard.errors import Refusal, render, send_refusal

if TYPE_CHECKING:
    from guard.identity.base import Principal

logger = logging.getLogger("guard.request")

_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class RequestContext:
    """Per-request facts shared by the middleware layers (lives in ``scope["guard"]``)."""

    request_id: str
    peer: str  # the TCP peer
    client: str  # the client address, through trusted proxies only
    scheme: str  # http or https, through trusted proxies only
    host: str | None  # the Host the client asked for; None if missing or duplicated
    started: float = field(default_factory=time.monotonic)
    principal: Principal | None = None
    refusal: Refusal | None = None
    status: int = 0
    # What the audit trail records, filled in by the layer that knows it.
    action: str = ""  # the action(s) authorized, e.g. "update" or "delete,promote"
    resources: list[str] = field(default_factory=list)  # experiment:NAME / model:NAME
    rule: str = ""  # the grant that allowed (or the deny that refused), as a policy row
    policy_version: int = 0
    changes: dict[str, object] = field(default_factory=dict)  # declared fields a write sets
    upstream_status: int = 0
    upstream_seconds: float = 0.0  # until MLflow's response headers arrived
    bytes_in: int = 0
    bytes_out: int = 0
    authorization_seconds: float = 0.0
    audit_seconds: float = 0.0  # waiting for the intent record's fsync
    unrecorded: bool = False  # one refusal of a flood: counted in a summary, not recorded alone

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _header_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in headers if key == name]


def _is_trusted(address: str, networks: tuple[Network, ...]) -> bool:
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def build_context(scope: Scope, trusted: tuple[Network, ...]) -> RequestContext:
    """Derive the request's context; forwarding headers count only from a trusted peer."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    client = scope.get("client")
    peer = client[0] if client else ""
    hosts = _header_values(headers, b"host")
    host = hosts[0] if len(hosts) == 1 else None
    scheme: str = scope.get("scheme", "http")
    request_id = ""
    address = peer
    if _is_trusted(peer, trusted):
        chain = [
            hop.strip()
            for value in _header_values(headers, b"x-forwarded-for")
            for hop in value.split(",")
            if hop.strip()
        ]
        # Walk from the nearest hop outwards; the first untrusted address is the client.
        for hop in reversed(chain):
            address = hop
            if not _is_trusted(hop, trusted):
                break
        if protos := _header_values(headers, b"x-forwarded-proto"):
            proto = protos[-1].split(",")[-1].strip().lower()
            if proto in {"http", "https"}:
                scheme = proto
        if forwarded_hosts := _header_values(headers, b"x-forwarded-host"):
            host = forwarded_hosts[-1].split(",")[-1].strip() if len(forwarded_hosts) == 1 else None
        if ids := _header_values(headers, b"x-request-id"):
            request_id = ids[0] if _REQUEST_ID.fullmatch(ids[0]) else ""
    return RequestContext(
        request_id=request_id or new_request_id(),
        peer=peer,
        client=address,
        scheme=scheme,
        host=host,
    )


class RequestContextMiddleware:
    """Build the request context, stamp X-Request-Id, and turn any exception into a 500."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        trusted_proxies: tuple[str, ...] = (),
        on_complete: Callable[[Scope], None] | None = None,
    ) -> None:
        self.app = app
        self.trusted = tuple(ipaddress.ip_network(p, strict=False) for p in trusted_proxies)
        self.on_complete = on_complete  # the audit trail's outcome record, whatever happened

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._refuse_websocket(scope, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = build_context(scope, self.trusted)
        scope["guard"] = context
        request_id = context.request_id.encode()
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                context.status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            elif message["type"] == "http.response.body":
                context.bytes_out += len(message.get("body", b""))
            await send(message)

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                context.bytes_in += len(message.get("body", b""))
            return message

        try:
            if (reason := scope.get(REFUSAL_KEY)) is not None:
                # The connection layer refused it (guard.edge.protocol): answered, not served.
                refusal = Refusal(reason, scope.get(DETAIL_KEY, ""))
                await send_refusal(scope, send_with_id, refusal)
            else:
                await self.app(scope, counting_receive, send_with_id)
        except Exception:
            logger.exception(
                "request %s %s %s failed", context.request_id, scope["method"], scope["path"]
            )
            if not started:
                await send_refusal(scope, send_with_id, Refusal("internal_error"))
        finally:
            reason = scope.get(REFUSAL_KEY)
            if reason is not None and (context.refusal is None or context.refusal.reason != reason):
                # The parser refused the body under a running request (a broken chunk): the
                # client got the protocol's refusal, whatever the application tried to send.
                context.refusal = Refusal(reason, scope.get(DETAIL_KEY, ""))
                context.status = context.refusal.status
            self._complete(scope, context)

    async def _refuse_websocket(self, scope: Scope, send: Send) -> None:
        """MLflow serves no WebSocket route: refused before anything else looks at it, and
        recorded like any refused request (the gateway's own server refuses upgrades earlier,
        in guard.edge.protocol; this covers any other ASGI server)."""
        context = build_context(scope, self.trusted)
        scope["guard"] = context
        refusal = context.refusal = Refusal("websocket_not_served")
        context.status = refusal.status
        if "websocket.http.response" in scope.get("extensions", {}):
            content_type, body = render(refusal, context.request_id, as_html=False)
            headers = [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"x-guard-reason", refusal.reason.encode()),
                (b"x-request-id", context.request_id.encode()),
            ]
            start = {"type": "websocket.http.response.start", "status": refusal.status}
            await send({**start, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
            context.bytes_out = len(body)
        else:
            await send({"type": "websocket.close", "code": 1008})
        # The audit trail records HTTP requests; the handshake is one (a GET with Upgrade).
        self._complete({**scope, "type": "http", "method": "GET"}, context)

    def _complete(self, scope: Scope, context: RequestContext) -> None:
        if self.on_complete is not None:
            try:
                self.on_complete(scope)
            except Exception:  # logged with its trace; the response is already out
                logger.exception("request %s: audit outcome not recorded", context.request_id)
