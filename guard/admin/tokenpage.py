"""The ``/guard/tokens`` page: a person's own personal tokens in the browser.

GET lists the caller's live tokens (name, created, expires, last used, state) with a revoke
button each, and a form to create one (a name and an expiry up to
``tokens.personal_max_expiry``). POST (``action`` ``create`` or ``revoke``) calls the same
operations as ``/guard/api/tokens`` (``guard.admin.personal``): one authorization path. A
created token's secret is on the answer page only (``Cache-Control: no-store``), never stored.

The page is served behind the gateway's authentication and needs a browser session: its forms
carry a CSRF token that is an HMAC of the session id (it dies with the session), and the
authentication middleware has already refused a cookie write whose Origin is not ours
(``csrf_failed``). A request with an ``Authorization`` header is sent to ``/guard/api/tokens``.
A session begun with a token sees its tokens but no create form: only a password or single
sign-on login may create one. Templates are in ``guard.identity.pages``; every value is
HTML-escaped; the CSP allows no inline script.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import html
from typing import Final

from starlette.types import Receive, Scope, Send

from guard.admin.personal import PersonalTokenError, PersonalTokens
from guard.errors import Refusal, send_body, send_refusal
from guard.identity import pages
from guard.identity.forms import read_form
from guard.identity.sessions import SessionCookie, derive_key
from guard.identity.tokens import TokenRecord, utcnow

PATH: Final = "/guard/tokens"
FIELDS: Final = frozenset({"csrf_token", "action", "name", "expires"})
EXPIRY_CHOICES: Final = (("7d", "7 days"), ("30d", "30 days"), ("90d", "90 days"),
                         ("180d", "180 days"), ("365d", "1 year"))  # fmt: skip
CSP: Final = b"content-security-policy"
HTML: Final = b"text/html; charset=utf-8"


def _e(value: str) -> str:
    return html.escape(value, quote=True)


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "never"


class TokenPageCsrf:
    """The page's form token: an HMAC of the session id under its own derived key."""

    def __init__(self, secret_key: bytes) -> None:
        self._key = derive_key(secret_key, "tokens page csrf")

    def token(self, session_id: str) -> str:
        return hmac.new(self._key, session_id.encode(), hashlib.sha256).hexdigest()

    def check(self, session_id: str, field: str) -> bool:
        return 0 < len(field) <= 128 and hmac.compare_digest(self.token(session_id), field)


class TokenPage:
    """GET and POST ``/guard/tokens`` (behind authentication)."""

    def __init__(
        self, *, personal: PersonalTokens, cookie: SessionCookie, csrf: TokenPageCsrf
    ) -> None:
        self.personal = personal
        self.cookie = cookie
        self.csrf = csrf
        self.choices = [
            (v, t) for v, t in EXPIRY_CHOICES if _days(v) * 86400 <= personal.max_expiry
        ]
        longest = round(personal.max_expiry / 86400)
        if not any(_days(v) == longest for v, _ in self.choices) and longest >= 1:
            self.choices.append((f"{longest}d", f"{longest} days (longest)"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != PATH:
            await send_refusal(scope, send, Refusal("not_found"))
            return
        if scope["method"] not in ("GET", "HEAD", "POST"):
            await send_refusal(scope, send, Refusal("method_not_allowed"))
            return
        session_id = self.cookie.read(scope["headers"])
        if session_id is None or not scope["guard"].principal.method.startswith("session:"):
            await send_refusal(
                scope, send,
                Refusal("permission_denied", "This page is for browsers; use /guard/api/tokens."),
            )  # fmt: skip
            return
        if scope["method"] == "POST":
            await self._post(scope, receive, send, session_id)
            return
        await self._page(scope, send, session_id, 200)

    async def _post(self, scope: Scope, receive: Receive, send: Send, session_id: str) -> None:
        form = await read_form(scope, receive, FIELDS)
        if isinstance(form, Refusal):
            await send_refusal(scope, send, form)
            return
        if not self.csrf.check(session_id, form.get("csrf_token", "")):
            refusal = Refusal("csrf_token_invalid")
            await self._page(scope, send, session_id, 403, refusal, refusal.message)
            return
        action, name = form.get("action"), form.get("name", "")
        try:
            if action == "create":
                record, secret = await self.personal.create(scope, name, form.get("expires"))
                await self._created(scope, send, record, secret)
                return
            if action == "revoke":
                record = await self.personal.revoke(scope, name)
                notice = f"Token {record.label} revoked."
                await self._page(scope, send, session_id, 200, notice=notice)
                return
        except PersonalTokenError as exc:
            refusal = exc.refusal
            await self._page(scope, send, session_id, refusal.status, refusal, refusal.message)
            return
        refusal = Refusal("invalid_request_body", "Unknown action.")
        await self._page(scope, send, session_id, 400, refusal, refusal.message)

    async def _page(
        self,
        scope: Scope,
        send: Send,
        session_id: str,
        status: int,
        refusal: Refusal | None = None,
        error: str = "",
        notice: str = "",
    ) -> None:
        principal = scope["guard"].principal
        token = self.csrf.token(session_id)
        try:
            records = await self.personal.list(scope)
        except PersonalTokenError as exc:  # not expected for one's own list
            await send_refusal(scope, send, exc.refusal)
            return
        now = utcnow()
        rows = [self._row(r, now, token) for r in records]
        table = (
            pages.template("token-table.html").substitute(rows="\n".join(rows))
            if rows
            else '<p class="empty">You have no live tokens.</p>'
        )
        if self.personal.creation_refusal(principal) is None:
            options = "\n".join(
                f'<option value="{_e(v)}"{" selected" if v == "30d" else ""}>{_e(t)}</option>'
                for v, t in self.choices
            )
            create = pages.template("token-create.html").substitute(
                csrf_token=_e(token), expiry_options=options
            )
        else:
            create = (
                '<p class="help">To create a token, log in with your password or single '
                "sign-on (a token cannot create tokens).</p>"
            )
        body = pages.template("tokens.html").substitute(
            css_version=pages.version("login.css"), name=_e(principal.name), error=_e(error),
            notice=_e(notice), table=table, create_form=create,
        )  # fmt: skip
        await self._send(scope, send, status, body, refusal)

    def _row(self, record: TokenRecord, now: dt.datetime, token: str) -> str:
        state = record.state(now)
        revoke = (
            pages.template("token-revoke.html").substitute(
                csrf_token=_e(token), name=_e(record.name), label=_e(record.label)
            )
            if state != "revoked"
            else ""
        )
        return pages.template("token-row.html").substitute(
            label=_e(record.label), created=_e(_when(record.created_at)),
            expires=_e(_when(record.expires_at)), last_used=_e(_when(record.last_used_at)),
            state=_e(state), revoke=revoke,
        )  # fmt: skip

    async def _created(self, scope: Scope, send: Send, record: TokenRecord, secret: str) -> None:
        body = pages.template("token-created.html").substitute(
            css_version=pages.version("login.css"), label=_e(record.label),
            expires=_e(_when(record.expires_at)), secret=_e(secret),
            user=_e((record.owner or "").removeprefix("user:")),
        )  # fmt: skip
        await self._send(scope, send, 201, body)

    @staticmethod
    async def _send(
        scope: Scope, send: Send, status: int, body: str, refusal: Refusal | None = None
    ) -> None:
        headers = [(CSP, pages.PAGE_CSP)]  # send_body adds Cache-Control: no-store
        if refusal is not None:
            scope["guard"].refusal = refusal
            headers.append((b"x-guard-reason", refusal.reason.encode()))
        await send_body(scope, send, status, HTML, body.encode("utf-8"), headers)


def _days(value: str) -> int:
    return int(value.rstrip("d"))
