"""What ``mlflow-guard audit ...`` does: verify the chains, query and export records.

The CLI parses arguments and calls these; they take an engine and the secret key, never the
network.
"""

from __future__ import annotations

import csv
import datetime as dt
import hmac
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.engine import Engine

from guard.audit.chain import Head, Problem, derive_key, mac_of, verify
from guard.audit.prune import anchor_problems
from guard.audit.spool import read_records, read_stored, segments
from guard.audit.store import AuditStore, Filters

TABLE_COLUMNS = ("time", "principal", "method", "path", "action", "resource", "decision",
                 "reason", "status")  # fmt: skip


def read_head(spool_dir: Path) -> Head | None:
    """The head a spool recorded beside itself (``head.json``), if there is one."""
    try:
        data = json.loads((spool_dir / "head.json").read_text())
        return Head(str(data["writer"]), int(data["seq"]), str(data["mac"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _with_spooled(
    stored: Iterable[dict[str, Any]],
    spools: list[Path],
    anchors: dict[str, Head],
    stored_to: dict[str, int],
    gone: dict[str, tuple[int, list[int]]],
) -> Iterator[dict[str, Any]]:
    """The stored records, each writer's chain continued by what its spool holds beyond them
    (records not yet shipped are part of the chain too). Spooled records at or below
    ``stored_to`` (known to have been stored) that the table lacks are not part of it: they go
    into ``gone`` (writer -> (last seq the table holds, their seqs))."""
    tails: dict[str, list[dict[str, Any]]] = {}
    for spool in spools:
        for path in segments(spool):
            try:
                found = read_records(path)
            except FileNotFoundError:  # stored and deleted by the shipper meanwhile
                continue
            for record, _ in found:
                tails.setdefault(str(record.get("writer")), []).append(record)
    last: dict[str, int] = {w: h.seq for w, h in anchors.items()}

    def tail(name: str) -> Iterator[dict[str, Any]]:
        after, known = last.get(name, 0), stored_to.get(name, 0)
        for record in tails.pop(name, []):
            seq = record.get("seq")
            if not isinstance(seq, int) or seq <= after:
                continue  # stored (or pruned) and still in the table (or the archive)
            if seq <= known:
                gone.setdefault(name, (after, []))[1].append(seq)
                continue
            yield record

    writer = None
    for record in stored:
        if writer is not None and record.get("writer") != writer:
            yield from tail(writer)
        writer = str(record.get("writer"))
        seq = record.get("seq")
        last[writer] = seq if isinstance(seq, int) else last.get(writer, 0)
        yield record
    if writer is not None:
        yield from tail(writer)
    for name in sorted(tails):
        yield from tail(name)


def _runs(seqs: list[int]) -> str:
    """Sequence numbers as ranges: ``3..4, 7..9``."""
    runs: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if runs and seq == runs[-1][1] + 1:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq])
    text = ", ".join(f"{a}..{b}" if a != b else str(a) for a, b in runs[:5])
    return text + (", ..." if len(runs) > 5 else "")


def vouched_heads(engine: Engine, key: bytes) -> dict[str, list[Head]]:
    """The heads writers noted of each other (``heads_seen`` events whose own MAC holds)."""
    found: dict[str, list[Head]] = {}
    for record in query_records(engine, Filters(kind="event"), None):
        if record.get("event") != "heads_seen" or not isinstance(record.get("heads"), dict):
            continue
        if not hmac.compare_digest(str(record.get("mac", "")), mac_of(key, record)):
            continue  # an altered note vouches for nothing (its chain's check reports it)
        for writer, head in record["heads"].items():
            try:
                found.setdefault(writer, []).append(Head(writer, int(head[0]), str(head[1])))
            except (TypeError, ValueError, IndexError):
                continue
    return found


def verify_trail(
    engine: Engine, secret_key: bytes, spools: list[Path], unchecked: list[str] | None = None
) -> tuple[int, list[Problem]]:
    """(records checked, the first break in each chain). Each chain is checked against every
    head known outside it: the heads beside the ``spools`` given (with their unshipped
    records), the signed head rows the writers keep in the database, and the heads other
    writers noted in their chains, and how far each spool says it was stored; a chain that
    stops short of one, or is gone, was cut, and what was stored and is left only in a spool was
    deleted from the database. Writers with no head known outside the table are appended to
    ``unchecked``: their newest records (or all of them) could have been deleted unseen."""
    store = AuditStore(engine)
    key = derive_key(secret_key, "audit-chain")
    heads = {h.writer: h for h in (read_head(s) for s in spools) if h is not None}
    # Everything that says how far a chain was stored is read before the table is, so a batch
    # stored meanwhile cannot look deleted.
    noted = [found for found in (read_stored(s, key) for s in spools) if found is not None]
    shipped = {head.writer: head for head, valid in noted if valid}
    anchored, forged = store.heads(key)
    known = vouched_heads(engine, key)
    says: dict[str, tuple[int, str]] = {}  # writer -> (stored up to, who says so)
    for writer, found in known.items():
        says[writer] = (max(h.seq for h in found), "another writer's heads_seen note")
    for head, source in [*((h, "its spool's stored.json") for h in shipped.values()),
                         *((h, "its head row") for h in anchored.values())]:  # fmt: skip
        known.setdefault(head.writer, []).append(head)
        if head.seq >= says.get(head.writer, (0, ""))[0]:
            says[head.writer] = (head.seq, source)
    counted = 0
    writers: set[str] = set()

    def counting(records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        nonlocal counted
        for record in records:
            counted += 1
            writers.add(str(record.get("writer")))
            yield record

    anchors = store.anchors()
    gone: dict[str, tuple[int, list[int]]] = {}
    stored_to = {w: seq for w, (seq, _) in says.items()}
    records = counting(_with_spooled(store.chain(), spools, anchors, stored_to, gone))
    problems = anchor_problems(key, engine) + [
        Problem(w, 0, "its head row (where its chain ends) was altered") for w in forged
    ]
    problems += [
        Problem(head.writer, 0, "its spool's stored.json (how far it was stored) was altered")
        for head, valid in noted if not valid
    ]  # fmt: skip
    breaks = verify(key, records, start=anchors, heads=heads, vouched=known)
    # A stored record the table lacks but the spool holds was deleted from the database: say
    # that, rather than the gap it leaves (which the spool's copy used to fill unnoticed).
    for writer, (after, seqs) in sorted(gone.items()):
        breaks = [p for p in breaks if p.writer != writer or p.seq <= after]
        top, source = says[writer]
        breaks.append(Problem(
            writer, after + 1,
            f"deleted from the database: records {after + 1}..{top} were stored ({source} says "
            f"so) and the table lacks them; the spool still holds {_runs(seqs)}",
        ))  # fmt: skip
    problems += sorted(breaks, key=lambda p: (p.writer, p.seq))
    if unchecked is not None:
        unchecked.extend(sorted((writers | set(anchors)) - set(heads) - set(known) - set(forged)))
    return counted, problems


def parse_when(value: str) -> dt.datetime:
    """A date (2026-01-01) or a time (2026-01-01T12:00, UTC unless it says otherwise)."""
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def write_records(
    records: Iterable[dict[str, Any]],
    fmt: str,
    out: TextIO,
    columns: tuple[str, ...] = TABLE_COLUMNS,
) -> int:
    """Write records as ``table``, ``csv`` or ``jsonl`` (all fields; the others show
    ``columns``); returns how many."""
    count = 0
    if fmt == "jsonl":
        for record in records:
            out.write(json.dumps(record, sort_keys=True) + "\n")
            count += 1
        return count
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(columns)
        for record in records:
            writer.writerow([_cell(record.get(c, "")) for c in columns])
            count += 1
        return count
    rows = [[_cell(r.get(c, "")) for c in columns] for r in records]
    widths = [max([len(c.upper())] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]
    out.write(
        "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n"
    )
    for row in rows:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")
    return len(rows)


def _cell(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    # A record's fields come from requests: keep control characters off the operator's terminal.
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def query_records(
    engine: Engine,
    filters: Filters,
    limit: int | None,
    page: int = 1000,
    *,
    newest_first: bool = False,
) -> Iterator[dict[str, Any]]:
    """Matching records, oldest stored first (or newest), at most ``limit`` (None: all), read a
    page at a time."""
    store = AuditStore(engine)
    after, left = 0, limit
    while left is None or left > 0:
        size = page if left is None else min(page, left)
        batch = store.query(filters, after=after, limit=size, newest_first=newest_first)
        for row_id, record in batch:
            after = row_id
            yield record
        if left is not None:
            left -= len(batch)
        if len(batch) < size:
            return
