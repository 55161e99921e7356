"""Records written by the caller's thread, fsynced by the spool's own: what each side may see.

The spool seals and writes each record where it is asked for (the event loop) and leaves only
the ``fsync`` to its thread (``GatedFsync`` holds or fails it here): outcomes need no hand-off,
the waiters of one fsync are woken with one call into their event loop, head.json is never
ahead of what is durable nor behind what a waiter was told, and a failed fsync takes back
everything written since the last one that worked.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from guard.audit.chain import verify
from guard.audit.spool import Spool, SpoolError, read_records, segments
from tests.unit.audit.test_spool import KEY, GatedFsync, body, open_spool, spooled


def intent(i: int) -> dict[str, Any]:
    return {**body(i), "kind": "intent", "method": "POST", "path": "/api/2.0/mlflow/runs/update"}


def head_file(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / "head.json").read_text())
    return data


class LoopCalls:
    """Counts the calls other threads make into the running event loop."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counted)


def test_an_outcome_is_written_at_once_while_an_fsync_is_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(tmp_path)
    try:
        asyncio.run(spool.append(body(0)))
        assert spool._fd is not None
        fsync = GatedFsync(monkeypatch, spool)

        async def scenario() -> None:
            done = await spool.write(intent(1))
            assert fsync.entered.wait(5)  # the intent's fsync is in progress
            spool.append_nowait(body(1))  # its outcome: written now, by this thread
            assert [r["request_id"] for r in spooled(tmp_path)] == ["r0", "r1", "r1"]
            assert "open" not in head_file(tmp_path)  # the head is never ahead of the fsync
            fsync.release()
            await spool.durable(done)
            # The intent is durable, its outcome not yet: the head names the intent open.
            assert head_file(tmp_path)["open"] == [[2, "r1"]]

        asyncio.run(scenario())
        for _ in range(500):  # the outcome is fsynced within FLUSH_INTERVAL
            if head_file(tmp_path)["seq"] == 3:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert "open" not in head_file(tmp_path) and fsync.calls == 2
    finally:
        spool.close()
    assert verify(KEY, spooled(tmp_path)) == []


def test_the_waiters_of_one_fsync_are_woken_with_one_call_into_their_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(tmp_path)
    try:
        asyncio.run(spool.append(body(0)))
        assert spool._fd is not None
        fsync = GatedFsync(monkeypatch, spool)

        async def scenario() -> None:
            first = asyncio.ensure_future(spool.append(body(1)))
            await asyncio.sleep(0)
            assert fsync.entered.wait(5)  # the first fsync holds
            waiting = [asyncio.ensure_future(spool.append(body(i))) for i in range(2, 42)]
            reads = [await spool.write(body(i)) for i in range(42, 52)]
            await asyncio.sleep(0)  # all of them written and waiting
            calls = LoopCalls(monkeypatch)
            fsync.release()
            await first
            await asyncio.gather(*waiting, *(spool.durable(done) for done in reads))
            assert fsync.calls == 2 and calls.count == 2  # one per fsync, not per record

        asyncio.run(scenario())
    finally:
        spool.close()
    records = spooled(tmp_path)
    assert [r["seq"] for r in records] == list(range(1, 53)) and verify(KEY, records) == []


def test_a_read_fsynced_before_its_answer_needs_no_call_into_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(tmp_path, loop_fsync_limit=0.0)  # (fsyncs on the thread)
    try:

        async def scenario() -> None:
            calls = LoopCalls(monkeypatch)
            done = await spool.write(intent(1))
            for _ in range(500):  # MLflow answers after the fsync: nothing to wake
                if done.done():
                    break
                time.sleep(0.01)
            await spool.durable(done)
            assert calls.count == 0

        asyncio.run(scenario())
    finally:
        spool.close()


def test_a_failed_fsync_fails_every_waiter_and_takes_back_what_was_written_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written during the failing fsync too: the chain goes on from the last durable record,
    waiters hear SpoolError (a write is refused, a read's answer replaced), an outcome nobody
    waited for is counted lost and said so by the next record that is written."""
    spool = open_spool(tmp_path)
    try:
        asyncio.run(spool.append(intent(0)))
        assert spool._fd is not None
        fsync = GatedFsync(monkeypatch, spool)
        fsync.fail = True

        async def scenario() -> None:
            write = asyncio.ensure_future(spool.append(intent(1)))
            await asyncio.sleep(0)
            assert fsync.entered.wait(5)
            read = await spool.write(intent(2))  # written while the fsync fails
            spool.append_nowait(body(0))  # the outcome of r0
            fsync.release()
            with pytest.raises(SpoolError, match="Input/output error"):
                await write
            with pytest.raises(SpoolError, match="Input/output error"):
                await spool.durable(read)
            assert not spool.healthy and spool.lost == 1
            assert [r["request_id"] for r in spooled(tmp_path)] == ["r0"]  # all cut back
            # r0's outcome is lost: its intent is no longer open, the loss is counted instead
            assert head_file(tmp_path) == {
                "writer": spool.writer, "seq": 1, "mac": spool.head.mac, "lost": 1,
            }  # fmt: skip
            fsync.fail = False
            await spool.append(intent(3))
            assert spool.healthy and spool.lost == 0

        asyncio.run(scenario())
    finally:
        spool.close()
    records = spooled(tmp_path)
    assert [(r["seq"], r.get("request_id", r.get("event"))) for r in records] == [
        (1, "r0"), (2, "records_lost"), (3, "r3"),
    ]  # fmt: skip
    assert records[1]["count"] == 1 and verify(KEY, records) == []


def test_a_failed_fsync_across_a_new_segment_goes_on_in_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(tmp_path, segment_size=1500)
    try:
        asyncio.run(spool.append(body(0)))
        assert spool._fd is not None
        fsync = GatedFsync(monkeypatch, spool)
        fsync.fail = True

        async def scenario() -> None:
            first = asyncio.ensure_future(spool.append(body(1)))
            await asyncio.sleep(0)
            assert fsync.entered.wait(5)
            for i in range(2, 30):  # past the segment's size: a new segment is started
                spool.append_nowait(body(i))
            assert len(segments(tmp_path)) >= 2
            fsync.release()
            with pytest.raises(SpoolError):
                await first

        asyncio.run(scenario())
        assert [p.name for p in segments(tmp_path)] == [f"{1:020d}.jsonl"]  # the new one went
        fsync.fail = False
        for i in range(30, 60):
            asyncio.run(spool.append(body(i)))
    finally:
        spool.close()
    records = spooled(tmp_path)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert verify(KEY, records) == []
    for path in segments(tmp_path):
        assert int(path.stem) == read_records(path)[0][0]["seq"]  # named by its first record


def test_the_cli_path_outside_a_running_loop(tmp_path: Path) -> None:
    """Opened and closed outside any event loop, each record awaited in a loop of its own (as
    ``record_cli_event`` and the tests do), records queued without a loop written by close."""
    spool = Spool(tmp_path, KEY, segment_size=1 << 20)
    spool.open(wait=True)
    for i in range(3):
        asyncio.run(spool.append(body(i)))
    spool.append_nowait(body(3))
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        asyncio.run(spool.append(body(4)))
    assert [r["request_id"] for r in spooled(tmp_path)] == ["r0", "r1", "r2", "r3"]
    assert head_file(tmp_path)["seq"] == 4


CRASH_BEFORE_FSYNC = """
import asyncio, os, sys, threading
from pathlib import Path
from guard.audit.spool import Spool
from tests.unit.audit.test_fsync_thread import intent
from tests.unit.audit.test_spool import KEY, body

spool = Spool(Path(sys.argv[1]), KEY, segment_size=1 << 20)
spool.open()
asyncio.run(spool.append(intent(0)))  # forwarded; fsynced
asyncio.run(spool.append(intent(1)))
held = threading.Event()
real = os.fsync
def hold(fd):
    held.set()
    threading.Event().wait(120)  # the next fsync never ends: the process is killed first
os.fsync = hold

async def main():
    done = await spool.write(intent(2))  # a read: written, forwarded, its fsync pending
    spool.append_nowait(body(0))  # r0's outcome: written, not fsynced
    assert held.wait(10)
    print("ready", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def test_a_crash_between_write_and_fsync_loses_nothing_written(tmp_path: Path) -> None:
    """SIGKILL after records were written and before their fsync: they are in the kernel, so
    the next open finds them after the head (which names only what was fsynced) and closes
    what is open: r1 and r2 get outcome_unknown, r0 keeps its outcome."""
    with subprocess.Popen(
        [sys.executable, "-c", CRASH_BEFORE_FSYNC, str(tmp_path)],
        stdout=subprocess.PIPE, cwd=Path(__file__).parents[3],
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            head = head_file(tmp_path)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    assert head["seq"] == 2 and head["open"] == [[1, "r0"], [2, "r1"]]  # as of the fsync
    spool = open_spool(tmp_path)
    spool.close()
    assert spool.unknown == 2
    records = spooled(tmp_path)
    assert verify(KEY, records) == []
    outcomes = [(r["request_id"], r.get("reason", "")) for r in records if r["kind"] == "outcome"]
    assert outcomes == [("r0", ""), ("r1", "outcome_unknown"), ("r2", "outcome_unknown")]


class HeadFsyncs:
    """Counts the fsyncs of head.json (``fail``: they fail with EIO)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, spool: Spool) -> None:
        self.spool = spool
        self.calls = 0
        self.fail = False
        self.real = os.fsync
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        if fd == self.spool._head_fd:
            self.calls += 1
            if self.fail:
                raise OSError(errno.EIO, "Input/output error")
        self.real(fd)

    def wait(self, calls: int) -> bool:
        deadline = time.monotonic() + 5
        while self.calls < calls and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.calls >= calls


def test_a_loss_counted_in_the_head_is_fsynced_within_the_flush_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outcome that cannot be written is a loss only head.json knows of until a later
    record says so: a power loss before then must not forget it."""
    spool = open_spool(tmp_path)
    real_write = os.write

    def full_disk(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        asyncio.run(spool.append(body(1)))
        fsyncs = HeadFsyncs(monkeypatch, spool)
        monkeypatch.setattr(os, "write", full_disk)
        spool.append_nowait(body(2))  # an outcome, nobody waits: lost, counted in the head
        monkeypatch.setattr(os, "write", real_write)
        assert head_file(tmp_path)["lost"] == 1
        assert fsyncs.wait(1), "head.json was not fsynced after the loss"
    finally:
        spool.close()


def test_a_head_whose_fsync_failed_is_fsynced_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(tmp_path)
    try:
        fsyncs = HeadFsyncs(monkeypatch, spool)
        fsyncs.fail = True
        spool.tally("203.0.113.9")  # a counted refusal: only head.json holds it
        assert fsyncs.wait(1)
        fsyncs.fail = False
        assert fsyncs.wait(2), "a failed fsync of head.json was taken as done"
    finally:
        spool.close()


def test_a_bug_while_noting_an_fsync_leaves_no_waiter_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fsync thread must outlive any bug and answer every waiter: those the fsync covered
    before the bug hear success, the rest fail; nobody waits forever."""
    spool = open_spool(tmp_path)
    real_note = Spool._note
    noted: list[int] = []

    def buggy(self: Spool, record: Any) -> None:
        noted.append(record.seq)
        if len(noted) == 2:
            raise RuntimeError("a bug")
        real_note(self, record)

    try:
        asyncio.run(spool.append(body(0)))
        assert spool._fd is not None
        fsync = GatedFsync(monkeypatch, spool)
        monkeypatch.setattr(Spool, "_note", buggy)
        noted.clear()

        async def scenario() -> list[Any]:
            first = asyncio.ensure_future(spool.append(body(1)))
            await asyncio.sleep(0)
            assert fsync.entered.wait(5)
            second = asyncio.ensure_future(spool.append(body(2)))  # for the next fsync
            await asyncio.sleep(0)
            fsync.release()
            return await asyncio.wait_for(
                asyncio.gather(first, second, return_exceptions=True), timeout=5
            )

        results = asyncio.run(scenario())
        assert results[0] is None and isinstance(results[1], SpoolError), results
        assert spool.broken
    finally:
        spool.close()
