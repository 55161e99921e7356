"""A directory session re-reads its groups through the real slapd (``ldap.group_refresh``, 1 s
here): a group membership removed in the directory leaves the session, and a deleted entry ends
it, on a gateway process in front of a real MLflow."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from guard.identity.base import Principal
from guard.identity.sessions import Session, SessionCookie, SessionStore
from guard.store.db import build_engine
from tests.integration.conftest import Gateway, Mlflow, start_gateway
from tests.slapd import GROUPS, PEOPLE, SERVICE_DN, Slapd

pytestmark = [pytest.mark.integration, pytest.mark.ldap]

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


@dataclass
class Setup:
    gateway: Gateway
    store: SessionStore
    cookie: SessionCookie


@pytest.fixture(scope="module")
def setup(
    external_mlflow: Mlflow, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("session-groups")
    key = os.urandom(32).hex()
    database = f"sqlite:///{root / 'guard.db'}"
    gateway = start_gateway(
        root / "gateway",
        "--upstream-url", external_mlflow.url, "--database-uri", database,
        MLFLOW_GUARD_SECRET_KEY=key,
        MLFLOW_GUARD_LDAP_URLS=slapd.url,
        MLFLOW_GUARD_LDAP_BIND_DN=slapd.service_dn,
        MLFLOW_GUARD_LDAP_BIND_PASSWORD=slapd.service_password,
        MLFLOW_GUARD_LDAP_USER_BASE=PEOPLE,
        MLFLOW_GUARD_LDAP_USE_MEMBEROF="true",
        MLFLOW_GUARD_LDAP_GROUP_REFRESH="1s",
    )  # fmt: skip
    engine = build_engine(database)
    try:
        store = SessionStore(engine, key.encode(), idle_timeout=3600, absolute_timeout=43200)
        cookie = SessionCookie(key.encode(), name="mlflow_guard_session", secure=False, max_age=60)
        yield Setup(gateway, store, cookie)
    finally:
        engine.dispose()
        gateway.stop()


def row(store: SessionStore, key: str) -> Session:
    [found] = [s for s in store.list(include_ended=True) if s.key == key]
    return found


def test_groups_follow_the_directory_and_a_deleted_entry_ends_the_session(
    setup: Setup, slapd: Slapd
) -> None:
    uid = f"sess-{uuid.uuid4().hex[:8]}"
    user_dn, group_cn = f"uid={uid},{PEOPLE}", f"sess-team-{uid[5:]}"
    group_dn = f"cn={group_cn},{GROUPS}"
    slapd.modify(
        f"dn: {user_dn}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\n"
        f"userPassword: {uid}-password\n\n"
        f"dn: {group_dn}\nobjectClass: groupOfNames\ncn: {group_cn}\nmember: {user_dn}\n"
        f"member: {SERVICE_DN}\n",
        add=True,
    )
    # One Basic login binds the name to the entry (and shows its groups are read).
    http = httpx.Client(timeout=30)
    login = http.get(setup.gateway.url + SEARCH, auth=(uid, f"{uid}-password"))
    assert login.status_code in (200, 403), login.text
    listed = setup.gateway.cli("user", "list", "--format", "json", "--database-uri",
                               str(setup.store.engine.url))  # fmt: skip
    [binding] = [b for b in json.loads(listed.stdout) if b["subject"] == f"user:{uid}"]
    group, identity = f"group:ldap/{group_cn}", f"ldap:{binding['id']}"
    session_id, session = setup.store.create(
        Principal(f"user:{uid}", uid, "ldap", (), groups=(group,), identity=identity),
        client="127.0.0.1",
    )
    cookie = {"Cookie": f"{setup.cookie.name}={setup.cookie.encode(session_id)}"}

    slapd.modify(f"dn: {group_dn}\nchangetype: modify\ndelete: member\nmember: {user_dn}\n")
    deadline = time.monotonic() + 15
    while row(setup.store, session.key).groups:
        assert time.monotonic() < deadline, "the session kept the removed group"
        time.sleep(0.3)
        assert http.get(setup.gateway.url + SEARCH, headers=cookie).status_code != 401
    assert row(setup.store, session.key).revoked_at is None

    slapd.modify(f"dn: {user_dn}\nchangetype: delete\n")
    deadline = time.monotonic() + 15
    while True:
        response = http.get(setup.gateway.url + SEARCH, headers=cookie)
        if response.status_code == 401:
            break
        assert time.monotonic() < deadline, "the session outlived its directory entry"
        time.sleep(0.3)
    assert "set-cookie" not in response.headers  # only a page load clears it
    assert row(setup.store, session.key).revoked_by == "gateway:group-refresh"
    http.close()


def test_a_block_stops_directory_logins_within_the_poll_interval(
    setup: Setup, slapd: Slapd
) -> None:
    uid = f"blk-{uuid.uuid4().hex[:8]}"
    slapd.modify(
        f"dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\n"
        f"userPassword: {uid}-password\n",
        add=True,
    )
    database = ("--database-uri", str(setup.store.engine.url))
    with httpx.Client(timeout=30, auth=(uid, f"{uid}-password")) as http:
        assert http.get(setup.gateway.url + SEARCH).status_code != 401
        blocked = setup.gateway.cli("user", "block", uid.upper(), "--reason", "test", *database)
        assert blocked.returncode == 0, blocked.stderr
        deadline = time.monotonic() + 10  # authz.poll_interval is 1 s
        while (response := http.get(setup.gateway.url + SEARCH)).status_code == 200:
            assert time.monotonic() < deadline, "the block did not reach the gateway"
            time.sleep(0.2)
        assert response.headers["x-guard-reason"] == "user_blocked"
        assert "ask an administrator" in response.json()["message"]
        assert setup.gateway.cli("user", "unblock", uid, *database).returncode == 0
        deadline = time.monotonic() + 10
        while http.get(setup.gateway.url + SEARCH).headers.get("x-guard-reason") == "user_blocked":
            assert time.monotonic() < deadline, "the unblock did not reach the gateway"
            time.sleep(0.2)
