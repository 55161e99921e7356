"""User names bound to identities (guard/identity/bindings.py) on SQLite and PostgreSQL: the
first claim wins, the same identity is let in again, another is refused until the name is freed
or linked, two first claims at once leave one winner, and confirmed bindings are cached."""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import pytest
import sqlalchemy as sa

from guard.identity.bindings import IdentityBindings
from guard.identity.ldap import stable_id
from guard.store.db import build_engine, identities


class Clock:
    def __init__(self) -> None:
        self.monotonic = 0.0
        self.now = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)

    def tick(self) -> float:
        return self.monotonic

    def wall(self) -> dt.datetime:
        return self.now


def bindings(engine: sa.Engine, clock: Clock | None = None, ttl: float = 60.0) -> IdentityBindings:
    clock = clock or Clock()
    return IdentityBindings(engine, ttl=ttl, clock=clock.tick, now=clock.wall)


def test_the_first_login_claims_and_the_same_identity_comes_back(engine: sa.Engine) -> None:
    clock = Clock()
    store = bindings(engine, clock)
    assert store.claim("user:alice", "ldap", "uuid-a") is None
    [row] = store.all()
    assert (row.subject, row.source, row.stable_id) == ("user:alice", "ldap", "uuid-a")
    assert row.created_at == row.last_seen_at == clock.now
    assert store.queries == 1
    assert store.claim("user:alice", "ldap", "uuid-a") is None
    assert store.queries == 1  # cached: no database round trip
    clock.monotonic += 61  # the cache entry expired: one query, last_seen moves on
    clock.now += dt.timedelta(minutes=5)
    assert store.claim("user:alice", "ldap", "uuid-a") is None
    assert store.queries == 2
    [row] = store.all()
    assert row.last_seen_at == clock.now and row.created_at == clock.now - dt.timedelta(minutes=5)


@pytest.mark.parametrize(("source", "other_id"), [("ldap", "uuid-b"), ("oidc", "uuid-a")])
def test_another_identity_is_refused_even_with_the_name_cached(
    engine: sa.Engine, source: str, other_id: str
) -> None:
    store = bindings(engine)
    assert store.claim("user:alice", "ldap", "uuid-a") is None
    other = store.claim("user:alice", source, other_id)  # the cache never answers for another
    assert other is not None and (other.source, other.stable_id) == ("ldap", "uuid-a")
    assert store.claim("user:alice", source, other_id) is not None  # a refusal is not cached
    assert [(b.source, b.stable_id) for b in store.all()] == [("ldap", "uuid-a")]


def test_unlink_frees_the_name_and_link_binds_it(engine: sa.Engine) -> None:
    gateway = bindings(engine)
    admin = bindings(engine, ttl=0)
    assert gateway.claim("user:alice", "ldap", "uuid-a") is None
    assert admin.unlink("user:alice") is True
    assert admin.unlink("user:alice") is False
    assert admin.all() == []
    gateway.forget("user:alice")  # (another process's cache expires after ttl)
    assert gateway.claim("user:alice", "ldap", "uuid-b") is None  # the next login claims it
    previous = admin.link("user:alice", "ldap", "uuid-c")
    assert previous is not None and previous.stable_id == "uuid-b"
    gateway.forget("user:alice")
    assert gateway.claim("user:alice", "ldap", "uuid-b") is not None
    assert gateway.claim("user:alice", "ldap", "uuid-c") is None
    assert admin.link("user:bob", "ldap", "uuid-d") is None  # link also binds a new name
    assert gateway.claim("user:bob", "ldap", "uuid-e") is not None
    for subject, source, sid in [
        ("token:ci", "ldap", "x"),
        ("user:x", "", "x"),
        ("user:x", "ldap", ""),
    ]:
        with pytest.raises(ValueError, match="user:<name>"):
            admin.link(subject, source, sid)


def test_two_first_logins_at_once_leave_one_winner(engine: sa.Engine) -> None:
    """Two processes (no shared cache) claim each name at the same moment with different ids:
    the primary key lets one insert win; the other sees the winner and is refused."""
    rounds = 10
    stores = [bindings(engine), bindings(engine)]
    results: dict[int, list[object]] = {0: [], 1: []}
    barrier = threading.Barrier(2, timeout=10)

    def contender(i: int) -> None:
        for n in range(rounds):
            barrier.wait()
            results[i].append(stores[i].claim(f"user:racer{n}", "ldap", f"id-{i}"))

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.select(identities.c.subject, identities.c.stable_id)).all())
    for n in range(rounds):
        winners = [i for i in range(2) if results[i][n] is None]
        assert len(winners) == 1, (n, results[0][n], results[1][n])
        loser = results[1 - winners[0]][n]
        assert getattr(loser, "stable_id", None) == f"id-{winners[0]}"
        assert rows[f"user:racer{n}"] == f"id-{winners[0]}"


def test_the_lost_insert_of_a_race_reads_the_winner(engine: sa.Engine) -> None:
    """The path where the row appears between the claim's read and its insert, made certain:
    another process's claim commits right before this one's INSERT runs, so the unique key
    refuses it and the claim reads the winner instead of failing."""
    loser_engine = build_engine(str(engine.url.render_as_string(hide_password=False)))
    winner = bindings(engine)
    loser = bindings(loser_engine)
    fired: list[str] = []

    def before(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO GUARD_IDENTITY") and not fired:
            fired.append(statement)
            assert winner.claim("user:late", "ldap", "winner-id") is None

    sa.event.listen(loser_engine, "before_cursor_execute", before)
    try:
        other = loser.claim("user:late", "ldap", "loser-id")
    finally:
        sa.event.remove(loser_engine, "before_cursor_execute", before)
        loser_engine.dispose()
    assert fired, "the loser never tried to insert"
    assert other is not None and other.stable_id == "winner-id"
    assert [b.stable_id for b in winner.all()] == ["winner-id"]


def test_stable_ids_as_text() -> None:
    guid = uuid.UUID("01234567-89ab-cdef-0123-456789abcdef")
    assert stable_id("objectGUID", [guid.bytes_le]) == str(guid)  # AD's byte order
    assert stable_id("entryUUID", [b"5c3a0f4e-1111-2222-3333-444455556666"]) == (
        "5c3a0f4e-1111-2222-3333-444455556666"
    )
    assert stable_id("nsUniqueId", [b"\xff\x00"]) == "ff00"  # not UTF-8: hex
    assert stable_id("entryUUID", None) == stable_id("entryUUID", [b""]) == ""
