"""TLS to the directory (guard/identity/ldap.py) both ways, ``ldaps://`` and StartTLS, against the
throwaway slapd's TLS listener (tests/slapd.py): the right CA logs in over a verified connection;
a certificate from an unknown CA and one that does not name the host are each 503
``identity_unavailable`` with a log line that says TLS failed and names the URL, for both ways;
a TLS failure fails over to the next URL; a server that refuses StartTLS is never bound to in
clear; the options reach libldap in the one order that works (``OPT_X_TLS_NEWCTX`` last); and
nothing in the environment (``LDAPTLS_*``, ``~/.ldaprc``, ``./ldaprc``) loosens verification."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ldap
import pytest
from cryptography import x509

from guard.errors import Refusal
from guard.identity.base import Credentials, Principal
from guard.identity.ldap import Directory, DirectoryUnavailable, LdapConfig, LdapProvider
from tests.slapd import PEOPLE, TWIN_NAME, TWIN_PASSWORD, USERS, Slapd, free_port

pytestmark = pytest.mark.ldap

ROOT = Path(__file__).resolve().parents[3]
WAYS = ["ldaps", "start-tls"]


def endpoint(slapd: Slapd, way: str) -> tuple[str, bool]:
    """The URL and start_tls setting for one way of doing TLS."""
    return (slapd.ldaps_url, False) if way == "ldaps" else (slapd.url, True)


def provider(slapd: Slapd, *urls: str, **options: Any) -> LdapProvider:
    config: dict[str, Any] = {
        "urls": urls, "bind_dn": slapd.service_dn, "bind_password": slapd.service_password,
        "user_base": PEOPLE, "use_memberof": True, "cache_ttl": 0.0, "connect_timeout": 3.0,
        "timeout": 3.0,
    }  # fmt: skip
    return LdapProvider(LdapConfig(**(config | options)))


def login(p: LdapProvider, name: str, password: str) -> object:
    return asyncio.run(p.authenticate(Credentials("basic", password, name)))


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("way", WAYS)
def test_the_right_ca_logs_in(slapd: Slapd, way: str) -> None:
    url, start_tls = endpoint(slapd, way)
    p = provider(slapd, url, start_tls=start_tls, ca_file=slapd.ca_file)
    try:
        principal = login(p, "alice", "alice-password")
        assert isinstance(principal, Principal), principal
        assert principal.subject == "user:alice"
        assert principal.groups == (
            "group:ldap/all-staff", "group:ldap/mlflow-admins", "group:ldap/mlflow-users",
        )  # fmt: skip
        # The pooled connection really is TLS, with the fixture's server certificate.
        [pooled] = p.directory._pool
        peer = x509.load_der_x509_certificate(pooled.get_option(ldap.OPT_X_TLS_PEERCERT))
        server = x509.load_pem_x509_certificate((slapd.dir / "server.crt").read_bytes())
        assert peer == server
    finally:
        p.close()


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("failure", ["unknown-ca", "host-mismatch"])
def test_an_unverified_certificate_is_unavailable_and_logged_as_tls(
    slapd: Slapd, way: str, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    url, start_tls = endpoint(slapd, way)
    ca_file = slapd.wrong_ca_file if failure == "unknown-ca" else slapd.ca_file
    if failure == "host-mismatch":  # libldap checks "localhost" against the machine's FQDN
        url = url.replace("127.0.0.1", "localhost")
    caplog.set_level(logging.INFO, logger="guard.identity.ldap")
    p = provider(slapd, url, start_tls=start_tls, ca_file=ca_file)
    try:
        result = login(p, "alice", "alice-password")
        assert isinstance(result, Refusal), result
        assert (result.status, result.reason) == (503, "identity_unavailable")
        assert p.directory.binds == 0  # not even the user's bind was tried
        assert p.directory._pool == []
    finally:
        p.close()
    logged = errors(caplog)
    assert any("TLS failed" in m and url in m for m in logged), logged
    assert not any("unreachable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("way", WAYS)
def test_a_tls_failure_fails_over_to_the_next_server(
    slapd: Slapd, way: str, caplog: pytest.LogCaptureFixture
) -> None:
    url, start_tls = endpoint(slapd, way)
    mismatch = url.replace("127.0.0.1", "localhost")
    caplog.set_level(logging.INFO, logger="guard.identity.ldap")
    p = provider(slapd, mismatch, url, start_tls=start_tls, ca_file=slapd.ca_file)
    try:
        principal = login(p, "bob", "bob-password")
        assert isinstance(principal, Principal) and principal.subject == "user:bob"
    finally:
        p.close()
    assert any("TLS failed" in m and mismatch in m for m in errors(caplog))


def test_a_dead_ldaps_server_is_logged_as_unreachable_not_tls(
    slapd: Slapd, caplog: pytest.LogCaptureFixture
) -> None:
    """libldap says SERVER_DOWN for both; the probe keeps the log from blaming certificates."""
    dead = f"ldaps://127.0.0.1:{free_port()}"
    caplog.set_level(logging.INFO, logger="guard.identity.ldap")
    p = provider(slapd, dead, ca_file=slapd.ca_file)
    try:
        result = login(p, "alice", "alice-password")
        assert isinstance(result, Refusal) and result.reason == "identity_unavailable"
    finally:
        p.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("unreachable" in m and dead in m for m in messages), messages
    assert not any("TLS failed" in m for m in messages)


@pytest.fixture(scope="module")
def plain_slapd() -> Iterator[Slapd]:
    """A directory without TLS (it refuses StartTLS) that logs every operation it gets."""
    server = Slapd(free_port(), tls=False, debug=256)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_a_server_that_refuses_start_tls_is_never_bound_in_clear(
    plain_slapd: Slapd, slapd: Slapd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="guard.identity.ldap")
    seen = len(plain_slapd.log(0))
    p = provider(plain_slapd, plain_slapd.url, start_tls=True, ca_file=slapd.ca_file)
    try:
        result = login(p, "alice", "alice-password")
        assert isinstance(result, Refusal), result
        assert (result.status, result.reason) == (503, "identity_unavailable")
        assert p.directory.binds == 0
    finally:
        p.close()
    assert any("refused StartTLS" in m and plain_slapd.url in m for m in errors(caplog)), errors(
        caplog
    )
    # What the server saw: StartTLS asked for and refused, then no bind at all (no password,
    # not the service account's either, went over the wire).
    operations = plain_slapd.log(0)[seen:]
    assert "EXT oid=1.3.6.1.4.1.1466.20037" in operations
    assert not re.search(r"op=\d+ BIND ", operations), operations
    # The same server without start_tls (allowed on loopback) does get the binds: the log
    # above would have shown them.
    p = provider(plain_slapd, plain_slapd.url)
    try:
        assert isinstance(login(p, "alice", "alice-password"), Principal)
    finally:
        p.close()
    assert f'BIND dn="{plain_slapd.service_dn}"' in plain_slapd.log(0)[seen:]


class RecordingConnection:
    """What ``ldap.initialize`` returns, recording the options set and the calls made; the
    bind fails as if the server were down, so a login ends there."""

    def __init__(self, url: str, calls: list[tuple[str, object, object]]) -> None:
        self.calls = calls
        calls.append(("initialize", url, None))

    def set_option(self, option: int, value: object) -> None:
        self.calls.append(("set_option", option, value))

    def start_tls_s(self) -> None:
        self.calls.append(("start_tls_s", None, None))

    def simple_bind_s(self, dn: str, password: str) -> None:
        self.calls.append(("simple_bind_s", dn, None))
        raise ldap.SERVER_DOWN({"desc": "Can't contact LDAP server"})

    def unbind_s(self) -> None:
        self.calls.append(("unbind_s", None, None))


TLS_OPTIONS = {v for k, v in vars(ldap).items() if k.startswith("OPT_X_TLS") and isinstance(v, int)}


@pytest.mark.parametrize(
    ("url", "start_tls", "ca_file"),
    [
        ("ldaps://dc1.example.test", False, "/etc/guard/ca.pem"),
        ("ldap://dc1.example.test", True, "/etc/guard/ca.pem"),
        ("ldaps://dc1.example.test", False, ""),
    ],
    ids=["ldaps", "start-tls", "ldaps-default-ca"],
)
def test_tls_options_are_set_on_the_connection_newctx_last(
    monkeypatch: pytest.MonkeyPatch, url: str, start_tls: bool, ca_file: str
) -> None:
    calls: list[tuple[str, object, object]] = []
    monkeypatch.setattr(ldap, "initialize", lambda u: RecordingConnection(u, calls))
    config = LdapConfig(
        urls=(url,), start_tls=start_tls, ca_file=ca_file, bind_dn="cn=svc", bind_password="x",
        user_base=PEOPLE,
    )  # fmt: skip
    directory = Directory(config)
    monkeypatch.setattr(directory, "_listening", lambda url: False)
    with pytest.raises(DirectoryUnavailable):
        directory.login("alice", "alice-password")
    options = [(option, value) for kind, option, value in calls if kind == "set_option"]
    tls = [(option, value) for option, value in options if option in TLS_OPTIONS]
    assert tls[-1] == (ldap.OPT_X_TLS_NEWCTX, 0)  # last: it applies those before it
    assert options[-1] == (ldap.OPT_X_TLS_NEWCTX, 0)  # and nothing of any kind after it
    assert dict(tls)[ldap.OPT_X_TLS_REQUIRE_CERT] == ldap.OPT_X_TLS_DEMAND
    assert [v for o, v in tls if o == ldap.OPT_X_TLS_REQUIRE_CERT] == [ldap.OPT_X_TLS_DEMAND]
    assert dict(tls)[ldap.OPT_X_TLS_PROTOCOL_MIN] == ldap.OPT_X_TLS_PROTOCOL_TLS1_2
    # The CA is always the connection's own: a new TLS context inherits no CA paths.
    expected_ca = ca_file or ldap.get_option(ldap.OPT_X_TLS_CACERTFILE)
    assert expected_ca and dict(tls)[ldap.OPT_X_TLS_CACERTFILE] == expected_ca
    kinds = [kind for kind, _, _ in calls]
    if start_tls:  # StartTLS after the options and before any bind
        assert kinds.index("start_tls_s") > max(i for i, k in enumerate(kinds) if k == "set_option")
        assert kinds.index("start_tls_s") < kinds.index("simple_bind_s")
    else:
        assert "start_tls_s" not in kinds


def test_plain_loopback_ldap_sets_no_tls_options(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, object, object]] = []
    monkeypatch.setattr(ldap, "initialize", lambda u: RecordingConnection(u, calls))
    directory = Directory(LdapConfig(urls=("ldap://127.0.0.1:1",), bind_dn="cn=svc",
                                     bind_password="x", user_base=PEOPLE))  # fmt: skip
    with pytest.raises(DirectoryUnavailable):
        directory.login("alice", "alice-password")
    assert not [c for c in calls if c[0] == "set_option" and c[1] in TLS_OPTIONS]
    assert "start_tls_s" not in [kind for kind, _, _ in calls]


# In a fresh interpreter, because libldap reads its environment and rc files once per process.
SCRIPT = """
import asyncio, json, sys
from guard.identity.base import Credentials
from guard.identity.ldap import LdapConfig, LdapProvider
results = []
for url, start_tls, ca_file in json.loads(sys.argv[1]):
    provider = LdapProvider(LdapConfig(
        urls=(url,), start_tls=start_tls, ca_file=ca_file, bind_dn=sys.argv[2],
        bind_password=sys.argv[3], user_base=sys.argv[4], use_memberof=True, cache_ttl=0.0,
        connect_timeout=3.0, timeout=3.0))
    result = asyncio.run(provider.authenticate(Credentials("basic", "alice-password", "alice")))
    provider.close()
    results.append(getattr(result, "reason", None) or getattr(result, "subject", None))
print(json.dumps(results))
"""


def run_elsewhere(
    slapd: Slapd, tmp_path: Path, cases: list[tuple[str, bool, str]], env: dict[str, str]
) -> list[str]:
    """Log alice in for each (url, start_tls, ca_file) in a new process with ``env``, its HOME
    and working directory in ``tmp_path``; what each login came to."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
            "HOME": str(tmp_path)}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(cases), slapd.service_dn,
         slapd.service_password, PEOPLE],
        env=base | env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


def both_ways(slapd: Slapd, ca_file: str) -> list[tuple[str, bool, str]]:
    return [(slapd.ldaps_url, False, ca_file), (slapd.url, True, ca_file)]


def test_the_environment_cannot_loosen_verification(slapd: Slapd, tmp_path: Path) -> None:
    """Every place libldap takes defaults from says "trust the right CA, check nothing": the
    gateway's ca_file (the wrong CA here) still decides, and certificates are still checked."""
    loose = f"TLS_REQCERT never\nTLS_CACERT {slapd.ca_file}\n"
    (tmp_path / ".ldaprc").write_text(loose)
    (tmp_path / "ldaprc").write_text(loose)
    env = {"LDAPTLS_REQCERT": "never", "LDAPTLS_CACERT": slapd.ca_file}
    cases = both_ways(slapd, slapd.wrong_ca_file) + both_ways(slapd, slapd.ca_file)
    assert run_elsewhere(slapd, tmp_path, cases, env) == [
        "identity_unavailable", "identity_unavailable", "user:alice", "user:alice",
    ]  # fmt: skip


def test_without_ca_file_libldaps_configured_ca_is_used_and_still_verified(
    slapd: Slapd, tmp_path: Path
) -> None:
    """An empty ca_file means libldap's configured default (here LDAPTLS_CACERT), which a new
    connection would otherwise not inherit; TLS_REQCERT never still changes nothing."""
    right = run_elsewhere(slapd, tmp_path, both_ways(slapd, ""), {"LDAPTLS_CACERT": slapd.ca_file})
    assert right == ["user:alice", "user:alice"]
    env = {"LDAPTLS_CACERT": slapd.wrong_ca_file, "LDAPTLS_REQCERT": "never"}
    wrong = run_elsewhere(slapd, tmp_path, both_ways(slapd, ""), env)
    assert wrong == ["identity_unavailable", "identity_unavailable"]


def test_the_awkward_names_over_tls(slapd: Slapd) -> None:
    """Every seeded user (a comma, non-ASCII letters, parentheses in the DN) logs in over
    StartTLS; the name two entries share is refused like a wrong password, after one bind
    against the dummy DN, though both entries would accept the password."""
    p = provider(slapd, slapd.url, start_tls=True, ca_file=slapd.ca_file)
    try:
        for uid, user in USERS.items():
            principal = login(p, uid, user.password)
            assert isinstance(principal, Principal), (uid, principal)
            assert principal.name == uid
        binds = p.directory.binds
        twin = login(p, TWIN_NAME, TWIN_PASSWORD)
        assert isinstance(twin, Refusal) and (twin.status, twin.reason) == (
            401, "invalid_credentials",
        )  # fmt: skip
        assert p.directory.binds == binds + 1
    finally:
        p.close()
