"""``ldap.ad_in_chain``: Active Directory's in-chain matching rule finds direct and nested groups
in one search. OpenLDAP does not implement the rule, so the query itself is checked against a
recording connection (the filter with the DN filter-escaped, the base, paging still applied, one
search instead of a walk), and the real slapd shows why the directory must first prove it
implements the rule: it answers such a filter with no groups, which would log people in with
fewer groups; instead the login is 503 ``identity_unavailable`` and the log says why."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ldap
import pytest
from ldap.controls import SimplePagedResultsControl

from guard.app import build_ldap_provider
from guard.config import load_settings
from guard.errors import Refusal
from guard.identity.base import Credentials
from guard.identity.ldap import Directory, DirectoryUnavailable, LdapConfig, LdapProvider
from tests.slapd import GROUPS, PEOPLE, USERS, Slapd

USER_DN = "cn=Erin Example (contractor),ou=people,dc=example,dc=org"
ESCAPED = "cn=Erin Example \\28contractor\\29,ou=people,dc=example,dc=org"
AD_ROOT = {"supportedCapabilities": [b"1.2.840.113556.1.4.800", b"1.2.840.113556.1.4.1670"]}


class RecordingConnection:
    """A service connection answering like Active Directory from a table, recording every
    search: the user's entry, the root DSE, the schema, and group searches whose pages are
    ``pages`` (a cookie links each page to the next)."""

    def __init__(
        self,
        pages: list[list[tuple[str, dict[str, list[bytes]]]]],
        root: dict[str, list[bytes]] | None = None,
        schema: dict[str, list[bytes]] | None = None,
    ) -> None:
        self.pages = pages
        self.root = AD_ROOT if root is None else root
        self.schema = schema or {}
        self.searches: list[dict[str, Any]] = []
        self._results: dict[int, tuple[list[Any], bytes]] = {}

    def search_ext_s(self, base: str, scope: int, filterstr: str = "(objectClass=*)",
                     attrlist: list[str] | None = None, **kwargs: Any) -> list[Any]:  # fmt: skip
        self.searches.append(
            {"base": base, "scope": scope, "filter": filterstr, "paged": None, **kwargs}
        )
        if base == "" and scope == ldap.SCOPE_BASE:
            return [("", self.root)]
        if base == "cn=Aggregate,cn=Schema" and scope == ldap.SCOPE_BASE:
            return [(base, self.schema)]
        if base == PEOPLE:
            return [(USER_DN, {"sAMAccountName": [b"erin"], "objectGUID": [b"\x01" * 16]})]
        return [entry for page in self.pages for entry in page]  # one unpaged group search

    def search_ext(self, base: str, scope: int, filterstr: str, attrlist: list[str],
                   serverctrls: list[Any]) -> int:  # fmt: skip
        [control] = serverctrls
        assert isinstance(control, SimplePagedResultsControl)
        page = int(control.cookie or b"0")
        self.searches.append({"base": base, "scope": scope, "filter": filterstr,
                              "paged": (control.size, control.cookie)})  # fmt: skip
        cookie = str(page + 1).encode() if page + 1 < len(self.pages) else b""
        self._results[len(self.searches)] = (self.pages[page], cookie)
        return len(self.searches)

    def result3(self, msgid: int) -> tuple[int, list[Any], int, list[Any]]:
        data, cookie = self._results.pop(msgid)
        return ldap.RES_SEARCH_RESULT, data, msgid, [SimplePagedResultsControl(True, 0, cookie)]

    def simple_bind_s(self, dn: str, password: str) -> None:
        pass

    def unbind_s(self) -> None:
        pass


def group(cn: str) -> tuple[str, dict[str, list[bytes]]]:
    return f"CN={cn},OU=Groups,DC=corp,DC=example", {"cn": [cn.encode()]}


def ad_directory(connection: RecordingConnection, **options: Any) -> Directory:
    config: dict[str, Any] = {
        "urls": ("ldaps://dc1.corp.example",), "bind_dn": "CN=svc", "bind_password": "x",
        "user_base": PEOPLE, "user_filter": "(sAMAccountName={username})",
        "user_attribute": "sAMAccountName", "id_attribute": "objectGUID",
        "group_base": "OU=Groups,DC=corp,DC=example", "ad_in_chain": True, "page_size": 2,
        "nested_groups": 0,
    }  # fmt: skip
    directory = Directory(LdapConfig(**(config | options)))
    directory._pool.append(connection)
    return directory


def group_searches(connection: RecordingConnection) -> list[dict[str, Any]]:
    return [s for s in connection.searches if s["base"].startswith("OU=Groups")]


def test_one_paged_in_chain_search_finds_direct_and_nested_groups() -> None:
    pages = [[group("Risk Team"), group("All Staff")], [group("Domain Users")]]
    connection = RecordingConnection(pages)
    directory = ad_directory(connection)
    user = directory.login("erin", "erin-password")
    assert user is not None
    # nested_groups is 0, yet the groups the rule resolved through nesting are all there.
    assert user.groups == ("All Staff", "Domain Users", "Risk Team")
    searches = group_searches(connection)
    assert [s["filter"] for s in searches] == [f"(member:1.2.840.113556.1.4.1941:={ESCAPED})"] * 2
    assert {(s["base"], s["scope"]) for s in searches} == {
        ("OU=Groups,DC=corp,DC=example", ldap.SCOPE_SUBTREE)
    }
    assert [s["paged"] for s in searches] == [(2, b""), (2, b"1")]  # the cookie is followed
    # Nothing else searched for groups (no walk), and the root DSE was read once.
    assert [s["base"] for s in connection.searches] == [
        PEOPLE,
        "",
        *["OU=Groups,DC=corp,DC=example"] * 2,
    ]
    user = directory.login("erin", "erin-password")
    assert [s["base"] for s in connection.searches].count("") == 1


def test_without_paging_the_in_chain_search_is_one_unpaged_search() -> None:
    connection = RecordingConnection([[group("Risk Team")], [group("All Staff")]])
    user = ad_directory(connection, page_size=0).login("erin", "erin-password")
    assert user is not None and user.groups == ("All Staff", "Risk Team")
    [search] = group_searches(connection)
    assert search["filter"] == f"(member:1.2.840.113556.1.4.1941:={ESCAPED})"
    assert search["paged"] is None


def test_a_directory_naming_the_rule_in_its_schema_is_trusted() -> None:
    """Not AD (no capability), but the rule is in its schema (389-ds has an in-chain plugin)."""
    root = {"subschemaSubentry": [b"cn=Aggregate,cn=Schema"]}
    schema = {"matchingRules": [
        b"( 2.5.13.1 NAME 'distinguishedNameMatch' SYNTAX 1.3.6.1.4.1.1466.115.121.1.12 )",
        b"( 1.2.840.113556.1.4.1941 NAME 'inchainMatch' SYNTAX 1.3.6.1.4.1.1466.115.121.1.12 )",
    ]}  # fmt: skip
    connection = RecordingConnection([[group("Risk Team")]], root=root, schema=schema)
    user = ad_directory(connection).login("erin", "erin-password")
    assert user is not None and user.groups == ("Risk Team",)


@pytest.mark.parametrize(
    "schema",
    [{}, {"matchingRules": [b"( 1.2.840.113556.1.4.19410 NAME 'lookalike' SYNTAX 1.2 )"]}],
    ids=["no-rules", "a-longer-oid"],
)
def test_a_directory_that_does_not_show_the_rule_gets_no_in_chain_search(
    schema: dict[str, list[bytes]],
) -> None:
    root = {"supportedCapabilities": [b"1.3.6.1.4.1.4203.1.5.1"],
            "subschemaSubentry": [b"cn=Aggregate,cn=Schema"]}  # fmt: skip
    connection = RecordingConnection([[group("Risk Team")]], root=root, schema=schema)
    with pytest.raises(DirectoryUnavailable, match="in-chain"):
        ad_directory(connection).login("erin", "erin-password")
    assert group_searches(connection) == []


# -- the real slapd ---------------------------------------------------------------------------


@pytest.mark.ldap
def test_openldap_answers_the_rule_with_no_groups_so_the_login_fails_instead(
    slapd: Slapd, caplog: pytest.LogCaptureFixture
) -> None:
    alice = USERS["alice"]
    conn = ldap.initialize(slapd.url)
    try:
        conn.simple_bind_s(slapd.service_dn, slapd.service_password)
        # The danger: slapd takes the filter and finds nothing (the rule is "undefined").
        in_chain = f"(member:1.2.840.113556.1.4.1941:={alice.dn})"
        assert conn.search_s(GROUPS, ldap.SCOPE_SUBTREE, in_chain, ["cn"]) == []
        assert conn.search_s(GROUPS, ldap.SCOPE_SUBTREE, f"(member={alice.dn})", ["cn"]) != []
    finally:
        conn.unbind_s()
    caplog.set_level(logging.INFO, logger="guard.identity.ldap")
    provider = LdapProvider(
        LdapConfig(
            urls=(slapd.url,), bind_dn=slapd.service_dn, bind_password=slapd.service_password,
            user_base=PEOPLE, group_base=GROUPS, ad_in_chain=True, cache_ttl=0.0,
        )
    )  # fmt: skip
    try:
        credentials = Credentials("basic", alice.password, "alice")
        result = asyncio.run(provider.authenticate(credentials))
        assert isinstance(result, Refusal), result
        assert (result.status, result.reason) == (503, "identity_unavailable")
        assert provider.directory._pool == []  # that connection was not kept
    finally:
        provider.close()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("does not support the in-chain matching rule" in m for m in messages), messages


def test_ad_in_chain_needs_a_group_base_and_no_memberof() -> None:
    base = {"ldap.urls": ["ldaps://dc1.corp.example"], "ldap.bind_dn_template": "{username}"}
    problem = (
        "ldap.ad_in_chain: set group_base (the in-chain search runs there) and turn "
        "use_memberof off"
    )
    assert problem in load_settings(base | {"ldap.ad_in_chain": "true"}, {}, None).problems
    with_memberof = base | {"ldap.ad_in_chain": "true", "ldap.group_base": "OU=Groups",
                            "ldap.use_memberof": "true"}  # fmt: skip
    assert problem in load_settings(with_memberof, {}, None).problems
    fine = base | {"ldap.ad_in_chain": "true", "ldap.group_base": "OU=Groups"}
    assert load_settings(fine, {}, None).problems == []
    env = {"MLFLOW_GUARD_LDAP_AD_IN_CHAIN": "true", "MLFLOW_GUARD_LDAP_GROUP_BASE": "OU=Groups"}
    assert load_settings(base, env, None).settings.ldap.ad_in_chain is True
    provider = build_ldap_provider(load_settings(fine, {}, None).settings)
    assert provider is not None
    try:
        assert provider.config.ad_in_chain is True
    finally:
        provider.close()
