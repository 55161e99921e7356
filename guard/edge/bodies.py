"""Request bodies: framing checked, buffered up to a limit, or left to stream.

On buffered routes the whole body is read here, once, into ``scope["guard.body"]``: the
authorization layer decides on those bytes and the proxy forwards exactly them. Artifact uploads
are never buffered; their body streams from the client to MLflow.

A request carries a body only where the gateway reads it the way MLflow does. MLflow reads a
GET's fields from its query string, or from a JSON body when the query string is empty, and a
HEAD's from its body alone. So a HEAD with a body is refused, and a GET with one unless its query
string is empty and its route is marked ``get_body`` (its handler reads that body). A HEAD
without a body is forwarded as a GET (``scope["guard.forward_method"]``) and only the headers of
the answer go back: it is then read, authorized and answered exactly like that GET.

The lists of ids a route is resolved on are counted here, before anything is looked up: past
``max_ids_per_request`` the request is refused (``too_many_ids``). The limit is left in
``scope["guard.max_ids"]`` for the layers that read other lists of ids.

Every body is read under the deadlines of ``guard.edge.deadlines``: a buffered one is answered
``408 body_timeout`` when it arrives too slowly, and a streamed one is passed on with a
``receive`` that fails the same way (the proxy then abandons the upload to MLflow).
"""

from __future__ import annotations

from typing import Final, Literal, Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from guard.edge.deadlines import BodyDeadlines, BodyTimeout, timed_receive
from guard.edge.requestdata import RequestData, RequestDataError
from guard.errors import Refusal, send_refusal


class ClientDisconnected(Exception):
    """The client went away before its whole body arrived."""


class BodyRoute(Protocol):
    """What this layer reads of the route the classifier put in ``scope["guard.route"]``
    (``guard.authz.routes.Route``): the edge knows how a route's body is read, not the table."""

    @property
    def body(self) -> Literal["buffer", "stream"]: ...

    @property
    def get_body(self) -> bool: ...

    @property
    def id_lists(self) -> tuple[str, tuple[str, ...]]: ...


def too_large(limit: int) -> Refusal:
    return Refusal("body_too_large", f"The limit is {limit} bytes.")


_FRAMING_NAMES: Final = frozenset({b"content-length", b"transfer-encoding"})


def check_framing(headers: list[tuple[bytes, bytes]]) -> tuple[Refusal | None, int | None, bool]:
    """Validate Content-Length / Transfer-Encoding. Returns (refusal, length, chunked)."""
    framing = [item for item in headers if item[0] in _FRAMING_NAMES]
    if not framing:  # a request without a body: most of them
        return None, None, False
    lengths = {v.strip() for k, v in framing if k == b"content-length"}
    encodings = [v.strip().lower() for k, v in framing if k == b"transfer-encoding"]
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


async def read_body(
    scope: Scope, receive: Receive, limit: int, deadlines: BodyDeadlines
) -> bytes | Refusal:
    """Read the whole request body, refusing past ``limit`` bytes or when it arrives too slowly
    (``body_timeout``)."""
    timed = timed_receive(scope, receive, deadlines, whole=True)
    chunks = []
    size = 0
    while True:
        try:
            message = await timed()
        except BodyTimeout as exc:
            return exc.refusal
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


# Refusals are frozen values: built once here rather than for every GET with a query string.
_HEAD_BODY: Final = Refusal("body_not_allowed", "A HEAD request carries no body.")
_GET_QUERY_BODY: Final = Refusal("body_not_allowed", "A GET with a query string carries no body.")
_GET_BODY: Final = Refusal("body_not_allowed", "A GET on this route carries no body.")


def body_refusal(method: str, query_string: bytes, route: BodyRoute) -> Refusal | None:
    """Why a request of this method, query string and route may not carry a body, if it may
    not: where MLflow would read it otherwise than the gateway, or not at all."""
    if method == "HEAD":
        return _HEAD_BODY
    if method != "GET":
        return None
    if query_string:
        return _GET_QUERY_BODY
    if not route.get_body:
        return _GET_BODY
    return None


class BodyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_size: int,
        max_ids_per_request: int,
        deadlines: BodyDeadlines = BodyDeadlines(),  # noqa: B008 - frozen, shared
    ) -> None:
        self.app = app
        self.max_body_size = max_body_size
        self.max_ids = max_ids_per_request
        self.deadlines = deadlines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal, length, chunked = check_framing(scope["headers"])
        if refusal is not None:
            await send_refusal(scope, send, refusal)
            return
        route: BodyRoute = scope["guard.route"]
        method: str = scope["method"]
        no_body = body_refusal(method, scope["query_string"], route)
        if no_body is not None and length:  # declared: no need to read it to refuse it
            await send_refusal(scope, send, no_body)
            return
        scope["guard.framing"] = (length, chunked)
        scope["guard.max_ids"] = self.max_ids
        if method == "HEAD":
            scope["guard.forward_method"] = "GET"
        if route.body == "stream":
            pending = bool(length) or chunked
            timed = timed_receive(scope, receive, self.deadlines, whole=False, pending=pending)
            await self.app(scope, timed, send)
            return
        body = b""
        if length is not None and length > self.max_body_size:
            await send_refusal(scope, send, too_large(self.max_body_size))
            return
        if length or chunked:
            try:
                read = await read_body(scope, receive, self.max_body_size, self.deadlines)
            except ClientDisconnected:
                return
            if isinstance(read, Refusal):
                await send_refusal(scope, send, read)
                return
            body = read
        if body and no_body is not None:  # a chunked body, known only once read
            await send_refusal(scope, send, no_body)
            return
        scope["guard.body"] = body
        if (refusal := self._count_ids(scope, route)) is not None:
            await send_refusal(scope, send, refusal)
            return
        await self.app(scope, receive, send)

    def _count_ids(self, scope: Scope, route: BodyRoute) -> Refusal | None:
        source, fields = route.id_lists
        if not fields:
            return None
        try:
            data = RequestData.of(scope)
        except RequestDataError:
            return None  # an unreadable body: the layers that read it refuse it, as before
        if source == "query" and scope["method"] not in ("GET", "HEAD"):
            data = data.query_only()  # such handlers read only their query string
        try:
            data.check_id_count(fields, self.max_ids)
        except RequestDataError as exc:
            return exc.refusal
        return None
