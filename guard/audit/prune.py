"""Retention: move old records out of the table into an archive that still verifies.

Each writer's chain is cut at a sequence number: every record of that writer up to the newest
one older than ``before`` goes. The archive (JSON lines) starts with a header naming, per writer,
the head its records continue from, so ``audit verify --archive FILE`` checks it on its own. The
table keeps a signed anchor per writer (the last archived record's seq and MAC), so the records
left still verify, and moving an anchor forward to hide deletions breaks its signature. Nothing
is cut that does not verify: the records to be archived are checked first (their chains, the
anchors and the heads known outside the table), so a prune cannot launder a tampered stretch
into an archive.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from guard.audit.chain import Head, Problem, canonical, derive_key, verify
from guard.audit.store import AuditStore
from guard.store.db import audit_anchors, audit_records

ARCHIVE_VERSION = 1


def sign_anchor(key: bytes, head: Head) -> str:
    message = f"anchor\n{head.writer}\n{head.seq}\n{head.mac}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def anchor_problems(key: bytes, engine: Engine) -> list[Problem]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(audit_anchors)).all()
    return [
        Problem(r.writer, int(r.seq), "its anchor (where a prune cut the chain) was altered")
        for r in rows
        if not hmac.compare_digest(r.signature, sign_anchor(key, Head(r.writer, int(r.seq), r.mac)))
    ]


def prune(engine: Engine, secret_key: bytes, before: dt.datetime, archive: Path) -> int:
    """Archive and delete every writer's records up to its newest one older than ``before``;
    returns how many. The archive is written and fsynced before anything is deleted, and is
    never overwritten."""
    if archive.exists():
        raise FileExistsError(f"{archive} exists; an archive is never overwritten")
    key = derive_key(secret_key, "audit-chain")
    store = AuditStore(engine)
    c = audit_records.c
    with engine.connect() as conn:
        cuts = dict(
            conn.execute(
                sa.select(c.writer, sa.func.max(c.seq)).where(c.time < before).group_by(c.writer)
            ).all()
        )
    if not cuts:
        return 0
    starts = store.anchors()
    pruned: list[dict[str, Any]] = []
    last: dict[str, Head] = {}
    for record in store.chain():
        writer = record.get("writer")
        seq = record.get("seq")
        if writer in cuts and isinstance(seq, int) and seq <= cuts[writer]:
            pruned.append(record)
            last[str(writer)] = Head(str(writer), seq, str(record.get("mac", "")))
    problems = _cut_problems(key, engine, pruned, starts, cuts)
    if problems:
        raise ValueError(
            "nothing pruned: the records to be cut do not verify ("
            + "; ".join(map(str, problems)) + "); run `mlflow-guard audit verify`"
        )  # fmt: skip
    # The header is signed and names where each chain starts and ends and how many records
    # there are, so cutting records off either end of the archive is found too.
    header: dict[str, Any] = {
        "archive": ARCHIVE_VERSION,
        "before": before.isoformat(),
        "created": dt.datetime.now(dt.UTC).isoformat(),
        "count": len(pruned),
        "start": {w: _head(starts.get(w, Head(w))) for w in sorted(last)},
        "end": {w: _head(h) for w, h in sorted(last.items())},
    }
    header["signature"] = _sign_header(key, header)
    fd = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(header, sort_keys=True) + "\n")
        for record in pruned:
            out.write(json.dumps(record, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())
    count = len(pruned)
    with engine.begin() as conn:
        for writer, seq in cuts.items():
            conn.execute(audit_records.delete().where(c.writer == writer, c.seq <= seq))
            head = last[writer]
            conn.execute(audit_anchors.delete().where(audit_anchors.c.writer == writer))
            conn.execute(
                audit_anchors.insert().values(
                    writer=writer, seq=head.seq, mac=head.mac, signature=sign_anchor(key, head)
                )
            )
    return count


def _cut_problems(
    key: bytes,
    engine: Engine,
    pruned: list[dict[str, Any]],
    starts: dict[str, Head],
    cuts: dict[str, int],
) -> list[Problem]:
    """What is wrong with the stretch about to be cut: its chains from their anchors to the
    cut, and any head known outside the table that falls inside it."""
    from guard.audit.commands import vouched_heads  # (commands imports this module)

    anchored, forged = AuditStore(engine).heads(key)
    known = vouched_heads(engine, key)
    for head in anchored.values():
        known.setdefault(head.writer, []).append(head)
    inside = {w: [h for h in hs if h.seq <= cuts.get(w, 0)] for w, hs in known.items()}
    problems = anchor_problems(key, engine)
    problems += [Problem(w, 0, "its head row was altered") for w in forged if w in cuts]
    return problems + verify(key, pruned, start=starts, vouched=inside)


def _head(head: Head) -> dict[str, Any]:
    return {"seq": head.seq, "mac": head.mac}


def _sign_header(key: bytes, header: dict[str, Any]) -> str:
    body = {k: v for k, v in header.items() if k != "signature"}
    return hmac.new(key, b"archive\n" + canonical(body), hashlib.sha256).hexdigest()


def verify_archive(secret_key: bytes, archive: Path) -> tuple[int, list[Problem]]:
    """(records in the archive, the first break in each of its chains, or in its header)."""
    key = derive_key(secret_key, "audit-chain")
    with archive.open() as source:
        header: dict[str, Any] = json.loads(source.readline())
        if header.get("archive") != ARCHIVE_VERSION:
            raise ValueError(f"{archive} is not a mlflow-guard audit archive")
        records = [json.loads(line) for line in source if line.strip()]
    if not hmac.compare_digest(str(header.get("signature", "")), _sign_header(key, header)):
        return len(records), [Problem("(archive)", 0, "its header was altered")]
    start = {w: Head(w, int(h["seq"]), str(h["mac"])) for w, h in header["start"].items()}
    ends = {w: Head(w, int(h["seq"]), str(h["mac"])) for w, h in header["end"].items()}
    problems = verify(key, records, start=start, heads=ends)
    if len(records) != header["count"] and not problems:
        count = header["count"]
        problems.append(Problem("(archive)", 0, f"holds {len(records)} records, not {count}"))
    return len(records), problems
