"""Browser single sign-on (guard.identity.sso) with a stub issuer that behaves like a provider
(it remembers the nonce and PKCE challenge of each code it hands out) and a real session table
(SQLite): the redirect to the provider, the callback's checks in order (state tampered, replayed,
missing; the provider's error; RFC 9207 ``iss``; the PKCE verifier and nonce handed to the
issuer), claims to identity (fallbacks, unverified email, groups, the binding, a renamed account,
a conflict, a block), open redirects through ``next``, cookie flags, the provider unreachable,
logout through the provider, and back-channel logout (sid, sub, replay, bad tokens)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from guard.edge.context import RequestContextMiddleware
from guard.identity.bindings import IdentityBindings
from guard.identity.browser import BrowserSessions
from guard.identity.csrf import LoginCsrf, LogoutCsrf
from guard.identity.login import LoginApp
from guard.identity.oidc import IssuerUnavailable, TokenInvalid
from guard.identity.sessions import SessionCookie, SessionStore
from guard.identity.sso import (
    ATTEMPT_COOKIE,
    LogoutReplay,
    SsoApp,
    SsoConfig,
    TokenBox,
    group_subjects,
    pkce_challenge,
    user_name,
)
from guard.store.db import build_engine, migrate
from guard.store.db import sessions as sessions_table
from tests.unit.identity.test_login import Client

KEY = b"k" * 32
ORIGIN = "http://testserver"
ISSUER = "https://idp.example"
AUTHORIZE = f"{ISSUER}/auth"
END_SESSION = f"{ISSUER}/session/end"
SESSION_COOKIE = "mlflow_guard_session"


@dataclass
class StubIssuer:
    """A provider in miniature: ``authorize`` hands out a code bound to the request's nonce and
    PKCE challenge; the exchange checks the verifier, the ID token check checks the nonce."""

    claims: dict[str, Any] = field(default_factory=lambda: {"sub": "s-alice",
                                   "preferred_username": "alice", "sid": "sid-1"})  # fmt: skip
    iss_supported: bool = True
    down: bool = False
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    exchanges: list[dict[str, Any]] = field(default_factory=list)
    verified: list[dict[str, Any]] = field(default_factory=list)
    logout_claims: dict[str, Any] | Exception = field(default_factory=dict)

    async def metadata(self) -> Mapping[str, Any]:
        if self.down:
            raise IssuerUnavailable("connection refused")
        return {
            "issuer": ISSUER, "authorization_endpoint": AUTHORIZE,
            "end_session_endpoint": END_SESSION,
            "authorization_response_iss_parameter_supported": self.iss_supported,
        }  # fmt: skip

    def authorize(self, location: str, **claims: Any) -> dict[str, str]:
        """The provider's side of the redirect: the callback's query (code, state, iss)."""
        query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
        code = f"code-{len(self.codes)}"
        self.codes[code] = {"nonce": query["nonce"], "challenge": query["code_challenge"],
                            "claims": {**self.claims, **claims}}  # fmt: skip
        return {"code": code, "state": query["state"], "iss": ISSUER}

    async def exchange_code(
        self, code: str, *, redirect_uri: str, code_verifier: str, client_id: str,
        client_secret: str,
    ) -> Mapping[str, Any]:  # fmt: skip
        self.exchanges.append({"code": code, "redirect_uri": redirect_uri,
                               "code_verifier": code_verifier})  # fmt: skip
        if self.down:
            raise IssuerUnavailable("connection refused")
        grant = self.codes.pop(code, None)
        if grant is None or pkce_challenge(code_verifier) != grant["challenge"]:
            raise TokenInvalid("invalid_grant")
        return {"id_token": f"idt.{code}", "access_token": "at", "_grant": grant}

    async def verify_id_token(
        self, token: str, *, client_id: str, nonce: str, algorithms: Sequence[str],
        leeway: float,
    ) -> Mapping[str, Any]:  # fmt: skip
        self.verified.append({"token": token, "nonce": nonce, "algorithms": tuple(algorithms)})
        grant = self._granted[token]
        claims = dict(grant["claims"])
        if "nonce" not in claims:
            claims["nonce"] = grant["nonce"]
        if claims["nonce"] is None or claims["nonce"] != nonce:
            raise TokenInvalid("nonce mismatch")
        return claims

    async def verify_logout_token(
        self, token: str, *, client_id: str, algorithms: Sequence[str], leeway: float
    ) -> Mapping[str, Any]:
        if isinstance(self.logout_claims, Exception):
            raise self.logout_claims
        return self.logout_claims

    # The token response's grant, by ID token (the stub's own bookkeeping).
    _granted: dict[str, dict[str, Any]] = field(default_factory=dict)


class Issuer(StubIssuer):
    async def exchange_code(self, code: str, **kwargs: Any) -> Mapping[str, Any]:
        tokens = dict(await super().exchange_code(code, **kwargs))
        self._granted[tokens["id_token"]] = tokens.pop("_grant")
        return tokens


@dataclass
class Setup:
    client: Client
    issuer: Issuer
    sessions: SessionStore
    bindings: IdentityBindings
    events: list[dict[str, Any]]
    app: SsoApp
    engine: Engine
    blocked: set[str]

    def start(self, next_: str = "/#/experiments/1") -> httpx.Response:
        response = self.client.get("/guard/oidc/login", params={"next": next_})
        assert response.status_code == 303, response.text
        return response

    def callback(self, query: Mapping[str, str], **kwargs: Any) -> httpx.Response:
        return self.client.get("/guard/oidc/callback", params=dict(query), **kwargs)

    def log_in(self, next_: str = "/#/experiments/1", **claims: Any) -> httpx.Response:
        query = self.issuer.authorize(self.start(next_).headers["location"], **claims)
        return self.callback(query)

    def rows(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(sessions_table)).all())


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = build_engine(f"sqlite:///{tmp_path / 'guard.db'}")
    migrate(engine)
    yield engine
    engine.dispose()


CONFIG = SsoConfig(
    issuer=ISSUER, client_id="gateway", client_secret="s3cret",
    redirect_uri=f"{ORIGIN}/guard/oidc/callback",
    post_logout_redirect_uri=f"{ORIGIN}/guard/login", groups_claim="groups",
)  # fmt: skip


def make(engine: Engine, config: SsoConfig = CONFIG, secure: bool = False) -> Setup:
    issuer = Issuer()
    sessions = SessionStore(engine, KEY, idle_timeout=3600, absolute_timeout=43200)
    cookie = SessionCookie(KEY, name=SESSION_COOKIE, secure=secure, max_age=43200)
    bindings = IdentityBindings(engine, ttl=0)
    events: list[dict[str, Any]] = []
    blocked: set[str] = set()
    app = SsoApp(
        config=config, issuer=issuer, sessions=sessions, cookie=cookie,
        attempts=LoginCsrf(KEY, secure=secure, name=ATTEMPT_COOKIE, purpose="oidc",
                           same_site="Lax"),
        bindings=bindings, replay=LogoutReplay(engine, KEY), box=TokenBox(KEY),
        blocked=blocked, audit=events.append,
    )  # fmt: skip
    client = Client(RequestContextMiddleware(app))
    return Setup(client, issuer, sessions, bindings, events, app, engine, blocked)


@pytest.fixture
def setup(engine: Engine) -> Setup:
    return make(engine)


def set_cookies(response: httpx.Response) -> list[str]:
    return response.headers.get_list("set-cookie")


# -- pure pieces -----------------------------------------------------------------------------


def test_pkce_challenge_is_rfc_7636_s256() -> None:
    # RFC 7636, appendix B.
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"sub": "s1", "preferred_username": "alice", "email": "a@x", "email_verified": True},
         "alice"),
        ({"sub": "s1", "email": "a@x", "email_verified": True}, "a@x"),
        ({"sub": "s1", "email": "a@x", "email_verified": False}, "s1"),
        ({"sub": "s1", "email": "a@x"}, "s1"),  # unverified when not said
        ({"sub": "s1", "email": "a@x", "email_verified": "true"}, "s1"),  # a string is not true
        ({"sub": "s1", "email": "a@x", "email_verified": 1}, "s1"),
        ({"sub": "s1", "preferred_username": "", "email": "a@x", "email_verified": True}, "a@x"),
        ({"sub": "s1", "preferred_username": "  "}, "s1"),
        ({"sub": "s1", "preferred_username": ["alice"]}, "s1"),  # not a string
        ({"sub": "s1", "preferred_username": "a" * 201}, "s1"),  # over long
        ({"preferred_username": None}, None),
    ],
)  # fmt: skip
def test_user_name_falls_back_from_the_claim_to_verified_email_to_sub(
    claims: dict[str, Any], expected: str | None
) -> None:
    assert user_name(claims) == expected


def test_a_configured_email_claim_still_needs_email_verified() -> None:
    assert user_name({"sub": "s1", "email": "a@x"}, "email") == "s1"
    assert user_name({"sub": "s1", "email": "a@x", "email_verified": True}, "email") == "a@x"
    assert user_name({"sub": "s1", "upn": "a@corp"}, "upn") == "a@corp"


def test_groups_are_source_qualified_and_encoded_by_the_naming_rule() -> None:
    claims = {"groups": ["/team/sub", "Risk Team", "admins", 7, "", "x" * 201]}
    assert group_subjects(claims, "groups", "kc") == (
        "group:kc/%2Fteam%2Fsub", "group:kc/admins", "group:kc/risk%20team",
    )  # fmt: skip
    assert group_subjects({"groups": "one"}, "groups", "oidc") == ("group:oidc/one",)
    assert group_subjects(claims, "", "oidc") == ()  # no groups claim configured
    assert group_subjects({"groups": {"a": 1}}, "groups", "oidc") == ()


# -- the redirect to the provider ----------------------------------------------------------


def test_login_redirects_to_the_provider_with_pkce_state_nonce_and_the_exact_redirect_uri(
    setup: Setup,
) -> None:
    response = setup.start()
    location = response.headers["location"]
    assert location.startswith(AUTHORIZE + "?")
    query = parse_qs(urlsplit(location).query)
    assert {k: v[0] for k, v in query.items() if k not in {"state", "nonce", "code_challenge"}} == {
        "response_type": "code", "client_id": "gateway",
        "redirect_uri": f"{ORIGIN}/guard/oidc/callback", "scope": "openid profile email",
        "code_challenge_method": "S256",
    }  # fmt: skip
    assert re.fullmatch(r"[0-9a-f]{16}\.[0-9a-f]{64}", query["state"][0])
    assert len(query["nonce"][0]) >= 32 and len(query["code_challenge"][0]) == 43
    assert response.headers["cache-control"] == "no-store"
    # Two logins: different states, nonces and challenges.
    again = parse_qs(urlsplit(setup.start().headers["location"]).query)
    for name in ("state", "nonce", "code_challenge"):
        assert again[name] != query[name]


def test_the_attempt_cookie_flags(engine: Engine) -> None:
    plain = set_cookies(make(engine).start())
    assert len(plain) == 1
    name = re.match(r"([^=]+)=", plain[0])
    assert name and re.fullmatch(rf"{ATTEMPT_COOKIE}_[0-9a-f]{{16}}", name.group(1))
    assert all(f in plain[0] for f in ("HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=600"))
    assert "Secure" not in plain[0]
    secure = set_cookies(make(engine, secure=True).start())
    assert secure[0].startswith(f"__Host-{ATTEMPT_COOKIE}_") and "; Secure" in secure[0]


@pytest.mark.parametrize(
    ("next_", "expected"),
    [
        ("/#/experiments/7", "/#/experiments/7"),
        ("//evil.com", "/"),
        ("https://evil.com/", "/"),
        ("/\\evil.com", "/"),
        ("/%2F%2Fevil.com", "/"),
        ("/guard/oidc/login", "/"),
        ("javascript:alert(1)", "/"),
    ],
)
def test_next_is_validated_before_it_is_kept(setup: Setup, next_: str, expected: str) -> None:
    response = setup.log_in(next_)
    assert response.status_code == 303, response.text
    assert response.headers["location"] == expected


def test_a_repeated_next_or_state_is_refused(setup: Setup) -> None:
    response = setup.client.get("/guard/oidc/login?next=/a&next=//evil.com")
    assert response.status_code == 400
    assert response.headers["x-guard-reason"] == "ambiguous_parameter"
    query = setup.issuer.authorize(setup.start().headers["location"])
    response = setup.client.get(
        f"/guard/oidc/callback?code={query['code']}&state={query['state']}&state=x&iss={ISSUER}"
    )
    assert response.status_code == 400
    assert response.headers["x-guard-reason"] == "ambiguous_parameter"


# -- the callback --------------------------------------------------------------------------


def test_a_login_creates_a_session_and_lands_on_next(setup: Setup) -> None:
    response = setup.log_in("/#/experiments/1", groups=["/team/sub", "ml"])
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/#/experiments/1"
    cookies = set_cookies(response)
    session = [c for c in cookies if c.startswith(f"{SESSION_COOKIE}=")]
    assert len(session) == 1 and "HttpOnly" in session[0] and "SameSite=Lax" in session[0]
    cleared = [c for c in cookies if c.startswith(ATTEMPT_COOKIE)]
    assert len(cleared) == 1 and "Max-Age=0" in cleared[0]
    (row,) = setup.rows()
    assert (row.subject, row.method, row.issuer, row.oidc_sub, row.oidc_sid) == (
        "user:alice", "oidc", ISSUER, "s-alice", "sid-1",
    )  # fmt: skip
    assert row.identity == f"oidc:{ISSUER}#s-alice"
    assert row.groups == '["group:oidc/%2Fteam%2Fsub", "group:oidc/ml"]'
    # The ID token is kept encrypted, never in clear.
    assert row.provider_tokens and "idt." not in row.provider_tokens
    assert TokenBox(KEY).open(row.provider_tokens) == {"id_token": "idt.code-0"}
    # The verifier went to the token endpoint, the nonce to the ID token check.
    (exchange,) = setup.issuer.exchanges
    assert exchange["redirect_uri"] == f"{ORIGIN}/guard/oidc/callback"
    assert setup.issuer.verified[0]["algorithms"] == ("RS256", "PS256", "ES256")
    (event,) = setup.events
    assert event["event"] == "login" and event["method"] == "oidc"
    assert event["principal"] == "user:alice"
    binding = setup.bindings.get("user:alice")
    assert binding is not None
    assert (binding.source, binding.stable_id) == ("oidc:oidc", f"{ISSUER}#s-alice")
    # The groups of this login, for the person's personal tokens.
    assert setup.bindings.groups("user:alice") == ("group:oidc/%2Fteam%2Fsub", "group:oidc/ml")


def test_two_tabs_log_in_in_either_order(setup: Setup) -> None:
    first = setup.issuer.authorize(setup.start("/#/a").headers["location"])
    second = setup.issuer.authorize(setup.start("/#/b").headers["location"])
    assert setup.callback(second).headers["location"] == "/#/b"
    assert setup.callback(first).headers["location"] == "/#/a"


def test_a_login_ends_the_browsers_previous_session(setup: Setup) -> None:
    setup.log_in()
    setup.log_in()
    rows = sorted(setup.rows(), key=lambda r: r.created_at)
    assert rows[0].revoked_by == "login" and rows[1].revoked_at is None


def test_a_tampered_state_is_refused(setup: Setup) -> None:
    query = setup.issuer.authorize(setup.start().headers["location"])
    state = query["state"]
    for forged in (state[:-1] + ("0" if state[-1] != "0" else "1"),
                   ("0" if state[0] != "0" else "1") + state[1:], "", "x" * 81):  # fmt: skip
        response = setup.callback({**query, "state": forged})
        assert response.status_code == 400, forged
        assert response.headers["x-guard-reason"] == "oidc_state_invalid"
        assert "Login expired" in response.text and 'id="retry"' in response.text
    assert setup.issuer.exchanges == []  # no code was sent anywhere
    assert setup.callback(query).status_code == 303  # the real one still works


def test_a_missing_state_is_refused(setup: Setup) -> None:
    query = setup.issuer.authorize(setup.start().headers["location"])
    del query["state"]
    response = setup.callback(query)
    assert response.status_code == 400
    assert response.headers["x-guard-reason"] == "oidc_state_invalid"


def test_a_replayed_callback_is_refused(setup: Setup) -> None:
    start = setup.start()
    query = setup.issuer.authorize(start.headers["location"])
    attempt = set_cookies(start)[0].split(";")[0]
    assert setup.callback(query).status_code == 303
    # The same callback again, the attempt cookie sent by hand (the browser dropped it).
    replay = setup.callback(query, headers={"cookie": attempt})
    assert replay.status_code == 400
    assert replay.headers["x-guard-reason"] == "oidc_state_invalid"
    assert len(setup.issuer.exchanges) == 1


def test_a_callback_without_the_attempt_cookie_is_refused(engine: Engine) -> None:
    """Login CSRF: a victim's browser fed the attacker's callback has no such attempt."""
    attacker, victim = make(engine), make(engine)
    query = attacker.issuer.authorize(attacker.start().headers["location"])
    response = victim.callback(query)
    assert response.status_code == 400
    assert response.headers["x-guard-reason"] == "oidc_state_invalid"


def test_an_error_from_the_provider_is_shown_plainly(setup: Setup) -> None:
    query = setup.issuer.authorize(setup.start().headers["location"])
    response = setup.callback({
        "state": query["state"], "iss": ISSUER, "error": "access_denied",
        "error_description": "<script>alert(1)</script> Call +1-555 to unlock your account",
    })  # fmt: skip
    assert response.status_code == 401
    assert response.headers["x-guard-reason"] == "oidc_provider_error"
    assert "refused the login" in response.text
    assert "555" not in response.text and "<script>alert" not in response.text
    assert setup.issuer.exchanges == []
    unknown = setup.issuer.authorize(setup.start().headers["location"])
    response = setup.callback({"state": unknown["state"], "error": "<b>x</b>"})
    assert response.status_code == 401 and "<b>x" not in response.text


def test_an_iss_of_another_issuer_is_refused_before_the_code_is_exchanged(setup: Setup) -> None:
    query = setup.issuer.authorize(setup.start().headers["location"])
    response = setup.callback({**query, "iss": "https://evil.example"})
    assert response.status_code == 401
    assert response.headers["x-guard-reason"] == "oidc_response_invalid"
    assert setup.issuer.exchanges == []
    assert setup.rows() == []


def test_a_missing_iss_is_refused_when_the_provider_advertises_it(setup: Setup) -> None:
    query = setup.issuer.authorize(setup.start().headers["location"])
    del query["iss"]
    response = setup.callback(query)
    assert response.status_code == 401
    assert response.headers["x-guard-reason"] == "oidc_response_invalid"
    assert setup.issuer.exchanges == []


def test_a_missing_iss_passes_when_the_provider_does_not_send_it(setup: Setup) -> None:
    setup.issuer.iss_supported = False
    query = setup.issuer.authorize(setup.start().headers["location"])
    del query["iss"]
    assert setup.callback(query).status_code == 303
    # ... but one that is sent is still compared.
    query = setup.issuer.authorize(setup.start().headers["location"])
    assert setup.callback({**query, "iss": "https://evil.example"}).status_code == 401


def test_a_wrong_nonce_from_the_issuer_is_refused(setup: Setup) -> None:
    query = setup.issuer.authorize(setup.start().headers["location"], nonce="someone-elses")
    response = setup.callback(query)
    assert response.status_code == 401
    assert response.headers["x-guard-reason"] == "oidc_response_invalid"
    assert setup.rows() == []


def test_a_missing_nonce_from_the_issuer_is_refused(setup: Setup) -> None:
    query = setup.issuer.authorize(setup.start().headers["location"], nonce=None)
    response = setup.callback(query)
    assert response.status_code == 401
    assert setup.rows() == []


def test_the_nonce_and_verifier_are_the_attempts_own(setup: Setup) -> None:
    location = setup.start().headers["location"]
    sent = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert setup.callback(setup.issuer.authorize(location)).status_code == 303
    assert setup.issuer.verified[0]["nonce"] == sent["nonce"]
    verifier = setup.issuer.exchanges[0]["code_verifier"]
    assert pkce_challenge(verifier) == sent["code_challenge"] and 43 <= len(verifier) <= 128


def test_a_code_for_another_verifier_is_refused(setup: Setup) -> None:
    """A code injected from another login (its challenge is not this attempt's verifier's)."""
    other = setup.issuer.authorize(setup.start().headers["location"])
    mine = setup.issuer.authorize(setup.start().headers["location"])
    response = setup.callback({**mine, "code": other["code"]})
    assert response.status_code == 401
    assert response.headers["x-guard-reason"] == "oidc_response_invalid"


def test_an_attempt_without_a_pkce_verifier_is_refused(setup: Setup) -> None:
    """Even a validly signed attempt must hold the verifier and the nonce."""
    forged = setup.app.attempts.issue([], {"nonce": "n", "next": "/"})
    query = setup.issuer.authorize(setup.start().headers["location"])
    cookie = forged.headers[0][1].decode().split(";")[0]
    response = setup.callback({**query, "state": forged.field}, headers={"cookie": cookie})
    assert response.status_code == 401
    assert setup.issuer.exchanges == []


def test_a_missing_code_is_refused(setup: Setup) -> None:
    query = setup.issuer.authorize(setup.start().headers["location"])
    del query["code"]
    assert setup.callback(query).status_code == 401


def test_an_unverified_email_is_not_the_user_name(setup: Setup) -> None:
    setup.issuer.claims = {"sub": "s-9", "email": "ceo@corp.example", "email_verified": False}
    assert setup.log_in().status_code == 303
    assert [r.subject for r in setup.rows()] == ["user:s-9"]


def test_a_verified_email_is_the_user_name_without_preferred_username(setup: Setup) -> None:
    setup.issuer.claims = {"sub": "s-9", "email": "Bob@Corp.example", "email_verified": True}
    assert setup.log_in().status_code == 303
    assert [r.subject for r in setup.rows()] == ["user:bob@corp.example"]


def test_the_name_is_bound_to_issuer_and_sub(setup: Setup) -> None:
    assert setup.log_in().status_code == 303
    # Another account (another sub) presenting the same name: refused.
    response = setup.log_in(sub="s-mallory", preferred_username="alice")
    assert response.status_code == 403
    assert response.headers["x-guard-reason"] == "identity_conflict"
    assert "another account" in response.text
    assert len(setup.rows()) == 1


def test_a_name_bound_by_ldap_is_not_taken_by_sso(setup: Setup) -> None:
    assert setup.bindings.claim("user:alice", "ldap", "uuid-1") is None
    response = setup.log_in()
    assert response.status_code == 403
    assert response.headers["x-guard-reason"] == "identity_conflict"


def test_a_renamed_account_keeps_its_identity(setup: Setup) -> None:
    assert setup.log_in().status_code == 303
    response = setup.log_in(preferred_username="alice.smith")  # same sub, renamed at the IdP
    assert response.status_code == 303
    rows = sorted(setup.rows(), key=lambda r: r.created_at)
    assert rows[-1].subject == "user:alice" and rows[-1].name == "alice.smith"
    assert setup.bindings.get("user:alice.smith") is None  # the new name was not claimed
    # The old name stays the account's: a newcomer called alice.smith is not alice.
    response = setup.log_in(sub="s-newcomer", preferred_username="alice")
    assert response.headers["x-guard-reason"] == "identity_conflict"


def test_the_same_sub_at_another_issuer_is_another_account(engine: Engine) -> None:
    first = make(engine)
    assert first.log_in().status_code == 303
    other = make(engine, dataclasses.replace(CONFIG, issuer="https://other.example"))
    query = other.issuer.authorize(other.start().headers["location"])
    response = other.callback({**query, "iss": "https://other.example"})
    assert response.headers["x-guard-reason"] == "identity_conflict"


def test_a_blocked_user_is_refused(setup: Setup) -> None:
    setup.blocked.add("user:alice")
    response = setup.log_in()
    assert response.status_code == 403
    assert response.headers["x-guard-reason"] == "user_blocked"
    assert setup.rows() == []


def test_an_unreachable_provider_is_503_and_sessions_keep_working(setup: Setup) -> None:
    ok = setup.log_in()
    session_cookie = ok.headers.get_list("set-cookie")[0].split(";")[0].split("=", 1)[1]
    setup.issuer.down = True
    response = setup.client.get("/guard/oidc/login", params={"next": "/"})
    assert response.status_code == 503
    assert response.headers["x-guard-reason"] == "identity_unavailable"
    assert "cannot be reached" in response.text
    setup.issuer.down = False
    query = setup.issuer.authorize(setup.start().headers["location"])
    setup.issuer.down = True
    response = setup.callback(query)
    assert response.status_code == 503
    # The session made before still authenticates: it is the gateway's own row.
    browsers = BrowserSessions(setup.sessions, setup.app.cookie, own_origins=[ORIGIN])
    session_id = setup.app.cookie.decode(session_cookie)
    assert session_id is not None
    principal = asyncio.run(browsers.authenticate(session_id))
    assert principal is not None and not isinstance(principal, Exception)
    assert str(getattr(principal, "subject", "")) == "user:alice"


def test_other_methods_are_refused(setup: Setup) -> None:
    assert setup.client.post("/guard/oidc/login").status_code == 405
    assert setup.client.post("/guard/oidc/callback").status_code == 405
    query = setup.issuer.authorize(setup.start().headers["location"])
    assert setup.client.head("/guard/oidc/callback", params=query).status_code == 405
    assert setup.callback(query).status_code == 303  # the HEAD spent nothing
    assert setup.client.get("/guard/oidc/backchannel-logout").status_code == 405


# -- logout ----------------------------------------------------------------------------------


def login_app(s: Setup) -> Client:
    app = LoginApp(
        providers=[], sessions=s.sessions, cookie=s.app.cookie,
        csrf=LoginCsrf(KEY, secure=False), logout_csrf=LogoutCsrf(KEY),
        origins=frozenset({ORIGIN}), directory=False, sso=True,
        provider_logout=s.app.provider_logout, provider_origin=ISSUER,
    )  # fmt: skip
    client = Client(RequestContextMiddleware(app))
    client.cookies = s.client.cookies
    return client


def test_the_login_page_shows_the_sso_button_with_next(setup: Setup) -> None:
    page = login_app(setup).get("/guard/login", params={"next": "/#/models"})
    assert 'id="sso-login"' in page.text
    assert 'href="/guard/oidc/login?next=%2F%23%2Fmodels"' in page.text
    without = LoginApp(
        providers=[], sessions=setup.sessions, cookie=setup.app.cookie,
        csrf=LoginCsrf(KEY, secure=False), logout_csrf=LogoutCsrf(KEY),
        origins=frozenset({ORIGIN}), directory=False,
    )  # fmt: skip
    plain = Client(RequestContextMiddleware(without)).get("/guard/login")
    assert plain.status_code == 200 and "sso-login" not in plain.text


def test_logout_ends_the_provider_session_with_the_id_token_hint(setup: Setup) -> None:
    setup.log_in()
    client = login_app(setup)
    (row,) = setup.rows()
    session_id = setup.app.cookie.decode(client.cookies[SESSION_COOKIE])
    assert session_id is not None
    response = client.post(
        "/guard/logout", data={"csrf_token": LogoutCsrf(KEY).token(session_id)},
        headers={"origin": ORIGIN},
    )  # fmt: skip
    assert response.status_code == 303
    location = response.headers["location"]
    assert location.startswith(END_SESSION + "?")
    query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert query == {"client_id": "gateway", "id_token_hint": "idt.code-0",
                     "post_logout_redirect_uri": f"{ORIGIN}/guard/login"}  # fmt: skip
    (row,) = setup.rows()
    assert row.revoked_by == "logout" and row.provider_tokens is None  # used once, forgotten
    assert any("Max-Age=0" in c for c in response.headers.get_list("set-cookie"))


def test_the_logout_form_may_lead_to_the_provider_only(setup: Setup) -> None:
    """CSP form-action also governs the redirect after the logout POST (Chromium enforces it):
    the provider's origin is allowed there, and nowhere else."""
    setup.log_in()
    client = login_app(setup)
    page = client.get("/guard/logout")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert f"form-action 'self' {ISSUER};" in csp
    login = client.get("/guard/login")
    assert "form-action 'self';" in login.headers["content-security-policy"]


def test_an_end_session_endpoint_on_another_origin_is_not_followed(setup: Setup) -> None:
    setup.log_in()
    (session,) = setup.sessions.list()

    async def elsewhere() -> Mapping[str, Any]:
        return {"end_session_endpoint": "https://evil.example/logout"}

    setup.issuer.metadata = elsewhere  # type: ignore[method-assign]
    assert asyncio.run(setup.app.provider_logout(session)) is None


def test_logout_stays_local_without_end_provider_session(engine: Engine) -> None:
    s = make(engine, dataclasses.replace(CONFIG, end_provider_session=False))
    s.log_in()
    (session,) = s.sessions.list()
    assert asyncio.run(s.app.provider_logout(session)) is None
    s.issuer.down = True
    s2 = make(engine)
    s2.issuer.down = True
    assert asyncio.run(s2.app.provider_logout(session)) is None  # provider down: local only


# -- back-channel logout -------------------------------------------------------------------


LOGOUT_TOKEN = "a.b.c"  # the stub issuer decides what it says


def backchannel(s: Setup, token: str = LOGOUT_TOKEN, **kwargs: Any) -> httpx.Response:
    return s.client.post("/guard/oidc/backchannel-logout", data={"logout_token": token}, **kwargs)


def logout_claims(**overrides: Any) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).timestamp()
    claims = {"iss": ISSUER, "aud": "gateway", "iat": now, "exp": now + 120, "jti": "j-1",
              "sub": "s-alice", "sid": "sid-1",
              "events": {"http://schemas.openid.net/event/backchannel-logout": {}}}  # fmt: skip
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def test_backchannel_logout_ends_the_sessions_of_the_sid(setup: Setup) -> None:
    setup.log_in()
    setup.client.cookies.clear()
    setup.log_in(sid="sid-2")  # the same person in another browser
    setup.issuer.logout_claims = logout_claims()
    setup.client.cookies.clear()
    response = backchannel(setup)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    ended = {r.oidc_sid: r.revoked_by for r in setup.rows()}
    assert ended == {"sid-1": "oidc:oidc:backchannel-logout", "sid-2": None}
    assert [e["event"] for e in setup.events[-1:]] == ["session_revoked"]


def test_backchannel_logout_by_sub_ends_every_session_of_the_account(setup: Setup) -> None:
    setup.log_in()
    setup.client.cookies.clear()
    setup.log_in(sid="sid-2")
    setup.client.cookies.clear()
    setup.log_in(sub="s-bob", preferred_username="bob", sid="sid-3")
    setup.issuer.logout_claims = logout_claims(sid=None)
    assert backchannel(setup).status_code == 200
    ended = {r.oidc_sid: r.revoked_at is not None for r in setup.rows()}
    assert ended == {"sid-1": True, "sid-2": True, "sid-3": False}


def test_backchannel_logout_names_only_its_own_issuers_sessions(setup: Setup) -> None:
    setup.log_in()
    with setup.engine.begin() as conn:  # the same sid from another provider
        conn.execute(sa.update(sessions_table).values(issuer="https://other.example"))
    setup.issuer.logout_claims = logout_claims()
    assert backchannel(setup).status_code == 200
    assert [r.revoked_at for r in setup.rows()] == [None]


def test_a_replayed_logout_token_is_refused(setup: Setup) -> None:
    setup.issuer.logout_claims = logout_claims()
    assert backchannel(setup).status_code == 200
    response = backchannel(setup)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert response.headers["x-guard-reason"] == "logout_token_invalid"
    # Across replicas: the store is the shared table.
    assert not LogoutReplay(setup.engine, KEY).first_use(
        ISSUER, "j-1", dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    )


def test_an_invalid_logout_token_is_400_with_an_error(setup: Setup) -> None:
    setup.log_in()
    setup.issuer.logout_claims = TokenInvalid("the token has a nonce")
    response = backchannel(setup)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert [r.revoked_at for r in setup.rows()] == [None]


@pytest.mark.parametrize("claims", [logout_claims(jti=None), logout_claims(sid=None, sub=None)])
def test_a_logout_token_without_jti_or_without_sid_and_sub_is_refused(
    setup: Setup, claims: dict[str, Any]
) -> None:
    setup.issuer.logout_claims = claims
    assert backchannel(setup).status_code == 400


def test_a_malformed_backchannel_request_is_refused(setup: Setup) -> None:
    setup.issuer.logout_claims = logout_claims()
    assert backchannel(setup, "").status_code == 400
    response = setup.client.post("/guard/oidc/backchannel-logout", json={"logout_token": "a.b.c"})
    assert response.status_code == 415
    response = setup.client.post(
        "/guard/oidc/backchannel-logout", content=b"logout_token=a&logout_token=b",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert response.status_code == 400


def test_an_unreachable_provider_answers_the_backchannel_503(setup: Setup) -> None:
    setup.issuer.logout_claims = IssuerUnavailable("keys")
    assert backchannel(setup).status_code == 503


def test_jti_rows_expire(engine: Engine) -> None:
    past = [dt.datetime(2026, 1, 1, tzinfo=dt.UTC)]
    replay = LogoutReplay(engine, KEY, clock=lambda: past[0])
    assert replay.first_use(ISSUER, "j", past[0] + dt.timedelta(seconds=60))
    assert not replay.first_use(ISSUER, "j", past[0] + dt.timedelta(seconds=60))
    assert replay.first_use("https://other.example", "j", past[0])  # per issuer
    past[0] += dt.timedelta(minutes=5)
    assert replay.first_use(ISSUER, "j", past[0] + dt.timedelta(seconds=60))  # forgotten
