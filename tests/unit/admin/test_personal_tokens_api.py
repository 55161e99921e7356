"""Personal tokens through the real gateway (a recording fake MLflow behind it):
``/guard/api/tokens`` and the ``/guard/tokens`` page — who may create (a person who just proved
it, never a token), the expiry cap, owners and administrators, the secret shown once, CSRF,
labels and CSP on the page, and a block ending the token while a logout does not."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.admin.governance import Governance
from guard.admin.personal import PersonalTokenError, PersonalTokens
from guard.app import Gateway, build_gateway
from guard.authz.policy import parse_lines
from guard.authz.runtime import PolicyRuntime
from guard.authz.store import PolicyStore
from guard.config import load_settings
from guard.edge.context import RequestContext
from guard.identity.base import Principal
from guard.identity.bindings import IdentityBindings
from guard.identity.sessions import SessionCookie, SessionStore, UserBlocks
from guard.identity.tokens import TokenStore
from guard.store.db import build_engine, migrate
from tests.conftest import free_port
from tests.servers import ServerThread, read_request_body, send_response

ADMIN = "mlg_" + "a" * 43
SERVICE = "mlg_" + "s" * 43
API = "/guard/api/tokens"
PAGE = "/guard/tokens"
ALICE_GROUPS = ("group:ldap/risk%20team",)


@dataclass
class Recording:
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_request_body(receive)
        if scope["path"] == "/version":
            await send_response(send, 200, b"3.17.2")
            return
        self.seen.append({"path": scope["path"]})
        await send_response(send, 200, b"{}", [(b"content-type", b"application/json")])


@dataclass
class Running:
    gateway: Gateway
    url: str
    store: SessionStore
    cookie: SessionCookie

    @property
    def origin(self) -> dict[str, str]:
        return {"Origin": self.url}

    def login(self, principal: Principal) -> str:
        """A session as the login page makes it: the Cookie header value."""
        session_id, _ = self.store.create(principal, client="127.0.0.1")
        return f"{self.cookie.name}={self.cookie.encode(session_id)}"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    data = tmp_path_factory.mktemp("personal-tokens")
    port = free_port()
    with ServerThread(Recording(), lifespan="off") as upstream:
        settings = load_settings(
            {
                "upstream.url": upstream.url,
                "storage.data_dir": str(data),
                "gateway.public_url": f"http://127.0.0.1:{port}",
                "tokens.cache_ttl": "0",
                "tokens.personal_max_expiry": "30d",
                "authz.poll_interval": "0.1",
            },
            {},
            None,
        ).settings
        env = {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": ADMIN, "MLFLOW_GUARD_SECRET_KEY": "k" * 40}
        gateway = build_gateway(settings, env)
        with ServerThread(gateway, port=port) as server:
            g = Governance(gateway.tokens, gateway.policies.store)
            g.create_token("svc", "viewer", "*", 3600, "test")
            g.tokens.revoke("svc")
            g.tokens.create("svc", "viewer", 3600, SERVICE)
            g.change("test", add=parse_lines(["p, token:svc, viewer, *"]))
            IdentityBindings(gateway.engine, ttl=0).claim(
                "user:alice", "ldap", "a-uuid", groups=ALICE_GROUPS
            )
            s = settings.sessions
            store = SessionStore(
                gateway.engine, gateway.tokens.key, idle_timeout=s.idle_timeout,
                absolute_timeout=s.absolute_timeout,
            )  # fmt: skip
            cookie = SessionCookie(gateway.tokens.key, name=s.cookie_name, secure=False, max_age=60)
            yield Running(gateway, server.url, store, cookie)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def person(name: str, method: str = "ldap") -> Principal:
    groups = ALICE_GROUPS if name == "alice" else ()
    return Principal(f"user:{name}", name, method, (), groups=groups, identity=f"ldap:{name}")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refused(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["x-guard-reason"] == reason


def create(running: Running, http: httpx.Client, cookie: str, label: str, **extra: Any) -> Any:
    return http.post(
        running.url + API,
        json={"name": label, **extra},
        headers={"Cookie": cookie, **running.origin},
    )


def me(running: Running, http: httpx.Client, headers: dict[str, str]) -> Any:
    response = http.get(running.url + "/guard/api/me", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


# -- the API ------------------------------------------------------------------------------------


def test_a_person_creates_a_token_that_acts_as_them(running: Running, http: httpx.Client) -> None:
    cookie = running.login(person("alice"))
    response = create(running, http, cookie, "api-one", expires="7d")
    assert response.status_code == 201, response.text
    body = response.json()
    secret = body["secret"]
    assert secret.startswith("mlg_")
    token = body["token"]
    assert (token["name"], token["label"], token["owner"], token["state"]) == (
        "alice/api-one", "api-one", "user:alice", "active",
    )  # fmt: skip
    created = dt.datetime.fromisoformat(token["created"])
    assert dt.datetime.fromisoformat(token["expires"]) - created == dt.timedelta(days=7)
    assert body["usage"]["MLFLOW_TRACKING_USERNAME"] == "alice"
    for headers in (
        bearer(secret),
        {"Authorization": httpx.BasicAuth("alice", secret)._auth_header},
    ):
        who = me(running, http, headers)
        assert who["subject"] == "user:alice" and who["auth_method"] == "token"
        assert set(ALICE_GROUPS) <= set(who["groups"])
    refused(
        http.get(running.url + "/guard/api/me",
                 headers={"Authorization": httpx.BasicAuth("alice/api-one", secret)._auth_header}),
        401, "invalid_credentials",
    )  # fmt: skip
    listed = http.get(running.url + API, headers={"Cookie": cookie}).json()["tokens"]
    assert "alice/api-one" in {t["name"] for t in listed}
    assert all("secret" not in t for t in listed) and secret not in str(listed)


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("personal-bearer", "permission_denied"),  # a stolen token must not mint more
        ("personal-session", "permission_denied"),  # nor a browser logged in with it
        ("service", "permission_denied"),  # a service token is nobody's person
        ("admin", "permission_denied"),  # not even the administrator's token
        ("nobody", "unauthenticated"),
    ],
)
def test_only_a_fresh_login_creates(
    running: Running, http: httpx.Client, who: str, reason: str
) -> None:
    secret = create(running, http, running.login(person("alice")), f"src-{who}").json()["secret"]
    record = running.gateway.tokens.lookup(secret)
    assert record is not None
    headers: dict[str, str] = {
        "personal-bearer": bearer(secret),
        "personal-session": {"Cookie": running.login(
            Principal("user:alice", "alice", "token", (), identity=f"token:{record.id}")
        ), **running.origin},
        "service": bearer(SERVICE),
        "admin": bearer(ADMIN),
        "nobody": {},
    }[who]  # fmt: skip
    before = len(running.gateway.tokens.list())
    status = 401 if reason == "unauthenticated" else 403
    for body in ({"name": "minted"}, {"name": "minted", "user": "bob"}):
        refused(http.post(running.url + API, json=body, headers=headers), status, reason)
    assert len(running.gateway.tokens.list()) == before


def test_expiry_is_capped_by_the_setting(running: Running, http: httpx.Client) -> None:
    cookie = running.login(person("alice"))
    for expires in ("31d", "5w", "745h", "0d", "-1d", "30", "1y", "soon"):
        refused(create(running, http, cookie, "capped", expires=expires), 400,
                "invalid_request_body")  # fmt: skip
    longest = create(running, http, cookie, "capped", expires="30d").json()["token"]
    default = create(running, http, cookie, "default").json()["token"]
    for token in (longest, default):  # the default (tokens.default_expiry, 90d) is capped too
        span = dt.datetime.fromisoformat(token["expires"]) - dt.datetime.fromisoformat(
            token["created"]
        )
        assert span == dt.timedelta(days=30)
    refused(create(running, http, cookie, "capped"), 409, "token_exists")
    for label in ("Bad", "a/b", "../admin", "", "x" * 65):
        refused(create(running, http, cookie, label), 400, "invalid_request_body")
    refused(create(running, http, cookie, "x", user="bob"), 400, "invalid_request_body")


def test_owners_and_administrators(running: Running, http: httpx.Client) -> None:
    alice, bob = running.login(person("alice")), running.login(person("bob"))
    assert create(running, http, alice, "shared-name").status_code == 201
    assert create(running, http, bob, "shared-name").status_code == 201  # per-owner names
    bobs = http.get(running.url + API, headers={"Cookie": bob}).json()["tokens"]
    assert {t["owner"] for t in bobs} == {"user:bob"}
    refused(http.get(running.url + API, params={"user": "alice"}, headers={"Cookie": bob}), 403,
            "permission_denied")  # fmt: skip
    refused(http.get(running.url + API, params={"all": "true"}, headers={"Cookie": bob}), 403,
            "permission_denied")  # fmt: skip
    # Another person's token is "not found", by label or by full name; nothing is revoked.
    as_bob = {"Cookie": bob, **running.origin}
    for name in ("alice/shared-name", "alice%2Fshared-name", "svc", "admin"):
        refused(http.delete(f"{running.url}{API}/{name}", headers=as_bob), 404, "not_found")
    # The administrator sees anyone's and everything (service tokens too), and revokes any.
    listed = http.get(running.url + API, params={"user": "alice"}, headers=bearer(ADMIN))
    assert {t["owner"] for t in listed.json()["tokens"]} == {"user:alice"}
    everything = http.get(running.url + API, params={"all": "true"}, headers=bearer(ADMIN))
    assert {"admin", "svc", "alice/shared-name", "bob/shared-name"} <= {
        t["name"] for t in everything.json()["tokens"]
    }
    revoked = http.delete(f"{running.url}{API}/alice/shared-name", headers=bearer(ADMIN))
    assert revoked.json() == {"revoked": "alice/shared-name", "owner": "user:alice"}
    # The owner revokes by label, with the cookie's CSRF check.
    refused(http.delete(f"{running.url}{API}/shared-name", headers={"Cookie": bob}), 403,
            "csrf_failed")  # fmt: skip
    mine = http.delete(f"{running.url}{API}/shared-name", headers=as_bob)
    assert mine.json() == {"revoked": "bob/shared-name", "owner": "user:bob"}
    refused(http.delete(f"{running.url}{API}/shared-name", headers=as_bob), 404, "not_found")


def test_a_personal_token_revokes_its_own_kind_but_only_its_owners(
    running: Running, http: httpx.Client
) -> None:
    secret = create(running, http, running.login(person("alice")), "self-revoke").json()["secret"]
    assert http.get(running.url + API, headers=bearer(secret)).status_code == 200
    refused(http.get(running.url + API, params={"all": "true"}, headers=bearer(secret)), 403,
            "permission_denied")  # fmt: skip
    assert http.delete(f"{running.url}{API}/self-revoke", headers=bearer(secret)).status_code == 200
    refused(http.get(running.url + API, headers=bearer(secret)), 401, "token_revoked")


def test_logout_keeps_the_token_and_a_block_kills_it(running: Running, http: httpx.Client) -> None:
    session_id, _ = running.store.create(person("carol"), client="127.0.0.1")
    cookie = f"{running.cookie.name}={running.cookie.encode(session_id)}"
    secret = create(running, http, cookie, "ci").json()["secret"]
    running.store.revoke(session_id, "logout")
    refused(http.get(running.url + API, headers={"Cookie": cookie}), 401, "unauthenticated")
    assert me(running, http, bearer(secret))["subject"] == "user:carol"
    UserBlocks(running.gateway.engine).block("user:carol", "test", "left")
    refused(http.get(running.url + "/guard/api/me", headers=bearer(secret)), 401, "token_revoked")
    UserBlocks(running.gateway.engine).unblock("user:carol")
    refused(http.get(running.url + "/guard/api/me", headers=bearer(secret)), 401, "token_revoked")


def test_a_blocked_owner_is_refused_even_before_the_revocation_is_seen(
    running: Running, http: httpx.Client
) -> None:
    secret = create(running, http, running.login(person("dave")), "ci").json()["secret"]
    with running.gateway.engine.begin() as conn:  # a block row alone, as another replica's
        from guard.store.db import user_blocks

        conn.execute(user_blocks.insert().values(
            subject="user:dave", blocked_at=dt.datetime.now(dt.UTC), blocked_by="t", reason="",
        ))  # fmt: skip
    deadline = time.monotonic() + 5  # within authz.poll_interval on every replica
    while http.get(running.url + "/guard/api/me", headers=bearer(secret)).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    refused(http.get(running.url + "/guard/api/me", headers=bearer(secret)), 403, "user_blocked")


def test_a_token_session_carries_the_owners_groups_now(
    running: Running, http: httpx.Client
) -> None:
    secret = create(running, http, running.login(person("erin")), "browser").json()["secret"]
    record = running.gateway.tokens.lookup(secret)
    assert record is not None
    cookie = running.login(
        Principal("user:erin", "erin", "token", (), identity=f"token:{record.id}")
    )
    assert "group:ldap/new" not in me(running, http, {"Cookie": cookie})["groups"]
    IdentityBindings(running.gateway.engine, ttl=0).claim(
        "user:erin", "ldap", "e-uuid", groups=("group:ldap/new",)
    )
    assert "group:ldap/new" in me(running, http, {"Cookie": cookie})["groups"]
    assert "group:ldap/new" in me(running, http, bearer(secret))["groups"]


# -- the page -----------------------------------------------------------------------------------


class Page(HTMLParser):
    """Forms, their fields, and the labels of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.forms: list[dict[str, str]] = []
        self.controls: list[dict[str, str | None]] = []
        self.labels: set[str] = set()
        self.scripts = 0
        self.inline_styles = 0
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "style" in a or tag == "style":
            self.inline_styles += 1
        if tag == "script":
            self.scripts += 1
        if tag == "form":
            self.forms.append({})
        if tag in ("input", "select", "textarea", "button"):
            self.controls.append({"tag": tag, **a})
            if tag in ("input", "select") and self.forms and a.get("name"):
                self.forms[-1][str(a["name"])] = a.get("value") or ""
        if tag == "label" and a.get("for"):
            self.labels.add(str(a["for"]))


def page(running: Running, http: httpx.Client, cookie: str) -> httpx.Response:
    return http.get(running.url + PAGE, headers={"Cookie": cookie, "Sec-Fetch-Mode": "navigate"})


def test_the_page_lists_creates_once_and_revokes(running: Running, http: httpx.Client) -> None:
    cookie = running.login(person("frank"))
    first = page(running, http, cookie)
    assert first.status_code == 200 and "no live tokens" in first.text
    csp = first.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert first.headers["cache-control"] == "no-store"
    parsed = Page(first.text)
    assert parsed.scripts == 0 and parsed.inline_styles == 0
    [form] = parsed.forms
    assert form["action"] == "create" and len(form["csrf_token"]) == 64
    for control in parsed.controls:  # every visible control has a label (or its own text)
        if control["tag"] == "input" and control.get("type") == "hidden":
            continue
        if control["tag"] == "button":
            continue
        assert control.get("id") in parsed.labels, control
    expiries = re.findall(r'<option value="([^"]+)"', first.text)
    assert expiries == ["7d", "30d"]  # nothing beyond tokens.personal_max_expiry (30d)
    post = {"Cookie": cookie, **running.origin}
    created = http.post(running.url + PAGE, data={**form, "name": "laptop", "expires": "7d"},
                        headers=post)  # fmt: skip
    assert created.status_code == 201, created.text
    assert created.headers["cache-control"] == "no-store"
    assert "content-security-policy" in created.headers
    [secret] = re.findall(r'value="(mlg_[^"]+)"', created.text)
    assert created.text.count(secret) == 3  # the field and the two ways to use it
    assert "MLFLOW_TRACKING_USERNAME=frank" in created.text
    assert me(running, http, bearer(secret))["subject"] == "user:frank"
    listing = page(running, http, cookie)
    assert "laptop" in listing.text and secret not in listing.text
    assert secret[4:] not in listing.text
    forms = Page(listing.text).forms
    revoke = next(f for f in forms if f.get("action") == "revoke")
    assert revoke["name"] == "frank/laptop" and revoke["csrf_token"] == form["csrf_token"]
    done = http.post(running.url + PAGE, data=revoke, headers=post)
    assert done.status_code == 200 and "Token laptop revoked." in done.text
    refused(http.get(running.url + "/guard/api/me", headers=bearer(secret)), 401, "token_revoked")


def test_the_page_checks_csrf(running: Running, http: httpx.Client) -> None:
    cookie = running.login(person("gina"))
    form = Page(page(running, http, cookie).text).forms[0]
    other = Page(page(running, http, running.login(person("gina"))).text).forms[0]
    fields = {**form, "name": "x"}
    url = running.url + PAGE
    for bad in ("", "0" * 64, other["csrf_token"]):  # another session's token does not do
        response = http.post(url, data={**fields, "csrf_token": bad},
                             headers={"Cookie": cookie, **running.origin})  # fmt: skip
        refused(response, 403, "csrf_token_invalid")
    without = {k: v for k, v in fields.items() if k != "csrf_token"}
    refused(http.post(url, data=without, headers={"Cookie": cookie, **running.origin}), 403,
            "csrf_token_invalid")  # fmt: skip
    # The cookie write's origin check stands in front of the token.
    refused(http.post(url, data=fields, headers={"Cookie": cookie}), 403, "csrf_failed")
    for origin in ("https://evil.example", "null"):
        response = http.post(url, data=fields, headers={"Cookie": cookie, "Origin": origin})
        assert response.status_code == 403
        assert response.headers["x-guard-reason"] in ("cors_origin_not_allowed", "csrf_failed")
    refused(http.post(url, content=b'{"name": "x"}', headers={
        "Cookie": cookie, "Content-Type": "application/json", **running.origin,
    }), 415, "unsupported_media_type")  # fmt: skip
    assert running.gateway.tokens.list(owner="user:gina") == []


def test_the_page_wants_a_browser_session(running: Running, http: httpx.Client) -> None:
    secret = create(running, http, running.login(person("hank")), "x").json()["secret"]
    refused(http.get(running.url + PAGE, headers=bearer(secret)), 403, "permission_denied")
    anonymous = http.get(running.url + PAGE, headers={"Sec-Fetch-Mode": "navigate"})
    assert anonymous.status_code == 303
    assert anonymous.headers["location"] == "/guard/login?next=%2Fguard%2Ftokens"
    refused(http.get(running.url + PAGE), 401, "unauthenticated")
    refused(http.get(running.url + PAGE + "/x", headers=bearer(ADMIN)), 404, "not_found")
    refused(http.put(running.url + PAGE, headers=bearer(ADMIN)), 405, "method_not_allowed")
    # A session begun with a token sees its tokens and no create form.
    record = running.gateway.tokens.lookup(secret)
    assert record is not None
    cookie = running.login(
        Principal("user:hank", "hank", "token", (), identity=f"token:{record.id}")
    )
    shown = page(running, http, cookie)
    assert shown.status_code == 200 and "a token cannot create tokens" in shown.text
    assert [f.get("action") for f in Page(shown.text).forms] == ["revoke"]
    form = Page(shown.text).forms[0]
    response = http.post(running.url + PAGE, data={**form, "action": "create", "name": "more"},
                         headers={"Cookie": cookie, **running.origin})  # fmt: skip
    refused(response, 403, "permission_denied")
    assert [r.name for r in running.gateway.tokens.list(owner="user:hank")] == ["hank/x"]


def test_escaping_on_the_page(running: Running, http: httpx.Client) -> None:
    cookie = running.login(Principal("user:x%3Cb%3E", "<b>ivy</b>", "ldap", (), identity="l:i"))
    shown = page(running, http, cookie)
    assert "<b>ivy</b>" not in shown.text and "&lt;b&gt;ivy&lt;/b&gt;" in shown.text


# -- the operations' audit events ---------------------------------------------------------------


def test_creation_and_revocation_are_audit_events_with_the_owner(database_uri: str) -> None:
    engine = build_engine(database_uri)
    migrate(engine)
    events: list[dict[str, Any]] = []
    policies = PolicyRuntime(PolicyStore(engine), 1.0)
    personal = PersonalTokens(
        governance=Governance(TokenStore(engine, b"k" * 32), policies.store), policies=policies,
        max_expiry=86400.0, default_expiry=90 * 86400.0, event=events.append,
    )  # fmt: skip
    context = RequestContext("req-1", "127.0.0.1", "127.0.0.1", "http", "gw")
    context.principal = person("alice", "session:oidc")
    scope: dict[str, Any] = {"guard": context}

    async def run() -> None:
        await policies.refresh()
        await personal.create(scope, "ci", "1d")
        assert context.changes["token_created"] == "alice/ci"
        await personal.revoke(scope, "ci")
        with pytest.raises(PersonalTokenError):
            await personal.create(scope, "ci", "2d")  # beyond the cap

    asyncio.run(run())
    assert [(e["event"], e["token"], e["owner"], e["principal"]) for e in events] == [
        ("token_created", "alice/ci", "user:alice", "user:alice"),
        ("token_revoked", "alice/ci", "user:alice", "user:alice"),
    ]
    engine.dispose()


# -- getting around the API -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "reason"),
    [
        ("PUT", API, 405, "method_not_allowed"),
        ("PATCH", API, 405, "method_not_allowed"),
        ("DELETE", API, 405, "method_not_allowed"),
        ("GET", API + "/x", 405, "method_not_allowed"),
        ("POST", API + "/x", 405, "method_not_allowed"),
        ("PUT", API + "/x", 405, "method_not_allowed"),
        ("GET", API + "x", 404, "not_found"),
        ("GET", "/guard/api/Tokens", 404, "not_found"),
    ],
)
def test_other_methods_and_paths(
    running: Running, http: httpx.Client, method: str, path: str, status: int, reason: str
) -> None:
    cookie = running.login(person("alice"))
    response = http.request(
        method, running.url + path, headers={"Cookie": cookie, **running.origin}
    )
    refused(response, status, reason)


def test_requests_that_could_be_read_two_ways_are_refused(
    running: Running, http: httpx.Client
) -> None:
    cookie = running.login(person("alice"))
    headers = {"Cookie": cookie, **running.origin}
    url = running.url + API
    cases = [
        (dict(content=b'{"name": "a", "name": "b"}'), "application/json", "invalid_request_body"),
        (dict(content=b'{"name": ["a"]}'), "application/json", "invalid_request_body"),
        (dict(content=b'{"name": "a", "owner": "user:bob"}'), "application/json",
         "invalid_request_body"),
        (dict(content=b"name=a"), "application/x-www-form-urlencoded", "unsupported_media_type"),
        (dict(content=b'{"name": "a"}'), "text/plain", "unsupported_media_type"),
    ]  # fmt: skip
    for kwargs, content_type, reason in cases:
        response = http.post(url, headers={**headers, "Content-Type": content_type}, **kwargs)
        assert response.headers["x-guard-reason"] == reason, (kwargs, response.text)
    refused(http.post(url + "?user=bob", json={"name": "a"}, headers=headers), 400,
            "invalid_request_body")  # fmt: skip
    refused(http.get(url + "?user=alice&user=bob", headers=headers), 400, "ambiguous_parameter")
    refused(http.get(url + "?user=bob&all=true", headers=bearer(ADMIN)), 400,
            "invalid_request_body")  # fmt: skip
    made = {r.name for r in running.gateway.tokens.list(include_revoked=True)}
    assert not {"alice/a", "alice/b", "bob/a"} & made


def test_a_double_encoded_name_names_nothing(running: Running, http: httpx.Client) -> None:
    alice = running.login(person("alice"))
    assert create(running, http, alice, "enc").status_code == 201
    bob = {"Cookie": running.login(person("bob")), **running.origin}
    for name in ("alice%252Fenc", "..%2Falice%2Fenc", "%61lice/enc", "ALICE/enc", "alice/enc/"):
        response = http.delete(f"{running.url}{API}/{name}", headers=bob)
        assert response.status_code in (400, 404), (name, response.text)
    assert "alice/enc" in {r.name for r in running.gateway.tokens.list(owner="user:alice")}
