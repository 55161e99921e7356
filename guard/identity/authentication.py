"""Authentication: turn the request's credentials into a principal, or refuse.

Credentials are the ``Authorization`` header or, without one, the session cookie. When both
arrive, ``Authorization`` decides and the cookie is ignored: an API client that also holds a
browser's cookie jar is judged by what it sent on purpose, and such a request is not subject to
the CSRF check (a browser never adds an Authorization header of its own: it is sent no Basic
challenge).

With ``Authorization``, providers are asked in order; the first that recognizes the credentials
decides (a gateway token, by its ``mlg_`` prefix, is only the token provider's; any other secret
is not). With the cookie, the session row decides (``guard.identity.browser``), and a write must
pass the CSRF check (403 ``csrf_failed``). A blocked person (``mlflow-guard user block``) is
refused with 403 ``user_blocked`` whatever provider accepted them.

No credentials, or credentials nobody accepts, get:

- a browser navigation (GET/HEAD for a page): 303 to the login page with ``next``, counted
  toward the address's flood limit like a refusal but never answered 429 (past the limit the
  login page is still served, and its POST gets the 429);
- everyone else: 401 with a Bearer challenge, plus a Basic one for API clients only. A request
  with the session cookie or browser fetch metadata (``Sec-Fetch-*``) gets no Basic challenge,
  because a browser that cached Basic credentials sends them forever and can never log out.

An ended, forged or duplicated session cookie counts as no credentials, and the answer clears it
(``Max-Age=0``). Each such 401 is counted and fingerprinted like any failed login.
"""

from __future__ import annotations

from collections.abc import Container, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from guard.edge.ratelimit import FailureLimiter
from guard.errors import Refusal, send_refusal
from guard.identity.base import Credentials, IdentityProvider, Principal, parse_authorization
from guard.identity.browser import BrowserSessions, is_navigation, login_location

ENDED = "The session has ended; log in again."


class AuthenticationMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        providers: Sequence[IdentityProvider],
        realm: str,
        limiter: FailureLimiter | None = None,
        sessions: BrowserSessions | None = None,
        blocked: Container[str] = frozenset(),
    ) -> None:
        self.app = app
        self.providers = tuple(providers)
        self.limiter = limiter
        self.sessions = sessions
        self.blocked = blocked
        quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
        self.bearer = [(b"www-authenticate", f'Bearer realm="{quoted}"'.encode())]
        basic = (b"www-authenticate", f'Basic realm="{quoted}", charset="UTF-8"'.encode())
        self.challenges = [basic, *self.bearer]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        credentials = parse_authorization(scope["headers"])
        if credentials is None:
            if self.sessions is not None:
                await self._session(self.sessions, scope, receive, send)
            else:
                await self._unauthorized(scope, send, Refusal("unauthenticated"))
            return
        if isinstance(credentials, Refusal):
            await self._unauthorized(scope, send, credentials)
            return
        client = scope["guard"].client  # for the per-user login throttle's rows
        limited = self.limiter is not None and self.limiter.blocked(client) > 0
        credentials = Credentials(
            credentials.scheme, credentials.secret, credentials.username, client, limited
        )
        for provider in self.providers:
            result = await provider.authenticate(credentials)
            if result is None:
                continue
            if isinstance(result, Refusal):
                if result.status == 401:
                    await self._unauthorized(scope, send, result)
                else:
                    await send_refusal(scope, send, result)
                return
            await self._serve(result, scope, receive, send)
            return
        await self._unauthorized(scope, send, Refusal("invalid_credentials"))

    async def _serve(
        self, principal: Principal, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if principal.subject in self.blocked:
            await send_refusal(scope, send, Refusal("user_blocked", f"({principal.subject})"))
            return
        scope["guard"].principal = principal
        await self.app(scope, receive, send)

    async def _session(
        self, sessions: BrowserSessions, scope: Scope, receive: Receive, send: Send
    ) -> None:
        headers = scope["headers"]
        session_id = sessions.cookie.read(headers)
        if session_id is not None:
            result = await sessions.authenticate(session_id)
            if isinstance(result, Refusal):  # the session store cannot be read: 503
                await send_refusal(scope, send, result)
                return
            if result is not None:
                if (refusal := sessions.csrf_refusal(scope)) is not None:
                    await send_refusal(scope, send, refusal)
                    return
                await self._serve(result, scope, receive, send)
                return
        if session_id is None and not sessions.cookie.present(headers):
            await self._unauthorized(scope, send, Refusal("unauthenticated"))
            return
        # Only a page load clears the ended cookie: a browser's other tabs keep making API calls
        # with the old cookie, and their answers would otherwise delete the cookie that a login
        # in another tab has just set (seen as a flaky two-tab test under load).
        clear = [sessions.cookie.clear()] if is_navigation(scope) else []
        await self._unauthorized(scope, send, Refusal("unauthenticated", ENDED), clear)

    async def _unauthorized(
        self,
        scope: Scope,
        send: Send,
        refusal: Refusal,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """303 to the login page for a browser navigation, even from an address past its limit
        (a person reloading a page must reach the login page; the redirect is counted like a
        refusal all the same); else 429 for an address past its limit of failures; else 401
        with the challenges this caller may be sent."""
        extra = extra or []
        sessions = self.sessions
        login = sessions.login_path if sessions is not None else None
        if login is not None and scope["path"] != login and is_navigation(scope):
            scope["guard"].refusal = refusal  # recorded as the refusal it is, answered as a way on
            headers = [
                (b"location", login_location(scope, login)),
                (b"content-length", b"0"),
                (b"cache-control", b"no-store"),
                (b"x-guard-reason", refusal.reason.encode()),
                *extra,
            ]
            await send({"type": "http.response.start", "status": 303, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        wait = self.limiter.blocked(scope["guard"].client) if self.limiter is not None else 0.0
        if wait > 0:
            retry = [(b"retry-after", str(max(1, round(wait))).encode()), *extra]
            await send_refusal(scope, send, Refusal("too_many_failures"), retry)
            return
        if sessions is None:
            await send_refusal(scope, send, refusal, self.challenges + extra)
            return
        challenges = self.bearer if sessions.is_browser(scope) else self.challenges
        await send_refusal(scope, send, refusal, challenges + extra)
