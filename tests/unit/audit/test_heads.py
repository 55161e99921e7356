"""Heads kept outside the chains: a writer's signed head row and the heads other writers note.
Deleting a chain's newest records, or the whole chain, is found without that writer's spool;
prune cuts only what verifies; history checks MACs and reads a model name as a name."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from guard.audit.chain import derive_key
from guard.audit.commands import verify_trail
from guard.audit.history import AlteredRecords, model_history
from guard.audit.prune import prune
from guard.audit.shipper import Shipper
from guard.audit.spool import Spool
from guard.audit.store import AuditStore
from guard.store.db import audit_heads, audit_records

SECRET = b"s" * 40
KEY = derive_key(SECRET, "audit-chain")


def record(n: int, **fields: Any) -> dict[str, Any]:
    return {"kind": "outcome", "time": dt.datetime.now(dt.UTC).isoformat(),
            "request_id": f"r{n}", "status": 200, **fields}  # fmt: skip


def write(directory: Path, engine: Engine, bodies: list[dict[str, Any]]) -> Shipper:
    """Spool ``bodies`` as one writer and store them all; the shipper (for vouching)."""
    spool = Spool(directory, KEY, segment_size=1 << 20)
    spool.open()
    try:
        for body in bodies:
            asyncio.run(spool.append(body))
    finally:
        spool.close()
    shipper = Shipper(spool, AuditStore(engine))
    shipper.ship_all()
    return shipper


def writer_of(directory: Path) -> str:
    return (directory / "writer").read_text().strip()


def problems(engine: Engine) -> list[str]:
    """What verify reports with no spool to compare with (another host's view)."""
    unchecked: list[str] = []
    _, found = verify_trail(engine, SECRET, [], unchecked)
    assert unchecked == []  # every writer has a head outside the table
    return [str(p) for p in found]


def test_each_stored_batch_moves_its_writers_signed_head(tmp_path: Path, engine: Engine) -> None:
    write(tmp_path / "a", engine, [record(n) for n in range(5)])
    anchored, forged = AuditStore(engine).heads(KEY)
    writer = writer_of(tmp_path / "a")
    assert forged == [] and anchored[writer].seq == 5
    assert problems(engine) == []


@pytest.mark.parametrize("deleted", ["newest", "all"])
def test_a_chain_cut_short_or_deleted_is_found_without_its_spool(
    tmp_path: Path, engine: Engine, deleted: str
) -> None:
    write(tmp_path / "a", engine, [record(n) for n in range(5)])
    writer = writer_of(tmp_path / "a")
    cut = audit_records.c.seq >= (4 if deleted == "newest" else 1)
    with engine.begin() as conn:
        conn.execute(audit_records.delete().where(audit_records.c.writer == writer, cut))
    (found,) = problems(engine)
    if deleted == "newest":
        assert f"writer {writer}, record 4: truncated: records 4..5 missing" in found
    else:
        assert f"writer {writer}, record 1: deleted: its whole chain 1..5 missing" in found


def test_a_head_row_moved_back_or_forged_is_found(tmp_path: Path, engine: Engine) -> None:
    write(tmp_path / "a", engine, [record(n) for n in range(5)])
    writer = writer_of(tmp_path / "a")
    with engine.begin() as conn:  # hide the newest two: delete them and move the head back
        conn.execute(audit_records.delete().where(audit_records.c.seq >= 4))
        conn.execute(audit_heads.update().values(seq=3))
    assert problems(engine) == [f"writer {writer}, record 0: its head row (where its chain "
                                "ends) was altered"]  # fmt: skip


def test_other_writers_vouch_for_a_head_even_when_its_row_is_deleted(
    tmp_path: Path, engine: Engine
) -> None:
    write(tmp_path / "b", engine, [record(n) for n in range(3)])
    victim = writer_of(tmp_path / "b")
    spool = Spool(tmp_path / "a", KEY, segment_size=1 << 20)
    spool.open()
    witness = Shipper(spool, AuditStore(engine))
    try:
        asyncio.run(spool.append(record(1)))
        witness.ship_all()
        witness._vouch()  # what the running shipper does every VOUCH_INTERVAL
    finally:
        spool.close()
    witness.ship_all()
    notes = [r for r in AuditStore(engine).chain() if r.get("event") == "heads_seen"]
    assert notes and notes[0]["heads"][victim][0] == 3
    with engine.begin() as conn:  # the victim's chain and its head row, both gone
        conn.execute(audit_records.delete().where(audit_records.c.writer == victim))
        conn.execute(audit_heads.delete().where(audit_heads.c.writer == victim))
    assert problems(engine) == [f"writer {victim}, record 1: deleted: its whole chain 1..3 "
                                "missing (its head is known outside the table)"]  # fmt: skip


def test_prune_refuses_to_cut_what_does_not_verify(tmp_path: Path, engine: Engine) -> None:
    write(tmp_path / "a", engine, [record(n, principal=f"user:{n}") for n in range(4)])
    with engine.begin() as conn:
        edited = sa.func.replace(audit_records.c.record, "user:1", "user:9")
        conn.execute(audit_records.update().where(audit_records.c.seq == 2).values(record=edited))
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    with pytest.raises(ValueError, match=r"nothing pruned: .* record 2: altered"):
        prune(engine, SECRET, future, tmp_path / "archive.jsonl")
    assert not (tmp_path / "archive.jsonl").exists()
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(audit_records)).scalar() == 4


def test_prune_keeps_the_rest_verifiable_against_the_head_rows(
    tmp_path: Path, engine: Engine
) -> None:
    write(tmp_path / "a", engine, [record(n) for n in range(4)])
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    assert prune(engine, SECRET, future, tmp_path / "archive.jsonl") == 4
    assert problems(engine) == []  # nothing left, and the head matches the prune's anchor


def alias(n: int, model: str, version: str) -> dict[str, Any]:
    return record(n, method="POST", path="/api/2.0/mlflow/registered-models/alias",
                  resource=f"model:{model}", decision="allow", principal="token:ci",
                  changes={"name": model, "alias": "champion", "version": version})  # fmt: skip


def test_history_reads_a_model_name_as_a_name(tmp_path: Path, engine: Engine) -> None:
    write(tmp_path / "a", engine, [alias(1, "fraud*", "1"), alias(2, "fraud-x", "2"),
                                   alias(3, "fraud?", "3")])  # fmt: skip
    assert [s.version for s in model_history(engine, "fraud*", SECRET)] == ["1"]
    assert [s.version for s in model_history(engine, "fraud?", SECRET)] == ["3"]
    assert [s.version for s in model_history(engine, "fraud-x", SECRET)] == ["2"]


def test_history_of_a_model_in_a_workspace(tmp_path: Path, engine: Engine) -> None:
    """Model names are per MLflow workspace: team-a's fraud is not team-b's."""
    a, b = alias(1, "fraud", "1"), alias(2, "fraud", "2")
    a["resource"], b["resource"] = "team-a/model:fraud", "team-b/model:fraud"
    write(tmp_path / "a", engine, [a, b, alias(3, "fraud", "3")])
    assert [s.version for s in model_history(engine, "fraud", SECRET, "team-a")] == ["1"]
    assert [s.version for s in model_history(engine, "fraud", SECRET, "team-b")] == ["2"]
    assert [s.version for s in model_history(engine, "fraud", SECRET)] == ["3"]


def test_history_is_never_built_from_an_altered_record(tmp_path: Path, engine: Engine) -> None:
    write(tmp_path / "a", engine, [alias(1, "fraud", "1"), alias(2, "fraud", "2")])
    with engine.begin() as conn:  # who set the alias, rewritten
        edited = sa.func.replace(audit_records.c.record, "token:ci", "token:xx")
        conn.execute(audit_records.update().where(audit_records.c.seq == 2).values(record=edited))
    with pytest.raises(AlteredRecords, match=r"#2"):
        model_history(engine, "fraud", SECRET)
