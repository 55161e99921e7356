"""Browser single sign-on through the real gateway: two replicas (one database, one secret key)
in front of the real MLflow, the real OpenID Connect provider (oidc-provider, tests/idp.py) and
Debian's headless Chromium.

In Chromium: a deep link to MLflow's UI is sent to the login page, the SSO button goes to the
provider, the login there lands exactly on the deep link, the UI lists and creates experiments
(a grant to the provider's group ``group:oidc/mlflow-users`` and one to ``user:alice``), logout
ends the provider's session too and comes back to the login page; a back-channel logout from the
provider (delivered to replica B) ends the browser's session on both replicas.

Over HTTP (httpx, the provider's pages walked without a browser): a cross-site POST with a valid
SSO session is refused, the session cookie after logout is refused, the provider unreachable at
login is a 503 page while existing sessions keep working, and every rule of the back-channel
logout token, each its own test, through the real endpoint with tokens the provider's own keys
signed."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.conftest import free_port
from tests.idp import OidcProvider
from tests.integration.conftest import Gateway, Mlflow, start_gateway

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.integration, pytest.mark.oidc]

SESSION_COOKIE = "mlflow_guard_session"
UI_TIMEOUT = 30_000  # ms: the first load of MLflow's UI bundle on a busy 2-core machine
SEARCH = "/ajax-api/2.0/mlflow/experiments/search"
BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"


@dataclass
class Replicas:
    a: Gateway
    b: Gateway
    client_id: str
    client_secret: str


@pytest.fixture(scope="module")
def replicas(
    external_mlflow: Mlflow, oidc_provider: OidcProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    """Two gateways sharing one database and key; the provider knows both callbacks and sends
    its back-channel logouts to B (so a logout ending a session made on A is seen on A)."""
    root = tmp_path_factory.mktemp("sso")
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    client_id, secret = oidc_provider.register_client(
        redirect_uris=[f"{url_a}/guard/oidc/callback", f"{url_b}/guard/oidc/callback"],
        post_logout_redirect_uris=[f"{url_a}/guard/login", f"{url_b}/guard/login"],
        backchannel_logout_uri=f"{url_b}/guard/oidc/backchannel-logout",
    )
    env = {
        "MLFLOW_GUARD_SECRET_KEY": os.urandom(32).hex(),
        "MLFLOW_GUARD_OIDC_ISSUER": oidc_provider.issuer,
        "MLFLOW_GUARD_OIDC_CLIENT_ID": client_id,
        "MLFLOW_GUARD_OIDC_CLIENT_SECRET": secret,
        "MLFLOW_GUARD_OIDC_SCOPES": "openid,profile,email,groups",
        "MLFLOW_GUARD_OIDC_GROUPS_CLAIM": "groups",
        # In the environment, not a flag: the CLI's policy commands use the same database.
        "MLFLOW_GUARD_STORAGE_DATABASE_URI": f"sqlite:///{root / 'shared.db'}",
    }
    args = ("--upstream-url", external_mlflow.url)
    a = start_gateway(root / "a", *args, port=port_a, **env)
    try:
        b = start_gateway(root / "b", *args, port=port_b, token=a.token, **env)
    except RuntimeError:
        a.stop()
        raise
    try:
        for rule in ("p, user:alice, manager, experiment:ui-*",
                     "p, group:oidc/mlflow-users, viewer, experiment:Default",
                     "p, user:bob, manager, experiment:sso-*"):  # fmt: skip
            added = a.cli("policy", "add", rule)
            assert added.returncode == 0, added.stderr
        time.sleep(1.5)  # both replicas poll the policy every second
        yield Replicas(a, b, client_id, secret)
    finally:
        b.stop()
        a.stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30, follow_redirects=False) as client:
        yield client


def sso_login(
    idp: OidcProvider, http: httpx.Client, gateway: Gateway, user: str, next_: str = "/"
) -> httpx.Response:
    """Log in through the provider's pages without a browser; the callback's answer."""
    callback = idp.login(http, f"{gateway.url}/guard/oidc/login?next={next_}", user)
    assert callback.startswith(gateway.url + "/guard/oidc/callback?"), callback
    return http.get(callback)


def cookie_of(response: httpx.Response) -> str:
    (value,) = [c.split(";")[0] for c in response.headers.get_list("set-cookie")
                if c.startswith(SESSION_COOKIE + "=")]  # fmt: skip
    return value


def search(gateway: Gateway, cookie: str) -> int:
    response = httpx.get(
        gateway.url + SEARCH, params={"max_results": "1"},
        headers={"cookie": cookie, "sec-fetch-site": "same-origin"}, timeout=10,
    )  # fmt: skip
    return response.status_code


def until(check: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return bool(check())


# -- Chromium ------------------------------------------------------------------------------


@pytest.fixture
def page(chromium: Browser) -> Iterator[Page]:
    context = chromium.new_context()
    context.set_default_timeout(UI_TIMEOUT)
    try:
        yield context.new_page()
    finally:
        context.close()


def log_in_at_the_provider(page: Page, user: str) -> None:
    page.wait_for_selector("input[name=login]")
    page.fill("input[name=login]", user)
    page.fill("input[name=password]", "any")
    page.click("button[type=submit]")


@pytest.mark.browser
def test_sso_from_a_deep_link_creates_an_experiment_and_logs_out(
    replicas: Replicas, oidc_provider: OidcProvider, page: Page
) -> None:
    url = replicas.a.url
    timings: dict[str, float] = {}
    started = time.monotonic()
    deep_link = "/#/experiments/0"

    page.goto(url + deep_link)
    page.wait_for_url(re.compile(r".*/guard/login\?next=.*"))
    sso = page.locator("#sso-login")
    assert sso.is_visible()
    assert sso.get_attribute("href") == "/guard/oidc/login?next=" + "%2F%23%2Fexperiments%2F0"
    timings["to the login page"] = time.monotonic() - started

    mark = time.monotonic()
    sso.click()
    page.wait_for_url(oidc_provider.issuer + "/**")
    log_in_at_the_provider(page, "alice")
    page.wait_for_url(url + deep_link)
    assert page.url == url + deep_link  # exactly the deep link
    timings["SSO login to the deep link"] = time.monotonic() - mark
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies[SESSION_COOKIE]
    assert session["httpOnly"] and session["sameSite"] == "Lax" and session["domain"] == "127.0.0.1"
    assert not [n for n in cookies if n.startswith("mlflow_guard_oidc_")]  # the attempt is spent

    # The experiments list (Default is visible through the provider's group).
    mark = time.monotonic()
    page.goto(url + "/#/experiments")
    page.get_by_role("link", name="Default", exact=True).wait_for()
    create = page.get_by_test_id("create-experiment-button")
    name = f"ui-{uuid.uuid4().hex[:8]}"
    create.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Experiment Name").fill(name)
    with page.expect_response(lambda r: r.url.endswith("/experiments/create")) as created:
        dialog.get_by_role("button", name="Create").click()
    response = created.value
    assert response.status == 200, response.text()
    assert response.request.header_value("origin") == url
    timings["list and create an experiment"] = time.monotonic() - mark

    # Logout: the gateway's page, then the provider's (its session ends too), then login.
    mark = time.monotonic()
    old = f"{SESSION_COOKIE}={session['value']}"
    since = time.time()
    page.goto(url + "/guard/logout")
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(oidc_provider.issuer + "/**")
    page.click("button[name=logout][value=yes]")  # the provider's own confirmation
    page.wait_for_url(url + "/guard/login**")
    timings["logout through the provider"] = time.monotonic() - mark
    assert not [c for c in page.context.cookies() if c["name"] == SESSION_COOKIE]
    assert search(replicas.a, old) == 401 and search(replicas.b, old) == 401
    # The provider's session is gone too: the next SSO asks for the login again.
    oidc_provider.wait_for_event("end_session.success", since)
    page.goto(url + "/#/experiments")
    page.wait_for_url(re.compile(r".*/guard/login\?next=.*"))
    page.locator("#sso-login").click()
    page.wait_for_selector("input[name=login]")
    timings["whole test"] = time.monotonic() - started
    print("SSO browser timings (s):", {k: round(v, 2) for k, v in timings.items()})


@pytest.mark.browser
def test_a_backchannel_logout_ends_the_browsers_session_on_both_replicas(
    replicas: Replicas, oidc_provider: OidcProvider, page: Page
) -> None:
    url = replicas.a.url
    page.goto(url + "/#/experiments")
    page.wait_for_url(re.compile(r".*/guard/login\?next=.*"))
    page.locator("#sso-login").click()
    log_in_at_the_provider(page, "bob")
    page.wait_for_url(url + "/#/experiments")
    (value,) = [c["value"] for c in page.context.cookies() if c["name"] == SESSION_COOKIE]
    cookie = f"{SESSION_COOKIE}={value}"
    # Cookies ignore ports: the browser's session works on both replicas.
    assert search(replicas.a, cookie) == 200 and search(replicas.b, cookie) == 200
    page.goto(replicas.b.url + "/#/experiments")
    page.get_by_test_id("create-experiment-button").wait_for()

    since = time.time()
    mark = time.monotonic()
    sent = oidc_provider.backchannel_logout(replicas.client_id, "bob")
    assert sent["sent"], sent
    oidc_provider.wait_for_event("backchannel.success", since)
    elapsed = time.monotonic() - mark
    assert search(replicas.a, cookie) == 401 and search(replicas.b, cookie) == 401
    page.goto(url + "/#/experiments")
    page.wait_for_url(re.compile(r".*/guard/login\?next=.*"))
    page.goto(replicas.b.url + "/#/experiments")
    page.wait_for_url(re.compile(r".*/guard/login\?next=.*"))
    print(f"back-channel logout delivered and applied in {elapsed:.2f} s")


# -- HTTP --------------------------------------------------------------------------------------


def test_sso_session_refuses_cross_site_posts_and_dies_at_logout(
    replicas: Replicas, oidc_provider: OidcProvider, http: httpx.Client
) -> None:
    answer = sso_login(oidc_provider, http, replicas.a, "bob", "/%23/experiments")
    assert answer.status_code == 303 and answer.headers["location"] == "/#/experiments"
    cookie = cookie_of(answer)
    create = "/ajax-api/2.0/mlflow/experiments/create"
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{replicas.a.port + 1}"):
        refused = httpx.post(
            replicas.a.url + create, json={"name": f"sso-{uuid.uuid4().hex[:8]}"},
            headers={"cookie": cookie, "origin": origin}, timeout=10,
        )  # fmt: skip
        assert refused.status_code == 403, (origin, refused.text)
        assert refused.headers["x-guard-reason"] in {"csrf_failed", "cors_origin_not_allowed"}
    no_origin = httpx.post(replicas.a.url + create, json={"name": "sso-x"},
                           headers={"cookie": cookie}, timeout=10)  # fmt: skip
    assert no_origin.status_code == 403
    own = httpx.post(
        replicas.a.url + create, json={"name": f"sso-{uuid.uuid4().hex[:8]}"},
        headers={"cookie": cookie, "origin": replicas.a.url}, timeout=10,
    )  # fmt: skip
    assert own.status_code == 200, own.text

    # Logout: to the provider's end_session_endpoint with the ID token as hint.
    page = http.get(replicas.a.url + "/guard/logout", headers={"cookie": cookie})
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token
    out = http.post(
        replicas.a.url + "/guard/logout", data={"csrf_token": token.group(1)},
        headers={"cookie": cookie, "origin": replicas.a.url},
    )  # fmt: skip
    assert out.status_code == 303
    location = out.headers["location"]
    assert location.startswith(oidc_provider.metadata()["end_session_endpoint"] + "?")
    query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert query["post_logout_redirect_uri"] == replicas.a.url + "/guard/login"
    assert query["client_id"] == replicas.client_id and query["id_token_hint"].count(".") == 2
    for replica in (replicas.a, replicas.b):
        assert search(replica, cookie) == 401


def test_an_unreachable_provider_is_a_503_page_and_sessions_keep_working(
    replicas: Replicas, oidc_provider: OidcProvider, http: httpx.Client
) -> None:
    cookie = cookie_of(sso_login(oidc_provider, http, replicas.a, "carol"))
    callback = oidc_provider.login(http, f"{replicas.a.url}/guard/oidc/login?next=/", "carol")
    with oidc_provider.failing(["/token"], status=0):
        answer = http.get(callback, headers={"accept": "text/html"})
    assert answer.status_code == 503
    assert answer.headers["x-guard-reason"] == "identity_unavailable"
    assert "cannot be reached" in answer.text
    assert search(replicas.a, cookie) == 200 and search(replicas.b, cookie) == 200


def test_a_replayed_callback_is_refused_end_to_end(
    replicas: Replicas, oidc_provider: OidcProvider, http: httpx.Client
) -> None:
    callback = oidc_provider.login(http, f"{replicas.a.url}/guard/oidc/login?next=/", "carol")
    attempt = [c for c in http.cookies.jar if c.name.startswith("mlflow_guard_oidc_")]
    assert len(attempt) == 1
    first = http.get(callback)
    assert first.status_code == 303
    replay = httpx.get(
        callback, headers={"cookie": f"{attempt[0].name}={attempt[0].value}"}, timeout=10
    )
    assert replay.status_code == 400
    assert replay.headers["x-guard-reason"] == "oidc_state_invalid"


def me(gateway: Gateway, cookie: str) -> dict[str, Any]:
    response = httpx.get(gateway.url + "/guard/api/me", headers={"cookie": cookie}, timeout=10)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.parametrize(
    ("account", "subject", "groups"),
    [
        ("unverified", "user:unverified", ["group:oidc/mlflow-users"]),  # not its email
        ("verified-email", "user:verified@example.org", ["group:oidc/mlflow-users"]),
        ("kc", "user:kc", ["group:oidc/%2Forg%2Fml%2Fadmins",
                           "group:oidc/%2Forg%2Frisk%20team", "group:oidc/mlflow-users"]),
    ],
)  # fmt: skip
def test_claims_map_to_subjects_through_the_real_provider(
    replicas: Replicas, oidc_provider: OidcProvider, http: httpx.Client, account: str,
    subject: str, groups: list[str],
) -> None:  # fmt: skip
    found = me(replicas.b, cookie_of(sso_login(oidc_provider, http, replicas.a, account)))
    assert found["subject"] == subject and sorted(found["groups"]) == groups


def test_a_renamed_account_keeps_its_name_and_a_newcomer_cannot_take_it(
    replicas: Replicas, oidc_provider: OidcProvider
) -> None:
    account = f"acct-{uuid.uuid4().hex[:6]}"
    oidc_provider.set_account(account, preferred_username=f"{account}-first", groups=[])
    with httpx.Client(timeout=30) as browser:
        first = me(replicas.a, cookie_of(sso_login(oidc_provider, browser, replicas.a, account)))
    assert first["subject"] == f"user:{account}-first"
    oidc_provider.set_account(account, preferred_username=f"{account}-second", groups=[])
    with httpx.Client(timeout=30) as browser:
        again = me(replicas.a, cookie_of(sso_login(oidc_provider, browser, replicas.a, account)))
    assert again["subject"] == f"user:{account}-first"  # bound to (issuer, sub) at first login
    newcomer = f"new-{uuid.uuid4().hex[:6]}"
    oidc_provider.set_account(newcomer, preferred_username=f"{account}-first", groups=[])
    with httpx.Client(timeout=30) as browser:
        refused = sso_login(oidc_provider, browser, replicas.a, newcomer)
    assert refused.status_code == 403
    assert refused.headers["x-guard-reason"] == "identity_conflict"


# -- back-channel logout tokens, rule by rule ----------------------------------------------


@pytest.fixture
def live_session(
    replicas: Replicas, oidc_provider: OidcProvider, http: httpx.Client
) -> tuple[str, str]:
    """(the session cookie, its sid) of a fresh SSO login of dave (oidc-dave) on A."""
    cookie = cookie_of(sso_login(oidc_provider, http, replicas.a, "oidc-dave"))
    sid = [s["sid"] for s in oidc_provider.sessions()
           if s["client_id"] == replicas.client_id and s["sub"] == "oidc-dave"][-1]  # fmt: skip
    return cookie, sid


def logout_token(idp: OidcProvider, replicas: Replicas, session_sid: str, **change: Any) -> str:
    header = change.pop("header", {"typ": "logout+jwt"})
    kid = change.pop("kid", "key-1")
    alg = change.pop("alg", "RS256")
    claims = {"aud": replicas.client_id, "sub": "oidc-dave", "sid": session_sid,
              "jti": uuid.uuid4().hex, "events": {BACKCHANNEL_EVENT: {}}, **change}  # fmt: skip
    # None removes a claim; sign() puts iss, iat and exp in itself, so those become null.
    kept = {k: v for k, v in claims.items() if v is not None or k in {"iss", "iat", "exp"}}
    return idp.sign(kept, kid=kid, alg=alg, header=header)


def post_logout(replicas: Replicas, token: str) -> httpx.Response:
    return httpx.post(
        replicas.b.url + "/guard/oidc/backchannel-logout", data={"logout_token": token},
        timeout=10,
    )  # fmt: skip


def test_a_valid_logout_token_ends_the_session_and_its_replay_is_refused(
    replicas: Replicas, oidc_provider: OidcProvider, live_session: tuple[str, str]
) -> None:
    cookie, sid = live_session
    token = logout_token(oidc_provider, replicas, sid)
    answer = post_logout(replicas, token)
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    assert search(replicas.a, cookie) == 401
    replay = httpx.post(
        replicas.a.url + "/guard/oidc/backchannel-logout", data={"logout_token": token},
        timeout=10,
    )  # fmt: skip
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_request"


BAD_TOKENS: dict[str, dict[str, Any]] = {
    "wrong issuer": {"iss": "http://localhost:1"},
    "another audience": {"aud": "another-client"},
    "iat too old": {"iat": int(time.time()) - 3600, "exp": int(time.time()) + 300},
    "iat null": {"iat": None},
    "exp null": {"exp": None},
    "expired": {"iat": int(time.time()) - 100, "exp": int(time.time()) - 90},
    "no events": {"events": None},
    "events without the back-channel member": {"events": {"other": {}}},
    "events member not an object": {"events": {BACKCHANNEL_EVENT: "yes"}},
    "a nonce": {"nonce": "n-1"},
    "neither sid nor sub": {"sid": None, "sub": None},
    "no jti": {"jti": None},
    "typ of an access token": {"header": {"typ": "at+jwt"}},
    "signed by an unpublished key": {"kid": "key-2"},
    "no kid": {"kid": None},
    "embedded jwk": {"header": {"typ": "logout+jwt", "jwk": {"kty": "RSA", "n": "x", "e": "AQAB"}}},
    "jku header": {"header": {"typ": "logout+jwt", "jku": "http://127.0.0.1:1/jwks"}},
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_a_logout_token_breaking_a_rule_is_refused(
    replicas: Replicas, oidc_provider: OidcProvider, live_session: tuple[str, str], case: str
) -> None:
    cookie, sid = live_session
    answer = post_logout(replicas, logout_token(oidc_provider, replicas, sid, **BAD_TOKENS[case]))
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"
    assert answer.headers["x-guard-reason"] == "logout_token_invalid"
    assert search(replicas.a, cookie) == 200  # the session lives on


def test_a_logout_token_with_a_bad_signature_or_alg_none_is_refused(
    replicas: Replicas, oidc_provider: OidcProvider, live_session: tuple[str, str]
) -> None:
    cookie, sid = live_session
    good = logout_token(oidc_provider, replicas, sid)
    head, body, signature = good.split(".")
    flipped = signature[:-2] + ("AA" if not signature.endswith("AA") else "BB")
    none = f"{head.replace(head, _b64json({'alg': 'none', 'typ': 'logout+jwt'}))}.{body}."
    for token in (f"{head}.{body}.{flipped}", none, f"{head}.{body}"):
        answer = post_logout(replicas, token)
        assert answer.status_code == 400, token
    assert search(replicas.a, cookie) == 200


def test_only_the_sso_routes_are_open_their_neighbours_need_credentials(
    replicas: Replicas,
) -> None:
    for path in ("/guard/oidc/", "/guard/oidc/login/", "/guard/oidc/callbackx",
                 "/guard/oidc/backchannel-logout/x", "/guard/oidc"):  # fmt: skip
        answer = httpx.get(replicas.a.url + path, timeout=10)
        assert answer.status_code == 401, path
    assert httpx.get(replicas.a.url + "/guard/oidc/login", timeout=10).status_code == 303


def test_a_logout_token_without_a_form_body_is_refused(replicas: Replicas) -> None:
    answer = httpx.post(replicas.b.url + "/guard/oidc/backchannel-logout",
                        json={"logout_token": "x.y.z"}, timeout=10)  # fmt: skip
    assert answer.status_code == 415
    get = httpx.get(replicas.b.url + "/guard/oidc/backchannel-logout", timeout=10)
    assert get.status_code == 405


def _b64json(value: dict[str, Any]) -> str:
    import base64
    import json

    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
