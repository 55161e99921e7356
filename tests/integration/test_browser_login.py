"""The login page in a real headless Chromium (Debian's, through Playwright) against the real
gateway in front of the real MLflow, with the real slapd for the directory form: a deep link to
MLflow's UI is sent to the login page, the login lands exactly on it, the UI lists and creates
experiments (a write through the cookie CSRF check with the browser's own Origin), logout ends
the session for good, login pages in two tabs both log in, and a cross-site form POST with a
valid session is refused. Then the same
gateway over plain HTTP (httpx): the page's headers through the whole stack, an open redirect
tried end to end, and failed logins counted per address until 429."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.conftest import free_port
from tests.integration.conftest import Gateway, Mlflow, start_gateway
from tests.slapd import PEOPLE, Slapd

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.integration, pytest.mark.browser]

SESSION_COOKIE = "mlflow_guard_session"
UI_TIMEOUT = 30_000  # ms: the first load of MLflow's UI bundle on a busy 2-core machine


@pytest.fixture(scope="module")
def token_gateway(
    external_mlflow: Mlflow, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """The default install: no LDAP, no OIDC; people log in with a gateway token."""
    gateway = start_gateway(
        tmp_path_factory.mktemp("browser-token"), "--upstream-url", external_mlflow.url
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def directory_gateway(
    external_mlflow: Mlflow, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gateway = start_gateway(
        tmp_path_factory.mktemp("browser-ldap"),
        "--upstream-url", external_mlflow.url,
        MLFLOW_GUARD_LDAP_URLS=slapd.url,
        MLFLOW_GUARD_LDAP_BIND_DN=slapd.service_dn,
        MLFLOW_GUARD_LDAP_BIND_PASSWORD=slapd.service_password,
        MLFLOW_GUARD_LDAP_USER_BASE=PEOPLE,
        MLFLOW_GUARD_LDAP_USE_MEMBEROF="true",
    )  # fmt: skip
    try:
        for rule in ("p, user:alice, manager, experiment:ui-*",
                     "p, user:alice, viewer, experiment:Default"):  # fmt: skip
            added = gateway.cli("policy", "add", rule)
            assert added.returncode == 0, added.stderr
        deadline = time.monotonic() + 15  # the gateway polls for policy changes every second
        while True:
            seen = httpx.get(
                gateway.url + "/api/2.0/mlflow/experiments/get", params={"experiment_id": "0"},
                auth=("alice", "alice-password"), timeout=10,
            )  # fmt: skip
            if seen.status_code == 200 or time.monotonic() > deadline:
                assert seen.status_code == 200, seen.text
                break
            time.sleep(0.2)
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture
def page(chromium: Browser) -> Iterator[Page]:
    context = chromium.new_context()
    context.set_default_timeout(UI_TIMEOUT)
    try:
        yield context.new_page()
    finally:
        context.close()


def session_cookie(page: Page) -> str:
    (value,) = [c["value"] for c in page.context.cookies() if c["name"] == SESSION_COOKIE]
    return value


def experiment_exists(gateway: Gateway, name: str) -> bool:
    response = httpx.get(
        f"{gateway.url}/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": name},
        headers={"authorization": f"Bearer {gateway.token}"},
        timeout=10,
    )
    assert response.status_code in (200, 403, 404), response.text
    return response.status_code == 200


def log_in_with_token(page: Page, gateway: Gateway, deep_link: str) -> None:
    page.goto(gateway.url + deep_link)
    page.wait_for_url(re.compile(r".*/guard/login\?next=.*"))
    page.fill("#token-name", "admin")
    page.fill("#token-secret", gateway.token)
    page.get_by_role("button", name="Log in with token").click()
    page.wait_for_url(gateway.url + deep_link)


# -- Chromium ------------------------------------------------------------------------------


def test_a_directory_user_logs_in_from_a_deep_link_creates_an_experiment_and_logs_out(
    directory_gateway: Gateway, page: Page
) -> None:
    url = directory_gateway.url
    timings: dict[str, float] = {}
    started = time.monotonic()

    # A deep link into MLflow's UI: the route is in the fragment, which the server never sees.
    page.goto(url + "/#/experiments")
    # The navigation was sent to the login page; the browser kept the fragment across the
    # redirect, and login.js put it into the forms' next field.
    assert page.url == f"{url}/guard/login?next=%2F#/experiments"
    nexts = page.eval_on_selector_all("input[name=next]", "els => els.map(e => e.value)")
    assert nexts == ["/#/experiments", "/#/experiments"]
    assert page.get_by_label("User name").is_visible()  # the directory form comes first
    assert not page.get_by_label("Token name").is_visible()  # the token form is folded away
    timings["to the login page"] = time.monotonic() - started

    # A wrong password: the page again, with the message in the alert region.
    page.get_by_label("User name").fill("alice")
    page.get_by_label("Password").fill("not-alices-password")
    page.get_by_role("button", name="Log in", exact=True).click()
    page.wait_for_load_state()
    assert page.get_by_role("alert").inner_text() == "The user name or password is not correct."
    assert page.url == f"{url}/guard/login"
    assert page.get_by_label("User name").input_value() == "alice"

    mark = time.monotonic()
    page.get_by_label("Password").fill("alice-password")
    page.get_by_role("button", name="Log in", exact=True).click()
    page.wait_for_url(url + "/#/experiments")
    assert page.url == url + "/#/experiments"  # exactly the deep link
    page.get_by_role("link", name="Default", exact=True).wait_for()  # the experiments list
    create = page.get_by_test_id("create-experiment-button")
    timings["login to the experiments list"] = time.monotonic() - mark

    # Create an experiment from the UI: a cookie-authenticated write with the browser's Origin.
    mark = time.monotonic()
    name = f"ui-{uuid.uuid4().hex[:8]}"
    create.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Experiment Name").fill(name)
    with page.expect_response(lambda r: r.url.endswith("/experiments/create")) as created:
        dialog.get_by_role("button", name="Create").click()
    response = created.value
    assert response.status == 200, response.text()
    assert response.request.header_value("origin") == url
    assert experiment_exists(directory_gateway, name)
    timings["create an experiment"] = time.monotonic() - mark

    # Log out: the confirm page's form, then back on the login page.
    mark = time.monotonic()
    old = session_cookie(page)
    page.goto(url + "/guard/logout")
    assert "alice" in page.get_by_role("main").inner_text()
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(url + "/guard/login")
    assert not [c for c in page.context.cookies() if c["name"] == SESSION_COOKIE]
    timings["logout"] = time.monotonic() - mark

    # The old cookie no longer works anywhere, and the UI sends the browser to log in again.
    gone = httpx.get(
        url + "/ajax-api/2.0/mlflow/experiments/search",
        params={"max_results": "1"},
        headers={"cookie": f"{SESSION_COOKIE}={old}", "sec-fetch-site": "same-origin"},
        timeout=10,
    )
    assert gone.status_code == 401
    assert not [c for c in gone.headers.get_list("www-authenticate") if "basic" in c.lower()]
    page.goto(url + "/#/experiments")
    page.wait_for_url(re.compile(r".*/guard/login\?next=.*"))
    timings["whole test"] = time.monotonic() - started
    print("browser timings (s):", {k: round(v, 2) for k, v in timings.items()})


def test_the_default_install_logs_in_with_a_gateway_token(
    token_gateway: Gateway, page: Page
) -> None:
    url = token_gateway.url
    page.goto(url + "/#/models")
    page.wait_for_url(re.compile(r".*/guard/login\?next=.*"))
    # No directory: the token form is the page, not a folded extra.
    assert page.get_by_label("Token name").is_visible()
    assert page.get_by_label("User name").count() == 0
    page.get_by_label("Token name").fill("admin")
    page.get_by_label("Token (mlg_…)").fill(token_gateway.token)
    page.get_by_role("button", name="Log in with token").click()
    page.wait_for_url(url + "/#/models")
    assert page.url == url + "/#/models"
    page.get_by_text("Registered Models").first.wait_for()
    cookie = next(c for c in page.context.cookies() if c["name"] == SESSION_COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and not cookie["secure"]
    assert cookie["path"] == "/"


def test_login_pages_in_two_tabs_both_log_in(token_gateway: Gateway, page: Page) -> None:
    """Each page view is its own login attempt (its own CSRF cookie): the second tab's page
    does not spoil the first tab's form."""
    url = token_gateway.url
    first, second = page, page.context.new_page()
    for tab, link in ((first, "/#/models"), (second, "/#/experiments")):
        tab.goto(url + link)
        tab.wait_for_url(re.compile(r".*/guard/login\?next=.*"))
    attempts = [c for c in page.context.cookies() if c["name"].startswith("mlflow_guard_csrf_")]
    assert len(attempts) == 2
    for tab, link in ((first, "/#/models"), (second, "/#/experiments")):  # the FIRST tab first
        tab.get_by_label("Token name").fill("admin")
        tab.get_by_label("Token (mlg_…)").fill(token_gateway.token)
        tab.get_by_role("button", name="Log in with token").click()
        tab.wait_for_url(url + link)
        assert tab.url == url + link
    assert not [c for c in page.context.cookies() if c["name"].startswith("mlflow_guard_csrf")]


class _Attacker(BaseHTTPRequestHandler):
    """Another origin (another port on 127.0.0.1: cookies ignore ports, so the browser does
    send the gateway's SameSite=Lax cookie with this same-site POST) serving pages that submit
    forms to the gateway on load."""

    pages: dict[str, bytes] = {}

    def do_GET(self) -> None:
        body = self.pages.get(self.path, b"")
        self.send_response(200 if body else 404)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def attacker() -> Iterator[tuple[str, dict[str, bytes]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    server.RequestHandlerClass.pages = {}  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Attacker.pages
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def auto_submit(action: str, fields: dict[str, str], enctype: str = "") -> bytes:
    inputs = "".join(f"<input type=hidden name='{k}' value='{v}'>" for k, v in fields.items())
    encoding = f" enctype='{enctype}'" if enctype else ""
    return (
        f"<!doctype html><form id=f method=post action='{action}'{encoding}>{inputs}</form>"
        "<script>document.getElementById('f').submit()</script>"
    ).encode()


def test_a_cross_site_form_post_with_a_valid_session_is_refused(
    token_gateway: Gateway, page: Page, attacker: tuple[str, dict[str, bytes]]
) -> None:
    url = token_gateway.url
    log_in_with_token(page, token_gateway, "/#/experiments")
    before = session_cookie(page)
    origin, pages = attacker
    name = f"csrf-{uuid.uuid4().hex[:8]}"
    # MLflow's JSON API through a text/plain form: {"name": "csrf-...", "x": "="}
    pages["/create"] = auto_submit(
        f"{url}/ajax-api/2.0/mlflow/experiments/create",
        {f'{{"name": "{name}", "x": "': '"}'},
        "text/plain",
    )
    pages["/logout"] = auto_submit(f"{url}/guard/logout", {"csrf_token": "guess"})
    pages["/login"] = auto_submit(
        f"{url}/guard/login", {"username": "admin", "password": token_gateway.token}
    )
    for path in ("/create", "/logout", "/login"):
        with page.expect_response(lambda r: r.url.startswith(url)) as answered:
            page.goto(origin + path)
        response = answered.value
        assert response.status == 403, (path, response.status)
        assert response.headers["x-guard-reason"] in {"cors_origin_not_allowed", "csrf_failed"}
        assert response.request.header_value("origin") == origin
        if path == "/create":
            assert f"{SESSION_COOKIE}=" in (response.request.header_value("cookie") or "")
    assert not experiment_exists(token_gateway, name)
    # The session survived the attempts (the forged logout did not end it).
    assert session_cookie(page) == before
    page.goto(url + "/#/experiments")
    page.get_by_test_id("create-experiment-button").wait_for()
    assert page.url == url + "/#/experiments"


# -- the same gateway over plain HTTP --------------------------------------------------------


def login_form(client: httpx.Client, next_: str = "/") -> str:
    page = client.get("/guard/login", params={"next": next_})
    assert page.status_code == 200
    match = re.search(r'name="csrf_token" value="([0-9a-f]{16}\.[0-9a-f]{64})"', page.text)
    assert match
    return match.group(1)


def test_the_page_through_the_whole_stack(token_gateway: Gateway) -> None:
    with httpx.Client(base_url=token_gateway.url, timeout=10) as client:
        page = client.get("/guard/login", headers={"accept": "text/html"})
        assert page.status_code == 200
        assert page.headers["x-content-type-options"] == "nosniff"
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "frame-ancestors 'self'" in csp  # the gateway's, merged in
        assert "unsafe-inline" not in csp
        for name, kind in (("login.js", "text/javascript"), ("login.css", "text/css")):
            static = client.get(f"/guard/static/{name}")
            assert static.status_code == 200 and static.headers["content-type"].startswith(kind)
            assert static.headers["x-content-type-options"] == "nosniff"
        assert client.get("/guard/login", headers={"host": "evil.example"}).status_code == 400
        # Only the exact paths are open: their neighbours stay behind authentication.
        for path in ("/guard/login/", "/guard/static/other.js", "/guard/static/", "/guard/Login"):
            assert client.get(path).status_code == 401, path
        # Without credentials the API still gets 401 with its challenges, not the page.
        api = client.get("/api/2.0/mlflow/experiments/search", params={"max_results": "1"})
        assert api.status_code == 401


def test_an_open_redirect_lands_on_slash_end_to_end(token_gateway: Gateway) -> None:
    url = token_gateway.url
    with httpx.Client(base_url=url, timeout=10, headers={"origin": url}) as client:
        for target in ("//evil.com", "/%5Cevil.com", "https://evil.com", "/guard/login"):
            token = login_form(client, target)
            form = {"username": "admin", "password": token_gateway.token, "csrf_token": token,
                    "next": target}  # fmt: skip
            response = client.post("/guard/login", data=form)
            assert response.status_code == 303, response.text
            assert response.headers["location"] == "/", target


def loopback_login_and_write(gateway: Gateway, origin: str) -> tuple[int, int]:
    """A token login and then a cookie-authenticated write, both sent by a page of ``origin``
    (the Host says the same name): the two statuses."""
    host = origin.removeprefix("http://")
    headers = {"origin": origin, "host": host}
    with httpx.Client(base_url=gateway.url, timeout=10, headers=headers) as client:
        form = {"username": "admin", "password": gateway.token, "csrf_token": login_form(client)}
        login = client.post("/guard/login", data=form)
        if login.status_code != 303:
            return login.status_code, 0
        name = f"loopback-{uuid.uuid4().hex[:8]}"
        write = client.post("/ajax-api/2.0/mlflow/experiments/create", json={"name": name})
        return login.status_code, write.status_code


def test_loopback_origins_are_own_origins_while_public_url_is_unset(
    token_gateway: Gateway, external_mlflow: Mlflow, tmp_path: Path
) -> None:
    # public_url unset, bound to 127.0.0.1: a person may type any loopback name.
    port = token_gateway.port
    for name in ("localhost", "127.0.0.1", "[::1]"):
        assert loopback_login_and_write(token_gateway, f"http://{name}:{port}") == (303, 200)
    assert loopback_login_and_write(token_gateway, f"http://localhost:{port + 1}")[0] == 403
    # public_url set: that origin only.
    port = free_port()
    pinned = start_gateway(
        tmp_path / "pinned", "--upstream-url", external_mlflow.url, port=port,
        MLFLOW_GUARD_GATEWAY_PUBLIC_URL=f"http://127.0.0.1:{port}",
    )  # fmt: skip
    try:
        assert loopback_login_and_write(pinned, f"http://127.0.0.1:{port}") == (303, 200)
        assert loopback_login_and_write(pinned, f"http://localhost:{port}") == (403, 0)
        # A session from the pinned origin still may not write from another loopback name.
        origin = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=pinned.url, timeout=10, headers={"origin": origin}) as client:
            form = {"username": "admin", "password": pinned.token,
                    "csrf_token": login_form(client)}  # fmt: skip
            assert client.post("/guard/login", data=form).status_code == 303
            write = client.post(
                "/ajax-api/2.0/mlflow/experiments/create",
                json={"name": f"loopback-{uuid.uuid4().hex[:8]}"},
                headers={"origin": f"http://localhost:{port}", "host": f"localhost:{port}"},
            )
            assert write.status_code == 403 and write.headers["x-guard-reason"] == "csrf_failed"
    finally:
        pinned.stop()


def test_failed_logins_count_per_address_until_429(external_mlflow: Mlflow, tmp_path: Path) -> None:
    gateway = start_gateway(
        tmp_path / "flood", "--upstream-url", external_mlflow.url,
        MLFLOW_GUARD_GATEWAY_FAILED_LOGIN_LIMIT="3",
    )  # fmt: skip
    try:
        url = gateway.url
        with httpx.Client(base_url=url, timeout=10, headers={"origin": url}) as client:
            statuses = []
            for _ in range(3):
                form = {"username": "admin", "password": "mlg_" + "0" * 43,
                        "csrf_token": login_form(client)}  # fmt: skip
                statuses.append(client.post("/guard/login", data=form).status_code)
            assert statuses == [401, 401, 401]
            # Past the limit even the right token is not tried: 429, and no session.
            form = {"username": "admin", "password": gateway.token,
                    "csrf_token": login_form(client)}  # fmt: skip
            blocked = client.post("/guard/login", data=form)
            assert blocked.status_code == 429
            assert blocked.headers["x-guard-reason"] == "too_many_failures"
            assert int(blocked.headers["retry-after"]) >= 1
            assert SESSION_COOKIE not in blocked.cookies
    finally:
        gateway.stop()


def test_csrf_fixation_logout_and_the_audit_trail_end_to_end(token_gateway: Gateway) -> None:
    url = token_gateway.url
    wrong = "mlg_" + "0" * 43
    with httpx.Client(base_url=url, timeout=10, headers={"origin": url}) as client:
        # The CSRF token: missing, then reused after it was spent on a failed login.
        assert client.post("/guard/login", data={"username": "admin"}).status_code == 403
        token = login_form(client)
        spent = dict(client.cookies)
        form = {"username": "admin", "password": wrong, "csrf_token": token}
        assert client.post("/guard/login", data=form).status_code == 401
        replay = httpx.post(
            url + "/guard/login", cookies=spent, headers={"origin": url}, timeout=10,
            data={"username": "admin", "password": token_gateway.token, "csrf_token": token},
        )  # fmt: skip
        assert replay.status_code == 403
        assert replay.headers["x-guard-reason"] == "csrf_token_invalid"

        # Fixation: a planted cookie is not the session; the first login's cookie is not the
        # second's, and the first session ends with the second login.
        client.cookies.set(SESSION_COOKIE, "planted")
        form = {"username": "admin", "password": token_gateway.token}
        first = client.post("/guard/login", data=form | {"csrf_token": login_form(client)})
        assert first.status_code == 303
        one = first.cookies[SESSION_COOKIE]
        assert one != "planted"
        client.cookies.clear()
        client.cookies.set(SESSION_COOKIE, one)
        second = client.post("/guard/login", data=form | {"csrf_token": login_form(client)})
        two = second.cookies[SESSION_COOKIE]
        assert two != one

        def search(cookie: str) -> int:
            return httpx.get(
                url + "/ajax-api/2.0/mlflow/experiments/search", params={"max_results": "1"},
                cookies={SESSION_COOKIE: cookie}, timeout=10,
            ).status_code  # fmt: skip

        assert search(one) == 401 and search(two) == 200
        # Logout with the page's token; the cookie is dead afterwards.
        client.cookies.clear()
        client.cookies.set(SESSION_COOKIE, two)
        page = client.get("/guard/logout")
        logout_token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
        assert logout_token
        done = client.post("/guard/logout", data={"csrf_token": logout_token.group(1)})
        assert done.status_code == 303 and done.headers["location"] == "/guard/login"
        assert search(two) == 401

    # The audit trail: a login event and a logout event, the successful POST's outcome names
    # who logged in, the failed one names the user name tried, and no secret is anywhere.
    deadline = time.monotonic() + 20  # records are shipped from the spool in the background
    while True:
        exported = token_gateway.cli("audit", "export", "--format", "jsonl")
        assert exported.returncode == 0, exported.stderr
        records = [json.loads(line) for line in exported.stdout.splitlines() if line.strip()]
        events = [r.get("event") for r in records]
        if "logout" in events or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "login" in events and "logout" in events
    logins = [r for r in records if r.get("path") == "/guard/login" and r.get("method") == "POST"]
    assert any(r.get("status") == 303 and r.get("principal") == "token:admin" for r in logins)
    failed = [r for r in logins if r.get("status") == 401]
    assert failed and all(r.get("login_name") == "admin" for r in failed)
    assert token_gateway.token not in exported.stdout and wrong not in exported.stdout
