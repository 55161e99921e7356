"""The login and logout pages (guard.identity.login) with a real session table (SQLite) and
fake identity providers: the page, its static files, ``next`` validation, the CSRF token (missing,
mismatched, reused, expired, forged), one login attempt per tab (several forms at once, each
once, the pile-up bounded, the payload OpenID Connect keeps), login CSRF by Origin, fixation,
logout, and every malformed form."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine
from starlette.types import ASGIApp

from guard.edge.context import RequestContextMiddleware
from guard.edge.ratelimit import FailureLimiter
from guard.errors import Refusal
from guard.identity.base import Credentials, Principal
from guard.identity.csrf import CSRF_COOKIE, MAX_ATTEMPTS, Issued, LoginCsrf, LogoutCsrf
from guard.identity.forms import validate_next
from guard.identity.login import LoginApp
from guard.identity.sessions import SessionCookie, SessionStore
from guard.store.db import build_engine, migrate

KEY = b"k" * 32
ORIGIN = "http://testserver"
TOKEN = "mlg_" + "a" * 40
JAR_DOMAIN = "testserver.local"  # where httpx files the test server's cookies


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/", "/"),
        ("/#/experiments/3/runs/abc", "/#/experiments/3/runs/abc"),
        ("/#/models", "/#/models"),
        ("/ajax-api/2.0/mlflow/experiments/search?max_results=5", None),
        ("/static-files/x.js?v=1#frag", None),
        ("/#/experiments/1?searchFilter=metrics.auc%20%3E%200.5", None),
        ("/#/experiments/1?q=a b", "/#/experiments/1?q=a%20b"),  # made ASCII, still the same
        ("/#/m/\u00e9", "/#/m/%C3%A9"),
        # Elsewhere: all land on /.
        ("", "/"),
        (None, "/"),
        ("//evil.com", "/"),
        ("//evil.com/#/x", "/"),
        ("https://evil.com", "/"),
        ("http:/evil.com", "/"),
        ("/\\evil.com", "/"),
        ("\\\\evil.com", "/"),
        ("/%2F%2Fevil.com", "/"),
        ("/%2fevil.com", "/"),
        ("%2F%2Fevil.com", "/"),
        ("/%5Cevil.com", "/"),
        ("/%5cevil.com", "/"),
        ("/%252F%252Fevil.com", "/"),  # encoded twice
        ("/%25252F%25252Fevil.com", "/"),  # three times
        ("/%2525252F%2525252Fevil.com", "/"),  # four times: given up on, not trusted
        ("javascript:alert(1)", "/"),
        ("/javascript:alert(1)", None),  # a path on this origin, harmless
        ("JaVaScRiPt:alert(1)", "/"),
        ("/\t/evil.com", "/"),  # browsers drop tabs and newlines from URLs: //evil.com
        ("/\n/evil.com", "/"),
        ("/\r\n/evil.com", "/"),
        ("/%09/evil.com", "/"),
        ("/%0d%0aSet-Cookie:x=1", "/"),
        ("/#/x\r\nSet-Cookie: x=1", "/"),
        ("/#/x%0d%0aSet-Cookie:%20x=1", "/"),
        ("/ /evil.com", "/"),
        ("/\x00", "/"),
        ("/%00", "/"),
        ("/%ff%fe", "/"),  # not UTF-8
        ("/" + "a" * 2048, "/"),
        ("/guard/login", "/"),
        ("/guard/login?next=/guard/login", "/"),
        ("/guard/logout", "/"),
        ("/guard/api/policies", "/"),
        ("/guard", "/"),
        ("/%67uard/login", "/"),
        ("/x/../guard/login", "/"),
        ("/%2e%2e/guard/login", "/"),
        ("evil.com", "/"),
        ("?next=//evil.com", "/"),
        ("#//evil.com", "/"),
    ],
)
def test_next_is_a_path_on_this_origin_or_slash(value: str | None, expected: str | None) -> None:
    assert validate_next(value) == (value if expected is None else expected)


# -- the app under test --------------------------------------------------------------------


@dataclass
class Provider:
    """The token provider's rules in miniature: mlg_ secrets are its, the name is checked."""

    calls: list[Credentials] = field(default_factory=list)
    refusal: Refusal | None = None
    name: str = "fake"

    async def authenticate(self, credentials: Credentials) -> Principal | Refusal | None:
        self.calls.append(credentials)
        if self.refusal is not None:
            return self.refusal
        if not credentials.secret.startswith("mlg_"):
            return None
        if credentials.secret == TOKEN and credentials.username == "ci":
            return Principal("token:ci", "ci", "token", ("viewer",), identity="token:1")
        return Refusal("invalid_credentials")


class Client:
    """A synchronous client for an ASGI app that keeps its cookie jar between requests."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.cookies = httpx.Cookies()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def run() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(
                transport=transport, base_url=ORIGIN, cookies=self.cookies
            ) as client:
                response = await client.request(method, path, **kwargs)
                self.cookies = client.cookies
                return response

        return asyncio.run(run())

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def head(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("HEAD", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)


@dataclass
class Setup:
    client: Client
    provider: Provider
    sessions: SessionStore
    cookie: SessionCookie
    csrf: LoginCsrf
    events: list[dict[str, Any]]
    limiter: FailureLimiter
    now: list[float]
    completed: list[Any]  # the request contexts, as the audit trail's outcome hook sees them

    def page(self, next_: str = "/") -> str:
        """GET the login page; the hidden csrf_token field's value."""
        response = self.client.get("/guard/login", params={"next": next_})
        assert response.status_code == 200
        return field_value(response.text, "csrf_token")

    def login(self, token: str, **overrides: str) -> Any:
        form = {"username": "ci", "password": TOKEN, "csrf_token": token, "next": "/#/models"}
        form.update(overrides)
        return self.client.post("/guard/login", data=form, headers={"origin": ORIGIN})


def attempt_cookie(token: str) -> str:
    """The name of the cookie of the login attempt a csrf_token field names."""
    return f"{CSRF_COOKIE}_{token.partition('.')[0]}"


def field_value(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, html
    return match.group(1)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = build_engine(f"sqlite:///{tmp_path / 'guard.db'}")
    migrate(engine)
    yield engine
    engine.dispose()


def make(
    engine: Engine, *, directory: bool = False, blocked: frozenset[str] = frozenset()
) -> Setup:
    provider = Provider()
    sessions = SessionStore(engine, KEY, idle_timeout=3600, absolute_timeout=43200)
    cookie = SessionCookie(KEY, name="mlflow_guard_session", secure=False, max_age=43200)
    now = [1_000_000.0]
    csrf = LoginCsrf(KEY, secure=False, clock=lambda: now[0])
    events: list[dict[str, Any]] = []
    limiter = FailureLimiter(5, 60)
    app = LoginApp(
        providers=[provider], sessions=sessions, cookie=cookie, csrf=csrf,
        logout_csrf=LogoutCsrf(KEY), origins=frozenset({ORIGIN}), directory=directory,
        blocked=blocked, limiter=limiter, audit=events.append,
    )  # fmt: skip
    completed: list[Any] = []
    client = Client(
        RequestContextMiddleware(app, on_complete=lambda scope: completed.append(scope["guard"]))
    )
    return Setup(client, provider, sessions, cookie, csrf, events, limiter, now, completed)


@pytest.fixture
def setup(engine: Engine) -> Setup:
    return make(engine)


# -- the page ------------------------------------------------------------------------------


class Controls(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[dict[str, str | None]] = []
        self.labels: set[str] = set()
        self.scripts: list[dict[str, str | None]] = []
        self.styles: list[str] = []
        self.alert = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "input":
            self.inputs.append(a)
        elif tag == "label" and a.get("for"):
            self.labels.add(str(a["for"]))
        elif tag == "script":
            self.scripts.append(a)
        elif tag == "style" or a.get("style"):
            self.styles.append(tag)
        if a.get("role") == "alert":
            self.alert = True


@pytest.mark.parametrize("directory", [False, True])
def test_the_page_has_labelled_controls_and_no_inline_script(
    engine: Engine, directory: bool
) -> None:
    s = make(engine, directory=directory)
    response = s.client.get("/guard/login", params={"next": "/#/models"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "form-action 'self'" in csp and "unsafe-inline" not in csp
    parsed = Controls()
    parsed.feed(response.text)
    visible = [i for i in parsed.inputs if i.get("type") != "hidden"]
    assert visible and all(i.get("id") in parsed.labels for i in visible)
    assert all(s.get("src", "").startswith("/guard/static/") for s in parsed.scripts)
    assert not parsed.styles and parsed.alert
    # Always the token form; the directory form only with LDAP.
    assert 'id="token-name"' in response.text
    assert ('id="password"' in response.text) is directory
    assert "SSO" in response.text  # the place the next issue's button goes
    assert "https://" not in response.text and "http://" not in response.text


def test_the_csrf_cookie_is_short_lived_httponly_and_strict(setup: Setup) -> None:
    response = setup.client.get("/guard/login")
    cookie = response.headers["set-cookie"]
    token = field_value(response.text, "csrf_token")
    assert re.fullmatch(r"[0-9a-f]{16}\.[0-9a-f]{64}", token)
    assert cookie.startswith(f"{attempt_cookie(token)}=")
    for attribute in ("Path=/", "Max-Age=600", "HttpOnly", "SameSite=Strict"):
        assert attribute in cookie
    assert "Secure" not in cookie
    assert LoginCsrf(KEY, secure=True).prefix == f"__Host-{CSRF_COOKIE}_"


def test_next_is_validated_into_the_form(setup: Setup) -> None:
    text = setup.client.get("/guard/login", params={"next": "//evil.com"}).text
    assert field_value(text, "next") == "/"
    text = setup.client.get("/guard/login?next=/a&next=//evil.com").text
    assert field_value(text, "next") == "/"
    text = setup.client.get("/guard/login", params={"next": '/"><script>x'}).text
    assert "<script>x" not in text


@pytest.mark.parametrize(
    ("name", "kind"), [("login.js", "text/javascript"), ("login.css", "text/css")]
)
def test_static_files(setup: Setup, name: str, kind: str) -> None:
    response = setup.client.get(f"/guard/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(kind)
    assert "max-age=31536000" in response.headers["cache-control"]
    head = setup.client.head(f"/guard/static/{name}")
    assert head.status_code == 200 and head.content == b""
    assert setup.client.post(f"/guard/static/{name}").status_code == 405
    assert setup.client.get("/guard/static/other.js").status_code == 405  # not ours (404 upstream)


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_other_methods_are_refused(setup: Setup, method: str) -> None:
    for path in ("/guard/login", "/guard/logout"):
        response = setup.client.request(method, path)
        assert response.status_code == 405, path


# -- login ---------------------------------------------------------------------------------


def test_a_token_login_sets_a_new_session_and_lands_on_next(setup: Setup) -> None:
    token = setup.page()
    response = setup.login(token)
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/#/models"
    cookies = response.headers.get_list("set-cookie")
    session = next(c for c in cookies if c.startswith("mlflow_guard_session="))
    assert "HttpOnly" in session and "SameSite=Lax" in session
    assert any(c.startswith(f"{attempt_cookie(token)}=;") and "Max-Age=0" in c for c in cookies)
    session_id = setup.cookie.decode(session.split(";")[0].split("=", 1)[1])
    assert session_id is not None
    row = setup.sessions.get(session_id)
    assert row is not None and row.subject == "token:ci" and row.method == "token"
    assert setup.provider.calls == [Credentials("basic", TOKEN, "ci", "127.0.0.1")]
    assert setup.completed[-1].principal.subject == "token:ci"  # the record names who
    (event,) = setup.events
    assert event["event"] == "login" and event["principal"] == "token:ci"
    assert TOKEN not in repr(setup.events)


def test_a_failed_login_says_nothing_about_the_user(setup: Setup) -> None:
    texts = []
    for name, password in (("ci", "mlg_" + "b" * 40), ("nobody", TOKEN)):
        response = setup.login(setup.page(), username=name, password=password)
        assert response.status_code == 401
        assert response.headers["x-guard-reason"] == "invalid_credentials"
        assert "The user name or password is not correct." in response.text
        assert field_value(response.text, "next") == "/#/models"  # kept for the next try
        texts.append(response.text.replace(name, "NAME"))
    token = r'value="[0-9a-f]{16}\.[0-9a-f]{64}"'
    assert re.sub(token, "", texts[0]) == re.sub(token, "", texts[1])
    assert setup.events == []  # the outcome records tell of failures:
    first, second = (c.refusal for c in setup.completed if c.refusal is not None)
    assert dict(first.audit)["login_name"] == "ci" and dict(second.audit)["login_name"] == "nobody"
    assert "mlg_" not in repr(first.audit) + repr(second.audit)


def test_the_failure_page_escapes_the_name(setup: Setup) -> None:
    response = setup.login(setup.page(), username='"><script>alert(1)</script>')
    assert response.status_code == 401
    assert "<script>alert(1)" not in response.text


def test_an_empty_password_is_refused_before_any_provider(setup: Setup) -> None:
    for username, password in (("ci", ""), ("", TOKEN)):
        response = setup.login(setup.page(), username=username, password=password)
        assert response.status_code == 401
    assert setup.provider.calls == []


@pytest.mark.parametrize(
    ("refusal", "status", "text"),
    [
        (Refusal("identity_unavailable"), 503, "cannot be checked right now"),
        (Refusal("identity_conflict"), 403, "bound to another identity"),
        (Refusal("user_blocked"), 403, "blocked"),
        (Refusal("token_expired"), 401, "expired"),
    ],
)
def test_provider_refusals(setup: Setup, refusal: Refusal, status: int, text: str) -> None:
    setup.provider.refusal = refusal
    response = setup.login(setup.page())
    assert response.status_code == status
    assert response.headers["x-guard-reason"] == refusal.reason
    assert text in response.text
    assert "mlflow_guard_session=" not in " ".join(response.headers.get_list("set-cookie"))


def test_a_blocked_subject_gets_no_session(engine: Engine) -> None:
    s = make(engine, blocked=frozenset({"token:ci"}))
    response = s.login(s.page())
    assert response.status_code == 403
    assert response.headers["x-guard-reason"] == "user_blocked"
    assert s.sessions.list() == []


def test_past_the_address_limit_the_providers_are_not_asked(setup: Setup) -> None:
    for _ in range(5):
        setup.limiter.refused("127.0.0.1")
    response = setup.login(setup.page())
    assert response.status_code == 429
    assert response.headers["x-guard-reason"] == "too_many_failures"
    assert int(response.headers["retry-after"]) >= 1
    assert setup.provider.calls == []
    # Its page views now go into the flood summary instead of a record each.
    page = setup.client.get("/guard/login")
    assert page.status_code == 200 and setup.completed[-1].unrecorded


def test_page_views_below_the_limit_are_recorded_and_not_counted(setup: Setup) -> None:
    for _ in range(10):
        setup.page()
    assert not any(c.unrecorded for c in setup.completed)
    assert setup.login(setup.page()).status_code == 303


def test_a_throttled_name_keeps_its_retry_after(setup: Setup) -> None:
    setup.provider.refusal = Refusal("login_throttled", retry_after=42)
    response = setup.login(setup.page())
    assert response.status_code == 401 and response.headers["retry-after"] == "42"


# -- CSRF ----------------------------------------------------------------------------------


def csrf_refused(response: Any) -> bool:
    return (
        response.status_code == 403 and response.headers["x-guard-reason"] == "csrf_token_invalid"
    )


def test_csrf_missing_field_or_cookie(setup: Setup) -> None:
    token = setup.page()
    assert csrf_refused(setup.login(""))
    setup.client.cookies.clear()
    assert csrf_refused(setup.login(token))
    assert setup.provider.calls == []


def test_csrf_mismatched(setup: Setup) -> None:
    first, second = setup.page(), setup.page()
    # One attempt's id with the other's HMAC: each cookie is there, neither fits.
    assert csrf_refused(setup.login(first.split(".")[0] + "." + second.split(".")[1]))
    assert csrf_refused(setup.login(second.split(".")[0] + "." + first.split(".")[1]))
    assert csrf_refused(setup.login("0" * 64))
    assert setup.provider.calls == []


def test_csrf_reused(setup: Setup) -> None:
    token = setup.page()
    jar = dict(setup.client.cookies)
    assert setup.login(token, password="mlg_" + "c" * 40).status_code == 401
    setup.client.cookies.clear()
    for name, value in jar.items():  # replay the same pair
        setup.client.cookies.set(name, value)
    assert csrf_refused(setup.login(token))
    assert len(setup.provider.calls) == 1


def test_csrf_expired(setup: Setup) -> None:
    token = setup.page()
    setup.now[0] += 601
    assert csrf_refused(setup.login(token))


def test_csrf_forged_cookie(setup: Setup) -> None:
    token = setup.page()
    setup.client.cookies.set(attempt_cookie(token), "forged.value.sig", domain=JAR_DOMAIN)
    assert csrf_refused(setup.login(token))
    # A cookie signed with another key for the same attempt does not fit either.
    other = LoginCsrf(b"x" * 32, secure=False)
    setup.client.cookies.clear()
    issued = other.issue([])
    name, _, rest = issued.headers[0][1].decode().partition("=")
    setup.client.cookies.set(name, rest.split(";")[0], domain=JAR_DOMAIN)
    assert csrf_refused(setup.login(issued.field))


def test_csrf_duplicate_cookie(setup: Setup) -> None:
    token = setup.page()
    name = attempt_cookie(token)
    value = setup.client.cookies[name]
    setup.client.cookies.clear()
    response = setup.client.post(
        "/guard/login",
        data={"username": "ci", "password": TOKEN, "csrf_token": token},
        headers={"origin": ORIGIN, "cookie": f"{name}={value}; {name}={value}"},
    )
    assert csrf_refused(response)


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "http://evil.example"},
        {"origin": "null"},
        {"origin": "http://testserver:8080"},
        {"origin": "https://testserver"},
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
    ],
)
def test_login_csrf_from_another_origin(setup: Setup, headers: dict[str, str]) -> None:
    token = setup.page()
    form = {"username": "ci", "password": TOKEN, "csrf_token": token}
    response = setup.client.post("/guard/login", data=form, headers=headers)
    assert response.status_code == 403
    assert response.headers["x-guard-reason"] == "csrf_failed"
    assert setup.provider.calls == []


@pytest.mark.parametrize("headers", [{"sec-fetch-site": "same-origin"}, {}])
def test_same_origin_without_origin_header(setup: Setup, headers: dict[str, str]) -> None:
    token = setup.page()
    form = {"username": "ci", "password": TOKEN, "csrf_token": token}
    response = setup.client.post("/guard/login", data=form, headers=headers)
    assert response.status_code == 303


def test_fixation_the_cookie_before_login_is_not_the_one_after(setup: Setup) -> None:
    before = setup.login(setup.page())
    old = setup.client.cookies["mlflow_guard_session"]
    after = setup.login(setup.page())
    assert before.status_code == after.status_code == 303
    new = setup.client.cookies["mlflow_guard_session"]
    assert new != old
    old_id, new_id = setup.cookie.decode(old), setup.cookie.decode(new)
    assert old_id is not None and new_id is not None
    assert setup.sessions.get(old_id) is None  # the earlier session was ended
    assert setup.sessions.get(new_id) is not None
    # A planted value never becomes the session: the id is drawn by the gateway.
    setup.client.cookies.set("mlflow_guard_session", "planted", domain=JAR_DOMAIN)
    setup.login(setup.page())
    assert setup.client.cookies["mlflow_guard_session"] != "planted"


# -- one attempt per tab ---------------------------------------------------------------------


def attempt_names(setup: Setup) -> set[str]:
    return {name for name in setup.client.cookies if name.startswith(f"{CSRF_COOKIE}_")}


def put_back(setup: Setup, jar: dict[str, str], token: str) -> None:
    setup.client.cookies.set(attempt_cookie(token), jar[attempt_cookie(token)], domain=JAR_DOMAIN)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_two_tabs_each_log_in_once_in_either_order(setup: Setup, order: tuple[int, int]) -> None:
    tokens = [setup.page(), setup.page()]  # two tabs, one cookie jar
    jar = dict(setup.client.cookies)
    assert attempt_names(setup) == {attempt_cookie(t) for t in tokens}
    for i in order:
        response = setup.login(tokens[i])
        assert response.status_code == 303, response.text
        assert attempt_cookie(tokens[i]) not in setup.client.cookies  # spent, so cleared
    assert attempt_names(setup) == set()
    for i in order:  # each attempt once, even with its cookie put back
        put_back(setup, jar, tokens[i])
        assert csrf_refused(setup.login(tokens[i]))
    assert len(setup.provider.calls) == 2


def test_a_failed_login_spends_its_attempt_and_the_page_gives_a_new_one(setup: Setup) -> None:
    first, other = setup.page(), setup.page()
    failed = setup.login(first, password="mlg_" + "b" * 40)
    assert failed.status_code == 401
    again = field_value(failed.text, "csrf_token")
    assert again not in {first, other}
    assert attempt_names(setup) == {attempt_cookie(other), attempt_cookie(again)}
    assert csrf_refused(setup.login(first))
    assert setup.login(again).status_code == 303
    assert setup.login(other).status_code == 303  # the other tab's attempt was left alone


@pytest.mark.parametrize(
    "field",
    [
        "",
        "0" * 64,  # the old form: no attempt
        "0123456789abcdef." + "0" * 64,  # well-formed, but no cookie of that attempt
        "0123456789ABCDEF." + "0" * 64,
        "0123456789abcde." + "0" * 64,
        "0123456789abcdef0." + "0" * 64,
        "0123456789abcdef." + "0" * 63,
        "0123456789abcdef.." + "0" * 64,
        "../../x." + "0" * 64,
        "0123456789abcdef;x=1." + "0" * 64,
    ],
)
def test_attempt_fields_that_name_no_attempt_of_ours(setup: Setup, field: str) -> None:
    setup.page()
    assert csrf_refused(setup.login(field))
    assert setup.provider.calls == []


def test_one_attempts_cookie_under_another_attempts_name_is_refused(setup: Setup) -> None:
    first, second = setup.page(), setup.page()
    value = setup.client.cookies[attempt_cookie(first)]
    setup.client.cookies.set(attempt_cookie(second), value, domain=JAR_DOMAIN)
    # The cookie names the attempt it was issued for: moved, it fits no field.
    assert csrf_refused(setup.login(second.split(".")[0] + "." + first.split(".")[1]))
    assert csrf_refused(setup.login(second))


def test_the_pile_up_of_attempts_is_bounded(setup: Setup) -> None:
    tokens = []
    for _ in range(MAX_ATTEMPTS + 4):  # tabs opened and never used
        tokens.append(setup.page())
        setup.now[0] += 1
        assert len(attempt_names(setup)) <= MAX_ATTEMPTS
    assert attempt_names(setup) == {attempt_cookie(t) for t in tokens[-MAX_ATTEMPTS:]}
    # Not ours (no attempt id) or forged under our pattern: the first is left, the second goes.
    setup.client.cookies.set(f"{CSRF_COOKIE}_other", "x", domain=JAR_DOMAIN)
    setup.client.cookies.set(f"{CSRF_COOKIE}_{'f' * 16}", "forged", domain=JAR_DOMAIN)
    newest = setup.page()
    assert f"{CSRF_COOKIE}_other" in setup.client.cookies
    assert f"{CSRF_COOKIE}_{'f' * 16}" not in setup.client.cookies
    assert attempt_cookie(newest) in setup.client.cookies
    assert len(attempt_names(setup) - {f"{CSRF_COOKIE}_other"}) == MAX_ATTEMPTS
    # Expired ones are cleared by the next page.
    setup.now[0] += 601
    latest = setup.page()
    assert attempt_names(setup) - {f"{CSRF_COOKIE}_other"} == {attempt_cookie(latest)}
    assert setup.login(latest).status_code == 303


def cookie_of(issued: Issued) -> tuple[bytes, bytes]:
    """The Cookie header a browser sends back for an attempt's Set-Cookie."""
    return (b"cookie", issued.headers[0][1].split(b";")[0])


def test_an_attempt_carries_a_payload_once_for_openid_connect() -> None:
    oidc = LoginCsrf(KEY, secure=True, name="mlflow_guard_oidc", purpose="oidc", same_site="Lax")
    payload = {"nonce": "n" * 43, "verifier": "v" * 64, "next": "/#/models"}
    issued = oidc.issue([], payload)
    set_cookie = issued.headers[0][1].decode()
    assert set_cookie.startswith(f"__Host-mlflow_guard_oidc_{issued.field.split('.')[0]}=")
    assert "SameSite=Lax" in set_cookie and "Secure" in set_cookie
    assert oidc.check([cookie_of(issued)], issued.field) == payload
    assert oidc.check([cookie_of(issued)], issued.field) is None  # a replayed callback
    # Another purpose's key never reads it; the login form's attempts are not the callback's.
    login = LoginCsrf(KEY, secure=True)
    other = oidc.issue([], payload)
    assert login.check([cookie_of(other)], other.field) is None
    assert oidc.check([cookie_of(other)], "a" * 200) is None  # over-long
    # Over TLS only the __Host- name is read.
    plain = (b"cookie", cookie_of(other)[1].removeprefix(b"__Host-"))
    assert oidc.check([plain], other.field) is None
    assert oidc.check([cookie_of(other)], other.field) == payload
    with pytest.raises(ValueError, match="too large"):
        oidc.issue([], {"x": "y" * 4000})


# -- malformed forms -----------------------------------------------------------------------


def post_raw(
    setup: Setup, body: bytes, content_type: str = "application/x-www-form-urlencoded"
) -> Any:
    return setup.client.post(
        "/guard/login", content=body, headers={"content-type": content_type, "origin": ORIGIN}
    )


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        (b"username=a&username=b&password=x&csrf_token=t", None, 400, "ambiguous_parameter"),
        (b"username=a&password=x&password=y&csrf_token=t", None, 400, "ambiguous_parameter"),
        (b"username=a&password=x&csrf_token=t&role=admin", None, 400, "invalid_request_body"),
        (b"username=" + b"a" * 257 + b"&password=x", None, 400, "invalid_request_body"),
        (b"username=a&password=" + b"x" * 1025, None, 400, "invalid_request_body"),
        (b"username=a&password=x&csrf_token=" + b"t" * 129, None, 400, "invalid_request_body"),
        (b"username=a%00&password=x&csrf_token=t", None, 400, "invalid_request_body"),
        (b"username=%ff&password=x&csrf_token=t", None, 400, "invalid_request_body"),
        (b"username=a&&password=x", None, 400, "invalid_request_body"),
        (b"x" * 9000, None, 413, "body_too_large"),
        (b'{"username": "a"}', "application/json", 415, "unsupported_media_type"),
        (b"username=a", "multipart/form-data; boundary=x", 415, "unsupported_media_type"),
        (b"username=a", "text/plain", 415, "unsupported_media_type"),
        (b"username=a", "application/x-www-form-urlencoded; charset=latin-1", 415,
         "unsupported_media_type"),
    ],
)  # fmt: skip
def test_malformed_forms_are_refused(
    setup: Setup, body: bytes, content_type: str | None, status: int, reason: str
) -> None:
    setup.page()
    response = post_raw(setup, body, content_type or "application/x-www-form-urlencoded")
    assert response.status_code == status, response.text
    assert response.headers["x-guard-reason"] == reason
    assert response.json()["reason"] == reason  # MLflow's error shape for a non-browser
    assert "set-cookie" not in response.headers  # no attempt is spent: it may be another tab's
    assert setup.provider.calls == []


# -- logout --------------------------------------------------------------------------------


def test_logout(setup: Setup) -> None:
    assert setup.login(setup.page()).status_code == 303
    session_id = setup.cookie.decode(setup.client.cookies["mlflow_guard_session"])
    assert session_id is not None
    page = setup.client.get("/guard/logout")
    assert page.status_code == 200 and "ci" in page.text
    token = field_value(page.text, "csrf_token")
    assert token == LogoutCsrf(KEY).token(session_id)

    wrong = setup.client.post("/guard/logout", data={"csrf_token": "0" * 64},
                              headers={"origin": ORIGIN})  # fmt: skip
    assert wrong.status_code == 403 and wrong.headers["x-guard-reason"] == "csrf_token_invalid"
    cross = setup.client.post("/guard/logout", data={"csrf_token": token},
                              headers={"origin": "http://evil.example"})  # fmt: skip
    assert cross.status_code == 403 and cross.headers["x-guard-reason"] == "csrf_failed"
    assert setup.sessions.get(session_id) is not None

    done = setup.client.post("/guard/logout", data={"csrf_token": token},
                             headers={"origin": ORIGIN})  # fmt: skip
    assert done.status_code == 303 and done.headers["location"] == "/guard/login"
    assert "Max-Age=0" in done.headers["set-cookie"]
    assert setup.sessions.get(session_id) is None
    assert [e["event"] for e in setup.events] == ["login", "logout"]
    # Without a session: nothing to end, back to the login page.
    setup.client.cookies.clear()
    assert setup.client.get("/guard/logout").headers["location"] == "/guard/login"
    again = setup.client.post("/guard/logout", data={"csrf_token": token},
                              headers={"origin": ORIGIN})  # fmt: skip
    assert again.status_code == 303
