"""The throwaway directory (tests/slapd.py) does what the LDAP provider's tests will rely on,
checked with python-ldap itself: the service account searches and anonymous callers cannot,
search-then-bind works and a wrong password does not, ``memberOf`` and group searches find the
seeded groups, nesting and the loop are visible by following groups, and paging is needed and
works for a user in more groups than one unpaged search returns. The awkward names are there: a
name two entries share, a comma (escaped in the DN, so a filter must escape the backslash) and
non-ASCII letters. TLS: ``ldaps://`` and StartTLS verify with the fixture's CA and fail with an
unknown CA or for a host the certificate does not name."""

from __future__ import annotations

from collections.abc import Iterator

import ldap
import ldap.dn
import pytest
from ldap.controls import SimplePagedResultsControl
from ldap.filter import escape_filter_chars

from tests.slapd import PEOPLE, TWIN_NAME, TWIN_PASSWORD, TWINS, USERS, DirectoryUser, Slapd, group

pytestmark = pytest.mark.ldap

MAX_DEPTH = 10


def connect(url: str) -> ldap.ldapobject.LDAPObject:
    conn = ldap.initialize(url)
    conn.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
    conn.set_option(ldap.OPT_REFERRALS, 0)
    conn.set_option(ldap.OPT_NETWORK_TIMEOUT, 5.0)
    conn.set_option(ldap.OPT_TIMEOUT, 5.0)
    return conn


@pytest.fixture
def service(slapd: Slapd) -> Iterator[ldap.ldapobject.LDAPObject]:
    conn = connect(slapd.url)
    conn.simple_bind_s(slapd.service_dn, slapd.service_password)
    yield conn
    conn.unbind_s()


def paged_search(
    conn: ldap.ldapobject.LDAPObject, base: str, filterstr: str, attrs: list[str], size: int
) -> tuple[list[tuple[str, dict[str, list[bytes]]]], int]:
    """All entries, and how many pages they came in (bounded: a server that never ends the
    cookie chain fails the test instead of hanging it)."""
    control = SimplePagedResultsControl(criticality=True, size=size, cookie=b"")
    entries: list[tuple[str, dict[str, list[bytes]]]] = []
    for pages in range(1, 101):
        msgid = conn.search_ext(base, ldap.SCOPE_SUBTREE, filterstr, attrs, serverctrls=[control])
        _, data, _, controls = conn.result3(msgid)
        entries += [(dn, values) for dn, values in data if dn]  # skip referrals (dn None)
        cookies = [c.cookie for c in controls if c.controlType == control.controlType]
        if not cookies or not cookies[0]:
            return entries, pages
        control.cookie = cookies[0]
    raise AssertionError("paged search did not end in 100 pages")


def groups_of(conn: ldap.ldapobject.LDAPObject, slapd: Slapd, dn: str) -> set[str]:
    filterstr = f"(&(objectClass=groupOfNames)(member={escape_filter_chars(dn)}))"
    entries, _ = paged_search(conn, slapd.groups_base, filterstr, ["1.1"], slapd.size_limit)
    return {gdn for gdn, _ in entries}


def nested_groups(conn: ldap.ldapobject.LDAPObject, slapd: Slapd, dn: str) -> dict[str, int]:
    """Every group reachable from ``dn`` by ``member`` links, with its depth; loops end."""
    seen: dict[str, int] = {}
    frontier = [dn]
    for depth in range(1, MAX_DEPTH + 1):
        found = {g for member in frontier for g in groups_of(conn, slapd, member)}
        frontier = [g for g in sorted(found) if g.lower() not in seen]
        seen.update({g.lower(): depth for g in frontier})
        if not frontier:
            return seen
    raise AssertionError(f"groups of {dn} nest deeper than {MAX_DEPTH}")


def lowered(dns: frozenset[str] | set[str]) -> set[str]:
    return {dn.lower() for dn in dns}


def test_the_directory_starts_quickly_and_listens_on_loopback(slapd: Slapd) -> None:
    assert slapd.url.startswith("ldap://127.0.0.1:")
    assert slapd.process is not None
    assert slapd.process.poll() is None


def test_the_service_account_binds(service: ldap.ldapobject.LDAPObject, slapd: Slapd) -> None:
    assert service.whoami_s() == f"dn:{slapd.service_dn}"


def test_anonymous_callers_read_nothing(slapd: Slapd) -> None:
    conn = connect(slapd.url)
    try:
        with pytest.raises(ldap.INSUFFICIENT_ACCESS):
            conn.search_s(slapd.people_base, ldap.SCOPE_SUBTREE, "(uid=alice)", ["uid"])
    finally:
        conn.unbind_s()


@pytest.mark.parametrize("uid", sorted(USERS))
def test_search_then_bind(service: ldap.ldapobject.LDAPObject, slapd: Slapd, uid: str) -> None:
    user = USERS[uid]
    typed = uid.lower()  # uid matching ignores case; the entry keeps its own spelling
    found = service.search_s(
        slapd.people_base, ldap.SCOPE_SUBTREE, f"(uid={escape_filter_chars(typed)})",
        ["uid", "entryUUID"],
    )  # fmt: skip
    assert [dn for dn, _ in found] == [user.dn]
    attributes = found[0][1]
    assert attributes["uid"] == [uid.encode()]
    assert len(attributes["entryUUID"]) == 1  # the stable id a name is bound to

    conn = connect(slapd.url)
    try:
        conn.simple_bind_s(user.dn, user.password)
        assert conn.whoami_s() == f"dn:{user.dn}"
    finally:
        conn.unbind_s()


def test_entry_uuids_differ(slapd: Slapd) -> None:
    # As the rootdn: other tests add people of their own to this shared directory, so a plain
    # search by anyone else could pass the size limit. Count the seeded ones.
    conn = connect(slapd.url)
    conn.simple_bind_s(slapd.root_dn, slapd.root_password)
    try:
        found = conn.search_s(
            slapd.people_base, ldap.SCOPE_ONELEVEL, "(objectClass=inetOrgPerson)", ["entryUUID"]
        )
    finally:
        conn.unbind_s()
    seeded = {user.dn.lower() for user in USERS.values()}
    uuids = {values["entryUUID"][0] for dn, values in found if dn.lower() in seeded}
    assert len(uuids) == len(USERS)


@pytest.mark.parametrize(
    ("dn", "password", "error"),
    [
        (USERS["alice"].dn, "bob-password", ldap.INVALID_CREDENTIALS),
        (USERS["alice"].dn, "ALICE-PASSWORD", ldap.INVALID_CREDENTIALS),
        (f"uid=nobody,{USERS['alice'].dn.split(',', 1)[1]}", "x", ldap.INVALID_CREDENTIALS),
        # An empty password is an unauthenticated bind: slapd refuses it, other servers (AD)
        # may not, so the gateway must refuse empty passwords itself.
        (USERS["alice"].dn, "", ldap.UNWILLING_TO_PERFORM),
    ],
    ids=["wrong-password", "wrong-case-password", "unknown-dn", "empty-password"],
)
def test_a_bad_bind_is_refused(
    slapd: Slapd, dn: str, password: str, error: type[ldap.LDAPError]
) -> None:
    conn = connect(slapd.url)
    try:
        with pytest.raises(error):
            conn.simple_bind_s(dn, password)
    finally:
        conn.unbind_s()


@pytest.mark.parametrize("uid", sorted(USERS))
def test_memberof_lists_the_direct_groups(
    service: ldap.ldapobject.LDAPObject, slapd: Slapd, uid: str
) -> None:
    user: DirectoryUser = USERS[uid]
    # A base search is one entry, so the size limit never applies to it.
    [(_, attributes)] = service.search_s(user.dn, ldap.SCOPE_BASE, "(objectClass=*)", ["memberOf"])
    memberof = {value.decode() for value in attributes.get("memberOf", [])}
    assert lowered(memberof) == lowered(user.direct_groups)


@pytest.mark.parametrize("uid", sorted(USERS))
def test_group_search_follows_nesting(
    service: ldap.ldapobject.LDAPObject, slapd: Slapd, uid: str
) -> None:
    user = USERS[uid]
    assert lowered(groups_of(service, slapd, user.dn)) == lowered(user.direct_groups)
    assert set(nested_groups(service, slapd, user.dn)) == lowered(user.all_groups)


def test_nesting_depths_and_the_loop(service: ldap.ldapobject.LDAPObject, slapd: Slapd) -> None:
    assert nested_groups(service, slapd, USERS["alice"].dn) == {
        group("mlflow-admins").lower(): 1,
        group("mlflow-users").lower(): 2,
        group("all-staff").lower(): 3,
    }
    assert nested_groups(service, slapd, USERS["carol"].dn) == {
        group("loop-a").lower(): 1,
        group("loop-b").lower(): 2,
    }


def test_an_unescaped_dn_breaks_the_group_filter(
    service: ldap.ldapobject.LDAPObject, slapd: Slapd
) -> None:
    dn = USERS["erin"].dn
    assert "(" in dn
    with pytest.raises(ldap.FILTER_ERROR):
        service.search_s(slapd.groups_base, ldap.SCOPE_SUBTREE, f"(member={dn})", ["1.1"])
    assert lowered(groups_of(service, slapd, dn)) == {
        group("admins").lower(), group("risk team").lower(),
    }  # fmt: skip


def test_group_names_differ_only_in_case(service: ldap.ldapobject.LDAPObject, slapd: Slapd) -> None:
    found = service.search_s(slapd.groups_base, ldap.SCOPE_SUBTREE, "(cn=analysts)", ["cn"])
    assert sorted(values["cn"][0] for _, values in found) == [b"Analysts", b"analysts"]
    [(_, risk)] = service.search_s(slapd.groups_base, ldap.SCOPE_SUBTREE, "(cn=risk team)", ["cn"])
    assert risk["cn"] == [b"Risk Team"]


def test_many_groups_take_paging(service: ldap.ldapobject.LDAPObject, slapd: Slapd) -> None:
    user = USERS["paula"]
    filterstr = f"(member={escape_filter_chars(user.dn)})"
    assert len(user.direct_groups) > slapd.size_limit
    with pytest.raises(ldap.SIZELIMIT_EXCEEDED):
        service.search_s(slapd.groups_base, ldap.SCOPE_SUBTREE, filterstr, ["cn"])
    entries, pages = paged_search(service, slapd.groups_base, filterstr, ["cn"], size=10)
    assert {dn for dn, _ in entries} == user.direct_groups
    assert pages == 3
    entries, pages = paged_search(service, slapd.groups_base, filterstr, ["cn"], size=1000)
    assert (len(entries), pages) == (len(user.direct_groups), 1)


def test_a_name_two_entries_share(service: ldap.ldapobject.LDAPObject, slapd: Slapd) -> None:
    found = service.search_s(slapd.people_base, ldap.SCOPE_SUBTREE, f"(uid={TWIN_NAME})", ["uid"])
    assert sorted(dn for dn, _ in found) == sorted(TWINS)
    for dn in TWINS:  # both would accept the password: only refusing the name is safe
        conn = connect(slapd.url)
        try:
            conn.simple_bind_s(dn, TWIN_PASSWORD)
        finally:
            conn.unbind_s()


def test_a_comma_in_a_user_name(service: ldap.ldapobject.LDAPObject, slapd: Slapd) -> None:
    user = USERS["lee,kim"]
    found = service.search_s(slapd.people_base, ldap.SCOPE_SUBTREE, "(uid=lee,kim)", ["uid"])
    assert found == [(user.dn, {"uid": [b"lee,kim"]})]
    # The DN written by escaping the name (a bind DN template does this) is the same entry.
    conn = connect(slapd.url)
    try:
        conn.simple_bind_s(f"uid={ldap.dn.escape_dn_chars('lee,kim')},{PEOPLE}", user.password)
        assert conn.whoami_s().lower() == f"dn:{user.dn}".lower()
    finally:
        conn.unbind_s()
    # In a group filter the DN's backslash must be escaped in turn: unescaped, "\2C" is read as
    # the filter's own escape for "," and names another (missing) entry.
    assert "\\" in user.dn
    assert service.search_s(slapd.groups_base, ldap.SCOPE_SUBTREE, f"(member={user.dn})") == []
    assert lowered(groups_of(service, slapd, user.dn)) == lowered(user.direct_groups)


def test_non_ascii_in_a_user_name(service: ldap.ldapobject.LDAPObject, slapd: Slapd) -> None:
    user = USERS["zoë.müller"]
    for typed in ["zoë.müller", "Zoë.Müller"]:  # uid matching ignores case, beyond ASCII too
        found = service.search_s(
            slapd.people_base, ldap.SCOPE_SUBTREE, f"(uid={escape_filter_chars(typed)})", ["uid"]
        )
        assert found == [(user.dn, {"uid": ["zoë.müller".encode()]})]
    [(_, attributes)] = service.search_s(
        group("mlflow-users"), ldap.SCOPE_BASE, "(objectClass=*)", ["member"]
    )
    assert user.dn.encode() in attributes["member"]


def tls_connect(url: str, ca_file: str, start_tls: bool) -> ldap.ldapobject.LDAPObject:
    """A connection verified against ``ca_file`` (NEWCTX last: it applies the options before)."""
    conn = connect(url)
    conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
    conn.set_option(ldap.OPT_X_TLS_CACERTFILE, ca_file)
    conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
    if start_tls:
        conn.start_tls_s()
    return conn


@pytest.mark.parametrize("start_tls", [False, True], ids=["ldaps", "start-tls"])
@pytest.mark.parametrize(
    ("host", "ca", "works"),
    [("127.0.0.1", "right", True), ("127.0.0.1", "wrong", False), ("localhost", "right", False)],
    ids=["right-ca", "unknown-ca", "host-mismatch"],
)
def test_tls_verifies_the_ca_and_the_host(
    slapd: Slapd, start_tls: bool, host: str, ca: str, works: bool
) -> None:
    """The server certificate names IP:127.0.0.1 and DNS:ldap.example.test; for ``localhost``
    libldap checks against the machine's FQDN, so it is a host-name mismatch."""
    url = (slapd.url if start_tls else slapd.ldaps_url).replace("127.0.0.1", host)
    ca_file = slapd.ca_file if ca == "right" else slapd.wrong_ca_file
    if works:
        conn = tls_connect(url, ca_file, start_tls)
        try:
            conn.simple_bind_s(slapd.service_dn, slapd.service_password)
            assert conn.whoami_s() == f"dn:{slapd.service_dn}"
        finally:
            conn.unbind_s()
        return
    # StartTLS fails with CONNECT_ERROR; ldaps:// like a server that is down.
    error = ldap.CONNECT_ERROR if start_tls else ldap.SERVER_DOWN
    with pytest.raises(error):
        tls_connect(url, ca_file, start_tls).simple_bind_s(slapd.service_dn, slapd.service_password)
