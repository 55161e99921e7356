"""Browser single sign-on with OpenID Connect: ``/guard/oidc/login``, ``callback`` and the
provider's ``backchannel-logout``.

Login (authorization code flow, PKCE S256, ``state`` and ``nonce`` always): ``GET
/guard/oidc/login?next=PATH`` draws a nonce and a PKCE verifier, keeps them with the validated
``next`` in a pre-login attempt cookie of its own (``guard.identity.csrf.LoginCsrf``: signed,
10 minutes, single use, SameSite=Lax because the provider's redirect back is a cross-site
navigation; one cookie per attempt, so two tabs can log in at once; nothing is written to the
database before login) and sends the browser to the provider's authorization endpoint with the
attempt's field as ``state`` and the exact ``redirect_uri``.

``GET /guard/oidc/callback``, in this order: the attempt named by ``state`` must come with its
cookie, fresh and unused (tampered, replayed, missing: 400 ``oidc_state_invalid``); an
``error`` from the provider is shown as such (401 ``oidc_provider_error``; only the standard
error code is shown, never the provider's free text, which anyone could put into a link); the
``iss`` parameter must be the issuer whenever the provider advertises
``authorization_response_iss_parameter_supported`` (and whenever it is sent): RFC 9207's mix-up
defence, checked before the code goes anywhere; then the code is exchanged with the verifier and
the ID token verified by ``guard.identity.oidc.Issuer`` (signature with the allowed algorithms
only, issuer, audience, expiry, nonce); a failure there is 401 ``oidc_response_invalid``, a
provider that cannot be reached 503 ``identity_unavailable`` (sessions already made keep
working: they are the gateway's rows).

Identity: ``user:<name>`` from ``username_claim`` (default ``preferred_username``), else
``email`` only when ``email_verified`` is true, else ``sub``, by the directory naming rule
(``guard.identity.ldap.subject_name``). The name is bound to the account (source
``oidc:<alias>``, stable id ``<issuer>#<sub>``, ``guard.identity.bindings``) at its first login;
a later login looks the account up first, so an account whose claim was renamed keeps the name
(and the grants) it first logged in with, and a new account presenting a bound name is refused
(403 ``identity_conflict``). Groups from ``groups_claim`` become ``group:<alias>/<name>`` (same
naming rule, so Keycloak's ``/team/sub`` paths are one name each). A blocked user is refused.
Success: the browser's previous session ends, a new one begins (new id) with the issuer, ``sub``
and ``sid`` of the ID token, and a 303 sends the browser to ``next``.

The ID token is kept, encrypted (Fernet, key derived from the gateway's secret key), in the
session row's ``provider_tokens``, never in a cookie: the logout sends it to the provider's
``end_session_endpoint`` as ``id_token_hint`` (with ``end_provider_session``), then forgets it.
Refresh and access tokens are not kept: the gateway calls nothing at the provider on the user's
behalf, groups come from the ID token at login, and the session has its own lifetimes.

Back-channel logout (OpenID Connect Back-Channel Logout 1.0): ``POST
/guard/oidc/backchannel-logout`` with the form field ``logout_token``, from the provider's server
(no cookie, no CSRF check, no ``Origin``). The token is verified by ``Issuer.verify_logout_token``
(every rule of the spec), its ``jti`` is accepted once across replicas (``guard_oidc_logout_jti``,
keyed by an HMAC of issuer and jti, kept until the token expires), and every active session of
that issuer with its ``sid`` (else its ``sub``) is revoked in the shared table, so every replica
refuses it at the next request. 200 on success (also when no session matched), 400 with
``{"error": "invalid_request"}`` for a token that fails.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import anyio.to_thread
import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy.engine import Engine
from starlette.types import Receive, Scope, Send

from guard.errors import Refusal, send_body, send_refusal
from guard.identity import pages
from guard.identity.base import DirectorySubject, Principal
from guard.identity.bindings import IdentityBindings
from guard.identity.csrf import LoginCsrf
from guard.identity.forms import query_text, read_form, validate_next
from guard.identity.ldap import subject_name
from guard.identity.oidc import IssuerUnavailable, TokenInvalid
from guard.identity.sessions import Session, SessionCookie, SessionStore, derive_key, utcnow
from guard.store.db import oidc_logout_jtis

logger = logging.getLogger("guard.sso")

LOGIN_PATH: Final = "/guard/oidc/login"
CALLBACK_PATH: Final = "/guard/oidc/callback"
BACKCHANNEL_PATH: Final = "/guard/oidc/backchannel-logout"
PATHS: Final = frozenset({LOGIN_PATH, CALLBACK_PATH, BACKCHANNEL_PATH})
ATTEMPT_COOKIE: Final = "mlflow_guard_oidc"
LOGIN_PAGE: Final = "/guard/login"  # where the provider's logout sends the browser back
MAX_NAME: Final = 200  # characters of a claim used as a user name; longer ones are skipped
MAX_GROUPS: Final = 256
MAX_GROUP: Final = 200
JTI_KEEP: Final = dt.timedelta(minutes=10)  # a logout token without exp is remembered this long
PRUNE_BATCH: Final = 100
CSP: Final = b"content-security-policy"

PROVIDER_ERRORS: Final = {
    "access_denied": "The identity provider refused the login (or you cancelled it).",
    "login_required": "The identity provider needs you to log in again.",
    "consent_required": "The identity provider needs your consent for this application.",
    "interaction_required": "The identity provider needs you to finish the login there.",
    "account_selection_required": "The identity provider needs you to choose an account.",
    "temporarily_unavailable": "The identity provider is busy. Please try again shortly.",
    "server_error": "The identity provider failed. Please try again shortly.",
}
PAGES: Final = {
    "oidc_state_invalid": (
        "Login expired",
        "This login attempt is unknown, expired or was already used. Please log in again.",
    ),
    "oidc_response_invalid": (
        "Login failed",
        "The identity provider's answer could not be verified. Please log in again; if this "
        "repeats, tell an administrator.",
    ),
    "identity_unavailable": (
        "Login unavailable",
        "The identity provider cannot be reached right now. Please try again shortly. "
        "If you are already logged in, MLflow keeps working.",
    ),
    "identity_conflict": (
        "Login refused",
        "This user name belongs to another account; an administrator must link or free it.",
    ),
    "user_blocked": ("Login refused", "This account is blocked; ask an administrator."),
    "oidc_provider_error": ("Login failed", "The identity provider did not log you in."),
}

Audit = Callable[[dict[str, Any]], None]


class Issuer(Protocol):
    """What SSO needs of ``guard.identity.oidc.Issuer`` (the one module using authlib)."""

    async def metadata(self) -> Mapping[str, Any]: ...

    async def exchange_code(
        self, code: str, *, redirect_uri: str, code_verifier: str, client_id: str,
        client_secret: str,
    ) -> Mapping[str, Any]: ...  # fmt: skip

    async def verify_id_token(
        self, token: str, *, client_id: str, nonce: str, algorithms: Sequence[str],
        leeway: float,
    ) -> Mapping[str, Any]: ...  # fmt: skip

    async def verify_logout_token(
        self, token: str, *, client_id: str, algorithms: Sequence[str], leeway: float
    ) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class SsoConfig:
    """The ``[oidc]`` settings SSO uses, resolved (secret read, redirect URI defaulted)."""

    issuer: str
    client_id: str
    client_secret: str
    redirect_uri: str
    post_logout_redirect_uri: str
    alias: str = "oidc"
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    username_claim: str = "preferred_username"
    groups_claim: str = ""
    allowed_algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256")
    end_provider_session: bool = True
    leeway: float = 60.0

    @property
    def source(self) -> str:
        return f"oidc:{self.alias}"


# -- claims to identity (pure) ---------------------------------------------------------------


def user_name(claims: Mapping[str, Any], claim: str = "preferred_username") -> str | None:
    """The name the person logs in as: ``claim``, else ``email`` when ``email_verified`` is
    true (JSON true, not the string), else ``sub``; blank or over-long values are skipped."""
    for name in dict.fromkeys((claim, "email", "sub")):
        value = claims.get(name)
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME:
            continue
        if name == "email" and claims.get("email_verified") is not True:
            continue
        return value
    return None


def group_subjects(claims: Mapping[str, Any], claim: str, alias: str) -> tuple[str, ...]:
    """``group:<alias>/<name>`` for each group in ``claim`` (a list of strings, or one)."""
    if not claim:
        return ()
    value = claims.get(claim)
    names = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    groups = {
        f"group:{alias}/{subject_name(g)}"
        for g in names[:MAX_GROUPS]
        if isinstance(g, str) and g and len(g) <= MAX_GROUP
    }
    return tuple(sorted(groups))


def pkce_challenge(verifier: str) -> str:
    """S256: base64url(sha256(verifier)) without padding (RFC 7636)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, as CSP source expressions write an origin."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def with_query(endpoint: str, params: Mapping[str, str]) -> str:
    return endpoint + ("&" if "?" in endpoint else "?") + urlencode(params, quote_via=quote)


# -- stores ------------------------------------------------------------------------------------


class TokenBox:
    """The provider's tokens a session keeps, encrypted for its row (Fernet)."""

    def __init__(self, secret_key: bytes) -> None:
        key = derive_key(secret_key, "oidc provider tokens")
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, tokens: Mapping[str, str]) -> str:
        return self._fernet.encrypt(json.dumps(dict(tokens)).encode()).decode("ascii")

    def open(self, sealed: str | None) -> dict[str, str]:
        if not sealed:
            return {}
        try:
            data = json.loads(self._fernet.decrypt(sealed.encode("ascii")))
        except (InvalidToken, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


class LogoutReplay:
    """Back-channel logout tokens already used (``guard_oidc_logout_jti``), shared by every
    replica. Blocking (SQLAlchemy): call from worker threads."""

    def __init__(
        self, engine: Engine, secret_key: bytes, clock: Callable[[], dt.datetime] = utcnow
    ) -> None:
        self.engine = engine
        self._key = derive_key(secret_key, "oidc logout jti")
        self.clock = clock

    def first_use(self, issuer: str, jti: str, expires_at: dt.datetime) -> bool:
        """Whether this ``jti`` of ``issuer`` is new (it is remembered until ``expires_at``)."""
        key = hmac.new(self._key, f"{issuer}\0{jti}".encode(), hashlib.sha256).hexdigest()
        now = self.clock()
        with self.engine.begin() as conn:  # forget a few expired ones: bounded work per call
            old = (
                sa.select(oidc_logout_jtis.c.key)
                .where(oidc_logout_jtis.c.expires_at < now)
                .limit(PRUNE_BATCH)
            )
            keys = conn.execute(old).scalars().all()
            if keys:
                conn.execute(oidc_logout_jtis.delete().where(oidc_logout_jtis.c.key.in_(keys)))
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    oidc_logout_jtis.insert().values(
                        key=key, issuer=issuer[:512], expires_at=max(expires_at, now)
                    )
                )
        except sa.exc.IntegrityError:
            return False
        return True


# -- assembly ----------------------------------------------------------------------------------


def build_sso(
    config: SsoConfig,
    issuer: Issuer,
    *,
    engine: Engine,
    secret_key: bytes,
    sessions: SessionStore,
    cookie: SessionCookie,
    bindings: IdentityBindings,
    blocked: Container[str] = frozenset(),
    audit: Audit | None = None,
) -> SsoApp:
    """The SSO routes: their own attempt cookie (SameSite=Lax: the provider's redirect back
    is a cross-site navigation), the replay store and the token box."""
    attempts = LoginCsrf(
        secret_key, secure=cookie.secure, name=ATTEMPT_COOKIE, purpose="oidc", same_site="Lax"
    )
    return SsoApp(
        config=config, issuer=issuer, sessions=sessions, cookie=cookie, attempts=attempts,
        bindings=bindings, replay=LogoutReplay(engine, secret_key), box=TokenBox(secret_key),
        blocked=blocked, audit=audit,
    )  # fmt: skip


# -- the routes ------------------------------------------------------------------------------


class SsoApp:
    """``GET /guard/oidc/login``, ``GET /guard/oidc/callback``, ``POST
    /guard/oidc/backchannel-logout`` (see the module docstring)."""

    def __init__(
        self,
        *,
        config: SsoConfig,
        issuer: Issuer,
        sessions: SessionStore,
        cookie: SessionCookie,
        attempts: LoginCsrf,
        bindings: IdentityBindings,
        replay: LogoutReplay,
        box: TokenBox,
        blocked: Container[str] = frozenset(),
        audit: Audit | None = None,
    ) -> None:
        self.config = config
        self.issuer = issuer
        self.sessions = sessions
        self.cookie = cookie
        self.attempts = attempts
        self.bindings = bindings
        self.replay = replay
        self.box = box
        self.blocked = blocked
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path == LOGIN_PATH and method in {"GET", "HEAD"}:
            await self._login(scope, send)
        elif path == CALLBACK_PATH and method == "GET":  # HEAD (a prefetch) must not log in
            await self._callback(scope, send)
        elif path == BACKCHANNEL_PATH and method == "POST":
            await self._backchannel(scope, receive, send)
        else:
            await send_refusal(scope, send, Refusal("method_not_allowed"))

    # -- login -------------------------------------------------------------------------------

    async def _login(self, scope: Scope, send: Send) -> None:
        params = _params(scope)
        if isinstance(params, Refusal):
            await send_refusal(scope, send, params)
            return
        target = validate_next(params.get("next"))
        try:
            metadata = await self.issuer.metadata()
        except IssuerUnavailable as exc:
            logger.warning("SSO login cannot start: %s", exc)
            await self._fail(scope, send, Refusal("identity_unavailable"), target)
            return
        endpoint = metadata.get("authorization_endpoint")
        if not isinstance(endpoint, str) or not endpoint:
            logger.warning("SSO login cannot start: the provider names no authorization endpoint")
            await self._fail(scope, send, Refusal("identity_unavailable"), target)
            return
        verifier, nonce = secrets.token_urlsafe(48), secrets.token_urlsafe(24)
        attempt = self.attempts.issue(
            scope["headers"], {"nonce": nonce, "verifier": verifier, "next": target}
        )
        location = with_query(endpoint, {
            "response_type": "code", "client_id": self.config.client_id,
            "redirect_uri": self.config.redirect_uri, "scope": " ".join(self.config.scopes),
            "state": attempt.field, "nonce": nonce,
            "code_challenge": pkce_challenge(verifier), "code_challenge_method": "S256",
        })  # fmt: skip
        headers = [(b"location", location.encode("ascii")), *attempt.headers]
        await send_body(scope, send, 303, b"text/plain; charset=utf-8", b"", headers)

    # -- callback ----------------------------------------------------------------------------

    async def _callback(self, scope: Scope, send: Send) -> None:
        params = _params(scope)
        if isinstance(params, Refusal):
            await send_refusal(scope, send, params)
            return
        state = params.get("state", "")
        attempt = self.attempts.check(scope["headers"], state) if state else None
        if attempt is None:  # clears nothing: a forged link must not end a real attempt
            await self._fail(scope, send, Refusal("oidc_state_invalid"), "/")
            return
        spent = self.attempts.clear(state)
        clear = [spent] if spent is not None else []
        target = validate_next(attempt.get("next"))
        if "error" in params:
            code = params["error"]
            known = code if code in PROVIDER_ERRORS else "other"
            refusal = Refusal("oidc_provider_error", f"({known})")
            message = PROVIDER_ERRORS.get(code, PAGES["oidc_provider_error"][1])
            await self._fail(scope, send, refusal, target, clear, message)
            return
        try:
            principal, claims, id_token = await self._verify(params, attempt)
        except IssuerUnavailable as exc:
            logger.warning("SSO login failed: the provider cannot be reached (%s)", exc)
            await self._fail(scope, send, Refusal("identity_unavailable"), target, clear)
            return
        except TokenInvalid as exc:
            logger.warning("SSO login refused: %s", exc)
            refusal = Refusal("oidc_response_invalid", audit=(("login_failure", str(exc)[:200]),))
            await self._fail(scope, send, refusal, target, clear)
            return
        try:
            session = await anyio.to_thread.run_sync(
                self._start_session, scope, principal, claims, id_token
            )
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("SSO login of %s failed: the database (%s)", principal.subject,
                           type(exc).__name__)  # fmt: skip
            refusal = Refusal("identity_unavailable", "Sessions cannot be stored right now.")
            await self._fail(scope, send, refusal, target, clear)
            return
        if isinstance(session, Refusal):
            await self._fail(scope, send, session, target, clear)
            return
        context = scope["guard"]
        context.principal = session[1]
        if self.audit is not None:
            self.audit({"event": "login", "principal": str(session[1].subject), "method": "oidc",
                        "identity": session[1].identity, "client": context.client,
                        "request_id": context.request_id})  # fmt: skip
        headers = [(b"location", target.encode("ascii")), self.cookie.set(session[0]), *clear]
        await send_body(scope, send, 303, b"text/plain; charset=utf-8", b"", headers)

    async def _verify(
        self, params: Mapping[str, str], attempt: Mapping[str, str]
    ) -> tuple[Principal, Mapping[str, Any], str]:
        """The principal of a callback with a code: ``iss`` checked, the code exchanged, the
        ID token verified, the claims mapped. Raises TokenInvalid or IssuerUnavailable."""
        config = self.config
        metadata = await self.issuer.metadata()
        iss = params.get("iss")
        if metadata.get("authorization_response_iss_parameter_supported") is True and iss is None:
            raise TokenInvalid("the authorization response has no iss (RFC 9207)")
        if iss is not None and iss != config.issuer:
            raise TokenInvalid("the authorization response's iss is another issuer (RFC 9207)")
        code, verifier, nonce = params.get("code"), attempt.get("verifier"), attempt.get("nonce")
        if not code:
            raise TokenInvalid("the authorization response has no code")
        if not verifier or not nonce:
            raise TokenInvalid("the login attempt holds no PKCE verifier or nonce")
        tokens = await self.issuer.exchange_code(
            code, redirect_uri=config.redirect_uri, code_verifier=verifier,
            client_id=config.client_id, client_secret=config.client_secret,
        )  # fmt: skip
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise TokenInvalid("the token response has no ID token")
        claims = await self.issuer.verify_id_token(
            id_token, client_id=config.client_id, nonce=nonce,
            algorithms=config.allowed_algorithms, leeway=config.leeway,
        )  # fmt: skip
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 255:
            raise TokenInvalid("the ID token has no usable sub")
        name = user_name(claims, config.username_claim)
        if name is None:  # sub is always there, so only an over-long sub gets here
            raise TokenInvalid("the ID token names no usable user")
        groups = group_subjects(claims, config.groups_claim, config.alias)
        subject = f"user:{subject_name(name)}"
        principal = Principal(
            subject=DirectorySubject(subject, groups), name=name, method="oidc", roles=(),
            groups=groups, identity=f"oidc:{config.issuer}#{sub}",
        )  # fmt: skip
        return principal, claims, id_token

    def _start_session(
        self, scope: Scope, principal: Principal, claims: Mapping[str, Any], id_token: str
    ) -> tuple[str, Principal] | Refusal:
        """In a worker thread: bind the name (the account's first name wins), check blocks,
        end the browser's previous session, create the new one."""
        config = self.config
        sub = str(claims["sub"])
        stable_id = f"{config.issuer}#{sub}"
        bound = self.bindings.find(config.source, stable_id)
        subject = bound.subject if bound is not None else str(principal.subject)
        # The groups are stored with the binding: the person's personal tokens carry them.
        other = self.bindings.claim(subject, config.source, stable_id, groups=principal.groups)
        if other is not None:
            logger.warning(
                "SSO login of %s refused: the name is bound to %s %s, this account is %s %s",
                subject, other.source, other.stable_id, config.source, stable_id,
            )  # fmt: skip
            return Refusal("identity_conflict", f"({subject})", audit=(("login_name", subject),))
        groups = principal.groups
        principal = Principal(
            subject=DirectorySubject(subject, groups), name=principal.name, method="oidc",
            roles=(), groups=groups, identity=principal.identity,
        )  # fmt: skip
        if subject in self.blocked:  # (another replica's fresh block: SessionStore.get sees it)
            return Refusal("user_blocked", audit=(("login_name", subject),))
        old = self.cookie.read(scope["headers"])
        if old is not None:
            self.sessions.revoke(old, "login")
        sid = claims.get("sid")
        session_id, _ = self.sessions.create(
            principal, client=scope["guard"].client, issuer=config.issuer, oidc_sub=sub,
            oidc_sid=sid if isinstance(sid, str) and sid and len(sid) <= 255 else None,
            provider_tokens=self.box.seal({"id_token": id_token}),
        )  # fmt: skip
        return session_id, principal

    async def _fail(
        self,
        scope: Scope,
        send: Send,
        refusal: Refusal,
        target: str,
        extra: Sequence[tuple[bytes, bytes]] = (),
        message: str = "",
    ) -> None:
        """A page that says what went wrong, with a link back to the login page."""
        scope["guard"].refusal = refusal
        title, default = PAGES[refusal.reason]
        retry = "/guard/login?next=" + quote(target, safe="")
        body = pages.render_sso_error(title, message or default, retry)
        headers = [(CSP, pages.PAGE_CSP), (b"x-guard-reason", refusal.reason.encode()), *extra]
        await send_body(scope, send, refusal.status, b"text/html; charset=utf-8", body, headers)

    # -- logout ------------------------------------------------------------------------------

    async def provider_logout(self, session: Session) -> str | None:
        """Where the logout of an OpenID Connect ``session`` sends the browser: the provider's
        ``end_session_endpoint`` with the session's ID token as ``id_token_hint`` and the login
        page to come back to; None (the login page) when there is none to go to."""
        config = self.config
        if not config.end_provider_session or session.issuer != config.issuer:
            return None
        try:
            sealed = await anyio.to_thread.run_sync(self.sessions.take_provider_tokens, session.key)
            metadata = await self.issuer.metadata()
        except (sa.exc.SQLAlchemyError, IssuerUnavailable) as exc:
            logger.warning("logout of %s stays local: %s", session.subject, exc)
            return None
        endpoint = metadata.get("end_session_endpoint")
        if not isinstance(endpoint, str) or not endpoint.isascii() or not endpoint:
            return None
        if origin_of(endpoint) != origin_of(config.issuer):
            # The logout page's CSP allows its form to lead to the issuer's origin only.
            logger.warning("logout stays local: the end_session_endpoint is on another origin")
            return None
        params = {"client_id": config.client_id,
                  "post_logout_redirect_uri": config.post_logout_redirect_uri}  # fmt: skip
        id_token = self.box.open(sealed).get("id_token")
        if id_token:
            params["id_token_hint"] = id_token
        return with_query(endpoint, params)

    # -- back-channel logout -----------------------------------------------------------------

    async def _backchannel(self, scope: Scope, receive: Receive, send: Send) -> None:
        form = await read_form(scope, receive, frozenset({"logout_token"}))
        if isinstance(form, Refusal):
            await self._backchannel_answer(scope, send, form, "invalid_request", form.message)
            return
        token = form.get("logout_token", "")
        if not token:
            refusal = Refusal("logout_token_invalid", "(no logout_token)")
            await self._backchannel_answer(scope, send, refusal, "invalid_request", "no token")
            return
        config = self.config
        try:
            claims = await self.issuer.verify_logout_token(
                token, client_id=config.client_id, algorithms=config.allowed_algorithms,
                leeway=config.leeway,
            )  # fmt: skip
        except IssuerUnavailable as exc:
            logger.warning("back-channel logout not checked: the provider's keys (%s)", exc)
            refusal = Refusal("identity_unavailable")
            await self._backchannel_answer(scope, send, refusal, "temporarily_unavailable", "")
            return
        except TokenInvalid as exc:
            logger.warning("back-channel logout refused: %s", exc)
            refusal = Refusal("logout_token_invalid", f"({str(exc)[:200]})")
            await self._backchannel_answer(scope, send, refusal, "invalid_request", str(exc))
            return
        jti, sid, sub = claims.get("jti"), claims.get("sid"), claims.get("sub")
        sid = sid if isinstance(sid, str) and sid else None
        sub = sub if isinstance(sub, str) and sub else None
        if not isinstance(jti, str) or not jti or (sid is None and sub is None):
            refusal = Refusal("logout_token_invalid", "(no jti, or neither sid nor sub)")
            await self._backchannel_answer(scope, send, refusal, "invalid_request", "claims")
            return
        exp = claims.get("exp")
        now = utcnow()
        until = (
            dt.datetime.fromtimestamp(exp, dt.UTC) + dt.timedelta(seconds=config.leeway)
            if isinstance(exp, int | float) and not isinstance(exp, bool)
            else now + JTI_KEEP
        )
        by = f"{config.source}:backchannel-logout"
        try:
            if not await anyio.to_thread.run_sync(self.replay.first_use, config.issuer, jti, until):
                refusal = Refusal("logout_token_invalid", "(jti seen before)")
                await self._backchannel_answer(scope, send, refusal, "invalid_request", "replay")
                return
            ended = await anyio.to_thread.run_sync(
                lambda: self.sessions.revoke_provider_session(
                    config.issuer, sid=sid, sub=sub, by=by
                )
            )
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("back-channel logout failed: the database (%s)", type(exc).__name__)
            refusal = Refusal("identity_unavailable", "Sessions cannot be ended right now.")
            await self._backchannel_answer(scope, send, refusal, "temporarily_unavailable", "")
            return
        logger.info("back-channel logout from %s ended %d session(s)", config.issuer, len(ended))
        for session in ended:
            if self.audit is not None:
                self.audit({"event": "session_revoked", "principal": by,
                            "subject": session.subject, "session": session.key[:12],
                            "detail": "back-channel logout"})  # fmt: skip
        await send_body(scope, send, 200, b"application/json", b"{}")

    async def _backchannel_answer(
        self, scope: Scope, send: Send, refusal: Refusal, error: str, description: str
    ) -> None:
        """The answer the spec asks for (``{"error": ...}``), the refusal kept for the record."""
        scope["guard"].refusal = refusal
        body = json.dumps({"error": error, "error_description": description[:200]}).encode()
        headers = [(b"x-guard-reason", refusal.reason.encode())]
        await send_body(scope, send, refusal.status, b"application/json", body, headers)


def _params(scope: Scope) -> dict[str, str] | Refusal:
    """The query's parameters, each at most once (a repeated ``state`` or ``code`` could be
    read two ways)."""
    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(query_text(scope), keep_blank_values=True, max_num_fields=32)
    except ValueError:
        return Refusal("too_many_parameters")
    for key, value in pairs:
        if key in params:
            return Refusal("ambiguous_parameter", f"The parameter {key} is repeated.")
        params[key] = value
    return params
