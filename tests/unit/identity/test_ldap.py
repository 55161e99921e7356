"""The LDAP provider (guard/identity/ldap.py) against the throwaway slapd (tests/slapd.py): every
seeded user through a real gateway, the same answer for an unknown user and a wrong password,
gateway tokens and empty passwords kept away from the directory, failover, the login cache,
group grants that apply and an LDAP group ``admins`` that does not escalate, filter injection,
and the three ways of finding groups (memberOf, a group search with or without paging, a direct
bind without a service account)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import ldap
import pytest
from starlette.types import Receive, Scope, Send

from guard.admin.governance import Governance
from guard.app import Gateway, build_gateway
from guard.authz.casbin_adapter import default_policy_text
from guard.authz.engine import PolicyIndex
from guard.authz.policy import PolicySet, parse_lines
from guard.config import load_settings
from guard.errors import Refusal
from guard.identity.base import Credentials, DirectorySubject, Principal
from guard.identity.ldap import LdapConfig, LdapProvider, subject_name, typed_name
from tests.conftest import free_port
from tests.servers import ServerThread, read_request_body, send_response
from tests.slapd import PEOPLE, USERS, Slapd

BOOTSTRAP = "mlg_" + "b" * 43
POLICY = [
    "p, group:ldap/risk%20team, promoter, model:fraud-*",
    "g, group:ldap/mlflow-admins, group:ldap-operators",
    "p, group:ldap-operators, viewer, model:ops-*",
]


def expected_groups(uid: str) -> list[str]:
    names = {dn.split(",", 1)[0].split("=", 1)[1] for dn in USERS[uid].all_groups}
    return sorted({f"group:ldap/{subject_name(n)}" for n in names})


def basic(name: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{name}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def dead_url() -> str:
    return f"ldap://127.0.0.1:{free_port()}"  # nothing listens: connection refused


# -- the naming rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("alice", "alice"),
        ("Risk Team", "risk%20team"),
        ("Frank.Ops", "frank.ops"),
        ("Analysts", "analysts"),
        ("analysts", "analysts"),
        ("a@b-c_d+e", "a@b-c_d%2Be"),
        ("50%", "50%25"),  # % is encoded too: "50%25" cannot also come from "50%"+"25"
        ("Zoë/ops,x", "zo%C3%AB%2Fops%2Cx"),
    ],
)
def test_subject_names(value: str, name: str) -> None:
    assert subject_name(value) == name


def test_names_differing_only_in_case_are_one_subject() -> None:
    assert subject_name("Analysts") == subject_name("analysts") == subject_name("ANALYSTS")


@pytest.mark.parametrize(
    ("typed", "forms", "name"),
    [
        ("alice", ("plain",), "alice"),
        ("EXAMPLE\\alice", ("plain",), None),
        ("EXAMPLE\\alice", ("domain",), "alice"),
        ("alice@example.org", ("plain", "domain"), None),
        ("alice@example.org", ("upn",), "alice"),
        ("alice", ("upn",), None),
        ("\\alice", ("domain",), None),
        ("alice@", ("upn",), None),
        ("A\\B\\alice", ("domain",), None),
        ("", ("plain",), None),
    ],
)
def test_name_forms(typed: str, forms: tuple[str, ...], name: str | None) -> None:
    assert typed_name(typed, forms) == name


# -- directory groups in decisions --------------------------------------------------------


def test_a_directory_group_grant_applies_and_admins_does_not_escalate() -> None:
    shipped = PolicySet.from_csv(default_policy_text()).rules()  # grants group:admins admin
    index = PolicyIndex(PolicySet.from_rules([*shipped, *parse_lines(POLICY)]))
    assert index.decide("group:admins", "model:anything", "read").allowed
    bob = DirectorySubject("user:bob", ("group:ldap/risk%20team",))
    assert index.decide(bob, "model:fraud-x", "promote").allowed
    assert not index.decide("user:bob", "model:fraud-x", "promote").allowed  # a plain string
    assert not index.decide(bob, "model:other", "read").allowed
    erin = DirectorySubject("user:erin", ("group:ldap/admins",))
    assert not index.decide(erin, "model:anything", "read").allowed
    assert not index.unconditional(erin, "model", "read")
    assert "group:admins" not in index.subjects_of(erin)
    # Only source-qualified names are honoured, whatever a subject carries.
    smuggled = DirectorySubject("user:mallory", ("group:admins", "user:root"))
    assert index.subjects_of(smuggled) == ("user:mallory",)
    assert not index.decide(smuggled, "model:anything", "read").allowed
    # A directory group may be mapped onto a policy group by a g row.
    alice = DirectorySubject("user:alice", ("group:ldap/mlflow-admins",))
    assert index.decide(alice, "model:ops-1", "read").allowed
    # The same subject with other groups is answered for those groups (no stale cache).
    assert index.decide(DirectorySubject("user:bob", ()), "model:fraud-x", "read").allowed is False


# -- settings -------------------------------------------------------------------------------


def test_ldap_settings_report_every_problem(tmp_path: Path) -> None:
    problems = load_settings(
        {
            "ldap.urls": ["ldap://ldap.example.com", "http://x", "ldaps://ad.corp.example"],
            "ldap.bind_dn": "cn=svc",
            "ldap.name_forms": ["plain", "kerberos"],
            "ldap.group_base": "ou=groups",
            "ldap.group_filter": "(member=x)",
            "ldap.ca_file": str(tmp_path / "missing.pem"),
            "ldap.page_size": "-1",
        },
        {},
        None,
    ).problems
    text = "\n".join(problems)
    for needle in [
        "ldap.urls: 'http://x' is not an LDAP URL",
        "ldap.name_forms: kerberos: not one of plain, domain, upn",
        "ldap.user_base: required with bind_dn",
        "ldap.bind_password: set it (MLFLOW_GUARD_LDAP_BIND_PASSWORD)",
        "ldap.group_filter: must contain {dn}",
        "ldap.ca_file:",
        "ldap.page_size: must not be negative",
        "ldap.urls: ldap://ldap.example.com would send passwords in clear",
    ]:
        assert needle in text, text
    assert "ad.corp.example" not in text  # ldaps:// is fine
    template_only = load_settings(
        {"ldap.urls": ["ldap://127.0.0.1:389"], "ldap.bind_dn_template": "uid=x"}, {}, None
    ).problems
    assert template_only == [
        "ldap.bind_dn: set a service account (bind_dn, user_base) or a bind_dn_template "
        "containing {username}"
    ]


def test_the_bind_password_comes_from_the_environment(slapd: Slapd) -> None:
    env = {"MLFLOW_GUARD_LDAP_BIND_PASSWORD": slapd.service_password}
    loaded = load_settings(
        {"ldap.urls": [slapd.url], "ldap.bind_dn": slapd.service_dn, "ldap.user_base": PEOPLE},
        env,
        None,
    )
    assert loaded.problems == []
    assert loaded.settings.ldap.bind_password == slapd.service_password


# -- through a real gateway -----------------------------------------------------------------


class FakeMlflow:
    """Answers every lookup: a registered model exists under any name asked for."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_request_body(receive)
        if scope["path"] == "/version":
            await send_response(send, 200, b"3.17.2")
            return
        payload: dict[str, Any] = {}
        if scope["path"].endswith("/registered-models/get"):
            name = parse_qs(scope["query_string"].decode()).get("name", [""])[0]
            payload = {"registered_model": {"name": name}}
        await send_response(send, 200, json.dumps(payload).encode())


def gateway_settings(slapd: Slapd, data: Path, **extra: object) -> Any:
    flags: dict[str, object] = {
        "storage.data_dir": str(data),
        "ldap.urls": [dead_url(), slapd.url],  # the first is dead: every login fails over
        "ldap.bind_dn": slapd.service_dn,
        "ldap.bind_password": slapd.service_password,
        "ldap.user_base": PEOPLE,
        "ldap.use_memberof": "true",
        # These tests log in wrongly as one name many times; the per-user limit has its own
        # tests (test_throttle.py).
        "gateway.failed_login_user_limit": "0",
        **extra,
    }
    loaded = load_settings(flags, {}, None)
    assert loaded.problems == []
    return loaded.settings


def run_gateway(settings: Any) -> Iterator[tuple[Gateway, str]]:
    env = {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": BOOTSTRAP, "MLFLOW_GUARD_SECRET_KEY": "k" * 40}
    gateway = build_gateway(settings, env)
    with ServerThread(gateway) as server:
        Governance(gateway.tokens, gateway.policies.store).change("test", add=parse_lines(POLICY))
        deadline = time.monotonic() + 10
        while gateway.policies.index.version != gateway.policies.store.version():
            assert time.monotonic() < deadline, "the policy change was not picked up"
            time.sleep(0.05)
        yield gateway, server.url


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with ServerThread(FakeMlflow(), lifespan="off") as server:
        yield server.url


@pytest.fixture(scope="module")
def running(
    slapd: Slapd, upstream: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, str]]:
    data = tmp_path_factory.mktemp("ldap-gateway")
    yield from run_gateway(gateway_settings(slapd, data, **{"upstream.url": upstream}))


def me(url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.get(f"{url}/guard/api/me", headers=headers, timeout=10)


def model(url: str, name: str, headers: dict[str, str]) -> httpx.Response:
    path = "/api/2.0/mlflow/registered-models/get"
    return httpx.get(f"{url}{path}", params={"name": name}, headers=headers, timeout=10)


pytestmark = pytest.mark.ldap


@pytest.mark.parametrize("uid", sorted(USERS))
def test_every_seeded_user_logs_in_with_basic(running: tuple[Gateway, str], uid: str) -> None:
    _, url = running
    user = USERS[uid]
    response = me(url, basic(uid.lower(), user.password))  # typed in lower case
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["subject"] == f"user:{subject_name(uid)}"  # the entry's spelling, folded
    assert body["auth_method"] == "ldap"
    directory_groups = [g for g in body["groups"] if g.startswith("group:ldap/")]
    assert directory_groups == expected_groups(uid)
    assert body["policy_administrator"] is False


def test_the_expected_names_of_the_tricky_users(running: tuple[Gateway, str]) -> None:
    _, url = running
    bob = me(url, basic("bob", "bob-password")).json()
    assert "group:ldap/risk%20team" in bob["groups"]
    dave = me(url, basic("dave", "dave-password")).json()
    assert [g for g in dave["groups"] if g.startswith("group:ldap/")] == ["group:ldap/analysts"]
    frank = me(url, basic("FRANK.OPS", "frank-password")).json()
    assert frank["subject"] == "user:frank.ops"
    carol = me(url, basic("carol", "carol-password")).json()  # the loop ends
    assert [g for g in carol["groups"] if g.startswith("group:ldap/")] == [
        "group:ldap/loop-a", "group:ldap/loop-b",
    ]  # fmt: skip
    paula = me(url, basic("paula", "paula-password")).json()
    assert len([g for g in paula["groups"] if g.startswith("group:ldap/")]) == 25


def test_group_grants_apply_and_ldap_admins_does_not_escalate(
    running: tuple[Gateway, str],
) -> None:
    _, url = running
    bob, erin = basic("bob", "bob-password"), basic("erin", "erin-password")
    alice, dave = basic("alice", "alice-password"), basic("dave", "dave-password")
    assert model(url, "fraud-detector", bob).status_code == 200  # via group:ldap/risk%20team
    assert model(url, "fraud-detector", erin).status_code == 200
    assert model(url, "ops-model", alice).status_code == 200  # g: ldap group -> policy group
    assert model(url, "fraud-detector", alice).status_code == 403
    assert model(url, "fraud-detector", dave).status_code == 403
    # erin is in the directory group "admins": not the policy's group:admins (admin on *).
    assert model(url, "anything", erin).status_code == 403
    policy = httpx.get(f"{url}/guard/api/policy", headers=erin, timeout=10)
    assert policy.status_code == 403
    assert me(url, erin).json()["policy_administrator"] is False


def refusal(response: httpx.Response) -> tuple[int, str, dict[str, Any], str]:
    body = response.json()
    body.pop("request_id", None)
    return (
        response.status_code,
        response.headers["x-guard-reason"],
        body,
        ",".join(response.headers.get_list("www-authenticate")),
    )


@pytest.mark.parametrize(
    ("name", "password"),
    [
        ("alice", "wrong-password"),
        ("nobody", "alice-password"),
        ("*", "alice-password"),
        (")(uid=*", "alice-password"),
        ("*)(uid=*", "alice-password"),
        ("alice)(|(uid=*", "alice-password"),
        ("alice*", "alice-password"),
        ("uid=alice," + PEOPLE, "alice-password"),
        ("alice\x00", "alice-password"),
        ("ålice", "alice-password"),
        ("alice,ou=people", "alice-password"),
        ("x" * 300, "alice-password"),
    ],
    ids=["wrong-password", "unknown", "star", "close-paren", "star-close", "or", "prefix",
         "dn", "nul", "non-ascii", "comma", "too-long"],
)  # fmt: skip
def test_bad_logins_get_one_answer(running: tuple[Gateway, str], name: str, password: str) -> None:
    gateway, url = running
    assert gateway.ldap_provider is not None
    reference = refusal(me(url, basic("alice", "wrong-password")))
    assert reference[:2] == (401, "invalid_credentials")
    binds = gateway.ldap_provider.directory.binds
    assert refusal(me(url, basic(name, password))) == reference
    if name != "x" * 300:
        assert gateway.ldap_provider.directory.binds == binds + 1  # unknown users cost a bind


@pytest.mark.parametrize("name", ["EXAMPLE\\alice", "alice@example.org", "ali\\ce"])
def test_a_name_form_that_is_off_gets_a_clear_message(
    running: tuple[Gateway, str], name: str
) -> None:
    gateway, url = running
    assert gateway.ldap_provider is not None
    binds = gateway.ldap_provider.directory.binds
    response = me(url, basic(name, "alice-password"))
    assert (response.status_code, response.headers["x-guard-reason"]) == (
        401, "invalid_credentials",
    )  # fmt: skip
    assert "Log in as NAME." in response.json()["message"]
    assert gateway.ldap_provider.directory.binds == binds  # refused before the directory


def test_gateway_tokens_and_empty_passwords_never_reach_the_directory(
    running: tuple[Gateway, str],
) -> None:
    gateway, url = running
    assert gateway.ldap_provider is not None
    binds = gateway.ldap_provider.directory.binds
    token_like = me(url, basic("alice", "mlg_" + "x" * 43))
    assert (token_like.status_code, token_like.headers["x-guard-reason"]) == (
        401, "invalid_credentials",
    )  # fmt: skip
    empty = me(url, basic("alice", ""))
    assert (empty.status_code, empty.headers["x-guard-reason"]) == (401, "invalid_credentials")
    assert "empty password" in empty.json()["message"]
    assert me(url, {"Authorization": f"Bearer {BOOTSTRAP}"}).status_code == 200
    assert gateway.ldap_provider.directory.binds == binds


def test_a_login_is_cached(running: tuple[Gateway, str]) -> None:
    gateway, url = running
    assert gateway.ldap_provider is not None
    binds = gateway.ldap_provider.directory.binds
    credentials = basic("CaRoL", "carol-password")  # a spelling no other test uses
    assert me(url, credentials).json()["subject"] == "user:carol"
    assert gateway.ldap_provider.directory.binds == binds + 1
    for _ in range(3):
        assert me(url, credentials).status_code == 200
    assert gateway.ldap_provider.directory.binds == binds + 1
    # Another password for the same name is not served from the cache.
    assert me(url, basic("CaRoL", "carol-password2")).status_code == 401
    assert gateway.ldap_provider.directory.binds == binds + 2


def test_an_address_past_its_limit_reaches_the_directory_no_more(
    slapd: Slapd, upstream: str, tmp_path: Path
) -> None:
    """A password spray from one address: once the address is past failed_login_limit, a login
    that is not cached is answered 429 without a bind; one already cached still works (many
    people may share an address)."""
    settings = gateway_settings(
        slapd, tmp_path, **{"upstream.url": upstream, "gateway.failed_login_limit": "3"}
    )
    for gateway, url in run_gateway(settings):
        assert gateway.ldap_provider is not None
        assert me(url, basic("dave", "dave-password")).status_code == 200  # cached now
        for n in range(3):
            assert me(url, basic("bob", f"wrong-{n}")).status_code == 401
        binds = gateway.ldap_provider.directory.binds
        for user in ("bob", "carol", "erin", "bob"):
            sprayed = me(url, basic(user, "Winter2026!"))
            assert (sprayed.status_code, sprayed.headers["x-guard-reason"]) == (
                429, "too_many_failures",
            )  # fmt: skip
        right = me(url, basic("carol", "carol-password"))  # right, but not cached: no bind
        assert right.status_code == 429
        assert gateway.ldap_provider.directory.binds == binds
        assert me(url, basic("dave", "dave-password")).status_code == 200


def test_name_forms_through_the_gateway(slapd: Slapd, upstream: str, tmp_path: Path) -> None:
    settings = gateway_settings(
        slapd, tmp_path, **{"upstream.url": upstream, "ldap.name_forms": ["domain", "upn"]}
    )
    for _, url in run_gateway(settings):
        assert me(url, basic("EXAMPLE\\bob", "bob-password")).json()["subject"] == "user:bob"
        assert me(url, basic("bob@example.org", "bob-password")).json()["subject"] == "user:bob"
        plain = me(url, basic("bob", "bob-password"))
        assert plain.status_code == 401
        assert "DOMAIN\\NAME or NAME@DOMAIN" in plain.json()["message"]


def test_directory_down_is_503_and_recorded(slapd: Slapd, upstream: str, tmp_path: Path) -> None:
    settings = gateway_settings(
        slapd,
        tmp_path,
        **{
            "upstream.url": upstream,
            "ldap.urls": [dead_url(), dead_url()],
            "gateway.failed_login_limit": "2",
        },
    )
    for gateway, url in run_gateway(settings):
        ids = []
        for _ in range(4):  # past failed_login_limit, yet no 429: not counted as failed logins
            response = me(url, basic("alice", "alice-password"))
            assert (response.status_code, response.headers["x-guard-reason"]) == (
                503, "identity_unavailable",
            )  # fmt: skip
            ids.append(response.headers["x-request-id"])
        admin = {"Authorization": f"Bearer {BOOTSTRAP}"}
        assert me(url, admin).status_code == 200  # tokens keep working
        deadline = time.monotonic() + 10
        while True:
            found = httpx.get(
                f"{url}/guard/api/audit", params={"request_id": ids[-1]}, headers=admin,
                timeout=10,
            ).json()["records"]  # fmt: skip
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert found, "the 503 was not recorded"
        assert any(r.get("status") == 503 for r in found), found
        # The limiter is on: refusals of a bad token (401s) do reach it.
        bad = basic("alice", "mlg_" + "z" * 43)
        statuses = [me(url, bad).status_code for _ in range(4)]
        assert statuses[:2] == [401, 401] and 429 in statuses, statuses
        assert gateway.ldap_provider is not None


# -- the provider on its own: the other ways of finding a user and groups -------------------


def login(provider: LdapProvider, name: str, password: str) -> Principal | Refusal | None:
    return asyncio.run(provider.authenticate(Credentials("basic", password, name)))


def directory(slapd: Slapd, **options: Any) -> LdapProvider:
    base: dict[str, Any] = {
        "urls": (slapd.url,), "bind_dn": slapd.service_dn,
        "bind_password": slapd.service_password, "user_base": PEOPLE, "cache_ttl": 0.0,
    }  # fmt: skip
    return LdapProvider(LdapConfig(**(base | options)))


MODES: dict[str, dict[str, Any]] = {
    "memberof": {"use_memberof": True},
    "search-paged": {"group_base": "ou=groups,dc=example,dc=org", "page_size": 5},
    "direct-bind": {
        "bind_dn": "",
        "bind_password": "",
        "user_base": "",
        "bind_dn_template": f"uid={{username}},{PEOPLE}",
        "use_memberof": True,
    },
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("uid", sorted(set(USERS) - {"erin"}))  # erin's DN is no uid= DN
def test_each_way_of_finding_groups(slapd: Slapd, mode: str, uid: str) -> None:
    provider = directory(slapd, **MODES[mode])
    try:
        principal = login(provider, uid, USERS[uid].password)
        assert isinstance(principal, Principal), principal
        assert principal.subject == f"user:{subject_name(uid)}"
        assert principal.name == uid
        assert list(principal.groups) == expected_groups(uid)
        assert isinstance(principal.subject, DirectorySubject)
        assert principal.subject.groups == principal.groups
        wrong = login(provider, uid, "wrong")
        assert isinstance(wrong, Refusal) and wrong.reason == "invalid_credentials"
    finally:
        provider.close()


def test_group_search_without_paging(slapd: Slapd) -> None:
    provider = directory(slapd, group_base="ou=groups,dc=example,dc=org", page_size=0)
    try:
        principal = login(provider, "alice", "alice-password")
        assert isinstance(principal, Principal)
        assert list(principal.groups) == expected_groups("alice")
    finally:
        provider.close()


def test_a_size_limited_unpaged_search_is_not_used_partially(slapd: Slapd) -> None:
    provider = directory(slapd, group_base="ou=groups,dc=example,dc=org", page_size=0)
    try:
        result = login(provider, "paula", "paula-password")  # 25 groups, the limit is 10
        assert isinstance(result, Refusal) and result.reason == "identity_unavailable"
        assert provider.directory._pool == []  # the connection was discarded
        assert isinstance(login(provider, "bob", "bob-password"), Principal)
    finally:
        provider.close()


def test_a_name_matching_several_entries_is_refused(slapd: Slapd) -> None:
    provider = directory(slapd, user_filter="(|(uid={username})(uid=bob))")
    try:
        result = login(provider, "alice", "alice-password")
        assert isinstance(result, Refusal) and result.reason == "invalid_credentials"
        assert provider.directory.binds == 1  # still one bind, against the dummy DN
        assert isinstance(login(provider, "bob", "bob-password"), Principal)
    finally:
        provider.close()


def test_nesting_depth_is_bounded(slapd: Slapd) -> None:
    provider = directory(slapd, use_memberof=True, nested_groups=0)
    try:
        principal = login(provider, "alice", "alice-password")
        assert isinstance(principal, Principal)
        assert principal.groups == ("group:ldap/mlflow-admins",)
    finally:
        provider.close()


def test_the_pool_is_rebound_as_the_service_account(slapd: Slapd) -> None:
    provider = directory(slapd, use_memberof=True, pool_size=1)
    try:
        assert isinstance(login(provider, "bob", "bob-password"), Principal)
        pooled = provider.directory._pool
        assert len(pooled) == 1
        assert pooled[0].whoami_s() == f"dn:{slapd.service_dn}"
        assert isinstance(login(provider, "alice", "alice-password"), Principal)
        assert len(provider.directory._pool) == 1  # reused, not a new connection per login
    finally:
        provider.close()


def test_a_bad_service_password_is_unavailable_not_a_failed_login(slapd: Slapd) -> None:
    provider = directory(slapd, bind_password="wrong")
    try:
        result = login(provider, "alice", "alice-password")
        assert isinstance(result, Refusal) and result.reason == "identity_unavailable"
    finally:
        provider.close()


@pytest.mark.parametrize(
    "options",
    [{"start_tls": True}, {"start_tls": True, "ca_file": "/etc/ssl/certs/ca-certificates.crt"},
     {"ldaps": True}],
    ids=["start-tls", "start-tls-ca-file", "ldaps"],
)  # fmt: skip
def test_tls_is_never_silently_skipped(slapd: Slapd, options: dict[str, Any]) -> None:
    """This slapd speaks no TLS: asking for it must fail the login, not fall back to clear."""
    if options.pop("ldaps", False):
        options["urls"] = (slapd.url.replace("ldap://", "ldaps://"),)
    provider = directory(slapd, connect_timeout=2.0, timeout=2.0, **options)
    try:
        result = login(provider, "alice", "alice-password")
        assert isinstance(result, Refusal) and result.reason == "identity_unavailable"
        assert provider.directory.binds == 0
    finally:
        provider.close()


def test_bearer_credentials_are_not_the_directorys(slapd: Slapd) -> None:
    provider = directory(slapd)
    try:
        assert asyncio.run(provider.authenticate(Credentials("bearer", "alice-password"))) is None
        assert login(provider, "alice", "mlg_" + "a" * 43) is None
        assert provider.directory.binds == 0
    finally:
        provider.close()


# -- mlflow-guard ldap test USER ------------------------------------------------------------


def ldap_cli(
    slapd: Slapd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, password: str, *args: str
) -> int:
    from guard.cli.main import main

    for name in list(__import__("os").environ):
        if name.startswith("MLFLOW_GUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_GUARD_LDAP_URLS", slapd.url)
    monkeypatch.setenv("MLFLOW_GUARD_LDAP_BIND_DN", slapd.service_dn)
    monkeypatch.setenv("MLFLOW_GUARD_LDAP_BIND_PASSWORD", slapd.service_password)
    monkeypatch.setenv("MLFLOW_GUARD_LDAP_USER_BASE", PEOPLE)
    monkeypatch.setenv("MLFLOW_GUARD_LDAP_USE_MEMBEROF", "true")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(password + "\n"))
    return main(["ldap", "test", *args, "--password-stdin", "--data-dir", str(tmp_path)])


def test_ldap_test_prints_what_the_gateway_makes_of_a_user(
    slapd: Slapd,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from guard.cli.main import main

    assert ldap_cli(slapd, tmp_path, monkeypatch, "bob-password", "BOB") == 0
    out = capsys.readouterr().out
    assert f"dn:       uid=bob,{PEOPLE}" in out
    assert "subject:  user:bob" in out
    assert "group:ldap/risk%20team" in out
    assert "(none: every request is denied)" in out  # the shipped policy grants bob nothing
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(""))
    rows = ["p, group:ldap/risk%20team, promoter, model:fraud-*"]
    assert main(["policy", "add", *rows, "--data-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert ldap_cli(slapd, tmp_path, monkeypatch, "bob-password", "bob") == 0
    assert "  p, group:ldap/risk%20team, promoter, model:fraud-*, allow" in capsys.readouterr().out
    assert ldap_cli(slapd, tmp_path, monkeypatch, "wrong", "bob") == 1
    assert "refused: unknown user or wrong password" in capsys.readouterr().out
    assert ldap_cli(slapd, tmp_path, monkeypatch, "bob-password", "EX\\bob") == 1
    assert "not in an accepted name form" in capsys.readouterr().out


def test_check_config_does_not_print_the_bind_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from guard.cli.main import main

    for name in list(__import__("os").environ):
        if name.startswith("MLFLOW_GUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_GUARD_UPSTREAM_URL", "http://127.0.0.1:5001")
    monkeypatch.setenv("MLFLOW_GUARD_LDAP_URLS", "ldap://127.0.0.1:389")
    monkeypatch.setenv("MLFLOW_GUARD_LDAP_BIND_DN", "cn=svc,dc=example,dc=org")
    monkeypatch.setenv("MLFLOW_GUARD_LDAP_BIND_PASSWORD", "hunter2-service")
    monkeypatch.setenv("MLFLOW_GUARD_LDAP_USER_BASE", PEOPLE)
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert "hunter2-service" not in out
    assert "ldap.bind_password = <set, not shown>  [env MLFLOW_GUARD_LDAP_BIND_PASSWORD]" in out


def test_a_burst_of_identical_logins_costs_one_bind(slapd: Slapd) -> None:
    provider = directory(slapd, use_memberof=True)  # cache_ttl 0: only the burst is shared

    async def burst() -> list[Principal | Refusal | None]:
        credentials = Credentials("basic", "bob-password", "bob")
        return await asyncio.gather(*(provider.authenticate(credentials) for _ in range(8)))

    try:
        results = asyncio.run(burst())
        assert all(isinstance(r, Principal) and r.subject == "user:bob" for r in results)
        assert provider.directory.binds == 1
        assert provider._pending == {}
        wrong = asyncio.run(provider.authenticate(Credentials("basic", "nope", "bob")))
        assert isinstance(wrong, Refusal) and provider.directory.binds == 2
    finally:
        provider.close()


class DroppedConnection:
    """A pooled connection whose server went away (restarted) in the meantime."""

    closed = False

    def search_ext_s(self, *args: object, **kwargs: object) -> None:
        raise ldap.SERVER_DOWN({"desc": "Can't contact LDAP server"})

    def unbind_s(self) -> None:
        self.closed = True


def test_dropped_pooled_connections_are_replaced(slapd: Slapd) -> None:
    provider = directory(slapd, use_memberof=True, pool_size=2)
    dropped = [DroppedConnection(), DroppedConnection()]
    provider.directory._pool.extend(dropped)
    try:
        principal = login(provider, "bob", "bob-password")
        assert isinstance(principal, Principal) and principal.subject == "user:bob"
        assert all(c.closed for c in dropped)
        assert not any(isinstance(c, DroppedConnection) for c in provider.directory._pool)
    finally:
        provider.close()
