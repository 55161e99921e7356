"""Browsers in the request path: the session cookie as credentials, and what only browsers need.

``BrowserSessions.authenticate`` turns a session id (from the signed cookie) into the principal
the session stands for, or None when the session has ended. The row is read on every request
(one indexed SELECT in a worker thread): a logout, ``session revoke`` or ``user block`` on any
replica ends the session everywhere at the next request. On the way it keeps two promises of the
session's login:

- ``ldap`` sessions re-read their groups through ``refresh`` once ``groups_checked_at`` is
  ``ldap.group_refresh`` old. An entry that is gone or disabled (None) ends the session
  (``revoked_by`` ``gateway:group-refresh``); a directory that cannot be reached keeps the old
  groups and is asked again for that session a minute later, never on every request.
- ``token`` sessions last only while their token does: a revoked or expired token ends them
  (``gateway:token-ended``). Token rows are cached as the token provider caches them: for
  ``tokens.cache_ttl`` and only until the revocation counter moves
  (``guard.identity.revocations``), so a revocation anywhere ends the session within a poll.
  A session begun with a personal token carries the groups the token carries now (its owner's
  last login), as the token itself would.

Cookie-authenticated writes must come from the gateway's own pages (``csrf_refusal``): the
cookie is ambient, so any site could otherwise make the browser send it. Requests with an
``Authorization`` header are not subject to it; a browser never adds one on its own (the
gateway sends browsers no Basic challenge, see ``guard.identity.authentication``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Final, Protocol, TypeVar
from urllib.parse import quote

import anyio.to_thread
import sqlalchemy as sa
from starlette.types import Scope

from guard.edge.cors import parse_origin
from guard.errors import Refusal
from guard.identity.base import Principal
from guard.identity.revocations import Counter, RevocableCache
from guard.identity.sessions import HOST_PREFIX, Session, SessionCookie, SessionStore, read_cookies
from guard.identity.tokens import TokenRecord

logger = logging.getLogger("guard.sessions")

SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
API_PATHS: Final = ("/api/", "/ajax-api/", "/guard/api/")
REFRESH_RETRY: Final = 60.0  # seconds before a failed group refresh is tried again for a session
_MAX_REMEMBERED: Final = 10_000  # token records and refresh retries kept in memory, oldest out
_PATH_SAFE: Final = "/!$&'()*+,;=:@-._~"

Event = Callable[[dict[str, object]], None]
K = TypeVar("K")
V = TypeVar("V")


class GroupRefresher(Protocol):
    """``LdapProvider.refresh``: the entry's current groups (a principal), a refusal when the
    directory cannot say now (``identity_unavailable``), or None when the entry is gone."""

    async def refresh(self, name: str, stable_id: str) -> Principal | Refusal | None: ...


class TokenLookup(Protocol):
    def by_id(self, token_id: int) -> TokenRecord | None: ...


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def has_fetch_metadata(scope: Scope) -> bool:
    """Whether a browser sent this (``Sec-Fetch-*``: every current browser, never a script)."""
    return any(key.startswith(b"sec-fetch-") for key, _ in scope["headers"])


def is_navigation(scope: Scope) -> bool:
    """A browser loading a page (GET or HEAD, not an API path): fetch metadata says so
    (``Sec-Fetch-Mode: navigate`` or ``Sec-Fetch-Dest: document``), or, from a browser too old
    to send it, an ``Accept`` that asks for HTML."""
    if scope["method"] not in ("GET", "HEAD") or scope["path"].startswith(API_PATHS):
        return False
    if has_fetch_metadata(scope):
        return (
            header(scope, b"sec-fetch-mode") == b"navigate"
            or header(scope, b"sec-fetch-dest") == b"document"
        )
    accept = header(scope, b"accept")
    return accept is not None and b"text/html" in accept


def login_location(scope: Scope, login_path: str) -> bytes:
    """``/guard/login?next=<path and query, percent-encoded>``; the login page validates it."""
    target = quote(scope["path"], safe=_PATH_SAFE)
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    return f"{login_path}?next={quote(target, safe='')}".encode("ascii")


class BrowserSessions:
    """Everything the authentication middleware needs for browsers (see the module docstring)."""

    def __init__(
        self,
        store: SessionStore,
        cookie: SessionCookie,
        *,
        own_origins: Iterable[str],
        allowed_origins: Iterable[str] = (),
        login_path: str | None = "/guard/login",
        directory: GroupRefresher | None = None,
        group_refresh: float = 900.0,
        tokens: TokenLookup | None = None,
        token_cache_ttl: float = 5.0,
        revocations: Counter | None = None,
        on_event: Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.cookie = cookie
        self.origins = frozenset(map(parse_origin, (*own_origins, *allowed_origins)))
        self.login_path = login_path
        self.directory = directory
        self.group_refresh = dt.timedelta(seconds=group_refresh)
        self.tokens = tokens
        self.token_cache_ttl = token_cache_ttl
        self.on_event = on_event
        self.clock = clock
        self._token_cache: RevocableCache[int, TokenRecord | None] = RevocableCache(
            revocations or Counter(), token_cache_ttl, size=_MAX_REMEMBERED, clock=clock
        )
        self._retry_at: OrderedDict[str, float] = OrderedDict()
        self._pending: dict[str, asyncio.Future[Session | None]] = {}

    def is_browser(self, scope: Scope) -> bool:
        """A browser, which must never be sent a Basic challenge: it would cache the password
        and send it on its own from then on, so that logging out is impossible."""
        if has_fetch_metadata(scope):
            return True
        cookies = read_cookies(scope["headers"])
        return self.cookie.name in cookies or self.cookie.name.removeprefix(HOST_PREFIX) in cookies

    def csrf_refusal(self, scope: Scope) -> Refusal | None:
        """Why a cookie-authenticated request may not be served, or None. Every method but GET,
        HEAD and OPTIONS needs ``Origin`` to be one of ours (``Settings.own_origins``) or an
        allowed origin; without ``Origin``,
        ``Sec-Fetch-Site: same-origin``; with neither, it is refused."""
        if scope["method"] in SAFE_METHODS:
            return None
        origins = [v for k, v in scope["headers"] if k == b"origin"]
        if origins:
            if len(origins) == 1:
                try:
                    if parse_origin(origins[0].decode("latin-1")) in self.origins:
                        return None
                except ValueError:  # "null", a path, garbage: not an origin we allow
                    pass
            return Refusal("csrf_failed")
        sites = [v for k, v in scope["headers"] if k == b"sec-fetch-site"]
        if sites == [b"same-origin"]:
            return None
        return Refusal("csrf_failed")

    async def authenticate(self, session_id: str) -> Principal | Refusal | None:
        """The principal of the active session with this id; None when it has ended; 503
        ``identity_unavailable`` when the session store cannot be read."""
        try:
            session = await anyio.to_thread.run_sync(self.store.get, session_id)
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("session lookup failed: database unavailable (%s)", type(exc).__name__)
            return Refusal("identity_unavailable", "The session store cannot be reached.")
        if session is None:
            return None
        if session.method == "token" and self.tokens is not None:
            record = await self._token(session)
            if isinstance(record, Refusal):
                return record
            if record is None or record.state(self.store.clock()) != "active":
                await self._end(session, "gateway:token-ended", "its token was revoked or expired")
                return None
            if record.owner is not None:  # a personal token: its owner's groups as of now
                session = dataclasses.replace(session, groups=record.groups)
        elif session.method == "ldap" and self._groups_due(session):
            refreshed = await self._refresh_groups(session)
            if refreshed is None:
                return None
            session = refreshed
        return session.principal()

    # -- token sessions --------------------------------------------------------------------

    async def _token(self, session: Session) -> TokenRecord | Refusal | None:
        """The session's token as stored (cached), or None when there is none."""
        kind, _, number = session.identity.partition(":")
        if kind != "token" or not number.isdigit():
            return None  # not a token we could ever check: the session cannot stand
        token_id = int(number)
        tokens = self.tokens
        assert tokens is not None  # noqa: S101 - checked by the caller

        async def load() -> TokenRecord | None:
            return await anyio.to_thread.run_sync(tokens.by_id, token_id)

        try:
            return await self._token_cache.get(token_id, load)
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("token lookup failed: database unavailable (%s)", exc)
            return Refusal("identity_unavailable", "The token store cannot be reached.")

    # -- directory sessions ----------------------------------------------------------------

    def _groups_due(self, session: Session) -> bool:
        return (
            self.directory is not None
            and self.store.clock() - session.groups_checked_at >= self.group_refresh
        )

    async def _refresh_groups(self, session: Session) -> Session | None:
        """The session with fresh groups, the session as it was (directory unavailable), or
        None (the entry is gone: the session ended). One refresh per session at a time."""
        pending = self._pending.get(session.key)
        if pending is None:
            retry_at = self._retry_at.get(session.key)
            if retry_at is not None and self.clock() < retry_at:
                return session
            pending = asyncio.ensure_future(self._refresh_now(session))
            self._pending[session.key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(session.key, None))
        return await asyncio.shield(pending)

    async def _refresh_now(self, session: Session) -> Session | None:
        assert self.directory is not None  # noqa: S101 - checked by the caller
        stable_id = session.identity.partition(":")[2]
        result = await self.directory.refresh(session.name, stable_id)
        if isinstance(result, Refusal):
            logger.warning(
                "group refresh of %s failed (%s); keeping its groups, retrying in %.0f s",
                session.subject, result.reason, REFRESH_RETRY,
            )  # fmt: skip
            _remember(self._retry_at, session.key, self.clock() + REFRESH_RETRY)
            return session
        if result is None or str(result.subject) != session.subject:
            await self._end(session, "gateway:group-refresh", "the directory entry is gone")
            return None
        self._retry_at.pop(session.key, None)
        groups = tuple(sorted(result.groups))
        try:
            await anyio.to_thread.run_sync(self.store.set_groups, session.key, groups)
        except sa.exc.SQLAlchemyError as exc:  # served with the fresh groups; stored next time
            logger.warning("could not store the groups of %s (%s)", session.subject, exc)
        if groups != session.groups:
            logger.info("groups of %s changed: %s", session.subject, ", ".join(groups) or "-")
        return dataclasses.replace(session, groups=groups, groups_checked_at=self.store.clock())

    # -- shared ----------------------------------------------------------------------------

    async def _end(self, session: Session, by: str, why: str) -> None:
        """Revoke the session row (so every replica and ``session list`` agree) and say so."""
        try:
            await anyio.to_thread.run_sync(self.store.revoke_key, session.key, by)
        except sa.exc.SQLAlchemyError as exc:  # refused here anyway; the check repeats
            logger.warning("could not revoke the session of %s (%s)", session.subject, exc)
        logger.info("session of %s ended: %s", session.subject, why)
        if self.on_event is not None:
            self.on_event(
                {"event": "session_revoked", "principal": by, "subject": session.subject,
                 "session": session.key[:12], "detail": why}
            )  # fmt: skip


def _remember(memory: OrderedDict[K, V], key: K, value: V) -> None:
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > _MAX_REMEMBERED:
        memory.popitem(last=False)
