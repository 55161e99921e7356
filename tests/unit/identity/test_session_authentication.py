"""The session cookie in the authentication middleware (a one-route app): which credentials
decide, CSRF for cookie writes, redirects and challenges, group refresh, token sessions, blocks."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from guard.edge.context import RequestContextMiddleware
from guard.edge.ratelimit import FailureLimiter
from guard.errors import Refusal
from guard.identity.authentication import AuthenticationMiddleware
from guard.identity.base import Credentials, Principal
from guard.identity.blocks import BlockedSubjects
from guard.identity.browser import BrowserSessions
from guard.identity.sessions import SessionCookie, SessionStore, UserBlocks
from guard.identity.tokens import TokenRecord
from guard.store.db import build_engine, migrate
from tests.unit.asgi import Recorder, Result, call

KEY = b"s" * 32
OWN = "https://gw.example"
ALLOWED = "https://notebooks.example:8443"
START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
ALICE = Principal("user:alice", "alice", "ldap", (), groups=("group:ldap/a",), identity="ldap:u-1")
BASIC_AND_BEARER = ['Basic realm="r", charset="UTF-8"', 'Bearer realm="r"']
BEARER = ['Bearer realm="r"']
WRITES = ["POST", "PUT", "PATCH", "DELETE"]
API_PATHS = ["/api/2.0/mlflow/runs/create", "/ajax-api/2.0/mlflow/runs/create"]


class Clock:
    def __init__(self) -> None:
        self.now = START
        self.mono = 1000.0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)
        self.mono += seconds


class Fixed:
    """Bearer good → token:t; Basic bob:pw → user:bob."""

    name = "fixed"

    async def authenticate(self, credentials: Credentials) -> Principal | Refusal | None:
        if credentials.secret == "good":
            return Principal("token:t", "t", "token", ("admin",))
        if credentials.scheme == "basic" and credentials.secret == "pw":
            return Principal(f"user:{credentials.username}", credentials.username, "ldap", ())
        return Refusal("invalid_credentials")


@dataclass
class Directory:
    answer: Principal | Refusal | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)

    async def refresh(self, name: str, stable_id: str) -> Principal | Refusal | None:
        self.calls.append((name, stable_id))
        return self.answer


@dataclass
class Tokens:
    records: dict[int, TokenRecord] = field(default_factory=dict)
    calls: int = 0

    def by_id(self, token_id: int) -> TokenRecord | None:
        self.calls += 1
        return self.records.get(token_id)


@dataclass
class Setup:
    app: RequestContextMiddleware
    inner: Recorder
    store: SessionStore
    cookie: SessionCookie
    sessions: BrowserSessions
    clock: Clock
    directory: Directory
    tokens: Tokens
    blocks: UserBlocks
    blocked: BlockedSubjects
    events: list[dict[str, object]]

    def login(self, principal: Principal = ALICE) -> str:
        session_id, _ = self.store.create(principal, client="203.0.113.7")
        return f"{self.cookie.name}={self.cookie.encode(session_id)}"

    def call(
        self,
        method: str = "GET",
        path: str = "/api/2.0/mlflow/experiments/search",
        headers: list[tuple[str, str]] | None = None,
        query: bytes = b"",
    ) -> Result:
        return call(
            self.app, method=method, path=path, query=query, scheme="https",
            headers=[("host", "gw.example"), *(headers or [])],
        )  # fmt: skip


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = build_engine(f"sqlite:///{tmp_path / 'guard.db'}")
    migrate(engine)
    yield engine
    engine.dispose()


def make(engine: Engine, *, secure: bool = True) -> Setup:
    clock = Clock()
    store = SessionStore(engine, KEY, idle_timeout=3600, absolute_timeout=43200, clock=clock)
    cookie = SessionCookie(KEY, name="sess", secure=secure, max_age=43200)
    directory, tokens, events = Directory(), Tokens(), []
    sessions = BrowserSessions(
        store, cookie, own_origins=[OWN], allowed_origins=[ALLOWED], directory=directory,
        group_refresh=900, tokens=tokens, token_cache_ttl=5, on_event=events.append,
        clock=lambda: clock.mono,
    )  # fmt: skip
    blocks = UserBlocks(engine)
    blocked = BlockedSubjects(blocks, poll_interval=1)
    inner = Recorder()
    app = AuthenticationMiddleware(
        inner, providers=[Fixed()], realm="r", sessions=sessions, blocked=blocked
    )
    return Setup(
        RequestContextMiddleware(app), inner, store, cookie, sessions, clock, directory, tokens,
        blocks, blocked, events,
    )  # fmt: skip


@pytest.fixture
def setup(engine: Engine) -> Setup:
    return make(engine)


def principal_of(setup: Setup) -> Principal:
    return setup.inner.scopes[-1]["guard"].principal  # type: ignore[no-any-return]


# -- the cookie as credentials ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/2.0/mlflow/experiments/search", "/ajax-api/2.0/x"])
def test_cookie_authenticates(setup: Setup, path: str) -> None:
    result = setup.call(path=path, headers=[("cookie", setup.login())])
    assert result.status == 200
    principal = principal_of(setup)
    assert principal.subject == "user:alice" and principal.method == "session:ldap"
    assert principal.subject.groups == ("group:ldap/a",)  # type: ignore[attr-defined]
    assert result.header("set-cookie") is None


def test_authorization_decides_when_both_arrive(setup: Setup) -> None:
    cookie = setup.login()
    # A bad Authorization header is not rescued by a good cookie...
    result = setup.call(headers=[("cookie", cookie), ("authorization", "Bearer bad")])
    assert result.status == 401 and result.reason == "invalid_credentials"
    # ...a good one decides, and the cookie is neither read nor cleared...
    result = setup.call(headers=[("cookie", "sess=forged"), ("authorization", "Bearer good")])
    assert result.status == 200 and result.header("set-cookie") is None
    assert principal_of(setup).subject == "token:t"
    # ...and is not subject to the CSRF check: it is not an ambient credential.
    result = setup.call(
        "POST", API_PATHS[0],
        [("cookie", cookie), ("authorization", "Bearer good"), ("origin", "https://evil.example")],
    )  # fmt: skip
    assert result.status == 200


@pytest.mark.parametrize("kind", ["forged", "revoked", "duplicate", "expired", "unknown"])
def test_an_ended_or_bad_cookie_is_no_credentials_and_a_page_load_clears_it(
    setup: Setup, kind: str
) -> None:
    cookie = setup.login()
    if kind == "forged":
        cookie = cookie[:-2] + "xx"
    elif kind == "revoked":
        session_id = setup.cookie.decode(cookie.split("=", 1)[1])
        assert session_id is not None
        setup.store.revoke(session_id, "test")
    elif kind == "duplicate":
        cookie = f"{cookie}; {setup.login()}"
    elif kind == "expired":
        setup.clock.advance(43200)
    else:
        cookie = f"{setup.cookie.name}={setup.cookie.encode('never-issued')}"
    result = setup.call(headers=[("cookie", cookie)])
    assert result.status == 401 and result.reason == "unauthenticated"
    assert "ended" in result.json()["message"]
    assert result.all("www-authenticate") == BEARER  # a browser: no Basic challenge
    # An API call's answer never clears it: it could delete a cookie another tab just set.
    assert result.header("set-cookie") is None
    assert not setup.inner.scopes
    navigation = setup.call(path="/", headers=[("cookie", cookie), ("accept", "text/html")])
    assert navigation.status == 303
    assert (
        navigation.header("set-cookie")
        == "__Host-sess=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax; Secure"
    )


def test_plain_cookie_name_is_ignored_over_tls(setup: Setup) -> None:
    prefixed = setup.login()
    plain = prefixed.removeprefix("__Host-")
    result = setup.call(headers=[("cookie", plain)])
    assert result.status == 401 and result.header("set-cookie") is None
    assert setup.call(headers=[("cookie", prefixed)]).status == 200


def test_session_store_down_is_503(tmp_path: Path) -> None:
    engine = build_engine(f"sqlite:///{tmp_path / 'missing' / 'guard.db'}")
    broken = make(engine)
    cookie = f"{broken.cookie.name}={broken.cookie.encode('some-id')}"
    result = broken.call(headers=[("cookie", cookie)])
    assert result.status == 503 and result.reason == "identity_unavailable"
    assert result.header("set-cookie") is None  # the session may be fine: keep the cookie
    engine.dispose()


# -- navigations and challenges ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "query", "headers", "location"),
    [
        ("GET", "/", b"", [("accept", "text/html,*/*")], "/guard/login?next=%2F"),
        ("HEAD", "/", b"", [("accept", "text/html")], "/guard/login?next=%2F"),
        ("GET", "/static-files/x y.js", b"a=1&b=%2F", [("accept", "text/html")],
         "/guard/login?next=%2Fstatic-files%2Fx%2520y.js%3Fa%3D1%26b%3D%252F"),
        ("GET", "/", b"", [("sec-fetch-mode", "navigate"), ("accept", "*/*")],
         "/guard/login?next=%2F"),
        ("GET", "/x", b"", [("sec-fetch-dest", "document"), ("sec-fetch-mode", "no-cors")],
         "/guard/login?next=%2Fx"),
    ],
)  # fmt: skip
def test_navigation_without_credentials_goes_to_login(
    setup: Setup, method: str, path: str, query: bytes, headers: list[tuple[str, str]],
    location: str,
) -> None:  # fmt: skip
    result = setup.call(method, path, headers, query)
    assert result.status == 303
    assert result.header("location") == location
    assert result.header("www-authenticate") is None
    assert result.header("cache-control") == "no-store"
    assert result.reason == "unauthenticated"


@pytest.mark.parametrize(
    ("method", "path", "headers", "challenges"),
    [
        # API clients: both challenges.
        ("GET", "/api/2.0/mlflow/experiments/search", [], BASIC_AND_BEARER),
        ("GET", "/api/2.0/mlflow/experiments/search", [("accept", "text/html")], BASIC_AND_BEARER),
        ("GET", "/ajax-api/2.0/x", [("accept", "text/html")], BASIC_AND_BEARER),
        ("GET", "/guard/api/me", [("accept", "text/html")], BASIC_AND_BEARER),
        ("POST", "/", [("accept", "text/html")], BASIC_AND_BEARER),
        # Browsers (fetch metadata or our cookie, even a bad one): never a Basic challenge.
        ("GET", "/ajax-api/2.0/x", [("sec-fetch-site", "same-origin")], BEARER),
        ("GET", "/", [("sec-fetch-mode", "cors"), ("accept", "text/html")], BEARER),
        ("POST", "/", [("sec-fetch-mode", "navigate")], BEARER),
        ("GET", "/ajax-api/2.0/x", [("cookie", "__Host-sess=junk")], BEARER),
        ("GET", "/ajax-api/2.0/x", [("cookie", "a=1; sess=junk")], BEARER),  # unprefixed too
        ("GET", "/ajax-api/2.0/x", [("authorization", "Bearer bad"), ("sec-fetch-dest", "empty")],
         BEARER),
        # The login page itself is never redirected to itself.
        ("GET", "/guard/login", [("accept", "text/html")], BASIC_AND_BEARER),
    ],
)  # fmt: skip
def test_challenges(
    setup: Setup, method: str, path: str, headers: list[tuple[str, str]], challenges: list[str]
) -> None:
    result = setup.call(method, path, headers)
    assert result.status == 401
    assert result.all("www-authenticate") == challenges


def test_past_the_address_limit_navigations_still_go_to_login(engine: Engine) -> None:
    setup = make(engine)
    limiter = FailureLimiter(2, 60)
    setup.app = RequestContextMiddleware(
        AuthenticationMiddleware(
            setup.inner, providers=[Fixed()], realm="r", sessions=setup.sessions, limiter=limiter
        )
    )
    for _ in range(3):
        limiter.refused("203.0.113.7")  # the address the test calls come from
    assert limiter.blocked("203.0.113.7") > 0
    # A person reloading a page reaches the login page (the redirect is counted as a refusal
    # by the audit trail's flood counting, see tests/unit/audit/test_trail.py)...
    for headers in ([("accept", "text/html")], [("sec-fetch-mode", "navigate")]):
        result = setup.call("GET", "/", headers)
        assert result.status == 303 and result.reason == "unauthenticated"
        assert result.header("location") == "/guard/login?next=%2F"
    # ...everything else from that address gets 429.
    for method, path, headers in (
        ("GET", "/api/2.0/mlflow/experiments/search", []),
        ("GET", "/ajax-api/2.0/x", [("sec-fetch-site", "same-origin")]),
        ("POST", "/", [("sec-fetch-mode", "navigate")]),
        ("GET", "/api/2.0/mlflow/experiments/search", [("authorization", "Bearer bad")]),
    ):
        result = setup.call(method, path, headers)
        assert (result.status, result.reason) == (429, "too_many_failures"), (method, path)


def test_without_sessions_nothing_changes() -> None:
    app = RequestContextMiddleware(
        AuthenticationMiddleware(Recorder(), providers=[Fixed()], realm="r")
    )
    headers = [("host", "x"), ("accept", "text/html"), ("sec-fetch-mode", "navigate")]
    result = call(app, headers=headers)
    assert result.status == 401 and result.all("www-authenticate") == BASIC_AND_BEARER


# -- CSRF -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", WRITES)
@pytest.mark.parametrize("path", API_PATHS)
@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ([("origin", OWN)], True),
        ([("origin", "HTTPS://GW.EXAMPLE")], True),
        ([("origin", "https://gw.example:443")], True),
        ([("origin", ALLOWED)], True),
        ([("sec-fetch-site", "same-origin")], True),
        ([("origin", OWN), ("sec-fetch-site", "cross-site")], True),  # Origin decides
        ([], False),
        ([("origin", "null")], False),
        ([("origin", "http://gw.example")], False),  # scheme differs
        ([("origin", "https://gw.example:8443")], False),  # port differs
        ([("origin", "https://notebooks.example")], False),  # allowed one's port missing
        ([("origin", "https://gw.example.evil.example")], False),
        ([("origin", "https://evil.example"), ("sec-fetch-site", "same-origin")], False),
        ([("origin", OWN), ("origin", "https://evil.example")], False),
        ([("origin", OWN + "/path")], False),
        ([("sec-fetch-site", "same-site")], False),
        ([("sec-fetch-site", "cross-site")], False),
        ([("sec-fetch-site", "none")], False),
        ([("sec-fetch-site", "same-origin"), ("sec-fetch-site", "cross-site")], False),
    ],
)
def test_csrf_for_cookie_writes(
    setup: Setup, method: str, path: str, headers: list[tuple[str, str]], allowed: bool
) -> None:
    result = setup.call(method, path, [("cookie", setup.login()), *headers])
    if allowed:
        assert result.status == 200
    else:
        assert (result.status, result.reason) == (403, "csrf_failed")
        assert "gateway.public_url" in result.json()["message"]
        assert not setup.inner.scopes


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_reads_need_no_origin(setup: Setup, method: str) -> None:
    result = setup.call(method, API_PATHS[0], [("cookie", setup.login())])
    assert result.status == 200


@pytest.mark.parametrize("method", ["post", "PROPFIND", "TRACE"])
def test_any_other_method_is_a_write(setup: Setup, method: str) -> None:
    result = setup.call(method, API_PATHS[0], [("cookie", setup.login())])
    assert result.reason == "csrf_failed"


# -- blocks -----------------------------------------------------------------------------------


def test_blocked_people_are_refused_whatever_provider(setup: Setup) -> None:
    basic = [("authorization", "Basic Ym9iOnB3")]  # bob:pw
    assert setup.call(headers=basic).status == 200
    setup.blocked.subjects = frozenset({"user:bob", "token:t"})
    result = setup.call(headers=basic)
    assert (result.status, result.reason) == (403, "user_blocked")
    assert result.json()["message"].startswith("This account is blocked; ask an administrator.")
    # Tokens are not people: token revoke ends them, a block does not apply.
    assert setup.call(headers=[("authorization", "Bearer good")]).status == 200


def test_blocking_ends_sessions(setup: Setup) -> None:
    cookie = setup.login()
    assert setup.call(headers=[("cookie", cookie)]).status == 200
    setup.blocks.block("user:alice", "cli:root")
    result = setup.call(headers=[("cookie", cookie)])
    assert result.status == 401 and result.reason == "unauthenticated"


# -- ldap group refresh -----------------------------------------------------------------------


def test_groups_are_refreshed_when_due(setup: Setup) -> None:
    cookie = setup.login()
    setup.directory.answer = Principal(
        "user:alice", "alice", "ldap", (), groups=("group:ldap/b",), identity="ldap:u-1"
    )
    setup.clock.advance(899)
    assert setup.call(headers=[("cookie", cookie)]).status == 200
    assert setup.directory.calls == []
    setup.clock.advance(2)
    assert setup.call(headers=[("cookie", cookie)]).status == 200
    assert setup.directory.calls == [("alice", "u-1")]
    assert principal_of(setup).groups == ("group:ldap/b",)
    assert principal_of(setup).subject.groups == ("group:ldap/b",)  # type: ignore[attr-defined]
    assert setup.call(headers=[("cookie", cookie)]).status == 200
    assert len(setup.directory.calls) == 1  # stored: not asked again until due
    [stored] = setup.store.list()
    assert stored.groups == ("group:ldap/b",) and stored.groups_checked_at == setup.clock.now


def test_an_entry_gone_ends_the_session(setup: Setup) -> None:
    cookie = setup.login()
    setup.directory.answer = None
    setup.clock.advance(901)
    result = setup.call(headers=[("cookie", cookie)])
    assert result.status == 401 and result.reason == "unauthenticated"
    [row] = setup.store.list(include_ended=True)
    assert row.revoked_by == "gateway:group-refresh"
    assert setup.events == [
        {"event": "session_revoked", "principal": "gateway:group-refresh",
         "subject": "user:alice", "session": row.key[:12], "detail": "the directory entry is gone"}
    ]  # fmt: skip


def test_another_subject_for_the_entry_ends_the_session(setup: Setup) -> None:
    cookie = setup.login()
    setup.directory.answer = Principal("user:mallory", "mallory", "ldap", (), identity="ldap:u-1")
    setup.clock.advance(901)
    assert setup.call(headers=[("cookie", cookie)]).status == 401


def test_directory_unavailable_keeps_the_groups_and_retries_later(setup: Setup) -> None:
    cookie = setup.login()
    setup.directory.answer = Refusal("identity_unavailable")
    setup.clock.advance(901)
    for _ in range(5):
        assert setup.call(headers=[("cookie", cookie)]).status == 200
        assert principal_of(setup).groups == ("group:ldap/a",)
    assert len(setup.directory.calls) == 1  # not once per request while it is down
    setup.clock.advance(61)
    assert setup.call(headers=[("cookie", cookie)]).status == 200
    assert len(setup.directory.calls) == 2


# -- token sessions ---------------------------------------------------------------------------


def token(setup: Setup, revoked: bool = False, expires_in: float = 3600) -> TokenRecord:
    now = setup.clock.now
    return TokenRecord(
        7, "ci", "admin", now, now + dt.timedelta(seconds=expires_in),
        now if revoked else None, None,
    )  # fmt: skip


def test_token_session_lives_with_its_token(setup: Setup) -> None:
    setup.tokens.records[7] = token(setup)
    cookie = setup.login(Principal("token:ci", "ci", "token", ("admin",), identity="token:7"))
    for _ in range(3):
        assert setup.call(headers=[("cookie", cookie)]).status == 200
    assert setup.tokens.calls == 1  # cached for token_cache_ttl
    setup.tokens.records[7] = token(setup, revoked=True)
    assert setup.call(headers=[("cookie", cookie)]).status == 200  # within the cache time
    setup.clock.advance(6)
    result = setup.call(headers=[("cookie", cookie)])
    assert result.status == 401
    [row] = setup.store.list(include_ended=True)
    assert row.revoked_by == "gateway:token-ended"
    assert setup.events[0]["principal"] == "gateway:token-ended"


@pytest.mark.parametrize("identity", ["token:99", "token:", "token:x", "ldap:7"])
def test_token_session_without_its_token_ends(setup: Setup, identity: str) -> None:
    setup.tokens.records[7] = token(setup, expires_in=1)
    cookie = setup.login(Principal("token:ci", "ci", "token", ("admin",), identity=identity))
    assert setup.call(headers=[("cookie", cookie)]).status == 401


def test_token_session_ends_when_the_token_expires(setup: Setup) -> None:
    setup.tokens.records[7] = token(setup, expires_in=10)
    cookie = setup.login(Principal("token:ci", "ci", "token", ("admin",), identity="token:7"))
    assert setup.call(headers=[("cookie", cookie)]).status == 200
    setup.clock.advance(11)
    assert setup.call(headers=[("cookie", cookie)]).status == 401
