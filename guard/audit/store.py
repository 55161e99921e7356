"""The audit table: records in, records out, for the shipper, the CLI and the API.

Each row is one sealed record. ``(writer, seq)`` is unique, which makes shipping idempotent: a
batch that was stored just before a crash is recognized and skipped when the spool replays it.
"""

from __future__ import annotations

import datetime as dt
import hmac
import itertools
import json
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Engine

from guard.audit.chain import Head, canonical, sign_head
from guard.patterns import resource_match
from guard.store.db import audit_anchors, audit_heads, audit_records

# Columns copied out of a record (name in the record -> its default when absent).
COLUMNS = {
    "kind": "", "request_id": "", "principal": "", "action": "", "resource": "",
    "decision": "", "reason": "", "status": 0,
}  # fmt: skip


def parse_time(value: str) -> dt.datetime:
    """A record's ``time`` (ISO 8601, UTC) as an aware datetime."""
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


# The longest text each column takes (what is longer is cut there; the record holds it whole).
_SIZES: Final = {
    name: column.type.length
    for name in COLUMNS
    if isinstance((column := audit_records.c[name]).type, sa.String) and column.type.length
}


def row_of(record: dict[str, Any], line: str | None = None) -> dict[str, Any]:
    """The row of a record; ``line``: its canonical JSON, as the spool holds it."""
    row = {name: record.get(name) or default for name, default in COLUMNS.items()}
    row["resource"] = str(row["resource"])
    for name in _SIZES:
        row[name] = column_value(name, row[name])
    row["writer"] = record["writer"]
    row["seq"] = record["seq"]
    row["time"] = parse_time(record["time"])
    row["record"] = canonical(record).decode() if line is None else line
    return row


# Rows per INSERT on SQLite: the driver releases the GIL around each statement it steps, and
# every hand-back makes the event loop's thread wait for it; one statement per 64 rows rather
# than one per row took ~7% off the gateway's CPU per request at c=32.
ROWS_PER_STATEMENT: Final = 64


class _SqliteInsert:
    """On SQLite, a batch's rows handed to the driver: the INSERT compiled once from the Core
    statement, each row's values taken in its column order with the conversions the dialect
    does (SQLite's DATETIME text for ``time``: the text time filters compare with), several
    rows per statement: ~16 µs of CPU per record where the Core statement, whose per-row
    parameter handling costs as much as SQLite's own work, took ~20. Other databases keep the
    Core statement (on PostgreSQL it batches rows into multi-row INSERTs itself)."""

    @classmethod
    def of(cls, dialect: Dialect) -> _SqliteInsert | None:
        if dialect.name != "sqlite" or dialect.paramstyle != "qmark":
            return None
        columns = [c for c in audit_records.c if not c.primary_key]
        names = [c.name for c in columns]
        statement = audit_records.insert().values({name: sa.bindparam(name) for name in names})
        compiled = statement.compile(dialect=dialect)
        if list(compiled.positiontup or ()) != names:  # (it orders them as the table does)
            return None
        conversions: list[tuple[int, Callable[[Any], Any]]] = [
            (index, convert)
            for index, c in enumerate(columns)
            if (convert := c.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        return cls(str(compiled), operator.itemgetter(*names), conversions)

    def __init__(
        self, sql: str, values: Callable[[dict[str, Any]], tuple[Any, ...]],
        conversions: list[tuple[int, Callable[[Any], Any]]],
    ) -> None:  # fmt: skip
        self._head, _, self._row = sql.partition(" VALUES ")
        self._values = values
        self._conversions = conversions
        self._full = self._sql(ROWS_PER_STATEMENT)

    def _sql(self, rows: int) -> str:
        return f"{self._head} VALUES {', '.join([self._row] * rows)}"

    def execute(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        values = [list(self._values(row)) for row in rows]
        for index, convert in self._conversions:
            for one in values:
                one[index] = convert(one[index])
        for start in range(0, len(values), ROWS_PER_STATEMENT):
            chunk = values[start : start + ROWS_PER_STATEMENT]
            sql = self._full if len(chunk) == ROWS_PER_STATEMENT else self._sql(len(chunk))
            conn.exec_driver_sql(sql, tuple(itertools.chain.from_iterable(chunk)))


def column_value(name: str, value: Any) -> Any:
    """``value`` as column ``name`` holds it: a text every database takes (a lone surrogate,
    which a request's JSON may carry, or a NUL, which PostgreSQL refuses, backslash-escaped),
    cut to the column's size. Only the columns queries filter on get this (a query's value
    too, so it matches); the record itself, escaped by its canonical JSON, holds the exact
    value."""
    size = _SIZES[name]
    if isinstance(value, str) and (len(value) > size or not value.isascii() or "\x00" in value):
        value = value.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()
        return value[:size]
    return value


@dataclass(frozen=True)
class Filters:
    """What auditors ask for; every field is optional and they combine with AND."""

    principal: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    action: str | None = None
    resource: str | None = None  # a pattern, as in policies: model:fraud-*
    decision: str | None = None
    request_id: str | None = None
    kind: str | None = None
    literal: bool = False  # ``resource`` is one resource's name ("model:a*b" is that model)


class AuditStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = _SqliteInsert.of(engine.dialect)

    def max_seq(self, writer: str) -> int:
        """The newest sequence number stored for ``writer`` (0 if none)."""
        query = sa.select(sa.func.max(audit_records.c.seq)).where(audit_records.c.writer == writer)
        with self.engine.connect() as conn:
            value = conn.execute(query).scalar()
        if value is None:
            anchor = self.anchors().get(writer)
            return anchor.seq if anchor else 0
        return int(value)

    def insert(
        self,
        records: Sequence[dict[str, Any]],
        key: bytes | None = None,
        lines: Sequence[str] | None = None,
    ) -> None:
        """Store a batch in one transaction (all or nothing); with ``key``, each writer's head
        row moves to its newest record in the same transaction, signed. ``lines``: each
        record's canonical JSON as the spool holds it (stored as it is, not encoded again)."""
        if not records:
            return
        rows = (
            [row_of(r) for r in records]
            if lines is None
            else [row_of(r, line) for r, line in zip(records, lines, strict=True)]
        )
        newest: dict[str, Head] = {}
        for record in records if key is not None else ():
            writer, seq = str(record["writer"]), int(record["seq"])
            if seq > newest.get(writer, Head(writer)).seq:
                newest[writer] = Head(writer, seq, str(record["mac"]))
        with self.engine.begin() as conn:
            if self._insert is None:
                conn.execute(audit_records.insert(), rows)
            else:
                self._insert.execute(conn, rows)
            if key is None:
                return
            now = dt.datetime.now(dt.UTC)
            for writer, head in newest.items():
                row = {"seq": head.seq, "mac": head.mac, "signature": sign_head(key, head),
                       "updated_at": now}  # fmt: skip
                moved = conn.execute(  # one writer per chain: nobody moves it meanwhile
                    audit_heads.update()
                    .where(audit_heads.c.writer == writer, audit_heads.c.seq < head.seq)
                    .values(**row)
                )
                if (
                    moved.rowcount == 0
                    and conn.execute(
                        sa.select(audit_heads.c.seq).where(audit_heads.c.writer == writer)
                    ).first()
                    is None
                ):
                    conn.execute(audit_heads.insert().values(writer=writer, **row))

    def heads(self, key: bytes) -> tuple[dict[str, Head], list[str]]:
        """Each writer's anchored head whose signature holds, and the writers whose does not."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(audit_heads)).all()
        good: dict[str, Head] = {}
        bad: list[str] = []
        for r in rows:
            head = Head(r.writer, int(r.seq), r.mac)
            if hmac.compare_digest(r.signature, sign_head(key, head)):
                good[r.writer] = head
            else:
                bad.append(r.writer)
        return good, bad

    def query(
        self, filters: Filters, after: int = 0, limit: int = 100, *, newest_first: bool = False
    ) -> list[tuple[int, dict[str, Any]]]:
        """Up to ``limit`` matching records as ``(row id, record)``: oldest stored first after
        row id ``after``, or with ``newest_first`` newest first before it (0: from the newest).
        The last row id is the cursor for the next page in the same order."""
        c = audit_records.c
        query = sa.select(c.id, c.record, c.resource)
        if newest_first:
            query = query.where(c.id < after) if after else query
            query = query.order_by(c.id.desc())
        else:
            query = query.where(c.id > after).order_by(c.id)
        if filters.principal:
            query = query.where(c.principal == column_value("principal", filters.principal))
        if filters.since:
            query = query.where(c.time >= filters.since)
        if filters.until:
            query = query.where(c.time < filters.until)
        if filters.action:
            query = query.where(c.action == column_value("action", filters.action))
        if filters.decision:
            query = query.where(c.decision == column_value("decision", filters.decision))
        if filters.request_id:
            query = query.where(c.request_id == column_value("request_id", filters.request_id))
        if filters.kind:
            query = query.where(c.kind == column_value("kind", filters.kind))
        pattern = column_value("resource", filters.resource)  # (as the column holds it)
        if pattern and (filters.literal or ("*" not in pattern and "?" not in pattern)):
            query = query.where(c.resource == pattern)
            pattern = None  # matched exactly in SQL
        elif pattern:
            prefix = pattern.split("*", 1)[0].split("?", 1)[0]
            escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            query = query.where(c.resource.like(escaped + "%", escape="\\"))
        result: list[tuple[int, dict[str, Any]]] = []
        # A glob is narrowed by its literal prefix in SQL and matched exactly here. The result
        # is closed even when the limit stops the loop early (PostgreSQL's server-side cursor).
        with (
            self.engine.connect() as conn,
            conn.execution_options(yield_per=500).execute(query) as rows,
        ):
            for row in rows:
                if pattern and not resource_match(row.resource, pattern):
                    continue
                result.append((row.id, json.loads(row.record)))
                if len(result) >= limit:
                    break
        return result

    def chain(self) -> Iterator[dict[str, Any]]:
        """Every record, ordered by writer and sequence number, for verification. A row whose
        columns (what queries filter on) disagree with its record comes back altered, so the
        MAC check reports it."""
        c = audit_records.c
        query = sa.select(audit_records).order_by(c.writer, c.seq)
        with self.engine.connect() as conn:
            for row in conn.execution_options(yield_per=1000).execute(query):
                try:
                    record = json.loads(row.record)
                    expected = row_of(record)
                except (ValueError, KeyError, TypeError, AttributeError):
                    yield {"writer": row.writer, "seq": row.seq, "unreadable": True}
                    continue
                columns = {name: getattr(row, name) for name in expected}
                if columns != expected:
                    record = {**record, "columns_differ": True}
                yield record

    def anchors(self) -> dict[str, Head]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(audit_anchors)).all()
        return {r.writer: Head(r.writer, int(r.seq), r.mac) for r in rows}
