"""Filtered searches: a caller sees only what they may read, in pages they can trust.

For a caller who may not read every experiment (or registered model), the gateway runs the
search against MLflow itself, page by page with the caller's own filter and order, drops what
the caller may not read, and refills a short page from at most ``authz.search_max_pages``
upstream pages. The page token it returns is its own, bound to the caller and the route: it
names an upstream page and a position in it, so paging through half-hidden data yields every
visible item exactly once and no hidden one.

Neither the answer nor its cost may tell how many hidden items match the caller's filter (a
``name LIKE 'secret-a%'`` probe would otherwise spell hidden names out): upstream pages are
read at MLflow's full default size whatever the caller asks for, so hidden matches cost an
upstream page only past the thousands, and the page token is encrypted (Fernet), since the
upstream cursor and the position in it count what was skipped.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode

from cryptography.fernet import Fernet, InvalidToken
from starlette.types import Scope, Send

from guard.authz import skills
from guard.authz.engine import PolicyIndex
from guard.authz.workspaces import HEADER as WORKSPACE_HEADER
from guard.edge.requestdata import RequestData, RequestDataError
from guard.errors import Refusal, send_refusal
from guard.upstream.client import UpstreamClient, UpstreamError


@dataclass(frozen=True)
class SearchKind:
    items: str  # the response field holding the results
    kind: str  # the policy kind of each result, named by its "name"
    default_max: int  # MLflow's default page size for this search
    scan: int  # the upstream page size the gateway reads at least (MLflow's most or default)


SEARCHES: Final = {
    "/experiments/search": SearchKind("experiments", "experiment", 1000, 1000),
    "/registered-models/search": SearchKind("registered_models", "model", 100, 1000),
    "/model-versions/search": SearchKind("model_versions", "model", 10000, 10000),
    "/3.0/mlflow/skills": SearchKind("skills", "skill", 100, 1000),  # GET; MLflow 3.18+
}
MAX_PAGE: Final = 50000
# The gateway pages for the caller; the caller's own paging fields never reach MLflow.
_PAGING: Final = frozenset({"page_token", "max_results", "pageToken", "maxResults"})


def search_kind(path: str) -> SearchKind | None:
    return next((kind for suffix, kind in SEARCHES.items() if path.endswith(suffix)), None)


class SearchFilter:
    def __init__(self, upstream: UpstreamClient, key: bytes, max_pages: int) -> None:
        self.upstream = upstream
        derived = hmac.new(key, b"mlflow-guard-search-token", hashlib.sha256).digest()
        self.tokens = Fernet(base64.urlsafe_b64encode(derived))
        self.max_pages = max_pages

    async def respond(
        self, scope: Scope, send: Send, subject: str, index: PolicyIndex, data: RequestData
    ) -> None:
        path: str = scope["path"]
        search = search_kind(path)
        assert search is not None  # noqa: S101 - routed here only for these searches
        try:
            limit = _limit(data.single("max_results"), search.default_max)
            # A page token is the caller's, for this search, in this workspace.
            bound = f"{scope.get('guard.workspace') or ''}{path}"
            cursor, skip, size = self._resume(
                data.single("page_token"), subject, bound, max(limit, search.scan)
            )
            items, nxt = await self._collect(
                scope, data, search, subject, index, cursor, skip, size, limit
            )
        except RequestDataError as exc:
            await send_refusal(scope, send, exc.refusal)
            return
        except UpstreamError as exc:
            await send_refusal(scope, send, exc.refusal)
            return
        except _UpstreamAnswer as answer:  # MLflow refused the search itself: pass it on
            await _send_json(send, answer.status, answer.body)
            return
        payload: dict[str, Any] = {search.items: items}
        if nxt is not None:
            state = {"s": subject, "p": bound, "u": nxt[0], "o": nxt[1], "m": size}
            payload["next_page_token"] = self.tokens.encrypt(json.dumps(state).encode()).decode()
        await _send_json(send, 200, json.dumps(payload).encode())

    def _resume(
        self, token: Any, subject: str, path: str, size: int
    ) -> tuple[str | None, int, int]:
        """(upstream cursor, position in its page, upstream page size) to go on from."""
        if token in (None, ""):
            return None, 0, size
        try:
            state = json.loads(self.tokens.decrypt(str(token).encode()))
        except (InvalidToken, ValueError, UnicodeEncodeError):
            raise RequestDataError(
                Refusal("invalid_request_body", "The page token is not one this gateway issued.")
            ) from None
        if not isinstance(state, dict) or state.get("s") != subject or state.get("p") != path:
            raise RequestDataError(
                Refusal("invalid_request_body", "The page token belongs to another search.")
            )
        return state.get("u"), int(state.get("o", 0)), int(state.get("m", size))

    async def _collect(
        self, scope: Scope, data: RequestData, search: SearchKind, subject: str,
        index: PolicyIndex, cursor: str | None, skip: int, size: int, limit: int,
    ) -> tuple[list[Any], tuple[str | None, int] | None]:  # fmt: skip
        collected: list[Any] = []
        for _ in range(self.max_pages):
            page = await self._page(scope, data, cursor, size)
            raw = page.get(search.items, [])
            if not isinstance(raw, list):
                raw = []
            for position in range(skip, len(raw)):
                item = raw[position]
                if (resource := _resource(search, item)) is None:
                    continue
                if not index.decide(subject, resource, "read").allowed:
                    continue
                if len(collected) == limit:
                    return collected, (cursor, position)
                collected.append(item)
            skip = 0
            upstream_next = page.get("next_page_token")
            if not upstream_next:
                return collected, None
            cursor = str(upstream_next)
            if len(collected) >= limit:
                break
        return collected, (cursor, 0)

    async def _page(
        self, scope: Scope, data: RequestData, cursor: str | None, size: int
    ) -> dict[str, Any]:
        method = "GET" if data.from_query or data.body is None else "POST"
        if method == "GET":
            params = [(k, v) for k, vs in data.query.items() for v in vs if k not in _PAGING]
            params.append(("max_results", str(size)))
            if cursor:
                params.append(("page_token", cursor))
            target, body = f"{scope['path']}?{urlencode(params)}", None
            headers = [("host", self.upstream.host_header)]
        else:
            fields = {k: v for k, v in (data.body or {}).items() if k not in _PAGING}
            fields["max_results"] = size
            if cursor:
                fields["page_token"] = cursor
            target, body = scope["path"], json.dumps(fields).encode()
            headers = [("host", self.upstream.host_header), ("content-type", "application/json"),
                       ("content-length", str(len(body)))]  # fmt: skip
        if (workspace := scope.get("guard.workspace")) is not None:
            headers.append((WORKSPACE_HEADER, workspace))  # MLflow searches that workspace only
        response = await self.upstream.request(method, target, headers, body)
        async with response:
            raw = b"".join([chunk async for chunk in response.body()])
        if response.status != 200:
            raise _UpstreamAnswer(response.status, raw)
        try:
            page = json.loads(raw)
        except (ValueError, RecursionError):
            raise _UpstreamAnswer(502, raw) from None
        return page if isinstance(page, dict) else {}


class _UpstreamAnswer(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status, self.body = status, body


def _resource(search: SearchKind, item: Any) -> str | None:
    """The policy resource of one result: ``KIND:NAME``, a skill ``skill:[@ORG/]NAME``."""
    if search.kind == "skill":
        return skills.identity(item)
    name = item.get("name") if isinstance(item, dict) else None
    return f"{search.kind}:{name}" if isinstance(name, str) else None


def _limit(value: Any, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        limit = int(value)
    except (TypeError, ValueError):
        raise RequestDataError(
            Refusal("invalid_request_body", "max_results must be a number.")
        ) from None
    if not 0 < limit <= MAX_PAGE:
        raise RequestDataError(
            Refusal("invalid_request_body", f"max_results must be 1 to {MAX_PAGE}.")
        )
    return limit


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
