"""Credential failures per user name (guard/identity/throttle.py) and their place in the LDAP
provider: names folded as loosely as a directory compares them, a lock that holds across
replicas (two throttles on one SQLite file and on PostgreSQL) and before any bind, a window
that passes on an injected clock, only credential failures counted, the audit record and the
``login_locked`` event without the password, and Active Directory's reasons for a refused bind.
Attempts to get around it: name variants, the right password while locked, a burst of wrong
passwords at once, another replica, inputs refused before the throttle, a directory outage."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from guard.app import Gateway
from guard.config import load_settings
from guard.errors import Refusal
from guard.identity import throttle as throttle_module
from guard.identity.base import Credentials, Principal
from guard.identity.ldap import LdapConfig, LdapProvider, directory_reason
from guard.identity.throttle import Lock, LoginThrottle, fold_name
from guard.store.db import audit_records, build_engine, login_failures, migrate
from tests.conftest import free_port
from tests.servers import ServerThread
from tests.slapd import PEOPLE, Slapd
from tests.unit.identity.test_ldap import FakeMlflow, gateway_settings, run_gateway

KEY = b"k" * 40
T0 = dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.UTC)
WINDOW = 600.0


class Clock:
    """An injected wall clock: tests move it instead of sleeping."""

    def __init__(self) -> None:
        self.at = T0

    def __call__(self) -> dt.datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += dt.timedelta(seconds=seconds)


def rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(login_failures)).all())


def fail(throttle: LoginThrottle, name: str, client: str = "192.0.2.1") -> float:
    """One credential failure of ``name`` as the provider records it; the wait if locked."""

    async def run() -> float:
        reservation = await throttle.reserve(name, client)
        if reservation.wait > 0:
            return reservation.wait
        await throttle.failed(reservation, name)
        return 0.0

    return asyncio.run(run())


# -- folding and the directory's reasons ------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    ["alice", "ALICE", " alice ", "Alice\u00a0", "\uff41\uff4c\uff49\uff43\uff45", "al\u0130ce",
     "ali\u00adce", "ali\u200bce", "ali\u0301ce", "al ice", "ALİCE"],
)  # fmt: skip
def test_names_a_directory_may_take_for_one_are_counted_as_one(variant: str) -> None:
    # slapd finds uid=alice for the case, space, fullwidth and dotted-I variants; the others a
    # directory might match, and folding too much only ever makes the limit stricter.
    assert fold_name(variant) == "alice"


@pytest.mark.parametrize("other", ["alicia", "bob", "alice2", "a", "alic"])
def test_other_names_are_not_folded_together(other: str) -> None:
    assert fold_name(other) != fold_name("alice")


@pytest.mark.parametrize(
    ("info", "reason"),
    [
        ("80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 52e, v4563",
         "wrong_password"),
        ("80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 525, v4563",
         "no_such_user"),
        ("80090308: LdapErr: DSID-0C090447, comment: AcceptSecurityContext error, data 530, v3839",
         "not_permitted_at_this_time"),
        ("... AcceptSecurityContext error, data 531, v2580", "not_permitted_at_this_workstation"),
        ("... AcceptSecurityContext error, data 532, v2580", "password_expired"),
        ("... AcceptSecurityContext error, data 533, v2580", "account_disabled"),
        ("... AcceptSecurityContext error, data 701, v2580", "account_expired"),
        ("... AcceptSecurityContext error, data 773, v2580", "must_reset_password"),
        ("... AcceptSecurityContext error, DATA 775, v2580", "account_locked"),
        ("... AcceptSecurityContext error, data 52E, v2580", "wrong_password"),
        ("... AcceptSecurityContext error, data 568, v2580", "data_568"),
        ("", ""),  # OpenLDAP says nothing
        ("Invalid credentials", ""),
        ("metadata 533", ""),  # not a data code
    ],
)  # fmt: skip
def test_active_directory_reasons(info: str, reason: str) -> None:
    assert directory_reason(info) == reason


# -- the throttle on its own (SQLite and PostgreSQL) -----------------------------------------


def test_a_name_locks_at_the_limit_and_unlocks_when_the_window_passes(engine: sa.Engine) -> None:
    clock = Clock()
    locks: list[tuple[str, Lock]] = []
    throttle = LoginThrottle(
        engine, KEY, limit=3, interval=WINDOW, now=clock,
        on_locked=lambda name, lock: locks.append((name, lock)),
    )  # fmt: skip
    for step in range(3):
        assert fail(throttle, "alice", f"192.0.2.{step}") == 0.0
        clock.advance(10)
    assert [(name, lock.failures) for name, lock in locks] == [("alice", 3)]
    assert locks[0][1].until == T0 + dt.timedelta(seconds=WINDOW)
    assert locks[0][1].clients == ("192.0.2.2", "192.0.2.1", "192.0.2.0")
    assert throttle.seconds_locked("ALICE") == WINDOW - 30
    assert fail(throttle, "alice") == WINDOW - 30  # refused: not a fourth row
    stored = rows(engine)
    assert len(stored) == 3
    # Neither the name nor anything but its HMAC is stored.
    assert {row.name_key for row in stored} == {throttle.name_key("alice")}
    assert "alice" not in repr(stored)
    assert throttle.name_key("alice") != LoginThrottle(
        engine, b"x" * 40, limit=3, interval=WINDOW
    ).name_key("alice")  # keyed by the gateway's secret
    clock.advance(WINDOW - 30)  # the oldest failure ages out
    assert throttle.seconds_locked("alice") == 0.0
    assert fail(throttle, "alice") == 0.0
    assert len(locks) == 2  # locked again by that one: a new lock, a new event


def test_two_replicas_share_the_count(engine: sa.Engine) -> None:
    clock = Clock()
    first = LoginThrottle(engine, KEY, limit=3, interval=WINDOW, now=clock)
    second = LoginThrottle(engine, KEY, limit=3, interval=WINDOW, now=clock)
    assert fail(first, "alice") == 0.0
    assert fail(second, "Alice") == 0.0
    assert fail(first, "ALICE") == 0.0
    assert fail(second, "alice") > 0  # locked by failures it mostly did not see
    before = second.queries
    assert fail(second, "alice") > 0
    assert second.queries == before  # remembered: no database round trip while locked
    assert fail(first, "bob") == 0.0  # another name is not affected


def test_racing_attempts_on_two_replicas_pass_at_most_the_limit(engine: sa.Engine) -> None:
    clock = Clock()
    replicas = [LoginThrottle(engine, KEY, limit=3, interval=WINDOW, now=clock) for _ in range(2)]
    passed: list[int] = []
    start = threading.Barrier(8)

    def attempt(i: int) -> None:
        start.wait(timeout=10)
        reservation = replicas[i % 2]._reserve(replicas[0].name_key("alice"), "192.0.2.1")
        if reservation.wait == 0:
            passed.append(i)  # reaches the directory; fails there, so its row stays

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(passed) <= 3
    assert len(rows(engine)) == len(passed)


def test_a_success_or_an_outage_is_not_a_failure(engine: sa.Engine) -> None:
    clock = Clock()
    throttle = LoginThrottle(engine, KEY, limit=2, interval=WINDOW, now=clock)

    async def released() -> None:
        reservation = await throttle.reserve("alice", "192.0.2.1")
        assert reservation.row_id and len(rows(engine)) == 1  # counted while in flight
        await throttle.release(reservation)

    for _ in range(5):
        asyncio.run(released())
    assert rows(engine) == []


def test_old_rows_are_pruned_in_bounded_batches(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(throttle_module, "PRUNE_BATCH", 4)
    clock = Clock()
    throttle = LoginThrottle(engine, KEY, limit=3, interval=WINDOW, now=clock)
    with engine.begin() as conn:
        conn.execute(sa.insert(login_failures), [
            {"name_key": f"{i:064x}", "client": "192.0.2.1", "failed_at": T0} for i in range(10)
        ])  # fmt: skip
    clock.advance(WINDOW + 1)
    fail(throttle, "alice")  # prunes one batch; a full batch leaves the next one due at once
    assert len(rows(engine)) == 10 - 4 + 1
    fail(throttle, "bob")
    fail(throttle, "carol")  # the last old ones go; then nothing is due for a window
    assert len(rows(engine)) == 3
    clock.advance(WINDOW + 1)
    fail(throttle, "dave")
    assert len(rows(engine)) == 1


def test_the_limit_is_a_setting_and_zero_turns_it_off() -> None:
    loaded = load_settings({}, {}, None)
    assert loaded.settings.gateway.failed_login_user_limit == 3
    assert loaded.settings.gateway.failed_login_user_interval == 1800
    problems = load_settings({"gateway.failed_login_user_limit": "-1"}, {}, None).problems
    assert any("failed_login_user_limit: must not be negative" in p for p in problems), problems
    with pytest.raises(ValueError, match="limit >= 1"):
        LoginThrottle(build_engine("sqlite://"), KEY, limit=0, interval=WINDOW)


# -- in the LDAP provider, against slapd -----------------------------------------------------


def dead_url() -> str:
    return f"ldap://127.0.0.1:{free_port()}"


def provider(
    slapd: Slapd, engine: sa.Engine, clock: Clock, limit: int = 3, **options: Any
) -> LdapProvider:
    config: dict[str, Any] = {
        "urls": (slapd.url,), "bind_dn": slapd.service_dn,
        "bind_password": slapd.service_password, "user_base": PEOPLE, "cache_ttl": 0.0,
        "name_forms": ("plain", "domain", "upn"),
    }  # fmt: skip
    throttle = LoginThrottle(engine, KEY, limit=limit, interval=WINDOW, now=clock)
    return LdapProvider(LdapConfig(**(config | options)), throttle=throttle)


def login(
    ldap: LdapProvider, name: str, password: str, client: str = "192.0.2.7"
) -> Principal | Refusal | None:
    return asyncio.run(ldap.authenticate(Credentials("basic", password, name, client)))


def reason(result: Principal | Refusal | None) -> str:
    return result.reason if isinstance(result, Refusal) else "ok"


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = build_engine(f"sqlite:///{tmp_path / 'guard.db'}")
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.mark.ldap
def test_name_variants_lock_one_user_before_the_directory_is_asked(
    slapd: Slapd, sqlite_engine: sa.Engine
) -> None:
    ldap = provider(slapd, sqlite_engine, Clock())
    for name in ["EXAMPLE\\ALICE", "alice@example.org", " Alice "]:
        assert reason(login(ldap, name, "wrong-password")) == "invalid_credentials"
    binds = ldap.directory.binds
    locked = login(ldap, "alice", "alice-password")  # the right password
    assert isinstance(locked, Refusal)
    assert (locked.reason, locked.status) == ("login_throttled", 401)
    assert 0 < locked.retry_after <= WINDOW
    assert "Try again in 10 minutes." in locked.message
    assert dict(locked.audit) == {"login_name": "alice", "login_failure": "throttled"}
    for name in ["OTHER\\alice", "ALICE@elsewhere", "alice", "alİce"]:
        assert reason(login(ldap, name, "guess")) == "login_throttled"
    assert ldap.directory.binds == binds  # the directory never saw them


@pytest.mark.ldap
def test_a_locked_user_waits_for_the_window_and_others_are_not_affected(
    slapd: Slapd, sqlite_engine: sa.Engine
) -> None:
    clock = Clock()
    ldap = provider(slapd, sqlite_engine, clock)
    for _ in range(3):
        assert reason(login(ldap, "alice", "wrong-password")) == "invalid_credentials"
        clock.advance(1)
    assert reason(login(ldap, "alice", "alice-password")) == "login_throttled"
    # Another user from the same address: the per-user lock is not per address.
    assert reason(login(ldap, "bob", "bob-password")) == "ok"
    assert reason(login(ldap, "bob", "wrong-password")) == "invalid_credentials"
    clock.advance(WINDOW - 4)
    assert reason(login(ldap, "alice", "alice-password")) == "login_throttled"
    clock.advance(1.5)  # the first failure is out of the window, the other two are not
    assert reason(login(ldap, "alice", "alice-password")) == "ok"
    # A success does not erase the two failures still in the window.
    assert reason(login(ldap, "alice", "wrong-password")) == "invalid_credentials"
    assert reason(login(ldap, "alice", "alice-password")) == "login_throttled"


@pytest.mark.ldap
def test_a_burst_of_wrong_passwords_reaches_the_directory_at_most_limit_times(
    slapd: Slapd, sqlite_engine: sa.Engine
) -> None:
    ldap = provider(slapd, sqlite_engine, Clock())

    async def burst() -> list[str]:
        results = await asyncio.gather(*(
            ldap.authenticate(Credentials("basic", f"guess-{i}", "alice", "192.0.2.9"))
            for i in range(12)
        ))  # fmt: skip
        return [reason(r) for r in results]

    binds = ldap.directory.binds
    reasons = asyncio.run(burst())
    assert ldap.directory.binds - binds <= 3
    assert reasons.count("invalid_credentials") <= 3
    assert set(reasons) == {"invalid_credentials", "login_throttled"}


@pytest.mark.ldap
def test_replicas_on_one_database_share_the_lock(slapd: Slapd, engine: sa.Engine) -> None:
    clock = Clock()
    first, second = provider(slapd, engine, clock), provider(slapd, engine, clock)
    assert reason(login(first, "alice", "wrong-1")) == "invalid_credentials"
    assert reason(login(second, "alice", "wrong-2")) == "invalid_credentials"
    assert reason(login(first, "alice", "wrong-3")) == "invalid_credentials"
    binds = second.directory.binds
    assert reason(login(second, "alice", "alice-password")) == "login_throttled"
    assert second.directory.binds == binds


@pytest.mark.ldap
@pytest.mark.parametrize(
    ("name", "password", "why"),
    [
        ("alice", "", "empty password"),
        ("a" * 300, "wrong", "over-long name"),
        ("alice", "p" * 2000, "over-long password"),
        ("alice", "mlg_" + "x" * 43, "a gateway token"),
        ("ali\\ce", "wrong", "a name form that is off"),
    ],
)
def test_inputs_refused_before_the_directory_create_no_rows(
    slapd: Slapd, sqlite_engine: sa.Engine, name: str, password: str, why: str
) -> None:
    ldap = provider(slapd, sqlite_engine, Clock(), name_forms=("plain",))
    for _ in range(5):
        assert reason(login(ldap, name, password)) in {"invalid_credentials", "ok"}, why
    assert rows(sqlite_engine) == [], why
    assert reason(login(ldap, "alice", "alice-password")) == "ok"


@pytest.mark.ldap
def test_a_directory_outage_is_not_a_failure(slapd: Slapd, sqlite_engine: sa.Engine) -> None:
    ldap = provider(slapd, sqlite_engine, Clock(), urls=(dead_url(), dead_url()))
    for _ in range(5):
        assert reason(login(ldap, "alice", "alice-password")) == "identity_unavailable"
    assert rows(sqlite_engine) == []


@pytest.mark.ldap
def test_the_database_down_refuses_rather_than_guess(slapd: Slapd, tmp_path: Path) -> None:
    engine = build_engine(f"sqlite:///{tmp_path / 'guard.db'}")  # no table: every query fails
    ldap = provider(slapd, engine, Clock())
    binds = ldap.directory.binds
    assert reason(login(ldap, "alice", "alice-password")) == "identity_unavailable"
    assert ldap.directory.binds == binds
    engine.dispose()


@pytest.mark.ldap
def test_a_cached_login_costs_the_throttle_nothing(slapd: Slapd, sqlite_engine: sa.Engine) -> None:
    ldap = provider(slapd, sqlite_engine, Clock(), cache_ttl=60.0)
    assert ldap.throttle is not None
    assert reason(login(ldap, "bob", "bob-password")) == "ok"
    queries = ldap.throttle.queries
    for _ in range(20):
        assert reason(login(ldap, "bob", "bob-password")) == "ok"
    assert ldap.throttle.queries == queries
    # Even when someone else then locks the name: a cached login never reaches the directory.
    for _ in range(3):
        login(ldap, "bob", "wrong-password")
    assert reason(login(ldap, "bob", "bob-password")) == "ok"


@pytest.mark.ldap
def test_active_directory_reasons_reach_the_audit_facts_not_the_client(
    slapd: Slapd, sqlite_engine: sa.Engine
) -> None:
    ldap = provider(slapd, sqlite_engine, Clock())
    plain = login(ldap, "alice", "wrong-password")  # slapd: no reason given
    assert isinstance(plain, Refusal)
    assert dict(plain.audit) == {"login_name": "alice", "login_failure": "credentials"}

    def disabled(name: str, password: str) -> None:
        ldap.directory.refused.info = (
            "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 533, "
            "v4563"
        )
        return None

    ldap.directory.login = disabled  # type: ignore[method-assign,assignment]
    refused = login(ldap, "bob", "bob-password")
    assert isinstance(refused, Refusal)
    assert (refused.reason, refused.message) == (plain.reason, plain.message)
    assert dict(refused.audit)["directory_reason"] == "account_disabled"


# -- through a real gateway: the answer and the audit trail -----------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with ServerThread(FakeMlflow(), lifespan="off") as server:
        yield server.url


def basic(name: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{name}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def stored_records(gateway: Gateway, wanted: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while True:
        with gateway.engine.connect() as conn:
            found = [json.loads(r) for r in conn.execute(sa.select(audit_records.c.record))
                     .scalars()]  # fmt: skip
        if len(found) >= wanted or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.mark.ldap
def test_through_the_gateway_the_lock_is_answered_and_audited(
    slapd: Slapd, upstream: str, tmp_path: Path
) -> None:
    settings = gateway_settings(
        slapd, tmp_path, **{"upstream.url": upstream, "gateway.failed_login_user_limit": "2",
                            "ldap.name_forms": ["plain", "domain"]},
    )  # fmt: skip
    for gateway, url in run_gateway(settings):
        me = f"{url}/guard/api/me"
        failures = [httpx.get(me, headers=basic(n, "Secret-Guess-1"), timeout=10)
                    for n in ["erin", "EXAMPLE\\Erin"]]  # fmt: skip
        assert [r.status_code for r in failures] == [401, 401]
        assert {r.headers["x-guard-reason"] for r in failures} == {"invalid_credentials"}
        locked = httpx.get(me, headers=basic("erin", "erin-password"), timeout=10)
        assert (locked.status_code, locked.headers["x-guard-reason"]) == (401, "login_throttled")
        assert 1700 < int(locked.headers["retry-after"]) <= 1800
        assert locked.json()["error_code"] == "UNAUTHENTICATED"
        assert "directory account itself is not locked" in locked.json()["message"]
        assert 'Basic realm="mlflow-guard"' in locked.headers["www-authenticate"]
        assert httpx.get(me, headers=basic("bob", "bob-password"), timeout=10).status_code == 200
        ids = [r.headers["x-request-id"] for r in [*failures, locked]]
        records = stored_records(gateway, 5)
        by_id = {r.get("request_id"): r for r in records if r["kind"] == "outcome"}
        first, second, third = (by_id[i] for i in ids)
        assert (first["login_name"], second["login_name"]) == ("erin", "Erin")
        assert first["login_failure"] == second["login_failure"] == "credentials"
        assert "directory_reason" not in first  # slapd does not say why
        assert second["credential"]["username"].startswith("hmac:")  # typed with a backslash
        assert (third["reason"], third["login_failure"]) == ("login_throttled", "throttled")
        events = [r for r in records if r.get("event") == "login_locked"]
        assert len(events) == 1
        assert events[0]["name"] == "Erin"  # as typed in the failure that locked it
        assert events[0]["failures"] == 2 and events[0]["window_seconds"] == 1800
        assert events[0]["clients"] == ["127.0.0.1"]
        text = json.dumps(records)
        for secret in ["Secret-Guess-1", "erin-password", "bob-password"]:
            assert secret not in text
