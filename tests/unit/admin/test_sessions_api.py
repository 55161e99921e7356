"""Sessions through the real gateway (a recording fake MLflow behind it): /guard/api/sessions
for administrators, the cookie on the MLflow API, CSRF, and the Cookie header never forwarded."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.admin.governance import Governance
from guard.app import Gateway, build_gateway
from guard.authz.policy import parse_lines
from guard.config import load_settings
from guard.identity.base import Principal
from guard.identity.sessions import SessionCookie, SessionStore
from tests.conftest import free_port
from tests.servers import ServerThread, read_request_body, send_response

ADMIN = "mlg_" + "a" * 43
AUDITOR = "mlg_" + "u" * 43
NOBODY = "mlg_" + "n" * 43
API = "/guard/api/sessions"


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
        self.seen.append({"path": scope["path"], "headers": list(scope["headers"])})
        await send_response(send, 200, b"{}", [(b"content-type", b"application/json")])


@dataclass
class Running:
    gateway: Gateway
    url: str
    upstream: Recording
    store: SessionStore
    cookie: SessionCookie

    def login(self, principal: Principal) -> tuple[str, str]:
        """A session as the login page makes it: (the Cookie header value, the row key)."""
        session_id, session = self.store.create(principal, client="127.0.0.1")
        return f"{self.cookie.name}={self.cookie.encode(session_id)}", session.key


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    data = tmp_path_factory.mktemp("sessions-api")
    port = free_port()
    fake = Recording()
    with ServerThread(fake, lifespan="off") as upstream:
        settings = load_settings(
            {
                "upstream.url": upstream.url,
                "storage.data_dir": str(data),
                "gateway.public_url": f"http://127.0.0.1:{port}",
                "gateway.cors_allowed_origins": "https://ui.example",
            },
            {},
            None,
        ).settings
        env = {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": ADMIN, "MLFLOW_GUARD_SECRET_KEY": "k" * 40}
        gateway = build_gateway(settings, env)
        with ServerThread(gateway, port=port) as server:
            g = Governance(gateway.tokens, gateway.policies.store)
            for name, secret in (("aud", AUDITOR), ("nobody", NOBODY)):
                g.tokens.create(name, "viewer", 3600, secret)
            g.change("test", add=parse_lines(["p, token:aud, auditor, guard:policy"]))
            deadline = time.monotonic() + 10
            while gateway.policies.index.version != gateway.policies.store.version():
                assert time.monotonic() < deadline, "the policy change was not picked up"
                time.sleep(0.05)
            s = settings.sessions
            store = SessionStore(
                gateway.engine, gateway.tokens.key, idle_timeout=s.idle_timeout,
                absolute_timeout=s.absolute_timeout,
            )  # fmt: skip
            cookie = SessionCookie(gateway.tokens.key, name=s.cookie_name, secure=False, max_age=60)
            yield Running(gateway, server.url, fake, store, cookie)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def admin_principal(running: Running) -> Principal:
    [record] = [t for t in running.gateway.tokens.list() if t.name == "admin"]
    return Principal("token:admin", "admin", "token", ("admin",), identity=f"token:{record.id}")


def alice() -> Principal:
    return Principal("user:alice", "alice", "ldap", (), groups=("group:ldap/x",), identity="ldap:a")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refused(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["x-guard-reason"] == reason


def test_only_policy_administrators_see_and_end_sessions(
    running: Running, http: httpx.Client
) -> None:
    running.login(alice())
    for token in (AUDITOR, NOBODY):
        refused(http.get(running.url + API, headers=bearer(token)), 403, "permission_denied")
        refused(
            http.delete(running.url + API, params={"user": "alice"}, headers=bearer(token)),
            403, "permission_denied",
        )  # fmt: skip
    refused(http.get(running.url + API), 401, "unauthenticated")
    listed = http.get(running.url + API, params={"user": "Alice"}, headers=bearer(ADMIN))
    assert listed.status_code == 200
    rows = listed.json()["sessions"]
    assert rows and {r["subject"] for r in rows} == {"user:alice"}
    assert set(rows[0]) == {
        "key", "subject", "method", "client", "created", "last_seen", "ends", "state", "revoked_by",
    }  # fmt: skip
    assert len(rows[0]["key"]) == 12


def test_revoke_one_session_by_key_prefix(running: Running, http: httpx.Client) -> None:
    cookie, key = running.login(alice())
    other, _ = running.login(alice())
    read = "/api/2.0/mlflow/experiments/search"
    assert http.get(running.url + read, headers={"Cookie": cookie}).status_code != 401
    refused(http.delete(f"{running.url}{API}/abc", headers=bearer(ADMIN)), 400,
            "invalid_request_body")  # fmt: skip
    refused(http.delete(f"{running.url}{API}/{'0' * 12}", headers=bearer(ADMIN)), 404, "not_found")
    response = http.delete(f"{running.url}{API}/{key[:10]}", headers=bearer(ADMIN))
    assert response.status_code == 200 and response.json() == {
        "revoked": 1,
        "subject": "user:alice",
    }
    ended = http.get(running.url + read, headers={"Cookie": cookie})
    refused(ended, 401, "unauthenticated")
    assert "set-cookie" not in ended.headers  # only a page load clears it
    assert http.get(running.url + read, headers={"Cookie": other}).status_code != 401
    refused(http.delete(f"{running.url}{API}/{key[:10]}", headers=bearer(ADMIN)), 404, "not_found")
    [row] = [s for s in running.store.list("user:alice", True) if s.key == key]
    assert row.revoked_by == "token:admin"


def test_revoke_every_session_of_a_person(running: Running, http: httpx.Client) -> None:
    cookies = [running.login(alice())[0] for _ in range(2)]
    response = http.delete(running.url + API, params={"user": "alice"}, headers=bearer(ADMIN))
    assert response.status_code == 200 and response.json()["revoked"] >= 2
    for cookie in cookies:
        refused(http.get(running.url + "/ajax-api/2.0/mlflow/experiments/search",
                         headers={"Cookie": cookie}), 401, "unauthenticated")  # fmt: skip
    refused(http.delete(running.url + API, headers=bearer(ADMIN)), 400, "invalid_request_body")


def test_an_admin_session_revokes_with_csrf_checked(running: Running, http: httpx.Client) -> None:
    cookie, _ = running.login(admin_principal(running))
    _, target = running.login(alice())
    url = f"{running.url}{API}/{target[:12]}"
    listed = http.get(running.url + API, headers={"Cookie": cookie})
    assert listed.status_code == 200
    # Foreign origins: the CORS layer refuses them first; the CSRF check stands behind it.
    for origin in ("https://evil.example", "null", "http://127.0.0.1:1", "https://127.0.0.1"):
        response = http.delete(url, headers={"Cookie": cookie, "Origin": origin})
        assert response.status_code == 403
        assert response.headers["x-guard-reason"] in ("cors_origin_not_allowed", "csrf_failed")
    # The origin of the Host asked for is not ours unless it is gateway.public_url.
    port = running.url.rsplit(":", 1)[1]
    response = http.delete(
        url.replace("127.0.0.1", "localhost"),
        headers={"Cookie": cookie, "Origin": f"http://localhost:{port}"},
    )
    refused(response, 403, "csrf_failed")
    refused(http.delete(url, headers={"Cookie": cookie}), 403, "csrf_failed")
    refused(
        http.delete(url, headers={"Cookie": cookie, "Sec-Fetch-Site": "same-origin",
                                  "Origin": "https://ui.example.evil"}),
        403, "cors_origin_not_allowed",
    )  # fmt: skip
    ok = http.delete(url, headers={"Cookie": cookie, "Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 200


def test_the_revocation_is_in_the_audit_trail(running: Running, http: httpx.Client) -> None:
    _, key = running.login(alice())
    assert http.delete(f"{running.url}{API}/{key[:12]}", headers=bearer(ADMIN)).status_code == 200
    deadline = time.monotonic() + 10
    while True:
        records = http.get(
            running.url + "/guard/api/audit", params={"limit": "50"}, headers=bearer(ADMIN)
        ).json()["records"]
        found = [
            r for r in records
            if (r.get("changes") or {}).get("session_revoked") == key[:12]
        ]  # fmt: skip
        if found:
            break
        assert time.monotonic() < deadline, "the revocation was not recorded"
        time.sleep(0.1)
    assert found[0]["principal"] == "token:admin"
    assert found[0]["changes"]["subject"] == "user:alice"


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
def test_the_cookie_is_never_forwarded(running: Running, http: httpx.Client, prefix: str) -> None:
    cookie, _ = running.login(admin_principal(running))
    before = len(running.upstream.seen)
    response = http.post(
        f"{running.url}{prefix}/2.0/mlflow/runs/log-metric",
        headers={"Cookie": f"{cookie}; other=1", "Origin": running.url,
                 "Content-Type": "application/json"},
        content=json.dumps({"run_id": "r1", "key": "m", "value": 1, "timestamp": 1}),
    )  # fmt: skip
    assert response.status_code == 200, response.text
    seen = running.upstream.seen[before:]  # the resolver's lookups and the write itself
    assert f"{prefix}/2.0/mlflow/runs/log-metric" in [r["path"] for r in seen]
    for request in seen:
        names = {k for k, _ in request["headers"]}
        assert b"cookie" not in names and b"authorization" not in names
