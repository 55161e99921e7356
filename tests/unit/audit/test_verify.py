"""Verify with the gateway's spool at hand: records the database once held and lost are BROKEN
("deleted from the database"), even though the spool still has copies of them and even when
their head rows went with them; records not shipped yet, and pruned ones, are not."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from guard.audit.chain import derive_key
from guard.audit.commands import query_records, verify_trail
from guard.audit.prune import prune
from guard.audit.shipper import Shipper
from guard.audit.spool import STORED, Spool, read_stored
from guard.audit.store import AuditStore, Filters
from guard.cli.main import main
from guard.store.db import audit_anchors, audit_heads, audit_records, build_engine

SECRET = b"s" * 40
KEY = derive_key(SECRET, "audit-chain")
NEWEST_FIVE = (  # the reviewer's statement
    "delete from guard_audit where id in (select id from guard_audit order by id desc limit 5)"
)


def record(n: int, when: dt.datetime | None = None) -> dict[str, Any]:
    return {"kind": "outcome", "time": (when or dt.datetime.now(dt.UTC)).isoformat(),
            "request_id": f"r{n}", "status": 200}  # fmt: skip


def spool_and_ship(
    directory: Path, engine: Engine, bodies: list[dict[str, Any]], *, unshipped: int = 0
) -> str:
    """Spool ``bodies`` as one writer, store all but the last ``unshipped``; its name."""
    spool = Spool(directory, KEY, segment_size=1 << 20)
    spool.open()
    try:
        for body in bodies[: len(bodies) - unshipped]:
            asyncio.run(spool.append(body))
        Shipper(spool, AuditStore(engine)).ship_all()
        for body in bodies[len(bodies) - unshipped :]:
            asyncio.run(spool.append(body))  # spooled, as when the database is down
    finally:
        spool.close()
    return spool.writer


def check(engine: Engine, *spools: Path) -> tuple[int, list[str]]:
    checked, problems = verify_trail(engine, SECRET, list(spools))
    return checked, [str(p) for p in problems]


def wipe(engine: Engine, *tables: sa.Table) -> None:
    with engine.begin() as conn:
        for table in tables:
            conn.execute(table.delete())


def test_the_newest_rows_deleted_are_found_though_the_spool_holds_them(
    tmp_path: Path, engine: Engine
) -> None:
    writer = spool_and_ship(tmp_path / "gw", engine, [record(n) for n in range(12)])
    assert check(engine, tmp_path / "gw") == (12, [])
    with engine.begin() as conn:
        conn.execute(sa.text(NEWEST_FIVE))
    checked, problems = check(engine, tmp_path / "gw")
    assert problems == [
        f"writer {writer}, record 8: deleted from the database: records 8..12 were stored (its "
        "head row says so) and the table lacks them; the spool still holds 8..12"
    ]
    assert checked == 7  # what the table holds: the spool's copies are not counted as stored
    assert len(list(query_records(engine, Filters(), None))) == 7


@pytest.mark.parametrize("also", ["nothing", "head rows", "head rows and anchors"])
def test_every_table_emptied_is_found_from_the_spools_stored_position(
    tmp_path: Path, engine: Engine, also: str
) -> None:
    writer = spool_and_ship(tmp_path / "gw", engine, [record(n) for n in range(9)])
    tables = {"nothing": [], "head rows": [audit_heads],
              "head rows and anchors": [audit_heads, audit_anchors]}[also]  # fmt: skip
    wipe(engine, audit_records, *tables)
    source = "its head row" if also == "nothing" else "its spool's stored.json"
    assert check(engine, tmp_path / "gw") == (0, [
        f"writer {writer}, record 1: deleted from the database: records 1..9 were stored "
        f"({source} says so) and the table lacks them; the spool still holds 1..9"
    ])  # fmt: skip


def test_newest_rows_and_head_row_deleted_are_found(tmp_path: Path, engine: Engine) -> None:
    writer = spool_and_ship(tmp_path / "gw", engine, [record(n) for n in range(6)])
    with engine.begin() as conn:
        conn.execute(audit_records.delete().where(audit_records.c.seq >= 3))
        conn.execute(audit_heads.delete())
    assert check(engine, tmp_path / "gw")[1] == [
        f"writer {writer}, record 3: deleted from the database: records 3..6 were stored (its "
        "spool's stored.json says so) and the table lacks them; the spool still holds 3..6"
    ]


def test_another_writers_note_shows_what_was_stored_without_stored_json(
    tmp_path: Path, engine: Engine
) -> None:
    victim = spool_and_ship(tmp_path / "b", engine, [record(n) for n in range(4)])
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
    (tmp_path / "b" / STORED).unlink()  # the victim's position is gone, and its head row
    with engine.begin() as conn:
        conn.execute(audit_records.delete().where(audit_records.c.writer == victim))
        conn.execute(audit_heads.delete().where(audit_heads.c.writer == victim))
    assert check(engine, tmp_path / "a", tmp_path / "b")[1] == [
        f"writer {victim}, record 1: deleted from the database: records 1..4 were stored "
        "(another writer's heads_seen note says so) and the table lacks them; the spool still "
        "holds 1..4"
    ]


def test_records_not_shipped_yet_are_part_of_the_chain(tmp_path: Path, engine: Engine) -> None:
    writer = spool_and_ship(tmp_path / "gw", engine, [record(n) for n in range(8)], unshipped=3)
    assert read_stored(tmp_path / "gw", KEY) is not None
    assert check(engine, tmp_path / "gw") == (8, [])
    # Stored rows deleted below an unshipped tail: the deletion is named, the tail is not.
    with engine.begin() as conn:
        conn.execute(audit_records.delete().where(audit_records.c.seq >= 4))
    assert check(engine, tmp_path / "gw") == (6, [
        f"writer {writer}, record 4: deleted from the database: records 4..5 were stored (its "
        "head row says so) and the table lacks them; the spool still holds 4..5"
    ])  # fmt: skip
    # Nothing stored ever (the database was down all along): the spool is the whole chain.
    fresh = spool_and_ship(tmp_path / "new", engine, [record(n) for n in range(3)], unshipped=3)
    assert read_stored(tmp_path / "new", KEY) is None
    _, problems = check(engine, tmp_path / "new")
    assert not any(fresh in p for p in problems)


def test_pruned_records_still_in_the_spool_are_not_deleted_ones(
    tmp_path: Path, engine: Engine
) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    bodies = [record(n, old) for n in range(4)] + [record(n) for n in range(4, 7)]
    spool_and_ship(tmp_path / "gw", engine, bodies)
    cut = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    assert prune(engine, SECRET, cut, tmp_path / "one.jsonl") == 4
    assert check(engine, tmp_path / "gw") == (3, [])
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    assert prune(engine, SECRET, future, tmp_path / "all.jsonl") == 3
    assert check(engine, tmp_path / "gw") == (0, [])  # the anchor says where the prune cut


def test_an_altered_stored_position_is_found(tmp_path: Path, engine: Engine) -> None:
    writer = spool_and_ship(tmp_path / "gw", engine, [record(n) for n in range(3)])
    path = tmp_path / "gw" / STORED
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "seq": 9}))
    assert check(engine, tmp_path / "gw")[1] == [
        f"writer {writer}, record 0: its spool's stored.json (how far it was stored) was altered"
    ]


def test_a_restart_says_what_it_stores_again(tmp_path: Path, engine: Engine) -> None:
    """A shipper that starts to find the database short of stored.json notes it in the chain
    before storing the spool's copies again, so the restore does not hide the deletion; the
    stored position never moves back."""
    writer = spool_and_ship(tmp_path / "gw", engine, [record(n) for n in range(5)])
    with engine.begin() as conn:
        conn.execute(audit_records.delete().where(audit_records.c.seq >= 4))

    async def run() -> None:
        shippers: list[Shipper] = []

        def wake() -> None:
            for waiting in shippers:
                waiting.notify()

        spool = Spool(tmp_path / "gw", KEY, segment_size=1 << 20, on_commit=wake)
        spool.open()
        shipper = Shipper(spool, AuditStore(engine))
        shippers.append(shipper)
        await shipper.start()
        for _ in range(200):  # the note is queued at start; wait until it is stored
            if shipper.shipped >= 6:
                break
            await asyncio.sleep(0.05)
        await shipper.stop(grace=10)
        spool.close()

    asyncio.run(run())
    chain = list(AuditStore(engine).chain())
    assert [r["seq"] for r in chain] == [1, 2, 3, 4, 5, 6]
    note = chain[-1]
    assert (note["event"], note["first"], note["last"]) == ("stored_records_missing", 4, 5)
    assert check(engine, tmp_path / "gw") == (6, [])
    found = read_stored(tmp_path / "gw", KEY)
    assert found is not None and found[0].seq == 6 and found[0].writer == writer
    late = Shipper(Spool(tmp_path / "gw", KEY, segment_size=1 << 20), AuditStore(engine))
    late.spool.writer = writer
    late._check_stored(False)
    late._note_stored(chain[2])  # a batch replayed from further back moves nothing back
    assert read_stored(tmp_path / "gw", KEY) == found


# -- the reviewer's statements through `mlflow-guard audit verify` ---------------------------


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLFLOW_GUARD_SECRET_KEY", "k" * 40)
    monkeypatch.delenv("MLFLOW_GUARD_BOOTSTRAP_TOKEN", raising=False)
    return tmp_path


def cli(data: Path, uri: str, *args: str) -> int:
    return main([*args, "--data-dir", str(data), "--database-uri", uri])


@pytest.mark.parametrize("deletion", ["newest five", "every table"])
def test_verify_reports_the_reviewers_deletions(
    data: Path, database_uri: str, capsys: pytest.CaptureFixture[str], deletion: str
) -> None:
    for name in "abcde":  # two records each in the CLI's own chain, its spool at hand
        assert cli(data, database_uri, "role", "assign", "--subject", f"user:{name}",
                   "--role", "viewer") == 0  # fmt: skip
    assert cli(data, database_uri, "audit", "verify") == 0
    assert "OK: 10 records" in capsys.readouterr().out
    engine = build_engine(database_uri)
    try:
        if deletion == "newest five":
            with engine.begin() as conn:
                conn.execute(sa.text(NEWEST_FIVE))
        else:
            wipe(engine, audit_records, audit_heads, audit_anchors)
    finally:
        engine.dispose()
    assert cli(data, database_uri, "audit", "verify") == 1
    out = capsys.readouterr().out
    first = 6 if deletion == "newest five" else 1
    assert f", record {first}: deleted from the database: records {first}..10 were stored" in out
    assert out.startswith("BROKEN: writer ") and "OK:" not in out
