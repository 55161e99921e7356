"""Directory logins bound to the entry that first used the name (guard/identity/bindings.py and
the LDAP provider) against the throwaway slapd, through a real gateway and ``mlflow-guard user``:
the first login claims, the same entry comes back, a name bound to another identity gets 403
``identity_conflict`` (recorded, not a failed login) until ``user unlink`` frees it or ``user
link`` binds it, CLI changes land in the audit trail, and an entry without the id attribute is
refused."""

from __future__ import annotations

import asyncio
import io
import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from guard.errors import Refusal
from guard.identity.base import Credentials, Principal
from guard.identity.bindings import IdentityBindings
from guard.store.db import audit_records, build_engine, migrate
from tests.slapd import Slapd
from tests.unit.identity.test_ldap import (
    BOOTSTRAP,
    basic,
    directory,
    gateway_settings,
    login,
    me,
    run_gateway,
    upstream,  # noqa: F401 - a fixture
)

pytestmark = pytest.mark.ldap
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def entry_id(slapd: Slapd, uid: str, password: str) -> str:
    provider = directory(slapd)
    try:
        user = provider.directory.login(uid, password)
    finally:
        provider.close()
    assert user is not None
    return user.stable_id


def user_cli(monkeypatch: pytest.MonkeyPatch, data: Path, *args: str) -> int:
    from guard.cli.main import main

    for name in list(os.environ):
        if name.startswith("MLFLOW_GUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_GUARD_SECRET_KEY", "k" * 40)  # the gateway's (run_gateway)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    return main(["user", *args, "--data-dir", str(data)])


def audit_rows(url: str, request_id: str) -> list[dict[str, Any]]:
    admin = {"Authorization": f"Bearer {BOOTSTRAP}"}
    deadline = time.monotonic() + 10
    while True:
        found: list[dict[str, Any]] = httpx.get(
            f"{url}/guard/api/audit", params={"request_id": request_id}, headers=admin,
            timeout=10,
        ).json()["records"]  # fmt: skip
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_names_are_bound_to_the_first_entry(
    slapd: Slapd,
    upstream: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice_id = entry_id(slapd, "alice", "alice-password")
    bob_id = entry_id(slapd, "bob", "bob-password")
    assert UUID.match(alice_id) and UUID.match(bob_id) and alice_id != bob_id
    settings = gateway_settings(slapd, tmp_path, **{"upstream.url": upstream})
    for gateway, url in run_gateway(settings):
        provider = gateway.ldap_provider
        assert provider is not None and provider.bindings is not None
        # The first login claims the name; the same entry comes back (cached: no query).
        assert me(url, basic("alice", "alice-password")).status_code == 200
        queries = provider.bindings.queries
        assert me(url, basic("ALICE", "alice-password")).status_code == 200  # another cache key
        assert provider.bindings.queries == queries
        assert user_cli(monkeypatch, tmp_path, "list", "--format", "json") == 0
        listed = {r["subject"]: r for r in __import__("json").loads(capsys.readouterr().out)}
        assert (listed["user:alice"]["source"], listed["user:alice"]["id"]) == ("ldap", alice_id)
        assert user_cli(monkeypatch, tmp_path, "list") == 0
        table = capsys.readouterr().out
        assert table.splitlines()[0].split() == ["SUBJECT", "SOURCE", "ID", "CREATED", "LAST",
                                                 "SEEN"]  # fmt: skip
        assert f"user:alice  ldap    {alice_id}" in table
        # A service token is never bound.
        assert me(url, {"Authorization": f"Bearer {BOOTSTRAP}"}).status_code == 200
        assert not any(s.startswith("token:") for s in listed)

        # user:bob bound to another identity first (another source's entry, say): bob's own
        # entry is refused, every time, with no Basic prompt (the password was right).
        assert user_cli(monkeypatch, tmp_path, "link", "bob", "--source", "oidc",
                        "--id", "https://idp.example.com|bob") == 0  # fmt: skip
        capsys.readouterr()
        ids = []
        for _ in range(3):
            refused = me(url, basic("bob", "bob-password"))
            ids.append(refused.headers["x-request-id"])
            assert (refused.status_code, refused.headers["x-guard-reason"]) == (
                403, "identity_conflict",
            )  # fmt: skip
            assert "www-authenticate" not in refused.headers
            assert "administrator must link or free it" in refused.json()["message"]
            assert "user:bob" in refused.json()["message"]
        recorded = audit_rows(url, ids[0])
        assert any(r.get("reason") == "identity_conflict" and r.get("status") == 403
                   for r in recorded), recorded  # fmt: skip
        # The name is freed: bob's next login claims it.
        assert user_cli(monkeypatch, tmp_path, "unlink", "user:bob") == 0
        assert me(url, basic("bob", "bob-password")).status_code == 200
        assert provider.bindings.get("user:bob") is not None
        assert provider.bindings.get("user:bob").stable_id == bob_id  # type: ignore[union-attr]
        assert user_cli(monkeypatch, tmp_path, "unlink", "user:nobody") == 1
        # link binds carol explicitly to her own entry before she ever logged in.
        carol_id = entry_id(slapd, "carol", "carol-password")
        assert user_cli(monkeypatch, tmp_path, "link", "user:carol", "--source", "ldap",
                        "--id", carol_id) == 0  # fmt: skip
        assert me(url, basic("carol", "carol-password")).status_code == 200
        # Tokens and other kinds of subject are not names the command binds.
        assert user_cli(monkeypatch, tmp_path, "unlink", "token:ci") == 1
        assert "only user:<name>" in capsys.readouterr().err

        engine = gateway.tokens.engine
        with engine.connect() as conn:
            texts = conn.execute(sa.select(audit_records.c.record)).scalars().all()
        events = [t for t in texts if '"user_linked"' in t or '"user_unlinked"' in t]
        assert any('"user_linked"' in t and "idp.example.com" in t and '"done"' in t
                   for t in events), events  # fmt: skip
        assert any('"user_unlinked"' in t and "user:bob" in t and '"intent"' in t
                   for t in events), events  # fmt: skip
        assert any('"user_unlinked"' in t and "user:nobody" in t and '"failed"' in t
                   for t in events), events  # fmt: skip


def test_a_burst_costs_one_bind_and_one_claim(slapd: Slapd, tmp_path: Path) -> None:
    engine = build_engine(f"sqlite:///{tmp_path / 'guard.db'}")
    migrate(engine)
    provider = directory(slapd, use_memberof=True)  # login cache off: only the burst is shared
    provider.bindings = IdentityBindings(engine, ttl=60)

    async def burst() -> list[Principal | Refusal | None]:
        credentials = Credentials("basic", "dave-password", "dave")
        return await asyncio.gather(*(provider.authenticate(credentials) for _ in range(8)))

    try:
        assert all(isinstance(r, Principal) for r in asyncio.run(burst()))
        assert (provider.directory.binds, provider.bindings.queries) == (1, 1)
        assert all(isinstance(r, Principal) for r in asyncio.run(burst()))
        assert (provider.directory.binds, provider.bindings.queries) == (2, 1)  # binding cached
    finally:
        provider.close()
        engine.dispose()


def test_the_database_down_is_503_not_a_login(slapd: Slapd) -> None:
    provider = directory(slapd)
    provider.bindings = IdentityBindings(
        build_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1"), ttl=0
    )
    try:
        refused = login(provider, "alice", "alice-password")
        assert isinstance(refused, Refusal) and refused.reason == "identity_unavailable"
    finally:
        provider.close()


@pytest.mark.parametrize("bind", ["search", "direct"])
def test_an_entry_without_the_id_attribute_is_refused(slapd: Slapd, bind: str) -> None:
    from tests.slapd import PEOPLE

    options: dict[str, Any] = {"id_attribute": "employeeNumber"}  # no seeded entry has one
    if bind == "direct":
        options |= {"bind_dn": "", "bind_password": "", "user_base": "",
                    "bind_dn_template": f"uid={{username}},{PEOPLE}"}  # fmt: skip
    provider = directory(slapd, **options)
    try:
        refused = login(provider, "alice", "alice-password")
        assert isinstance(refused, Refusal)
        assert (refused.reason, refused.status) == ("internal_error", 500)
        assert "employeeNumber" in refused.message
        wrong = login(provider, "alice", "wrong")  # a wrong password stays a wrong password
        assert isinstance(wrong, Refusal) and wrong.reason == "invalid_credentials"
    finally:
        provider.close()


def test_the_readme_documents_the_user_commands() -> None:
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    for command in ("user list", "user unlink user:", "user link user:"):
        assert f"mlflow-guard {command}" in readme
    assert "`403 identity_conflict`" in readme and "`ldap.id_attribute`" in readme
