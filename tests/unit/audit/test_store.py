"""The audit table as the shipper fills it: SQLite's lean INSERT (rows handed to the driver)
stores exactly what SQLAlchemy's Core statement stores, so queries, verify and history read
both alike; the writer's head row moves forward only."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from guard.audit.chain import Head, derive_key
from guard.audit.store import ROWS_PER_STATEMENT, AuditStore, Filters
from guard.store.db import audit_heads, audit_records, build_engine, migrate

KEY = derive_key(b"s" * 40, "audit-chain")


def sealed(
    bodies: list[dict[str, Any]], writer: str = "gw-a"
) -> tuple[list[dict[str, Any]], list[str]]:
    """``bodies`` sealed as one chain: the records and their lines, as the spool holds them."""
    head, records, lines = Head(writer), [], []
    for body in bodies:
        line, record, head = head.seal_line(KEY, body)
        records.append(record)
        lines.append(line[:-1].decode())
    return records, lines


# Values that test a column's conversion: a lone surrogate, a NUL, text over the column's size,
# non-ASCII, a time given with an offset and one in the far past, no optional field at all.
BODIES: list[dict[str, Any]] = [
    {"kind": "intent", "time": "2026-12-05T10:15:07.708143+00:00", "request_id": "r1",
     "principal": "user:alice", "action": "read", "resource": "model:fraud", "decision": "allow"},
    {"kind": "outcome", "time": "2026-12-05T11:15:07.000001+01:00", "request_id": "r1",
     "principal": "user:\ud800x", "resource": "model:a\x00b", "status": 200, "reason": ""},
    {"kind": "outcome", "time": "1999-01-01T00:00:00+00:00", "request_id": "r" * 300,
     "principal": "p" * 400, "resource": "experiment:Straße", "status": 403,
     "decision": "deny", "reason": "forbidden"},
    {"kind": "event", "time": "2026-12-05T10:15:08Z"},
]  # fmt: skip


def stored(engine: Engine) -> list[tuple[Any, ...]]:
    """Every row as the database holds it (the time as its own text on SQLite)."""
    columns = [c for c in audit_records.c if not c.primary_key]
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(
            f"SELECT {', '.join(c.name for c in columns)} FROM {audit_records.name} ORDER BY seq"  # noqa: S608 - the table's names
        )]  # fmt: skip


@pytest.fixture
def lean_and_core(tmp_path: Path) -> Iterator[tuple[AuditStore, AuditStore]]:
    """Two SQLite stores: one as the gateway has it (the lean INSERT), one with the Core
    statement other databases use."""
    engines = [build_engine(f"sqlite:///{tmp_path / name}.db") for name in ("lean", "core")]
    for engine in engines:
        migrate(engine)
    lean, core = AuditStore(engines[0]), AuditStore(engines[1])
    assert lean._insert is not None  # the lean path is what this compares
    core._insert = None
    yield lean, core
    for engine in engines:
        engine.dispose()


def test_the_lean_insert_stores_what_the_core_statement_stores(
    lean_and_core: tuple[AuditStore, AuditStore],
) -> None:
    records, lines = sealed(BODIES)
    for store in lean_and_core:
        store.insert(records, KEY, lines)
    rows = stored(lean_and_core[0].engine)
    assert len(rows) == len(BODIES)
    assert rows == stored(lean_and_core[1].engine)
    # The time is stored as SQLAlchemy stores it, so time filters compare alike (the second
    # record's 11:15:07.000001+01:00 is before this; the first is at it).
    since = dt.datetime(2026, 12, 5, 10, 15, 7, 708143, tzinfo=dt.UTC)
    for store in lean_and_core:
        assert [r["seq"] for _, r in store.query(Filters(since=since), limit=10)] == [1, 4]


@pytest.mark.parametrize(
    "count", [ROWS_PER_STATEMENT - 1, ROWS_PER_STATEMENT, 2 * ROWS_PER_STATEMENT + 3]
)
def test_batches_of_several_statements_store_every_row_in_order(
    lean_and_core: tuple[AuditStore, AuditStore], count: int
) -> None:
    records, lines = sealed([dict(BODIES[n % len(BODIES)], n=n) for n in range(count)])
    for store in lean_and_core:
        store.insert(records, KEY, lines)
    rows = stored(lean_and_core[0].engine)
    assert [row[1] for row in rows] == list(range(1, count + 1))
    assert rows == stored(lean_and_core[1].engine)
    assert [r for _, r in lean_and_core[0].query(Filters(), limit=count)] == records


def test_stored_rows_read_back_and_filter_on_either_database(engine: Engine) -> None:
    records, lines = sealed(BODIES)
    store = AuditStore(engine)
    store.insert(records, KEY, lines)
    assert [r for _, r in store.query(Filters(), limit=10)] == records
    by_principal = store.query(Filters(principal="user:\ud800x"), limit=10)
    assert [r["seq"] for _, r in by_principal] == [2]
    by_resource = store.query(Filters(resource="model:a\x00b", literal=True), limit=10)
    assert [r["seq"] for _, r in by_resource] == [2]
    long = store.query(Filters(principal="p" * 400, request_id="r" * 300), limit=10)
    assert [r["seq"] for _, r in long] == [3]
    old = store.query(Filters(until=dt.datetime(2000, 1, 1, tzinfo=dt.UTC)), limit=10)
    assert [r["seq"] for _, r in old] == [3]
    assert store.max_seq("gw-a") == len(BODIES)


def test_the_head_row_moves_forward_only(engine: Engine) -> None:
    records, lines = sealed([{"kind": "event", "time": "2026-12-05T10:00:00Z"}] * 5)
    store = AuditStore(engine)

    def head() -> tuple[int, str]:
        with engine.connect() as conn:
            row = conn.execute(sa.select(audit_heads.c.seq, audit_heads.c.mac)).one()
        return int(row.seq), str(row.mac)

    store.insert(records[:3], KEY, lines[:3])  # the first batch makes the row
    assert head() == (3, records[2]["mac"])
    store.insert(records[3:], KEY, lines[3:])
    assert head() == (5, records[4]["mac"])
    other, other_lines = sealed([{"kind": "event", "time": "2026-12-05T10:00:00Z"}], "gw-b")
    store.insert(other, KEY, other_lines)  # another writer: its own row
    with engine.connect() as conn:
        heads = dict(conn.execute(sa.select(audit_heads.c.writer, audit_heads.c.seq)).all())
    assert heads == {"gw-a": 5, "gw-b": 1}
    # A batch replayed below the head (a restart storing again) leaves the row where it is.
    with engine.begin() as conn:
        conn.execute(audit_records.delete().where(audit_records.c.seq <= 2,
                                                  audit_records.c.writer == "gw-a"))  # fmt: skip
    store.insert(records[:2], KEY, lines[:2])
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(audit_heads.c.seq, audit_heads.c.mac).where(audit_heads.c.writer == "gw-a")
        ).one()
    assert (row.seq, row.mac) == (5, records[4]["mac"])


def test_a_full_statement_binds_no_more_values_than_any_sqlite_allows() -> None:
    """ROWS_PER_STATEMENT rows of every column but the id, in one INSERT: SQLite builds before
    3.32 allow 999 values per statement (later ones 32,766), so a column added to the table
    must not take a full statement past that, or every batch of 64 would fail to store."""
    bound = [c for c in audit_records.c if not c.primary_key]
    assert len(bound) * ROWS_PER_STATEMENT <= 999
