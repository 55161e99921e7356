"""Retention: move old records out of the table into an archive that still verifies.

Each writer's chain is cut at a sequence number: every record of that writer up to the newest
one older than ``before`` goes. The archive (JSON lines) starts with a header naming, per writer,
the head its records continue from, so ``audit verify --archive FILE`` checks it on its own. The
table keeps a signed anchor per writer (the last archived record's seq and MAC), so the records
left still verify, and moving an anchor forward to hide deletions breaks its signature.
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

from guard.audit.chain import Head, Problem, derive_key, verify
from guard.audit.store import AuditStore
from guard.db import audit_anchors, audit_records

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
    header = {
        "archive": ARCHIVE_VERSION,
        "before": before.isoformat(),
        "created": dt.datetime.now(dt.UTC).isoformat(),
        "start": {w: {"seq": h.seq, "mac": h.mac} for w, h in starts.items() if w in cuts},
    }
    count, last = 0, {}
    fd = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(header, sort_keys=True) + "\n")
        for record in store.chain():
            writer = record.get("writer")
            if (
                writer in cuts
                and isinstance(record.get("seq"), int)
                and record["seq"] <= cuts[writer]
            ):
                out.write(json.dumps(record, sort_keys=True) + "\n")
                last[writer] = Head(str(writer), record["seq"], str(record["mac"]))
                count += 1
        out.flush()
        os.fsync(out.fileno())
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


def verify_archive(secret_key: bytes, archive: Path) -> tuple[int, list[Problem]]:
    """(records in the archive, the first break in each of its chains)."""
    key = derive_key(secret_key, "audit-chain")
    with archive.open() as source:
        header: dict[str, Any] = json.loads(source.readline())
        if header.get("archive") != ARCHIVE_VERSION:
            raise ValueError(f"{archive} is not a mlflow-guard audit archive")
        start = {
            w: Head(w, int(h["seq"]), str(h["mac"])) for w, h in header.get("start", {}).items()
        }
        records = [json.loads(line) for line in source if line.strip()]
    return len(records), verify(key, records, start=start)
