"""The shipper: moves spooled records into the database, in batches, exactly once.

It reads the spool from its oldest segment, skips what the table already holds for this writer
(``(writer, seq)`` is unique, and the newest stored seq is asked once at start), and inserts the
rest a batch per transaction, moving the writer's signed head row in the same transaction. Now
and then it notes in its own chain the heads of the other writers it sees (``heads_seen``), so
each writer's head is vouched for by the others too. While the database is down, records wait
in the spool and the shipper retries with backoff; when it is back they are replayed in order.
A segment is deleted once everything in it is stored and the spool writes elsewhere. After each
batch it notes, signed, in the spool directory how far the chain is stored (``stored.json``), so
records deleted from the database later are found even with their head row gone; a start that
finds the database short of that note says so in the chain before storing again what the spool
still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import anyio.to_thread
import sqlalchemy as sa

from guard.audit.chain import Head
from guard.audit.spool import (
    Spool,
    read_lines,
    read_stored,
    running_loop,
    segment_name,
    segments,
    write_stored,
)
from guard.audit.store import AuditStore

logger = logging.getLogger("guard.audit")

RETRY_MIN, RETRY_MAX = 0.5, 30.0
SETTLE = 0.2  # seconds a small backlog waits to grow into a bigger batch (fewer transactions)
VOUCH_INTERVAL = 10.0  # seconds between notes of the other writers' heads (when they moved)


class Shipper:
    def __init__(self, spool: Spool, store: AuditStore, *, batch_size: int = 500) -> None:
        self.spool = spool
        self.store = store
        self.batch_size = batch_size
        self.shipped = 0  # newest seq known to be in the database
        self.replayed = 0  # records stored by this process
        self.failures = 0
        self.last_error = ""
        self._cursor: tuple[Path, int] | None = None
        self._pending: tuple[Path, int] | None = None
        self._wake = asyncio.Event()
        self._wanted = False  # a commit since the last read should wake the task
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._vouched_at = 0.0
        self._vouched: dict[str, tuple[int, str]] = {}
        self._stored: Head | None = None  # what stored.json says (it never moves back)

    def notify(self) -> None:
        """Called after each commit (on the event loop, or the spool's thread): wakes the task
        once per read it makes, not once per commit."""
        if self._loop is not None and self._wanted:
            self._wanted = False
            if running_loop() is self._loop:
                self._wake.set()
            else:
                self._loop.call_soon_threadsafe(self._wake.set)

    @property
    def depth(self) -> int:
        """Records in the spool not yet in the database."""
        return max(0, self.spool.head.seq - self.shipped)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.ensure_future(self._run())

    async def stop(self, grace: float) -> None:
        """Ship what is spooled (for at most ``grace`` seconds), then stop. What is left
        stays in the spool and is shipped by the next start."""
        if self._task is None:
            return
        deadline = asyncio.get_running_loop().time() + grace
        while self.depth and asyncio.get_running_loop().time() < deadline and not self._task.done():
            self._wake.set()
            await asyncio.sleep(0.02)
        if self.depth:
            logger.warning("%d audit records left in the spool for the next start", self.depth)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                if not self._started:
                    self.shipped = await anyio.to_thread.run_sync(
                        self.store.max_seq, self.spool.writer
                    )
                    await anyio.to_thread.run_sync(self._check_stored, True)
                    self._started = True
                if 0 < self.depth < self.batch_size:
                    await asyncio.sleep(SETTLE)  # let a few commits gather into one transaction
                self._wake.clear()
                self._wanted = True  # (a commit from now on wakes the wait below)
                batch, lines = await anyio.to_thread.run_sync(self._read)
                if batch:
                    await anyio.to_thread.run_sync(self._store, batch, lines)
                    self.shipped = int(batch[-1]["seq"])  # last: stop() waits for this
                    self.replayed += len(batch)
                    if self.last_error:
                        logger.warning(
                            "audit database reachable again; %d records behind", self.depth
                        )
                    self.last_error, delay = "", RETRY_MIN
                    if time.monotonic() - self._vouched_at >= VOUCH_INTERVAL:
                        await anyio.to_thread.run_sync(self._vouch)
                    continue
            except Exception as exc:  # the database, the files, or a bug: retried, never gone
                self.failures += 1
                message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if message != self.last_error:
                    logger.error(
                        "audit records not stored yet (%s); they wait in the spool", message,
                        exc_info=not isinstance(exc, sa.exc.SQLAlchemyError | OSError),
                    )  # fmt: skip
                self.last_error = message
                self._started = self._started and not isinstance(exc, sa.exc.IntegrityError)
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    def ship_all(self) -> int:
        """Store everything spooled, now, without a task (the CLI's short-lived chain)."""
        self.shipped = self.store.max_seq(self.spool.writer)
        self._check_stored(False)
        stored = 0
        while (read := self._read())[0]:
            batch, lines = read
            self._store(batch, lines)
            self.shipped = int(batch[-1]["seq"])
            stored += len(batch)
        return stored

    def _store(self, batch: list[dict[str, Any]], lines: list[str]) -> None:
        """One batch into the database (its lines as the spool holds them: canonical), then
        stored.json moved and the segments stored whole deleted."""
        self.store.insert(batch, self.spool.key, lines)
        self._note_stored(batch[-1])
        self._prune_segments()

    def _check_stored(self, note: bool) -> None:
        """Compare the database with what stored.json says was stored: records missing below
        it were deleted from the database. Say so (in the chain too, with ``note``) before the
        spool's copies are stored again, so restoring them does not hide that they were gone."""
        found = read_stored(self.spool.directory, self.spool.key)
        valid = found is not None and found[1] and found[0].writer == self.spool.writer
        self._stored = found[0] if found is not None and valid else None
        if self._stored is None or self._stored.seq <= self.shipped:
            return
        first, last = self.shipped + 1, self._stored.seq
        logger.error(
            "audit records %d..%d of writer %s were stored and are gone from the database; "
            "storing again those the spool still holds",
            first, last, self.spool.writer,
        )  # fmt: skip
        if note:
            self.spool.append_nowait({
                "kind": "event", "event": "stored_records_missing",
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
                "first": first, "last": last,
            })  # fmt: skip

    def _note_stored(self, newest: dict[str, Any]) -> None:
        """stored.json moves forward to the newest record of a batch just stored."""
        head = Head(self.spool.writer, int(newest["seq"]), str(newest["mac"]))
        if self._stored is None or head.seq > self._stored.seq:
            try:
                write_stored(self.spool.directory, self.spool.key, head)
            except OSError as exc:  # the batch is stored: only verify's knowledge lags
                logger.warning("audit stored position not written: %s", exc)
                return
            self._stored = head

    def _vouch(self) -> None:
        """Note the other writers' anchored heads in this writer's chain, if they moved: then
        deleting a writer's chain together with its head row still shows."""
        self._vouched_at = time.monotonic()
        anchored, _ = self.store.heads(self.spool.key)
        heads = {w: (h.seq, h.mac) for w, h in anchored.items() if w != self.spool.writer}
        if heads and heads != self._vouched:
            self._vouched = heads
            self.spool.append_nowait({
                "kind": "event", "event": "heads_seen",
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
                "heads": {w: list(h) for w, h in sorted(heads.items())},
            })  # fmt: skip

    def _read(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The next batch not yet stored, from the durable part of the spool, with each
        record's line. Where it ends becomes the cursor once the batch is stored. Taken from
        the spool's memory while it holds what comes next; else read from the files, at most a
        batch at a time, so a long backlog is read once, not once per batch."""
        kept = self.spool.kept(self.shipped, self.batch_size)
        if kept is not None:
            if kept:
                _, _, _, first, end = kept[-1]
                self._pending = (self.spool.directory / segment_name(first), end)
            return [entry[1] for entry in kept], [entry[2][:-1].decode() for entry in kept]
        writing, durable = self.spool.committed()
        cursor = self._cursor
        batch: list[dict[str, Any]] = []
        lines: list[str] = []
        for path in segments(self.spool.directory):
            if cursor is not None and path.name < cursor[0].name:
                continue
            start = cursor[1] if cursor is not None and cursor[0] == path else 0
            current = int(path.stem) == writing
            while True:
                chunk = read_lines(path, start, durable if current else None, self.batch_size)
                for record, line, after in chunk:
                    cursor = (path, after)
                    if int(record["seq"]) <= self.shipped:
                        continue  # stored before a restart: the spool replays from its start
                    batch.append(record)
                    lines.append(line)
                    if len(batch) >= self.batch_size:
                        self._pending = cursor
                        return batch, lines
                if len(chunk) < self.batch_size:
                    break
                start = chunk[-1][2]
            if current:
                break
        self._pending = cursor
        if not batch:
            self._cursor = cursor  # only stored records were passed over
        return batch, lines

    def _prune_segments(self) -> None:
        """Advance the cursor; delete segments before it that the spool no longer writes."""
        self._cursor = self._pending
        if self._cursor is None:
            return
        writing, _ = self.spool.committed()
        for path in segments(self.spool.directory):
            if path.name >= self._cursor[0].name or int(path.stem) >= writing:
                break
            path.unlink()
