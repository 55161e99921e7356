"""SessionStore, SessionCookie and UserBlocks against a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from guard.identity.base import DirectorySubject, Principal
from guard.identity.sessions import (
    TOUCH_INTERVAL,
    SessionCookie,
    SessionStore,
    UserBlocks,
    read_cookies,
)
from guard.store.db import build_engine

KEY = b"k" * 32
START = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
ALICE = Principal(
    subject=DirectorySubject("user:alice", ("group:ldap/risk%20team",)),
    name="alice",
    method="ldap",
    roles=(),
    groups=("group:ldap/risk%20team",),
    identity="ldap:1234-abcd",
)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def new_store(engine: Engine, clock: Clock) -> SessionStore:
    return SessionStore(engine, KEY, idle_timeout=3600, absolute_timeout=43200, clock=clock)


@pytest.fixture
def store(engine: Engine, clock: Clock) -> SessionStore:
    return new_store(engine, clock)


def count_updates(engine: Engine) -> list[str]:
    seen: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("UPDATE GUARD_SESSION"):
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", before)
    return seen


def test_create_and_get(store: SessionStore) -> None:
    session_id, session = store.create(ALICE, client="203.0.113.7")
    found = store.get(session_id)
    assert found == session
    assert found.key != session_id and session_id not in found.key  # only an HMAC is stored
    principal = found.principal()
    assert principal.subject == "user:alice"
    assert isinstance(principal.subject, DirectorySubject)
    assert principal.subject.groups == ("group:ldap/risk%20team",)
    assert principal.method == "session:ldap" and principal.identity == "ldap:1234-abcd"
    assert store.get("not-" + session_id) is None


def test_every_login_gets_a_new_id(store: SessionStore) -> None:
    assert store.create(ALICE, client="a")[0] != store.create(ALICE, client="a")[0]


def test_idle_expiry(store: SessionStore, clock: Clock) -> None:
    session_id, _ = store.create(ALICE, client="a")
    clock.advance(minutes=59)
    assert store.get(session_id) is not None  # and last_seen moves to now
    clock.advance(minutes=59)
    assert store.get(session_id) is not None
    clock.advance(minutes=60)
    assert store.get(session_id) is None


def test_absolute_expiry_however_busy(store: SessionStore, clock: Clock) -> None:
    session_id, _ = store.create(ALICE, client="a")
    for _ in range(12 * 2 - 1):
        clock.advance(minutes=30)
        assert store.get(session_id) is not None
    clock.advance(minutes=30)
    assert store.get(session_id) is None


def test_last_seen_written_at_most_once_a_minute(
    store: SessionStore, clock: Clock, engine: Engine
) -> None:
    session_id, _ = store.create(ALICE, client="a")
    updates = count_updates(engine)
    for _ in range(20):  # 20 requests over 50 seconds: no write
        clock.advance(seconds=2.5)
        assert store.get(session_id) is not None
    assert updates == []
    clock.advance(seconds=10)  # a minute since login
    assert store.get(session_id).last_seen_at == clock.now  # type: ignore[union-attr]
    assert len(updates) == 1
    for _ in range(5):
        assert store.get(session_id) is not None
    assert len(updates) == 1
    clock.now += TOUCH_INTERVAL
    store.get(session_id)
    assert len(updates) == 2


def test_revoke(store: SessionStore, clock: Clock) -> None:
    session_id, _ = store.create(ALICE, client="a")
    ended = store.revoke(session_id, "user:alice")
    assert ended is not None and ended.revoked_by == "user:alice"
    assert store.get(session_id) is None
    assert store.revoke(session_id, "again") is None
    [row] = store.list(include_ended=True)
    assert row.state(clock.now, store.idle_timeout) == "revoked"
    assert store.list() == []


def test_revoke_on_another_replica(engine: Engine, clock: Clock, database_uri: str) -> None:
    replica_a = new_store(engine, clock)
    other_engine = build_engine(database_uri)
    try:
        replica_b = new_store(other_engine, clock)
        session_id, session = replica_a.create(ALICE, client="a")
        assert replica_b.get(session_id) is not None
        assert replica_b.revoke_key(session.key, "cli:root") is not None
        assert replica_a.get(session_id) is None
    finally:
        other_engine.dispose()


def test_revoke_subject_and_list(store: SessionStore) -> None:
    first, _ = store.create(ALICE, client="a")
    second, _ = store.create(ALICE, client="b")
    bob = Principal("token:ci", "ci", "token", ("viewer",), identity="token:7")
    other, _ = store.create(bob, client="c")
    assert {s.subject for s in store.list()} == {"user:alice", "token:ci"}
    assert len(store.list("user:alice")) == 2
    assert store.revoke_subject("user:alice", "cli:root") == 2
    assert store.get(first) is None and store.get(second) is None
    assert store.get(other) is not None


def test_blocked_subject_has_no_session(engine: Engine, store: SessionStore) -> None:
    blocks = UserBlocks(engine)
    session_id, _ = store.create(ALICE, client="a")
    assert blocks.block("user:alice", "cli:root", "left the company")
    assert store.get(session_id) is None
    assert not blocks.block("user:alice", "cli:root")  # already blocked
    assert blocks.subjects() == frozenset({"user:alice"})
    assert blocks.is_blocked("user:alice")
    _, by, reason = blocks.blocked()["user:alice"]
    assert (by, reason) == ("cli:root", "left the company")
    # A session created while blocked (a login racing the block) is not served either.
    late, _ = store.create(ALICE, client="a")
    assert store.get(late) is None
    assert blocks.unblock("user:alice") and not blocks.unblock("user:alice")
    assert store.get(session_id) is None  # unblocking does not bring ended sessions back
    assert store.get(late) is not None


def test_set_groups(store: SessionStore, clock: Clock) -> None:
    session_id, session = store.create(ALICE, client="a")
    clock.advance(minutes=20)
    store.set_groups(session.key, ["group:ldap/b", "group:ldap/a"])
    found = store.get(session_id)
    assert found is not None
    assert found.groups == ("group:ldap/a", "group:ldap/b")
    assert found.groups_checked_at == clock.now


def test_prune_is_bounded_and_keeps_recent(store: SessionStore, clock: Clock) -> None:
    ended = [store.create(ALICE, client="a") for _ in range(5)]
    for session_id, _ in ended:
        store.revoke(session_id, "test")
    live, _ = store.create(ALICE, client="a")
    assert store.prune() == 0  # ended just now: kept for a week
    clock.advance(days=8)
    fresh, _ = store.create(ALICE, client="a")
    assert store.prune(limit=3) == 3
    assert store.prune(limit=3) == 3  # the 2 revoked ones and the idle one
    assert store.prune(limit=3) == 0
    assert store.get(fresh) is not None
    assert store.get(live) is None


# -- the cookie -----------------------------------------------------------------------------


def cookie_headers(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"cookie", v.encode("latin-1")) for v in values]


def test_cookie_round_trip_and_flags() -> None:
    cookie = SessionCookie(KEY, name="mlflow_guard_session", secure=False, max_age=43200)
    name, value = cookie.set("abc")
    assert name == b"set-cookie"
    text = value.decode()
    assert text.startswith("mlflow_guard_session=")
    assert "HttpOnly" in text and "SameSite=Lax" in text and "Path=/" in text
    assert "Secure" not in text and "Max-Age=43200" in text
    signed = text.split(";")[0].split("=", 1)[1]
    assert cookie.read(cookie_headers(f"other=1; mlflow_guard_session={signed}")) == "abc"
    assert cookie.clear()[1].decode().startswith("mlflow_guard_session=; Path=/; Max-Age=0")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda v: v[:-1],  # truncated
        lambda v: v[:-1] + ("A" if v[-1] != "A" else "B"),  # signature altered
        lambda v: "x" + v,  # id altered
        lambda v: v.split(".")[0],  # signature dropped
        lambda v: v + "." + v,
        lambda v: "",
        lambda v: v + "A" * 300,  # far too long
        lambda v: "\u00e9" + v,
    ],
)
def test_forged_cookies_are_refused(tamper) -> None:  # type: ignore[no-untyped-def]
    cookie = SessionCookie(KEY, name="s", secure=False, max_age=60)
    value = cookie.encode("the-id")
    assert cookie.decode(value) == "the-id"
    forged = tamper(value)
    header = f"s={forged}".encode().decode("latin-1")
    assert cookie.read(cookie_headers(header)) is None


def test_another_key_or_purpose_does_not_verify() -> None:
    ours = SessionCookie(KEY, name="s", secure=False, max_age=60)
    theirs = SessionCookie(b"x" * 32, name="s", secure=False, max_age=60)
    assert theirs.decode(ours.encode("id")) is None


def test_duplicate_cookie_counts_as_none() -> None:
    cookie = SessionCookie(KEY, name="s", secure=False, max_age=60)
    good = cookie.encode("mine")
    planted = cookie.encode("planted")  # e.g. set by a sibling subdomain, or a fixation attempt
    assert cookie.read(cookie_headers(f"s={good}; s={planted}")) is None
    assert cookie.read(cookie_headers(f"s={good}", f"s={planted}")) is None
    assert cookie.present(cookie_headers(f"s={good}; s={planted}"))


def test_host_prefix_only_over_tls() -> None:
    secure = SessionCookie(KEY, name="s", secure=True, max_age=60)
    plain = SessionCookie(KEY, name="s", secure=False, max_age=60)
    value = secure.encode("id")
    assert secure.name == "__Host-s"
    text = secure.set("id")[1].decode()
    assert text.startswith("__Host-s=") and "; Secure" in text and "Domain" not in text
    # Over TLS only the prefixed name is read: a plain-HTTP cookie a MITM set is ignored.
    assert secure.read(cookie_headers(f"s={value}")) is None
    assert secure.read(cookie_headers(f"__Host-s={value}")) == "id"
    # Without TLS the prefixed name is not ours.
    assert plain.read(cookie_headers(f"__Host-s={value}")) is None
    assert plain.read(cookie_headers(f"s={value}")) == "id"


def test_read_cookies_tolerates_junk() -> None:
    found = read_cookies(cookie_headers('a=1; =x; junk; b="q"; a=2', "c=3"))
    assert found == {"a": ["1", "2"], "b": ["q"], "c": ["3"]}
