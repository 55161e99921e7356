"""The audit commands and the CLI's own chain: events for its changes, verify, query,
history, prune with an archive that verifies."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from guard.cli.main import main
from guard.store.db import audit_anchors, audit_heads, audit_records, build_engine

URIS: dict[Path, str] = {}


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_uri: str) -> Path:
    """A data directory whose database is SQLite or a fresh PostgreSQL database."""
    monkeypatch.setenv("MLFLOW_GUARD_SECRET_KEY", "k" * 40)
    monkeypatch.delenv("MLFLOW_GUARD_BOOTSTRAP_TOKEN", raising=False)
    URIS[tmp_path] = database_uri
    return tmp_path


def cli(data: Path, *args: str) -> int:
    return main([*args, "--data-dir", str(data), "--database-uri", URIS[data]])


ENGINES: list[sa.engine.Engine] = []


def engine_of(data: Path) -> sa.engine.Engine:
    ENGINES.append(build_engine(URIS[data]))
    return ENGINES[-1]


@pytest.fixture(autouse=True)
def _dispose() -> Iterator[None]:
    yield
    while ENGINES:
        ENGINES.pop().dispose()


def test_cli_changes_are_recorded_in_their_own_chain(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(data, "token", "create", "--name", "ci", "--role", "promoter",
               "--resource", "model:fraud-*", "--quiet") == 0  # fmt: skip
    secret = capsys.readouterr().out.strip()
    assert cli(data, "role", "assign", "--subject", "user:alice", "--role", "viewer",
               "--resource", "experiment:x") == 0  # fmt: skip
    assert cli(data, "token", "revoke", "ci") == 0
    capsys.readouterr()
    assert cli(data, "audit", "query", "--kind", "event", "--format", "jsonl",
               "--order", "oldest") == 0  # fmt: skip
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["event"], e["phase"]) for e in events] == [
        ("token_created", "intent"), ("token_created", "done"),
        ("policy_changed", "intent"), ("policy_changed", "done"),
        ("token_revoked", "intent"), ("token_revoked", "done"),
    ]  # fmt: skip
    assert all(e["principal"].startswith("cli:") for e in events)
    assert events[1]["token"] == "ci" and events[1]["resource"] == "model:fraud-*"
    assert events[3]["changes"]["added"] == ["p, user:alice, viewer, experiment:x, allow"]
    assert len({e["writer"] for e in events}) == 1
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    with engine_of(data).connect() as conn:
        table = "".join(conn.execute(sa.select(audit_records.c.record)).scalars())
    spooled = b"".join(p.read_bytes() for p in (data / "audit-cli").glob("*.jsonl"))
    assert secret not in table and secret.encode() not in spooled
    assert cli(data, "audit", "verify") == 0
    assert "every chain intact" in capsys.readouterr().out


def test_verify_fails_on_an_edited_record(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("a", "b", "c"):
        cli(data, "role", "assign", "--subject", f"user:{name}", "--role", "viewer")
    engine = engine_of(data)
    with engine.begin() as conn:
        edited = sa.func.replace(audit_records.c.record, "user:b", "user:z")
        conn.execute(audit_records.update().where(audit_records.c.seq == 4).values(record=edited))
    capsys.readouterr()
    assert cli(data, "audit", "verify") == 1
    assert "record 4: altered" in capsys.readouterr().out  # b's change, as done


def test_prune_archives_what_it_removes_and_both_still_verify(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    for name in ("a", "b"):
        cli(data, "role", "assign", "--subject", f"user:{name}", "--role", "viewer")
    time.sleep(0.05)
    cut = dt.datetime.now(dt.UTC).isoformat()
    time.sleep(0.05)
    for name in ("c", "d"):
        cli(data, "role", "assign", "--subject", f"user:{name}", "--role", "viewer")
    archive = data / "old.jsonl"
    capsys.readouterr()
    assert cli(data, "audit", "prune", "--before", cut, "--archive", str(archive)) == 0
    assert "archived 4 records" in capsys.readouterr().out  # two changes: intent and done each
    lines = archive.read_text().splitlines()
    assert json.loads(lines[0])["archive"] == 1 and len(lines) == 5
    assert cli(data, "audit", "verify", "--archive", str(archive)) == 0
    assert cli(data, "audit", "verify") == 0  # the rest continues from the anchor
    engine = engine_of(data)
    with engine.connect() as conn:
        assert conn.execute(sa.select(audit_records.c.seq)).scalars().all() == [5, 6, 7, 8]
    # An edited archive does not verify; an archive is never overwritten.
    archive.write_text(archive.read_text().replace("user:a", "user:z"))
    capsys.readouterr()
    assert cli(data, "audit", "verify", "--archive", str(archive)) == 1
    assert cli(data, "audit", "prune", "--before", cut, "--archive", str(archive)) == 1
    assert "exists" in capsys.readouterr().err


def test_a_forged_anchor_is_found(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("a", "b", "c"):
        cli(data, "role", "assign", "--subject", f"user:{name}", "--role", "viewer")
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    assert cli(data, "audit", "prune", "--before", future, "--archive", str(data / "a.jsonl")) == 0
    assert cli(data, "role", "assign", "--subject", "user:d", "--role", "viewer") == 0
    capsys.readouterr()
    assert cli(data, "audit", "verify") == 0
    engine = engine_of(data)
    with engine.begin() as conn:  # hide record 4 by moving the anchor past it
        conn.execute(audit_records.delete().where(audit_records.c.seq == 4))
        conn.execute(audit_anchors.update().values(seq=4))
    capsys.readouterr()
    assert cli(data, "audit", "verify") == 1
    assert "anchor" in capsys.readouterr().out


def test_an_archive_cut_at_either_end_does_not_verify(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a", "b", "c", "d", "e"):
        cli(data, "role", "assign", "--subject", f"user:{name}", "--role", "viewer")
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    archive = data / "all.jsonl"
    assert cli(data, "audit", "prune", "--before", future, "--archive", str(archive)) == 0
    header, *records = archive.read_text().splitlines()
    assert cli(data, "audit", "verify", "--archive", str(archive)) == 0
    for cut in ([header, *records[:-2]], [header, *records[2:]]):
        archive.write_text("\n".join(cut) + "\n")
        capsys.readouterr()
        assert cli(data, "audit", "verify", "--archive", str(archive)) == 1
    forged = json.loads(header)  # move the start to hide the first records: the header breaks
    forged["start"] = {w: {"seq": 2, "mac": json.loads(records[1])["mac"]} for w in forged["start"]}
    archive.write_text("\n".join([json.dumps(forged), *records[2:]]) + "\n")
    capsys.readouterr()
    assert cli(data, "audit", "verify", "--archive", str(archive)) == 1
    assert "header was altered" in capsys.readouterr().out


def test_a_change_that_cannot_be_recorded_is_not_made(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (data / "audit-cli").write_text("not a directory")
    assert cli(data, "token", "create", "--name", "ci", "--role", "viewer", "--quiet") == 1
    assert "not made" in capsys.readouterr().err
    assert cli(data, "token", "list") == 0
    assert "ci" not in capsys.readouterr().out.split()


def test_writers_without_a_head_are_named(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli(data, "role", "assign", "--subject", "user:a", "--role", "viewer")
    capsys.readouterr()
    assert cli(data, "audit", "verify", "--spool", str(data / "elsewhere")) == 0
    assert "UNCHECKED" not in capsys.readouterr().out  # its head row vouches for it
    with engine_of(data).begin() as conn:  # records stored before head rows existed
        conn.execute(audit_heads.delete())
    assert cli(data, "audit", "verify", "--spool", str(data / "elsewhere")) == 0
    out = capsys.readouterr().out
    assert "UNCHECKED: " in out and "every chain intact" in out
    assert cli(data, "audit", "verify") == 0
    assert "UNCHECKED" not in capsys.readouterr().out  # the CLI's own spool holds its head


def test_query_shows_the_newest_first_unless_asked(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a", "b", "c", "d", "e"):
        cli(data, "role", "assign", "--subject", f"user:{name}", "--role", "viewer")
    capsys.readouterr()

    def seqs(*args: str) -> list[int]:
        assert cli(data, "audit", *args, "--format", "jsonl") == 0
        return [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()]

    assert seqs("query", "--limit", "3") == [10, 9, 8]
    assert seqs("query", "--limit", "3", "--order", "newest") == [10, 9, 8]
    assert seqs("query", "--limit", "3", "--order", "oldest") == [1, 2, 3]
    assert seqs("query", "--principal", "nobody") == []
    assert seqs("export") == list(range(1, 11))  # a file to keep reads in order
    assert seqs("export", "--order", "newest") == list(range(10, 0, -1))


@pytest.mark.parametrize("newest_first", [True, False])
def test_paging_visits_every_record_once_in_either_order(data: Path, newest_first: bool) -> None:
    from guard.audit.commands import query_records
    from guard.audit.store import Filters

    for name in ("a", "b", "c", "d", "e"):
        cli(data, "role", "assign", "--subject", f"user:{name}", "--role", "viewer")
    everything = list(range(10, 0, -1)) if newest_first else list(range(1, 11))
    engine = engine_of(data)
    for page in (1, 3, 4, 10, 11):
        for limit in (None, 1, 7, 10, 20):
            found = [r["seq"] for r in query_records(
                engine, Filters(kind="event"), limit, page, newest_first=newest_first)]  # fmt: skip
            assert found == everything[:limit], (page, limit)
        done = Filters(kind="event", resource="*")  # a glob is matched after the SQL narrowing
        found = [r["seq"] for r in query_records(engine, done, 4, page, newest_first=newest_first)]
        assert found == everything[:4]
