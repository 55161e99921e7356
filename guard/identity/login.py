"""The login and logout pages: ``/guard/login``, ``/guard/logout`` and their static files.

Served without credentials (behind the Host check, CORS and the security headers). A login posts
``username``, ``password``, ``csrf_token`` and ``next`` as a form; the user name and password go to
the same identity providers, in the same order, as HTTP Basic (a ``mlg_`` password to the token
provider, with the token's name checked; anything else to LDAP when it is configured). Success
creates a new server-side session (a new id every time: no fixation; the browser's previous
session, if any, is revoked), sets its cookie and answers 303 to ``next``, validated by
``guard.identity.forms.validate_next``. A failure shows the page again with a message that does not
say whether the user exists; its 401 is counted per client address like any refusal, and an address
past ``gateway.failed_login_limit`` gets 429 without the directory being asked (its page views then
go into the flood summary too). The outcome record of a failed login names the user name tried
(``login_name``, never the password); a login and a logout are also audit events. CSRF: see
``guard.identity.csrf``; every page view is a new login attempt with its own cookie, so forms in
several tabs each work, and a POST spends its attempt (success clears its cookie, a failure shows
the page with a new attempt). Besides the token, a POST whose ``Origin`` (or ``Sec-Fetch-Site``)
is not one of the gateway's own origins is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl

import anyio.to_thread
import sqlalchemy as sa
from starlette.types import Receive, Scope, Send

from guard.edge.cors import parse_origin
from guard.edge.ratelimit import FailureLimiter
from guard.errors import Refusal, send_body, send_refusal
from guard.identity import pages
from guard.identity.base import Credentials, IdentityProvider, Principal
from guard.identity.csrf import LoginCsrf, LogoutCsrf
from guard.identity.forms import query_text, read_form, validate_next
from guard.identity.sessions import Session, SessionCookie, SessionStore

logger = logging.getLogger("guard.login")

LOGIN_PATH: Final = "/guard/login"
LOGOUT_PATH: Final = "/guard/logout"
STATIC_PATHS: Final = frozenset(pages.STATIC_PREFIX + name for name in pages.CONTENT_TYPES)
PATHS: Final = frozenset({LOGIN_PATH, LOGOUT_PATH, *STATIC_PATHS})

LOGIN_FIELDS: Final = frozenset({"username", "password", "csrf_token", "next"})
LOGOUT_FIELDS: Final = frozenset({"csrf_token"})
CSP: Final = b"content-security-policy"
STATIC_CACHE: Final = b"public, max-age=31536000, immutable"
SAME_SITE: Final = frozenset({"same-origin", "none"})

GENERIC_FAILURE: Final = "The user name or password is not correct."
MESSAGES: Final = {
    "too_many_failures": "Too many failed logins from this address. Wait a minute and try again.",
    "identity_unavailable": "Logins cannot be checked right now. Please try again shortly.",
    "csrf_token_invalid": "This form has expired or was already used. Please log in again.",
    "user_blocked": "This account is blocked; ask an administrator.",
}

Audit = Callable[[dict[str, Any]], None]
# Where a logout sends the browser after ending an OpenID Connect session: the provider's
# end_session_endpoint (guard.identity.sso), or None for the login page.
ProviderLogout = Callable[[Session], Awaitable[str | None]]


class LoginApp:
    """GET/POST ``/guard/login``, GET/POST ``/guard/logout``, GET ``/guard/static/*``."""

    def __init__(
        self,
        *,
        providers: Sequence[IdentityProvider],
        sessions: SessionStore,
        cookie: SessionCookie,
        csrf: LoginCsrf,
        logout_csrf: LogoutCsrf,
        origins: frozenset[str],
        directory: bool,
        blocked: Container[str] = frozenset(),
        limiter: FailureLimiter | None = None,
        audit: Audit | None = None,
        sso: bool = False,
        provider_logout: ProviderLogout | None = None,
        provider_origin: str = "",
    ) -> None:
        self.providers = tuple(providers)
        self.sso = sso  # show the single sign-on button
        self.provider_logout = provider_logout
        # The logout form's POST may be redirected to the provider's end_session_endpoint:
        # CSP's form-action governs that redirect too (Chromium enforces it).
        self.logout_csp = pages.PAGE_CSP
        if provider_origin:
            extended = f"form-action 'self' {provider_origin}".encode("ascii")
            self.logout_csp = pages.PAGE_CSP.replace(b"form-action 'self'", extended)
        self.sessions = sessions
        self.cookie = cookie
        self.csrf = csrf
        self.logout_csrf = logout_csrf
        self.origins = frozenset(parse_origin(o) for o in origins)
        self.directory = directory
        self.blocked = blocked
        self.limiter = limiter
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path in STATIC_PATHS or (path == LOGIN_PATH and method in {"GET", "HEAD"}):
            self._fold_if_flooding(scope)
        if path in STATIC_PATHS:
            if method not in {"GET", "HEAD"}:
                await send_refusal(scope, send, Refusal("method_not_allowed"))
                return
            await self._static(scope, send, path.removeprefix(pages.STATIC_PREFIX))
        elif path == LOGIN_PATH and method in {"GET", "HEAD"}:
            nexts = [v for k, v in parse_qsl(query_text(scope), keep_blank_values=True)
                     if k == "next"]  # fmt: skip
            target = validate_next(nexts[0]) if len(nexts) == 1 else "/"
            await self._login_page(scope, send, 200, target)
        elif path == LOGIN_PATH and method == "POST":
            await self._login(scope, receive, send)
        elif path == LOGOUT_PATH and method in {"GET", "HEAD"}:
            await self._logout_page(scope, send)
        elif path == LOGOUT_PATH and method == "POST":
            await self._logout(scope, receive, send)
        else:
            await send_refusal(scope, send, Refusal("method_not_allowed"))

    def _fold_if_flooding(self, scope: Scope) -> None:
        """Page views of an address already past its limit of refusals go into its flood
        summary instead of a record each (they are answered as usual). Below the limit they
        are recorded and not counted, so viewing the page never locks anyone out."""
        context = scope["guard"]
        if self.limiter is not None and self.limiter.blocked(context.client) > 0:
            context.unrecorded = not self.limiter.refused(context.client)

    # -- static files and pages ------------------------------------------------------------

    async def _static(self, scope: Scope, send: Send, name: str) -> None:
        body = pages.static_file(name) or b""
        headers = [
            (b"content-type", pages.CONTENT_TYPES[name]),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", STATIC_CACHE),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    async def _login_page(
        self,
        scope: Scope,
        send: Send,
        status: int,
        target: str,
        refusal: Refusal | None = None,
        message: str = "",
        username: str = "",
        token_failed: bool = False,
        extra: Sequence[tuple[bytes, bytes]] = (),
        spent: str = "",
    ) -> None:
        """The page with a new login attempt (its own CSRF cookie); the request's stale
        attempts and the one it ``spent`` are cleared."""
        attempt = self.csrf.issue(scope["headers"], spent=spent)
        body = pages.render_login(
            pages.LoginForm(
                csrf_token=attempt.field,
                next=target,
                directory=self.directory,
                error=message,
                username=username,
                token_failed=token_failed,
                sso=self.sso,
            )
        )
        headers = [(CSP, pages.PAGE_CSP), *attempt.headers, *extra]
        if refusal is not None:
            scope["guard"].refusal = refusal
            headers.append((b"x-guard-reason", refusal.reason.encode()))
            if refusal.retry_after > 0:
                headers.append((b"retry-after", str(refusal.retry_after).encode()))
        await send_body(scope, send, status, b"text/html; charset=utf-8", body, headers)

    # -- login -------------------------------------------------------------------------------

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = scope["guard"]
        # A malformed or cross-site POST gets the error in MLflow's shape (or the HTML error
        # page) and clears no attempt: it may not be the tab that holds one.
        if not self._same_origin(scope):
            await send_refusal(scope, send, Refusal("csrf_failed"))
            return
        form = await read_form(scope, receive, LOGIN_FIELDS)
        if isinstance(form, Refusal):
            await send_refusal(scope, send, form)
            return
        field = form.get("csrf_token", "")
        target = validate_next(form.get("next"))
        username = form.get("username", "")
        password = form.get("password", "")
        token_failed = password.startswith("mlg_")

        async def again(
            refusal: Refusal, message: str, extra: Sequence[tuple[bytes, bytes]] = ()
        ) -> None:
            if username and not any(key == "login_name" for key, _ in refusal.audit):
                # The outcome record names whose login failed (by the audit trail's naming
                # rule: a name that looks like a secret is fingerprinted); never the password.
                refusal = dataclasses.replace(
                    refusal, audit=(*refusal.audit, ("login_name", username))
                )
            await self._login_page(
                scope, send, refusal.status, target, refusal, message, username, token_failed,
                extra, spent=field,
            )  # fmt: skip

        if self.csrf.check(scope["headers"], field) is None:
            refusal = Refusal("csrf_token_invalid")
            await again(refusal, MESSAGES["csrf_token_invalid"])
            return
        if self.limiter is not None and (wait := self.limiter.blocked(context.client)) > 0:
            retry = [(b"retry-after", str(max(1, round(wait))).encode())]
            await again(Refusal("too_many_failures"), MESSAGES["too_many_failures"], retry)
            return
        if not username or not password:
            refusal = Refusal("invalid_credentials", "Enter a user name and a password.")
            await again(refusal, "Enter a user name and a password.")
            return
        credentials = Credentials("basic", password, username, context.client)
        result = await self._authenticate(credentials)
        if isinstance(result, Refusal):
            await again(result, _message(result))
            return
        if str(result.subject) in self.blocked:
            await again(Refusal("user_blocked"), MESSAGES["user_blocked"])
            return
        context.principal = result
        try:
            session_id = await anyio.to_thread.run_sync(self._start_session, scope, result)
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("login of %s failed: sessions cannot be stored (%s)",
                           result.subject, type(exc).__name__)  # fmt: skip
            refusal = Refusal("identity_unavailable", "Sessions cannot be stored right now.")
            await again(refusal, MESSAGES["identity_unavailable"])
            return
        if self.audit is not None:
            self.audit({"event": "login", "principal": result.subject, "method": result.method,
                        "identity": result.identity, "client": context.client,
                        "request_id": context.request_id})  # fmt: skip
        headers = [
            (b"location", target.encode("ascii")),
            self.cookie.set(session_id),
        ]
        if (spent := self.csrf.clear(field)) is not None:
            headers.append(spent)
        await send_body(scope, send, 303, b"text/plain; charset=utf-8", b"", headers)

    async def _authenticate(self, credentials: Credentials) -> Principal | Refusal:
        for provider in self.providers:
            result = await provider.authenticate(credentials)
            if result is not None:
                return result
        return Refusal("invalid_credentials")

    def _start_session(self, scope: Scope, principal: Principal) -> str:
        """Revoke the browser's previous session (if any), then create a new one (worker thread)."""
        old = self.cookie.read(scope["headers"])
        if old is not None:
            self.sessions.revoke(old, "login")
        session_id, _ = self.sessions.create(principal, client=scope["guard"].client)
        return session_id

    def _same_origin(self, scope: Scope) -> bool:
        """Whether a POST comes from a page of this site: its Origin, else Sec-Fetch-Site.
        A client that sends neither is not a browser, which a CSRF attack needs."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        origins = [v.decode("latin-1") for k, v in headers if k == b"origin"]
        if origins:
            if len(origins) != 1:
                return False
            try:
                origin = parse_origin(origins[0])
            except ValueError:
                return False  # "null" among them
            return origin in self.origins
        sites = [v.decode("latin-1").strip().lower() for k, v in headers if k == b"sec-fetch-site"]
        return all(site in SAME_SITE for site in sites)

    # -- logout ------------------------------------------------------------------------------

    async def _logout_page(self, scope: Scope, send: Send) -> None:
        session_id = self.cookie.read(scope["headers"])
        session = None
        if session_id is not None:
            try:
                session = await anyio.to_thread.run_sync(self.sessions.get, session_id)
            except sa.exc.SQLAlchemyError:
                await send_refusal(scope, send, Refusal("identity_unavailable"))
                return
        if session_id is None or session is None:
            await self._to_login(scope, send)
            return
        scope["guard"].principal = session.principal()
        body = pages.render_logout(session.name, self.logout_csrf.token(session_id))
        headers = [(CSP, self.logout_csp)]
        await send_body(scope, send, 200, b"text/html; charset=utf-8", body, headers)

    async def _logout(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = scope["guard"]
        if not self._same_origin(scope):
            await send_refusal(scope, send, Refusal("csrf_failed"))
            return
        form = await read_form(scope, receive, LOGOUT_FIELDS)
        if isinstance(form, Refusal):
            await send_refusal(scope, send, form)
            return
        session_id = self.cookie.read(scope["headers"])
        if session_id is None:
            await self._to_login(scope, send)  # nothing to end
            return
        if not self.logout_csrf.check(session_id, form.get("csrf_token", "")):
            await send_refusal(scope, send, Refusal("csrf_token_invalid"))
            return
        try:
            ended = await anyio.to_thread.run_sync(self.sessions.revoke, session_id, "logout")
        except sa.exc.SQLAlchemyError:
            await send_refusal(scope, send, Refusal("identity_unavailable"))
            return
        if ended is not None:
            context.principal = ended.principal()
            if self.audit is not None:
                self.audit({
                    "event": "logout", "principal": ended.subject, "method": ended.method,
                    "session": ended.key[:12], "client": context.client,
                    "request_id": context.request_id,
                })  # fmt: skip
            if self.provider_logout is not None and ended.method == "oidc":
                await self._to_login(scope, send, await self.provider_logout(ended))
                return
        await self._to_login(scope, send)

    async def _to_login(self, scope: Scope, send: Send, location: str | None = None) -> None:
        """303 to the login page (or ``location``: the provider's logout), the cookie cleared."""
        target = (location or LOGIN_PATH).encode("ascii")
        headers = [(b"location", target), self.cookie.clear()]
        await send_body(scope, send, 303, b"text/plain; charset=utf-8", b"", headers)


def _message(refusal: Refusal) -> str:
    """What the page says about a refusal from an identity provider. A 401 says the same for
    an unknown user and a wrong password; its detail (the name forms accepted) is kept."""
    if refusal.status == 401:
        if refusal.reason == "invalid_credentials":
            return f"{GENERIC_FAILURE} {refusal.detail}".strip()
        return refusal.message
    return MESSAGES.get(refusal.reason, refusal.message)
