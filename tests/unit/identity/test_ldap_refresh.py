"""``LdapProvider.refresh``: a browser session's groups read again by the service account, without
the user's password. Against a throwaway slapd of its own (these tests change the directory):
alice's refresh gives her login's groups; removed from a group, she no longer has it (nor the
groups it nested in); a deleted entry, or a new entry under the same name, ends the session
(None); the directory stopped is 503 ``identity_unavailable`` (the caller keeps the old groups).
Against the shared slapd: every seeded user's refresh matches their login, and a name two
entries share ends the session. AD's disabled flag and the pool's dropped connections use a
recording connection; a directory without a service account cannot refresh at all."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import ldap
import pytest

from guard.errors import Refusal
from guard.identity.base import Credentials, Principal
from guard.identity.ldap import LdapConfig, LdapProvider
from tests.slapd import GROUPS, PEOPLE, TWIN_NAME, USERS, Slapd, free_port, group

pytestmark = pytest.mark.ldap

MODES: dict[str, dict[str, Any]] = {
    "memberof": {"use_memberof": True},
    "group-search": {"group_base": GROUPS, "page_size": 5},
}


def provider(slapd: Slapd, **options: Any) -> LdapProvider:
    config: dict[str, Any] = {
        "urls": (slapd.url,), "bind_dn": slapd.service_dn,
        "bind_password": slapd.service_password, "user_base": PEOPLE, "cache_ttl": 0.0,
        "connect_timeout": 2.0, "timeout": 2.0, "use_memberof": True,
    }  # fmt: skip
    return LdapProvider(LdapConfig(**(config | options)))


def login(p: LdapProvider, uid: str) -> Principal:
    result = asyncio.run(p.authenticate(Credentials("basic", USERS[uid].password, uid)))
    assert isinstance(result, Principal), result
    return result


def refresh(p: LdapProvider, principal: Principal) -> Principal | Refusal | None:
    source, _, stable_id = principal.identity.partition(":")
    assert source == "ldap" and stable_id
    return asyncio.run(p.refresh(principal.name, stable_id))


@pytest.fixture
def own_slapd() -> Iterator[Slapd]:
    """A directory for one test to change (or stop) without disturbing the shared one."""
    server = Slapd(free_port(), tls=False)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_removing_someone_from_a_group_takes_effect(own_slapd: Slapd, mode: str) -> None:
    p = provider(own_slapd, **MODES[mode])
    try:
        alice = login(p, "alice")
        fresh = refresh(p, alice)
        assert fresh == alice  # same shape as a login's: subject, groups, identity
        assert isinstance(fresh, Principal) and fresh.subject.groups == alice.subject.groups
        assert "group:ldap/mlflow-admins" in alice.groups
        # groupOfNames needs a member: bob takes alice's place.
        own_slapd.modify(
            f"dn: {group('mlflow-admins')}\nchangetype: modify\nreplace: member\n"
            f"member: {USERS['bob'].dn}\n"
        )
        later = refresh(p, alice)
        assert isinstance(later, Principal)
        # mlflow-users and all-staff came only through mlflow-admins: gone with it.
        assert later.groups == ()
        assert (later.subject, later.name, later.identity) == (
            alice.subject, alice.name, alice.identity,
        )  # fmt: skip
        own_slapd.modify(
            f"dn: {group('Risk Team')}\nchangetype: modify\nadd: member\n"
            f"member: {USERS['alice'].dn}\n"
        )
        added = refresh(p, alice)
        assert isinstance(added, Principal) and added.groups == ("group:ldap/risk%20team",)
    finally:
        p.close()


def test_a_deleted_or_replaced_entry_ends_the_session(own_slapd: Slapd) -> None:
    p = provider(own_slapd)
    try:
        bob, carol = login(p, "bob"), login(p, "carol")
        own_slapd.modify(f"dn: {USERS['bob'].dn}\nchangetype: delete\n")
        assert refresh(p, bob) is None
        # carol's entry deleted and a new one made with the same name: another identity.
        own_slapd.modify(f"dn: {USERS['carol'].dn}\nchangetype: delete\n")
        own_slapd.modify(
            f"dn: {USERS['carol'].dn}\nobjectClass: inetOrgPerson\nuid: carol\ncn: carol\n"
            "sn: carol\nuserPassword: carol-password\n",
            add=True,
        )
        assert refresh(p, carol) is None
        assert refresh(p, login(p, "carol")) is not None  # the new entry's own session is fine
    finally:
        p.close()


def test_the_directory_stopped_is_unavailable_not_the_end(own_slapd: Slapd) -> None:
    p = provider(own_slapd)
    try:
        alice = login(p, "alice")
        own_slapd.stop()
        result = refresh(p, alice)
        assert isinstance(result, Refusal), result
        assert (result.status, result.reason) == (503, "identity_unavailable")
    finally:
        p.close()


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("uid", sorted(USERS))
def test_every_seeded_user_refreshes_to_their_login(slapd: Slapd, mode: str, uid: str) -> None:
    p = provider(slapd, **MODES[mode])
    try:
        principal = login(p, uid)
        binds = p.directory.binds
        assert refresh(p, principal) == principal
        assert p.directory.binds == binds  # no password, no user bind
    finally:
        p.close()


def test_a_name_two_entries_share_ends_the_session(slapd: Slapd) -> None:
    p = provider(slapd)
    try:
        assert asyncio.run(p.refresh(TWIN_NAME, "any-id")) is None
        assert asyncio.run(p.refresh("*", "any-id")) is None  # filter-escaped: no such name
        assert asyncio.run(p.refresh("nobody", "any-id")) is None
    finally:
        p.close()


def test_a_wrong_stable_id_ends_the_session(slapd: Slapd) -> None:
    p = provider(slapd)
    try:
        alice = login(p, "alice")
        assert asyncio.run(p.refresh(alice.name, "another-entrys-id")) is None
    finally:
        p.close()


def test_without_a_service_account_a_session_ends_at_its_refresh(slapd: Slapd) -> None:
    p = provider(
        slapd, bind_dn="", bind_password="", user_base="",
        bind_dn_template=f"uid={{username}},{PEOPLE}",
    )  # fmt: skip
    try:
        alice = login(p, "alice")
        assert refresh(p, alice) is None
        assert p.directory.binds == 1  # the login's; the refresh asked nothing
    finally:
        p.close()


class ActiveDirectoryConnection:
    """A pooled service connection answering one AD entry with its userAccountControl."""

    def __init__(self, control: bytes) -> None:
        self.control = control
        self.closed = False

    def search_ext_s(self, base: str, scope: int, *args: Any, **kwargs: Any) -> list[Any]:
        if base == PEOPLE:
            return [(f"CN=Alice,{PEOPLE}", {
                "sAMAccountName": [b"alice"], "objectGUID": [bytes(range(16))],
                "userAccountControl": [self.control], "memberOf": [],
            })]  # fmt: skip
        raise ldap.NO_SUCH_OBJECT({"desc": "No such object"})

    def unbind_s(self) -> None:
        self.closed = True


GUID = "03020100-0504-0706-0809-0a0b0c0d0e0f"  # bytes(range(16)) read as AD's GUID


@pytest.mark.parametrize(
    ("control", "ends"),
    [(b"512", False), (b"514", True), (b"66050", True), (b"66048", False)],
    ids=["normal", "disabled", "disabled-no-expiry", "normal-no-expiry"],
)
def test_a_disabled_active_directory_account_ends_the_session(control: bytes, ends: bool) -> None:
    p = LdapProvider(
        LdapConfig(
            urls=("ldaps://dc1.corp.example",), bind_dn="CN=svc", bind_password="x",
            user_base=PEOPLE, user_filter="(sAMAccountName={username})",
            user_attribute="sAMAccountName", id_attribute="objectGUID", use_memberof=True,
        )
    )  # fmt: skip
    p.directory._pool.append(ActiveDirectoryConnection(control))
    result = asyncio.run(p.refresh("alice", GUID))
    if ends:
        assert result is None
    else:
        assert isinstance(result, Principal) and result.identity == f"ldap:{GUID}"


class DroppedConnection:
    """A pooled connection whose server went away (restarted) in the meantime."""

    closed = False

    def search_ext_s(self, *args: object, **kwargs: object) -> None:
        raise ldap.SERVER_DOWN({"desc": "Can't contact LDAP server"})

    def unbind_s(self) -> None:
        self.closed = True


def test_dropped_pooled_connections_are_replaced(slapd: Slapd) -> None:
    p = provider(slapd, pool_size=2)
    try:
        alice = login(p, "alice")
        dropped = [DroppedConnection(), DroppedConnection()]
        p.directory.close()
        p.directory._pool.extend(dropped)
        assert refresh(p, alice) == alice
        assert all(c.closed for c in dropped)
    finally:
        p.close()


def test_refreshes_share_the_logins_worker_limit(slapd: Slapd) -> None:
    """A burst of refreshes never runs more directory calls at once than pool_size."""
    p = provider(slapd, pool_size=2)
    running, most = 0, 0
    lookup = p.directory.lookup

    def counted(name: str) -> object:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            return lookup(name)
        finally:
            running -= 1

    p.directory.lookup = counted  # type: ignore[method-assign]

    async def burst() -> list[Principal | Refusal | None]:
        alice = await p.authenticate(Credentials("basic", "alice-password", "alice"))
        assert isinstance(alice, Principal)
        stable_id = alice.identity.partition(":")[2]
        return await asyncio.gather(*(p.refresh("alice", stable_id) for _ in range(8)))

    try:
        results = asyncio.run(burst())
        assert all(isinstance(r, Principal) for r in results)
        assert p._threads.total_tokens == 2
        assert 1 <= most <= 2
    finally:
        p.close()
