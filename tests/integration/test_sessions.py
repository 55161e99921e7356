"""Browser sessions through two real gateway processes on one database, in front of a real MLflow.

Sessions are made as the login page makes them (SessionStore.create + SessionCookie over the
gateways' database and key), so these tests need nothing but the gateways: the cookie on /api
and /ajax-api, revocation on one replica seen at once by the other, blocks, redirects of
navigations, challenges, and the CSRF check on cookie writes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from guard.identity.base import Principal
from guard.identity.sessions import SessionCookie, SessionStore
from guard.identity.tokens import TokenStore
from guard.store.db import build_engine
from tests.integration.conftest import Gateway, Mlflow, start_gateway

pytestmark = pytest.mark.integration

SEARCH = "/2.0/mlflow/experiments/search?max_results=1"
CREATE = "/2.0/mlflow/experiments/create"


@dataclass
class Pair:
    a: Gateway
    b: Gateway
    database: str
    store: SessionStore
    cookie: SessionCookie
    admin_identity: str

    def login(self, principal: Principal) -> tuple[str, str]:
        """(the Cookie header value, the session's row key)."""
        session_id, session = self.store.create(principal, client="127.0.0.1")
        return f"{self.cookie.name}={self.cookie.encode(session_id)}", session.key

    def admin(self) -> tuple[str, str]:
        return self.login(
            Principal("token:admin", "admin", "token", ("admin",), identity=self.admin_identity)
        )


@pytest.fixture(scope="module")
def pair(external_mlflow: Mlflow, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("sessions")
    database = f"sqlite:///{root / 'shared.db'}"
    key = os.urandom(32).hex()
    args = ("--upstream-url", external_mlflow.url, "--database-uri", database)
    a = start_gateway(root / "a", *args, MLFLOW_GUARD_SECRET_KEY=key)
    try:
        b = start_gateway(root / "b", *args, token=a.token, MLFLOW_GUARD_SECRET_KEY=key)
    except RuntimeError:
        a.stop()
        raise
    engine = build_engine(database)
    try:
        [admin] = [t for t in TokenStore(engine, key.encode()).list() if t.name == "admin"]
        store = SessionStore(engine, key.encode(), idle_timeout=3600, absolute_timeout=43200)
        cookie = SessionCookie(key.encode(), name="mlflow_guard_session", secure=False, max_age=60)
        yield Pair(a, b, database, store, cookie, f"token:{admin.id}")
    finally:
        engine.dispose()
        b.stop()
        a.stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30, follow_redirects=False) as client:
        yield client


def alice() -> Principal:
    return Principal("user:alice", "alice", "ldap", (), groups=("group:ldap/x",), identity="ldap:1")


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
def test_the_cookie_works_on_both_replicas(pair: Pair, http: httpx.Client, prefix: str) -> None:
    cookie, _ = pair.admin()
    for replica in (pair.a, pair.b):
        found = http.get(replica.url + prefix + SEARCH, headers={"Cookie": cookie})
        assert found.status_code == 200, found.text
        assert "experiments" in found.json()
        name = f"from-a-browser-{prefix.strip('/')}-{replica.port}"
        created = http.post(
            replica.url + prefix + CREATE, json={"name": name},
            headers={"Cookie": cookie, "Origin": replica.url},
        )  # fmt: skip
        assert created.status_code == 200, created.text
        assert created.json()["experiment_id"]


def test_revoked_on_one_replica_refused_on_the_other(pair: Pair, http: httpx.Client) -> None:
    cookie, key = pair.admin()
    assert http.get(pair.a.url + "/api" + SEARCH, headers={"Cookie": cookie}).status_code == 200
    revoked = http.delete(
        f"{pair.b.url}/guard/api/sessions/{key[:12]}",
        headers={"Authorization": f"Bearer {pair.a.token}"},
    )
    assert revoked.status_code == 200, revoked.text
    for replica in (pair.a, pair.b):
        refused = http.get(replica.url + "/api" + SEARCH, headers={"Cookie": cookie})
        assert refused.status_code == 401
        assert refused.headers["x-guard-reason"] == "unauthenticated"
        assert "set-cookie" not in refused.headers  # only a page load clears it
        assert refused.headers.get_list("www-authenticate") == ['Bearer realm="mlflow-guard"']


def test_revoked_and_blocked_from_the_cli(pair: Pair, http: httpx.Client) -> None:
    first, key = pair.admin()
    assert http.get(pair.a.url + "/ajax-api" + SEARCH, headers={"Cookie": first}).status_code == 200
    done = pair.a.cli("session", "revoke", key[:12], "--database-uri", pair.database)
    assert done.returncode == 0, done.stderr
    assert http.get(pair.b.url + "/ajax-api" + SEARCH, headers={"Cookie": first}).status_code == 401

    person, _ = pair.login(alice())
    before = http.get(pair.b.url + "/api" + SEARCH, headers={"Cookie": person})
    assert before.status_code != 401  # alice holds no grant: a 200 or a 403, but she is known
    done = pair.a.cli("user", "block", "alice", "--reason", "left", "--database-uri", pair.database)
    assert done.returncode == 0, done.stderr
    for replica in (pair.a, pair.b):
        after = http.get(replica.url + "/api" + SEARCH, headers={"Cookie": person})
        assert after.status_code == 401
    listed = pair.a.cli("session", "list", "--user", "alice", "--all", "--database-uri",
                        pair.database)  # fmt: skip
    assert "revoked" in listed.stdout
    assert pair.a.cli("user", "unblock", "alice", "--database-uri", pair.database).returncode == 0


@pytest.mark.parametrize(
    ("path", "location"),
    [
        ("/", "/guard/login?next=%2F"),
        ("/static-files/index.html?x=1", "/guard/login?next=%2Fstatic-files%2Findex.html%3Fx%3D1"),
    ],
)
def test_a_navigation_goes_to_the_login_page(
    pair: Pair, http: httpx.Client, path: str, location: str
) -> None:
    browser = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate",
               "Sec-Fetch-Dest": "document", "Sec-Fetch-Site": "none"}  # fmt: skip
    response = http.get(pair.a.url + path, headers=browser)
    assert response.status_code == 303
    assert response.headers["location"] == location
    assert "www-authenticate" not in response.headers
    page = http.get(pair.a.url + location, headers=browser)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # An API client asking the same gets 401 with both challenges.
    api = http.get(pair.a.url + "/api" + SEARCH)
    assert api.status_code == 401
    assert [c.split()[0] for c in api.headers.get_list("www-authenticate")] == ["Basic", "Bearer"]


@pytest.mark.parametrize(
    "headers",
    [{"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"},
     {"Cookie": "mlflow_guard_session=forged.value"}, {"Sec-Fetch-Dest": "empty"}],
)  # fmt: skip
def test_browsers_get_no_basic_challenge(
    pair: Pair, http: httpx.Client, headers: dict[str, str]
) -> None:
    for prefix in ("/api", "/ajax-api"):
        response = http.get(pair.b.url + prefix + SEARCH, headers=headers)
        assert response.status_code == 401
        assert response.headers.get_list("www-authenticate") == ['Bearer realm="mlflow-guard"']


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
@pytest.mark.parametrize(
    ("extra", "reasons"),
    [
        ({}, {"csrf_failed"}),
        ({"Sec-Fetch-Site": "cross-site"}, {"csrf_failed"}),
        ({"Sec-Fetch-Site": "same-site"}, {"csrf_failed"}),
        ({"Origin": "null"}, {"csrf_failed", "cors_origin_not_allowed"}),
        ({"Origin": "https://evil.example", "Sec-Fetch-Site": "same-origin"},
         {"csrf_failed", "cors_origin_not_allowed"}),
        ({"Origin": "http://127.0.0.1:1"}, {"csrf_failed", "cors_origin_not_allowed"}),
        ({"Origin": "https://127.0.0.1"}, {"csrf_failed", "cors_origin_not_allowed"}),
    ],
)  # fmt: skip
def test_cross_site_cookie_writes_are_refused(
    pair: Pair, http: httpx.Client, prefix: str, extra: dict[str, str], reasons: set[str]
) -> None:
    cookie, _ = pair.admin()
    name = f"csrf-{os.urandom(4).hex()}"
    response = http.post(
        pair.a.url + prefix + CREATE, json={"name": name}, headers={"Cookie": cookie, **extra}
    )
    assert response.status_code == 403, response.text
    assert response.headers["x-guard-reason"] in reasons
    # Nothing was created: the same write from the gateway's own page succeeds with that name.
    same = {"Cookie": cookie, "Sec-Fetch-Site": "same-origin"}
    assert (
        http.post(pair.a.url + prefix + CREATE, json={"name": name}, headers=same).status_code
        == 200
    )


def test_the_origin_of_another_port_is_not_ours(pair: Pair, http: httpx.Client) -> None:
    """With gateway.public_url unset the own origins are the loopback names on the gateway's
    port (test_browser_login.py covers public_url set): a page served from another port of the
    same host is another site, whatever Host the request names."""
    cookie, _ = pair.admin()
    url = f"http://localhost:{pair.a.port}/ajax-api{CREATE}"
    response = http.post(
        url, json={"name": "via-another-port"},
        headers={"Cookie": cookie, "Origin": f"http://localhost:{pair.a.port + 1}"},
    )  # fmt: skip
    assert response.status_code == 403
    assert response.headers["x-guard-reason"] == "cors_origin_not_allowed"  # refused first
    same = http.post(
        url, json={"name": "via-localhost"},
        headers={"Cookie": cookie, "Origin": f"http://localhost:{pair.a.port}"},
    )  # fmt: skip
    assert same.status_code == 200


def test_authorization_decides_over_the_cookie(pair: Pair, http: httpx.Client) -> None:
    cookie, _ = pair.admin()
    wrong = http.get(
        pair.a.url + "/api" + SEARCH, headers={"Cookie": cookie, "Authorization": "Bearer mlg_x"}
    )
    assert wrong.status_code == 401
    # An API client with a token is not subject to the CSRF check, whatever cookie it carries.
    created = http.post(
        pair.a.url + "/api" + CREATE, json={"name": f"bearer-{os.urandom(4).hex()}"},
        headers={"Cookie": "mlflow_guard_session=junk", "Authorization": f"Bearer {pair.a.token}"},
    )  # fmt: skip
    assert created.status_code == 200, created.text
    assert "set-cookie" not in created.headers
