"""Group commit on the event loop: while commits are quick, the loop that wrote the records
fsyncs them itself, once the callbacks ready at the time have run, with no thread to wake and
none waking it back. A slow one (failed or not) sends the commits of the next LOOP_RETRY seconds
to the spool's thread (the loop serves on meanwhile); the thread and the loop never fsync at
once. The tests' limit is far above any real fsync: only the ones they slow down are slow."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guard.audit.chain import verify
from guard.audit.spool import Durable, Spool, SpoolError
from tests.unit.audit.test_fsync_thread import LoopCalls, intent
from tests.unit.audit.test_spool import KEY, body, open_spool, spooled


class Fsyncs:
    """Notes which thread does each fsync of the segment ``spool`` writes, and takes no time
    unless ``slow`` says how long; ``fail``: the next fails with EIO; ``gate``: those on
    another thread than the test's wait for it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, spool: Spool) -> None:
        assert spool._fd is not None
        self.fd = spool._fd
        self.threads: list[int] = []
        self.slow = 0.0
        self.fail = False
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.real = os.fsync
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        if fd == self.fd:
            self.threads.append(threading.get_ident())
            if self.gate is not None and threading.get_ident() != MAIN:
                self.entered.set()
                assert self.gate.wait(10), "the test never opened the gate"
            time.sleep(self.slow)
            if self.fail:
                self.fail = False
                raise OSError(errno.EIO, "Input/output error")
            return  # (not the disk's: its own time would be part of what these tests time)
        self.real(fd)

    @property
    def on_loop(self) -> list[bool]:
        return [ident == MAIN for ident in self.threads]


MAIN = threading.get_ident()  # the tests' thread, where asyncio.run runs their loops
LIMIT = 0.05  # loop_fsync_limit


@contextlib.contextmanager
def opened(
    directory: Path, monkeypatch: pytest.MonkeyPatch, limit: float = LIMIT, flushes: bool = False
) -> Iterator[tuple[Spool, Fsyncs]]:
    """A spool with ``limit`` as its loop_fsync_limit, its segment open, its fsyncs watched.
    Its thread commits only when rung, unless ``flushes`` (then also every FLUSH_INTERVAL, as
    in the gateway: such a commit may take one the loop was about to do)."""
    if not flushes:
        monkeypatch.setattr("guard.audit.spool.FLUSH_INTERVAL", 60.0)
    spool = open_spool(directory, loop_fsync_limit=limit)
    try:
        asyncio.run(spool.append(body(0)))  # (the segment and its name fsynced)
        yield spool, Fsyncs(monkeypatch, spool)
    finally:
        spool.close()


def test_an_awaited_record_is_fsynced_on_its_loop_with_no_thread_woken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with opened(tmp_path, monkeypatch) as (spool, fsyncs):

        async def scenario() -> None:
            calls = LoopCalls(monkeypatch)
            await spool.append(intent(1))
            assert calls.count == 0  # nobody called into the loop: it fsynced itself

        asyncio.run(scenario())
        assert fsyncs.on_loop == [True]
        assert spool.head.seq == spool.fsynced.seq == 2


def test_records_written_in_one_turn_of_the_loop_share_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with opened(tmp_path, monkeypatch) as (spool, fsyncs):

        async def read(i: int) -> None:
            await spool.durable(await spool.write(body(i)))

        async def scenario() -> None:  # requests started together, reads and writes
            await asyncio.gather(*(read(i) if i % 3 else spool.append(intent(i))
                                   for i in range(1, 31)))  # fmt: skip

        asyncio.run(scenario())
        assert fsyncs.on_loop == [True]  # 30 records, one fsync
    records = spooled(tmp_path)
    assert [r["seq"] for r in records] == list(range(1, 32)) and verify(KEY, records) == []


def test_a_read_goes_on_before_its_fsync_which_the_loop_does_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What lets a read's fsync overlap MLflow's work: ``write`` returns with the record only
    written; the fsync runs once the request has gone on (and the loop is free)."""
    with opened(tmp_path, monkeypatch) as (spool, fsyncs):

        async def scenario() -> None:
            done = await spool.write(intent(1))
            assert not done.done() and fsyncs.threads == []  # forwarded before any fsync
            await asyncio.sleep(0)
            assert done.done() and fsyncs.on_loop == [True]
            await spool.durable(done)

        asyncio.run(scenario())


# Where a test slows commits down on purpose: a short window, so that one commit this much
# slower than the limit leaves the loop at once with a limit no busy machine's commit reaches.
SMALL = 0.02
WINDOW = 4
STALL = SMALL * WINDOW * 1.25


@pytest.fixture
def short_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("guard.audit.spool.LOOP_WINDOW", WINDOW)


@pytest.mark.usefixtures("short_window")
@pytest.mark.parametrize("fails", [False, True], ids=["slow", "slow-and-failing"])
def test_a_commit_far_slower_than_the_limit_sends_the_next_seconds_commits_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    monkeypatch.setattr("guard.audit.spool.LOOP_RETRY", 0.3)
    with opened(tmp_path, monkeypatch, SMALL) as (spool, fsyncs):

        async def scenario() -> None:
            fsyncs.slow, fsyncs.fail = STALL, fails
            try:
                await spool.append(intent(1))  # on the loop, and far too slow
            except SpoolError:
                assert fails
            fsyncs.slow = 0.0
            await spool.append(intent(2))  # so on the thread, quick or not
            await spool.append(intent(3))
            await asyncio.sleep(0.35)  # (between two of the thread's FLUSH_INTERVAL wakes)
            await spool.append(intent(4))  # the loop tries again: quick, it stays
            await spool.append(intent(5))

        asyncio.run(scenario())
        assert fsyncs.on_loop == [True, False, False, True, True]
    assert verify(KEY, spooled(tmp_path)) == []


def test_one_slow_commit_now_and_then_keeps_commits_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk's occasional slow fsync (a journal commit) costs one stall, not a second of
    hand-offs."""
    with opened(tmp_path, monkeypatch) as (spool, fsyncs):

        async def scenario() -> None:
            fsyncs.slow = LIMIT * 3
            await spool.append(intent(1))
            fsyncs.slow = 0.0
            await spool.append(intent(2))

        asyncio.run(scenario())
        assert fsyncs.on_loop == [True, True]


@pytest.mark.usefixtures("short_window")
def test_commits_slower_than_the_limit_on_average_go_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with opened(tmp_path, monkeypatch, SMALL) as (spool, fsyncs):
        fsyncs.slow = SMALL * 3

        async def scenario() -> None:
            for i in range(1, 9):
                await spool.append(intent(i))

        asyncio.run(scenario())
        assert fsyncs.on_loop[:1] == [True]  # the average needs a few
        assert fsyncs.on_loop[-1] is False and fsyncs.on_loop.count(False) >= 4


@pytest.mark.usefixtures("short_window")
def test_a_commit_whose_head_file_fsync_is_slow_counts_as_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop stalls for every fsync of a commit, head.json's too (counted refusals)."""
    with opened(tmp_path, monkeypatch, SMALL) as (spool, fsyncs):
        real = fsyncs.real
        head_fd = spool._head_fd

        def slow_head(fd: int) -> None:
            if fd == head_fd:
                time.sleep(STALL)
            real(fd)

        fsyncs.real = slow_head

        async def scenario() -> None:
            spool.tally("203.0.113.9")  # head.json holds a count: due with the next commit
            await spool.append(intent(1))  # on the loop, head.json's fsync slow
            await spool.append(intent(2))

        asyncio.run(scenario())
        assert fsyncs.on_loop == [True, False]


def test_an_fsync_dropped_with_a_stopped_loop_does_not_keep_the_next_loop_from_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with opened(tmp_path, monkeypatch) as (spool, fsyncs):
        loop = asyncio.new_event_loop()

        async def write_and_stop() -> Durable:
            done = await spool.write(intent(1))
            loop.stop()  # in the turn that made its fsync due
            return done

        task = loop.create_task(write_and_stop())
        loop.run_forever()
        loop.close()
        done = task.result()
        assert not done.done() and fsyncs.threads == []
        asyncio.run(spool.append(intent(2)))  # a new loop fsyncs both
        assert done.done() and done.error is None and fsyncs.on_loop == [True]


def test_a_failed_fsync_on_the_loop_fails_its_waiters_and_cuts_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with opened(tmp_path, monkeypatch) as (spool, fsyncs):
        size = os.fstat(fsyncs.fd).st_size

        async def scenario() -> None:
            fsyncs.fail = True
            reading = asyncio.ensure_future(spool.write(intent(1)))
            write = asyncio.ensure_future(spool.append(intent(2)))  # (in the same turn)
            read = await reading
            with pytest.raises(SpoolError, match="Input/output error"):
                await write
            with pytest.raises(SpoolError):
                await spool.durable(read)
            assert os.fstat(fsyncs.fd).st_size == size  # both cut back off the file
            assert not spool.healthy
            await spool.append(intent(3))  # the chain goes on from the durable head
            assert spool.healthy

        asyncio.run(scenario())
        assert fsyncs.on_loop == [True, True]
    records = spooled(tmp_path)
    assert [r["request_id"] for r in records] == ["r0", "r3"] and verify(KEY, records) == []


def test_while_the_thread_fsyncs_the_loop_leaves_the_next_fsync_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never two fsyncs at once: a record awaited while the thread is in an fsync (one nobody
    waited for: an outcome's, within FLUSH_INTERVAL) is fsynced by the thread right after."""
    with opened(tmp_path, monkeypatch, flushes=True) as (spool, fsyncs):
        fsyncs.gate = threading.Event()

        async def scenario() -> None:
            spool.append_nowait(body(1))
            assert fsyncs.entered.wait(5)  # the thread's flush holds
            task = asyncio.ensure_future(spool.append(intent(2)))
            await asyncio.sleep(0.05)
            assert not task.done() and len(fsyncs.threads) == 1
            assert fsyncs.gate is not None
            fsyncs.gate.set()
            await asyncio.wait_for(task, 5)

        asyncio.run(scenario())
        assert fsyncs.on_loop == [False, False]
    records = spooled(tmp_path)
    assert [r["seq"] for r in records] == [1, 2, 3] and verify(KEY, records) == []


def test_closing_with_an_fsync_due_on_the_loop_fsyncs_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with opened(tmp_path, monkeypatch) as (spool, fsyncs):

        async def scenario() -> None:
            await spool.write(intent(1))  # its fsync due on the loop
            await asyncio.to_thread(spool.close)  # as the gateway stops, meanwhile
            await asyncio.sleep(0)

        asyncio.run(scenario())
        assert len(fsyncs.threads) == 1  # the loop or the thread, whichever came first
    records = spooled(tmp_path)
    assert [r["seq"] for r in records] == [1, 2] and verify(KEY, records) == []
