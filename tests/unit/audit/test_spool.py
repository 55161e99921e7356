"""The spool and the shipper: durable before forwarding, exactly once into the database."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import guard.audit.shipper as shipper_module
from guard.audit.chain import Head, canonical, derive_key, verify
from guard.audit.shipper import Shipper
from guard.audit.spool import Spool, SpoolError, read_records, segment_name, segments
from guard.audit.store import AuditStore, Filters
from guard.store.db import audit_records, build_engine, migrate

KEY = derive_key(b"k" * 40, "audit-chain")


def body(i: int) -> dict[str, Any]:
    return {"kind": "outcome", "time": "2026-12-01T00:00:00+00:00", "request_id": f"r{i}",
            "principal": "token:ci", "status": 200}  # fmt: skip


def spooled(directory: Path) -> list[dict[str, Any]]:
    return [r for path in segments(directory) for r, _ in read_records(path)]


def open_spool(directory: Path, segment_size: int = 1 << 20, **kwargs: Any) -> Spool:
    spool = Spool(directory, KEY, segment_size=segment_size, **kwargs)
    spool.open()
    return spool


def test_append_returns_once_the_record_is_on_disk(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    try:
        asyncio.run(spool.append(body(1)))
        records = spooled(tmp_path)
        assert [r["request_id"] for r in records] == ["r1"]
        assert records[0]["writer"] == spool.writer and records[0]["seq"] == 1
        head = json.loads((tmp_path / "head.json").read_text())
        assert head == {"writer": spool.writer, "seq": 1, "mac": records[0]["mac"]}
    finally:
        spool.close()


def test_concurrent_appends_share_fsyncs_and_keep_one_chain(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)

    async def many() -> None:
        await asyncio.gather(*(spool.append(body(i)) for i in range(200)))

    try:
        asyncio.run(many())
    finally:
        spool.close()
    records = spooled(tmp_path)
    assert sorted(r["request_id"] for r in records) == sorted(f"r{i}" for i in range(200))
    assert [r["seq"] for r in records] == list(range(1, 201))
    assert verify(KEY, records) == []
    assert spool.commits < 200  # group commit: queued records share one write and fsync


def test_a_reopened_spool_continues_its_chain(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    asyncio.run(spool.append(body(1)))
    writer = spool.writer
    spool.close()
    again = open_spool(tmp_path)
    try:
        assert again.writer == writer and again.head.seq == 1
        asyncio.run(again.append(body(2)))
    finally:
        again.close()
    assert verify(KEY, spooled(tmp_path)) == []


def test_outcomes_queued_without_waiting_are_written_by_close(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    for i in range(50):
        spool.append_nowait(body(i))
    spool.close()
    assert len(spooled(tmp_path)) == 50


def test_a_torn_last_record_is_cut_off_and_the_chain_goes_on(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    asyncio.run(spool.append(body(1)))
    spool.close()
    (segment,) = segments(tmp_path)
    with segment.open("ab") as file:
        file.write(b'{"kind": "outcome", "seq": 2, "tor')  # a crash mid-write
    again = open_spool(tmp_path)
    try:
        assert again.head.seq == 1
        asyncio.run(again.append(body(2)))
    finally:
        again.close()
    records = spooled(tmp_path)
    assert [r["seq"] for r in records] == [1, 2] and verify(KEY, records) == []


def test_one_spool_one_process(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    try:
        with pytest.raises(SpoolError, match="in use by another gateway"):
            open_spool(tmp_path)
    finally:
        spool.close()


def test_a_failed_write_is_refused_and_cut_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(tmp_path)
    real_write = os.write

    def full_disk(fd: int, data: Any) -> int:
        real_write(fd, bytes(data)[:10])  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        asyncio.run(spool.append(body(1)))
        monkeypatch.setattr(os, "write", full_disk)
        with pytest.raises(SpoolError, match="No space left"):
            asyncio.run(spool.append(body(2)))
        assert not spool.healthy and not spool.broken
        spool.append_nowait(body(9))  # an outcome: nobody waits, it is lost (and counted)
        deadline = time.monotonic() + 5
        while spool.lost == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        monkeypatch.setattr(os, "write", real_write)
        asyncio.run(spool.append(body(3)))  # space again: recovers by itself
        assert spool.healthy
    finally:
        spool.close()
    records = spooled(tmp_path)
    assert [(r["seq"], r.get("request_id", r.get("event"))) for r in records] == [
        (1, "r1"), (2, "records_lost"), (3, "r3"),
    ]  # fmt: skip
    assert records[1]["count"] == 1
    assert verify(KEY, records) == []


def test_a_write_that_cannot_be_cut_back_stops_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(tmp_path)

    def fail(*args: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    try:
        monkeypatch.setattr(os, "fsync", fail)
        monkeypatch.setattr(os, "ftruncate", fail)
        with pytest.raises(SpoolError):
            asyncio.run(spool.append(body(1)))
        assert spool.broken
        monkeypatch.undo()
        with pytest.raises(SpoolError, match="restart the gateway"):
            asyncio.run(spool.append(body(2)))  # never reuses a sequence number
    finally:
        spool.close()


def test_segments_rotate(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, segment_size=2000)
    try:
        for i in range(40):
            asyncio.run(spool.append(body(i)))
    finally:
        spool.close()
    assert len(segments(tmp_path)) > 3
    records = spooled(tmp_path)
    assert [r["seq"] for r in records] == list(range(1, 41)) and verify(KEY, records) == []
    for path in segments(tmp_path):
        assert int(path.stem) == read_records(path)[0][0]["seq"]  # named by its first record


@pytest.fixture
def store(database_uri: str) -> Iterator[AuditStore]:
    engine = build_engine(database_uri)
    migrate(engine)
    yield AuditStore(engine)
    engine.dispose()


def stored(store: AuditStore) -> list[dict[str, Any]]:
    return list(store.chain())


@contextlib.asynccontextmanager
async def shipping(
    directory: Path, store: AuditStore, batch_size: int = 500, segment_size: int = 1 << 20
) -> AsyncIterator[tuple[Spool, Shipper]]:
    """A spool and its shipper, as the gateway runs them; on leaving, the shipper stores what
    it can within 10 s and stops, and the spool closes."""
    spool = open_spool(directory, segment_size=segment_size)
    try:
        shipper = Shipper(spool, store, batch_size=batch_size)
        spool.on_commit = shipper.notify
        await shipper.start()
        yield spool, shipper
        await shipper.stop(grace=10)
    finally:
        spool.close()


def test_the_shipper_stores_everything_exactly_once(tmp_path: Path, store: AuditStore) -> None:
    async def run() -> None:
        shipper: Shipper | None = None
        spool = open_spool(
            tmp_path / "spool", segment_size=4000, on_commit=lambda: shipper and shipper.notify()
        )
        shipper = Shipper(spool, store, batch_size=7)
        await shipper.start()
        await asyncio.gather(*(spool.append(body(i)) for i in range(100)))
        await shipper.stop(grace=10)
        spool.close()
        # A restart replays the spool from its first segment: nothing is stored twice.
        spool = open_spool(tmp_path / "spool", segment_size=4000)
        for i in range(100, 110):
            await spool.append(body(i))
        again = Shipper(spool, store, batch_size=50)
        await again.start()
        await again.stop(grace=10)
        spool.close()
        assert again.replayed == 10

    asyncio.run(run())
    records = stored(store)
    assert [r["seq"] for r in records] == list(range(1, 111))
    assert verify(KEY, records) == []
    assert len(segments(tmp_path / "spool")) == 1  # shipped segments are deleted
    with store.engine.connect() as conn:  # each row holds the line as spooled, not re-encoded
        rows = conn.execute(sa.select(audit_records.c.record)).scalars().all()
    assert all(row == canonical(json.loads(row)).decode() for row in rows) and len(rows) == 110


class FlakyStore(AuditStore):
    """Fails the first ``failures`` inserts, after committing some of them (a lost reply)."""

    def __init__(self, store: AuditStore, failures: int) -> None:
        super().__init__(store.engine)
        self.failures = failures

    def insert(self, records: Any, key: bytes | None = None, lines: Any = None) -> None:
        if self.failures > 0:
            self.failures -= 1
            if self.failures % 2:
                super().insert(records, key, lines)  # stored, but the caller hears of an error
            raise sa.exc.OperationalError("INSERT", {}, Exception("connection lost"))
        super().insert(records, key, lines)


@pytest.mark.parametrize("kept", [None, 5], ids=["from-memory", "outage-longer-than-memory"])
def test_a_database_outage_is_replayed_exactly_once(
    tmp_path: Path, store: AuditStore, monkeypatch: pytest.MonkeyPatch, kept: int | None
) -> None:
    """From the spool's memory, or (what an outage outlasted there) from its files first."""
    monkeypatch.setattr("guard.audit.shipper.RETRY_MIN", 0.01)
    if kept is not None:
        monkeypatch.setattr("guard.audit.spool.KEPT_RECORDS", kept)
    flaky = FlakyStore(store, failures=6)
    reads = Counter[str]()
    real = shipper_module.read_lines

    def counted(*args: Any, **kwargs: Any) -> Any:
        reads["files"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr("guard.audit.shipper.read_lines", counted)

    async def run() -> None:
        async with shipping(tmp_path / "spool", flaky, 4, 2000) as (spool, shipper):
            for i in range(30):
                await spool.append(body(i))
        assert shipper.failures >= 6 and shipper.depth == 0

    asyncio.run(run())
    records = stored(store)
    assert [r["seq"] for r in records] == list(range(1, 31)) and verify(KEY, records) == []
    assert (reads["files"] > 0) == (kept is not None)  # the first ones from the files


# -- the shipper takes what the spool kept in memory ------------------------------------------


def test_the_shipper_takes_records_from_memory_as_sealed_and_stores_them_as_the_files_say(
    tmp_path: Path, store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No file read, no line parsed: and still each row is what verification derives from the
    line it holds (columns included), including values that need escaping."""

    def unread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the shipper read the spool's files")

    monkeypatch.setattr("guard.audit.shipper.read_lines", unread)

    # What a request can put into the columns: a lone surrogate and a NUL (from JSON escapes),
    # longer than a column: stored, cut and escaped, by SQLite and PostgreSQL.
    odd = {"principal": "user:\u00e9\ud800\"x" + "p" * 300,
           "resource": "model:\x00" + "m" * 600, "reason": "", "status": 0}  # fmt: skip

    async def run() -> None:
        async with shipping(tmp_path / "spool", store, 7, 3000) as (spool, shipper):
            await asyncio.gather(*(spool.append({**body(i), **(odd if i % 2 else {})})
                                   for i in range(40)))  # fmt: skip
        assert shipper.replayed == 40

    asyncio.run(run())
    records = stored(store)
    assert [r["seq"] for r in records] == list(range(1, 41))
    assert not any(r.get("columns_differ") for r in records) and verify(KEY, records) == []
    # Shipped segments are deleted (the cursor follows what memory said): the last one is left.
    assert segments(tmp_path / "spool")[0].name > segment_name(1)


def test_a_query_for_a_value_no_database_takes_as_it_is_finds_its_records(
    store: AuditStore,
) -> None:
    """The query's value is escaped and cut as the column's is: no driver error, a match."""
    principal, resource = "user:\u00e9\ud800" + "p" * 300, "model:\x00m\ud800"
    record, _ = Head("gw-q").seal(KEY, {**body(0), "principal": principal, "resource": resource})
    store.insert([record], KEY)
    for filters in (
        Filters(principal=principal),
        Filters(resource=resource),
        Filters(resource="model:\x00*"),
        Filters(resource=resource, literal=True),
    ):
        assert [r["seq"] for _, r in store.query(filters)] == [1], filters
    assert store.query(Filters(principal="user:\u00e9")) == []


def test_a_bug_while_storing_is_retried_not_the_end_of_the_shipper(
    tmp_path: Path, store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("guard.audit.shipper.RETRY_MIN", 0.01)
    failing = [ValueError("a value no database takes")]

    class Buggy(AuditStore):
        def insert(self, records: Any, key: bytes | None = None, lines: Any = None) -> None:
            if failing:
                raise failing.pop()
            super().insert(records, key, lines)

    async def run() -> None:
        async with shipping(tmp_path / "spool", Buggy(store.engine)) as (spool, shipper):
            for i in range(5):
                await spool.append(body(i))
        assert shipper.failures == 1 and shipper.last_error == ""  # (logged, then cleared)

    asyncio.run(run())
    assert [r["seq"] for r in stored(store)] == [1, 2, 3, 4, 5]


def test_records_cut_back_are_never_taken_from_memory(
    tmp_path: Path, store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(tmp_path / "spool")
    try:
        asyncio.run(spool.append(body(0)))
        fsync = GatedFsync(monkeypatch, spool)
        fsync.fail = True

        async def scenario() -> None:
            waiting = asyncio.ensure_future(spool.append(body(1)))
            await asyncio.sleep(0)
            assert fsync.entered.wait(5)
            during = spool.kept(0, 10)  # the second is written, not durable: not offered
            assert during is not None and [seq for seq, *_ in during] == [1]
            fsync.release()
            with pytest.raises(SpoolError):
                await waiting
            fsync.fail = False
            await spool.append(body(2))  # takes seq 2 again

        asyncio.run(scenario())
        kept = spool.kept(0, 10)
        assert kept is not None
        assert [(seq, record["request_id"]) for seq, record, *_ in kept] == [(1, "r0"), (2, "r2")]
        shipper = Shipper(spool, store)
        assert shipper.ship_all() == 2
    finally:
        spool.close()
    assert [r["request_id"] for r in stored(store)] == ["r0", "r2"]


def test_columns_that_disagree_with_their_record_fail_verification(
    tmp_path: Path, store: AuditStore
) -> None:
    spool = open_spool(tmp_path / "spool")

    async def run() -> None:
        shipper = Shipper(spool, store)
        await shipper.start()
        for i in range(3):
            await spool.append(body(i))
        await shipper.stop(grace=10)

    asyncio.run(run())
    spool.close()
    heads = {spool.writer: Head(spool.writer, 3, spool.head.mac)}
    assert verify(KEY, stored(store), heads=heads) == []
    with store.engine.begin() as conn:  # hide a record from principal queries
        conn.execute(audit_records.update().where(audit_records.c.seq == 2).values(principal="x"))
    problems = verify(KEY, stored(store), heads=heads)
    assert problems[0].seq == 2 and problems[0].what.startswith("altered")


# -- what a crash must not lose ------------------------------------------------------------------

CRASHING_WRITER = """
import asyncio, sys, time
from pathlib import Path
from guard.audit.spool import Spool
from tests.unit.audit.test_spool import KEY, body

spool = Spool(Path(sys.argv[1]), KEY, segment_size=1 << 20)
spool.open()
intent = {**body(0), "kind": "intent", "path": "/api/2.0/mlflow/runs/log-metric",
          "method": "POST", "decision": "allow"}
for i in range(6):  # six requests forwarded; the first four answered
    asyncio.run(spool.append({**intent, "request_id": f"r{i}"}))
for i in range(4):
    spool.append_nowait(body(i))
for _ in range(35):  # a flood: refusals counted, not recorded one by one
    spool.tally("203.0.113.9")
spool.tally("198.51.100.7")
spool.summarize({"kind": "event", "event": "unauthenticated_refusals", "client": "198.51.100.7",
                 "unrecorded": 1, "time": "2026-12-01T00:00:00+00:00"}, "198.51.100.7", 1)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    head = Path(sys.argv[1], "head.json").read_text()
    if '"203.0.113.9":35' in head and '"r3"' not in head and '198.51' not in head:
        break
    time.sleep(0.01)
print("ready", flush=True)
time.sleep(60)
"""


def kill_mid_run(directory: Path) -> None:
    """Run CRASHING_WRITER in a process of its own and SIGKILL it once its head is written."""
    import signal
    import subprocess
    import sys

    with subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(directory)],
        stdout=subprocess.PIPE, cwd=Path(__file__).parents[3],
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


def test_after_a_sigkill_every_intent_has_an_outcome_and_counted_refusals_a_summary(
    tmp_path: Path,
) -> None:
    kill_mid_run(tmp_path)
    spool = open_spool(tmp_path)
    assert spool.unknown == 2
    spool.close()
    records = spooled(tmp_path)
    assert verify(KEY, records) == []
    outcomes = Counter(r["request_id"] for r in records if r["kind"] == "outcome")
    intents = [r for r in records if r["kind"] == "intent"]
    assert all(outcomes[r["request_id"]] == 1 for r in intents)  # exactly one each
    unknown = [r for r in records if r.get("reason") == "outcome_unknown"]
    assert sorted(r["request_id"] for r in unknown) == ["r4", "r5"]
    for record in unknown:  # what the intent said, so an auditor sees what may have happened
        assert record["status"] == 0 and record["decision"] == "allow"
        assert record["path"] == "/api/2.0/mlflow/runs/log-metric" and record["method"] == "POST"
        assert record["principal"] == "token:ci"
        intent = next(r for r in intents if r["request_id"] == record["request_id"])
        assert record["intent_seq"] == [intent["seq"]]
    summaries = [r for r in records if r.get("event") == "unauthenticated_refusals"]
    counted = Counter()
    for summary in summaries:
        counted[summary["client"]] += summary["unrecorded"]
    assert counted == {"203.0.113.9": 35, "198.51.100.7": 1}  # none lost, none twice
    assert json.loads((tmp_path / "head.json").read_text()).keys() == {"writer", "seq", "mac"}
    # A second start finds nothing left to say.
    again = open_spool(tmp_path)
    again.close()
    assert again.unknown == 0 and len(spooled(tmp_path)) == len(records)


def crash_copy(source: Path, target: Path, head: bytes | None) -> None:
    """What a crash would leave: the segments as written, and ``head`` (None: no head file)."""
    target.mkdir()
    for path in [*segments(source), source / "writer"]:
        (target / path.name).write_bytes(path.read_bytes())
    if head is not None:
        (target / "head.json").write_bytes(head)


@pytest.mark.parametrize("head", ["stale", "missing"])
def test_records_after_a_stale_head_are_read_from_the_spool(tmp_path: Path, head: str) -> None:
    """A crash between a commit and the head's rewrite (the spool is ahead of head.json), or
    a head that is gone: the records say what is open."""
    spool = open_spool(tmp_path / "live")
    try:
        asyncio.run(spool.append({**body(1), "kind": "intent"}))
        stale = (tmp_path / "live" / "head.json").read_bytes()
        assert b'"r1"' in stale
        asyncio.run(spool.append({**body(2), "kind": "intent"}))
        spool.append_nowait(body(1))
        asyncio.run(spool.append({**body(3), "kind": "intent"}))
        crash_copy(tmp_path / "live", tmp_path / "crashed", stale if head == "stale" else None)
    finally:
        spool.close()
    recovered = open_spool(tmp_path / "crashed")
    recovered.close()
    records = spooled(tmp_path / "crashed")
    unknown = [r["request_id"] for r in records if r.get("reason") == "outcome_unknown"]
    assert unknown == ["r2", "r3"]
    assert verify(KEY, records) == []


def test_a_clean_close_summarizes_what_it_counted(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    for _ in range(3):
        spool.tally("192.0.2.1")
    spool.close()
    [summary] = [r for r in spooled(tmp_path) if r.get("event") == "unauthenticated_refusals"]
    assert (summary["client"], summary["unrecorded"]) == ("192.0.2.1", 3)


def test_the_head_names_a_bounded_number_of_addresses(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    for n in range(100):
        spool.tally(f"10.0.{n // 256}.{n % 256}")
    spool.summarize(
        {
            "kind": "event",
            "event": "unauthenticated_refusals",
            "client": "10.0.0.99",
            "unrecorded": 1,
            "time": "2026-12-01T00:00:00+00:00",
        },
        "10.0.0.99",
        1,
    )
    spool.close()
    summaries = [r for r in spooled(tmp_path) if r.get("event") == "unauthenticated_refusals"]
    assert sum(s["unrecorded"] for s in summaries) == 100
    assert len(summaries) <= 64 + 2  # "*" stands for the addresses past the head's list


# -- written now, fsynced while MLflow answers (reads) -----------------------------------------


class GatedFsync:
    """``os.fsync`` of the segment ``spool`` writes held until ``release()`` (or failing with
    EIO once ``fail`` is set); counts those fsyncs. Held on the event loop it would hold the
    test too: the spool's fsyncs go to its thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, spool: Spool) -> None:
        assert spool._fd is not None
        self.fd = spool._fd
        monkeypatch.setattr(spool, "loop_fsync_limit", 0.0)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail = False
        self.calls = 0
        self.real = os.fsync
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        if fd == self.fd:
            self.calls += 1
            self.entered.set()
            assert self.gate.wait(10), "the test never released the fsync"
            if self.fail:
                raise OSError(errno.EIO, "Input/output error")
        self.real(fd)

    def release(self) -> None:
        self.gate.set()


def test_write_returns_once_written_and_its_future_once_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(tmp_path)
    try:
        asyncio.run(spool.append(body(0)))  # the segment is open: its fsyncs are the gated ones
        assert spool._fd is not None
        fsync = GatedFsync(monkeypatch, spool)

        async def read() -> None:
            done = await spool.write(body(1))
            # Written: in the file (the kernel's), while its fsync has not finished.
            assert [r["request_id"] for r in spooled(tmp_path)] == ["r0", "r1"]
            assert fsync.entered.wait(5) and not done.done()
            assert spool.committed()[1] < segments(tmp_path)[0].stat().st_size  # not shipped yet
            fsync.release()
            await spool.durable(done)
            assert spool.committed()[1] == segments(tmp_path)[0].stat().st_size

        asyncio.run(read())
    finally:
        spool.close()
    head = json.loads((tmp_path / "head.json").read_text())
    assert head["seq"] == 2 and verify(KEY, spooled(tmp_path)) == []


def test_reads_written_during_an_fsync_share_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(tmp_path)
    try:
        asyncio.run(spool.append(body(0)))
        assert spool._fd is not None
        fsync = GatedFsync(monkeypatch, spool)

        async def many() -> None:
            first = await spool.write(body(1))
            assert fsync.entered.wait(5)  # the writer thread is inside the first fsync
            tasks = [asyncio.ensure_future(spool.write(body(i))) for i in range(2, 52)]
            await asyncio.sleep(0)  # every one of them is queued
            fsync.release()
            futures = await asyncio.gather(*tasks)
            await asyncio.gather(*(spool.durable(f) for f in [first, *futures]))

        asyncio.run(many())
        assert fsync.calls == 2  # group commit: the fifty queued reads shared one fsync
    finally:
        spool.close()
    records = spooled(tmp_path)
    assert [r["seq"] for r in records] == list(range(1, 53)) and verify(KEY, records) == []


def test_a_failed_fsync_fails_a_written_record_and_cuts_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(tmp_path)
    try:
        asyncio.run(spool.append(body(0)))
        assert spool._fd is not None
        fsync = GatedFsync(monkeypatch, spool)
        fsync.fail = True

        async def read() -> None:
            done = await spool.write(body(1))  # written; MLflow would be answering now
            fsync.release()
            with pytest.raises(SpoolError, match="Input/output error"):
                await spool.durable(done)

        asyncio.run(read())
        assert not spool.healthy
        assert [r["request_id"] for r in spooled(tmp_path)] == ["r0"]  # cut back
        fsync.fail = False
        asyncio.run(spool.append(body(2)))  # the disk works again: so does the spool
        assert spool.healthy
    finally:
        spool.close()
    records = spooled(tmp_path)
    assert [r["request_id"] for r in records] == ["r0", "r2"] and verify(KEY, records) == []


def test_a_write_that_fails_fails_before_anything_is_forwarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(tmp_path)

    def full_disk(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        asyncio.run(spool.append(body(0)))
        monkeypatch.setattr(os, "write", full_disk)
        with pytest.raises(SpoolError, match="No space left"):
            asyncio.run(spool.write(body(1)))
    finally:
        monkeypatch.undo()
        spool.close()
    assert [r["request_id"] for r in spooled(tmp_path)] == ["r0"]
