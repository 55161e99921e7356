"""The spool: a local journal every audit record reaches, fsynced, before the database does.

A record is sealed into the chain and appended with one ``write`` by the thread that asks for
it (the event loop's): in the kernel at once, so a crash of the process no longer loses it.
Each ``fsync`` covers everything written before it (group commit). While such commits are
quick on average (``loop_fsync_limit``) the event loop does them itself, once the callbacks
ready when a record was written have run (every request that got that far has written its
record too): this costs the fsync's own CPU and nothing else, where handing it to a thread
costs as much again in wakes and GIL hand-offs on a small VM. Slow ones would stall every
request the loop serves, so then the commits of the next ``LOOP_RETRY`` seconds go to the
spool's own thread, which tells the waiters of each ``fsync`` with one call into their event
loop. A request waits for its intent record this way before it is forwarded, or (``write``: a
read, see ``guard.audit.trail``) goes on at once and its answer waits for the ``fsync``.
Records nobody waits for (outcomes: the request already happened) are fsynced with the next
record someone waits for, or by the thread within ``FLUSH_INTERVAL``.

The journal is a directory of segments named by their first sequence number
(``00000000000000000001.jsonl``), one canonical JSON record per line. Only bytes up to the last
fsync are offered to the shipper. A failed write is cut back off the file, its callers get
``SpoolError`` and the spool reports unhealthy until a write succeeds again (a full disk that
gets space back recovers by itself); a failed ``fsync`` cuts back everything written since the
last one that worked (the chain goes on from there), and fails whoever waits for any of it. If
even cutting back fails, the spool stops accepting records until the gateway restarts: sequence
numbers are never reused. On open, a torn last line (a crash mid-write) is cut off and the
chain continues from the last whole record.

What a crash must not lose is kept in ``head.json`` beside the chain's head, rewritten after
every ``fsync`` before anyone hears of it, as of the records it made durable: the intents whose
outcome is not durable yet, the refusals a flood summary counts but has not made durable yet
(per address; rewritten at once when one is counted), and the records that could not be
written. On open, the records after that head are read from the spool, and a writer that did
not stop cleanly writes an ``outcome_unknown`` outcome for each of its intents left open, a
summary of the refusals still counted, and a ``records_lost`` event: every intent ends with
exactly one outcome or an explicit loss.

How far the chain is stored in the database is kept beside it too, in ``stored.json``, signed,
written by the shipper after each batch it stores and never moved back: records at or below it
that the database no longer holds were deleted from it, even if its head row went with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hmac
import itertools
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from guard.audit.chain import Head, sign_head

logger = logging.getLogger("guard.audit")

SUFFIX: Final = ".jsonl"
HEAD_SIZE: Final = 512  # head.json is rewritten in place, padded to a multiple of this size
MAX_TALLIES: Final = 64  # addresses whose unwritten refusals the head names; the rest are "*"
OTHER: Final = "*"
FLUSH_INTERVAL: Final = 0.1  # longest a record nobody waits for stays written but not fsynced
# A group commit on the event loop blocks it. When the loop's commits take longer than this on
# average (over about LOOP_WINDOW of them: a disk's occasional slow fsync does not count, one
# longer than LOOP_WINDOW times it does at once), the commits of the next LOOP_RETRY seconds go
# to the spool's thread (the loop serves on meanwhile): a slow disk stalls the loop about once
# per LOOP_RETRY.
LOOP_FSYNC_LIMIT: Final = 0.002
LOOP_WINDOW: Final = 64
LOOP_RETRY: Final = 1.0
# Records kept in memory, as sealed, until the shipper stores them (it reads the files for
# older ones: a database outage, a restart).
KEPT_RECORDS: Final = 4096
_HEAD_JSON: Final = json.JSONEncoder(separators=(",", ":")).encode


STORED: Final = "stored.json"


class SpoolError(Exception):
    """The record could not be made durable; the message says why."""


# What a waiter is told once its record's fsync is over: None (durable), or why it is not.
Waiter = asyncio.Future[SpoolError | None]


class Durable:
    """A record ``write`` wrote: done once its fsync is over, with ``error`` if that failed (it
    was cut back). Settled under the spool's lock, by whoever fsyncs; ``Spool.durable`` awaits
    it. (A future of concurrent.futures costs a Condition per request for nothing.)"""

    __slots__ = ("_done", "error", "waiter")

    def __init__(self) -> None:
        self._done = False
        self.error: SpoolError | None = None
        self.waiter: Waiter | None = None  # someone awaits it (``Spool.durable``)

    def done(self) -> bool:
        return self._done

    def settle(self, error: SpoolError | None) -> Waiter | None:
        """Done (once); the waiter to tell, if any."""
        if self._done:
            return None
        self._done, self.error = True, error
        return self.waiter


@dataclass(slots=True)
class _Written:
    """A record written and not fsynced yet: what head.json learns of it once it is."""

    seq: int
    kind: str
    request_id: str
    waiter: Waiter | None = None  # (``append``)
    durable: Durable | None = None  # (``write``)
    settles: tuple[str, int] | None = None  # a summary: this many of an address's refusals
    notes: int = 0  # a records_lost event: the losses it states


@dataclass(slots=True)
class _Segment:
    """A segment file open for writing, or written and not all fsynced yet."""

    fd: int
    first: int  # its name: the sequence number of its first record
    synced: int  # bytes fsynced
    end: int  # bytes written
    named: bool  # its name is fsynced into the directory


# A group commit: the chain's head at that moment, each segment with where it then ended, and
# the counts in head.json to fsync with it (how many changes they had then) or None.
_Sync = tuple[Head, list[tuple[_Segment, int]], int | None]
_Told = tuple[Waiter, SpoolError | None]  # a waiter and what it is told
# A record kept for the shipper: its seq, the record, its line, and where it ends (the first
# seq of its segment, the offset after it).
Kept = tuple[int, dict[str, Any], bytes, int, int]


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SUFFIX}"


def segments(directory: Path) -> list[Path]:
    """The spool's segments, oldest first."""
    return sorted(p for p in directory.glob(f"*{SUFFIX}") if p.stem.isdigit())


def read_records(
    path: Path, start: int = 0, end: int | None = None, limit: int | None = None
) -> list[tuple[dict[str, Any], int]]:
    """Whole records in ``path`` from byte ``start`` (up to ``end``, at most ``limit`` of
    them), each with the offset just after it. Stops at the first line that is not whole (a
    write cut short by a crash)."""
    return [(record, after) for record, _, after in read_lines(path, start, end, limit)]


def read_lines(
    path: Path, start: int = 0, end: int | None = None, limit: int | None = None
) -> list[tuple[dict[str, Any], str, int]]:
    """``read_records``, each record with its line as stored (without the newline)."""
    records: list[tuple[dict[str, Any], str, int]] = []
    offset = start
    with path.open("rb") as file:
        file.seek(start)
        for line in file:
            if (end is not None and offset + len(line) > end) or not line.endswith(b"\n"):
                break
            try:
                text = line[:-1].decode("utf-8", "surrogatepass")
                record = json.loads(text)
            except ValueError:
                break
            if not isinstance(record, dict):
                break
            offset += len(line)
            records.append((record, text, offset))
            if limit is not None and len(records) >= limit:
                break
    return records


def read_stored(directory: Path, key: bytes) -> tuple[Head, bool] | None:
    """Where the shipper last stored this spool's chain (``stored.json``) and whether its
    signature holds; None if there is no such file or it is torn."""
    try:
        data = json.loads((directory / STORED).read_bytes())
        head = Head(str(data["writer"]), int(data["seq"]), str(data["mac"]))
        signature = str(data["signature"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return head, hmac.compare_digest(signature, sign_head(key, head, "stored"))


def write_stored(directory: Path, key: bytes, head: Head) -> None:
    """Record, signed, that the chain is stored up to ``head``. Replaced whole by a rename, not
    fsynced: after a power loss it may lag behind (verify then knows less), never run ahead."""
    data = {"writer": head.writer, "seq": head.seq, "mac": head.mac,
            "signature": sign_head(key, head, "stored")}  # fmt: skip
    temporary = directory / f"{STORED}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(json.dumps(data, sort_keys=True).encode() + b"\n")
    os.replace(temporary, directory / STORED)


class Spool:
    def __init__(
        self,
        directory: Path,
        key: bytes,
        *,
        segment_size: int,
        on_commit: Callable[[], None] | None = None,
        loop_fsync_limit: float = LOOP_FSYNC_LIMIT,
    ) -> None:
        self.directory = directory
        self.loop_fsync_limit = loop_fsync_limit  # 0: every fsync on the spool's thread
        self.key = key
        self.segment_size = segment_size
        self.on_commit = on_commit or (lambda: None)
        self.writer = ""
        self.head = Head("")  # the newest record written (the chain goes on from it)
        self.fsynced = Head("")  # the newest record fsynced (the head head.json names)
        self.healthy = True
        self.broken = False
        self.error = ""
        self.spooled = 0
        self.commits = 0
        self.failures = 0
        self.lost = 0  # records that could not be written, not yet stated by a durable event
        self.unknown = 0  # intents left open by a crash, given outcome_unknown on open
        # Kept in head.json so a crash cannot lose them (see the module docstring), as of the
        # newest fsync:
        self.open_intents: dict[str, list[int]] = {}  # request id -> its intents' seq
        self.tallies: dict[str, int] = {}  # address -> refusals counted, not yet summarized
        self._telling: list[_Told] = []  # waiters the fsync being noted has covered
        self._tallied = 0  # changes to the counts in head.json (refusals, losses: in no record)
        self._tallied_synced = 0  # ... of them covered by an fsync of head.json
        self._head_size = HEAD_SIZE
        self._lock = threading.Lock()  # everything below, and the files
        self._bell = threading.Lock()  # released to wake the fsync thread
        self._bell.acquire()
        self._syncing = threading.Lock()  # held by whoever fsyncs: the loop or the thread
        self._soon: asyncio.AbstractEventLoop | None = None  # the loop an fsync is due on
        self._thread_until = 0.0  # (monotonic) till then, commits go to the thread
        self._loop_commits = 0.0  # the loop's commits: how long they take, a moving average
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stopping = False
        self._lock_fd: int | None = None
        self._head_fd: int | None = None
        self._segment: _Segment | None = None  # the segment being written
        self._full: list[_Segment] = []  # segments written to their size, not all fsynced
        self._written: deque[_Written] = deque()  # oldest first
        self._noting = 0  # losses stated by records_lost events written, not fsynced yet
        self._kept: deque[Kept] = deque()  # the newest records written, not yet shipped
        self._committed = (0, 0)

    @property
    def _fd(self) -> int | None:
        """The file descriptor of the segment being written."""
        return self._segment.fd if self._segment is not None else None

    @_fd.setter
    def _fd(self, fd: int) -> None:
        if self._segment is not None:
            self._segment.fd = fd

    # -- lifecycle -------------------------------------------------------------------------

    def open(self, wait: bool = False) -> None:
        """Lock the directory (``wait``: until the process holding it is done), recover the
        chain's head, start the fsync thread."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"audit spool {self.directory} cannot be opened: {exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise SpoolError(
                f"audit spool {self.directory} is in use by another gateway process (give each "
                "process its own storage.data_dir or audit.spool_dir)"
            ) from None
        try:
            self.writer = self._writer_id()
            self.head = self.fsynced = self._recover()
            left = self._left_by_crash()
        except OSError as exc:
            self.close()
            raise SpoolError(f"audit spool {self.directory} cannot be recovered: {exc}") from None
        self._accepting, self._stopping = True, False
        self._thread = threading.Thread(target=self._run, name="audit-spool", daemon=True)
        self._thread.start()
        with self._lock:
            self._write_head()  # what is left open, until the records below close it
            for body in left:
                settles = None
                if body.get("event") == "unauthenticated_refusals":
                    settles = (str(body["client"]), int(body["unrecorded"]))
                with contextlib.suppress(SpoolError):  # (logged and counted as lost)
                    self._put(body, settles=settles)
        logger.info(
            "audit spool %s: writer %s continues at record %d",
            self.directory, self.writer, self.head.seq + 1,
        )  # fmt: skip

    def close(self) -> None:
        """Summarize what is counted, fsync everything written, then stop. Safe to call
        twice."""
        if self._thread is not None:
            with self._lock:
                counted = dict(self.tallies)
                for record in self._written:  # summaries written, not fsynced yet
                    if record.settles is not None:
                        _settle(counted, *record.settles)
                if counted and not self.broken:  # counted, never summarized: say so now
                    for client, count in sorted(counted.items()):
                        with contextlib.suppress(SpoolError):
                            self._put(self._summary(client, count), settles=(client, count))
                self._accepting, self._stopping = False, True
            self._bell_thread()
            self._thread.join()
            self._thread = None
        self._accepting = False
        with self._syncing:  # (not under an fsync the event loop is doing)
            for segment in self._segments():
                with contextlib.suppress(OSError):
                    os.close(segment.fd)
            self._full, self._segment = [], None
            if self._head_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._head_fd)
                self._head_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- appending -------------------------------------------------------------------------

    async def append(self, body: dict[str, Any]) -> None:
        """Write ``body`` and return once it is fsynced; SpoolError if it could not be."""
        waiter: Waiter = asyncio.get_running_loop().create_future()
        with self._lock:
            self._put(body, waiter)
        self._ring()
        if (error := await waiter) is not None:
            raise error

    async def write(self, body: dict[str, Any]) -> Durable:
        """Write ``body`` now: in the kernel, so a crash of this process no longer loses it (a
        power loss still may); SpoolError if it could not be. The ``Durable`` returned is done
        once the record is fsynced too, or with an error (it was cut back); ``durable`` awaits
        it."""
        done = Durable()
        with self._lock:
            self._put(body, durable=done)
        self._ring()
        return done

    async def durable(self, done: Durable) -> None:
        """Return once a record ``write`` wrote is fsynced; SpoolError if it was not. (The
        waiters of one fsync are woken with one call into their event loop; one already
        fsynced, as a read's often is by the time MLflow answers, needs neither lock nor wake.)"""
        if not done.done():
            waiter: Waiter | None = None
            with self._lock:
                if not done.done():
                    waiter = done.waiter = asyncio.get_running_loop().create_future()
            if waiter is not None:
                await waiter
        if done.error is not None:
            raise done.error

    def append_nowait(self, body: dict[str, Any]) -> None:
        """Write ``body`` without waiting for its fsync (an outcome: the request already
        happened)."""
        with self._lock:
            try:
                self._put(body)
            except SpoolError as exc:
                logger.error("audit record lost, the spool is unavailable: %s", exc)

    def tally(self, client: str) -> None:
        """Count one refusal a flood summary will stand for (it gets no record of its own):
        in head.json at once, fsynced within FLUSH_INTERVAL."""
        with self._lock:
            if self.broken or not self._accepting:
                self.failures += 1
                self.lost += 1
                return
            self._count(client, 1)
            self._write_head()

    async def count(self, client: str) -> None:
        """``tally``, returning once the count is in head.json: a refusal counted this way
        before its answer goes out cannot be lost to a crash of the process."""
        self.tally(client)

    def summarize(self, body: dict[str, Any], client: str, count: int) -> None:
        """Write a flood summary standing for ``count`` of ``client``'s counted refusals."""
        with self._lock:
            try:
                self._put(body, settles=(client, count))
            except SpoolError as exc:
                logger.error("audit record lost, the spool is unavailable: %s", exc)

    def kept(self, after: int, limit: int) -> list[Kept] | None:
        """The durable records after seq ``after`` (at most ``limit``), as kept in memory since
        they were written, for the shipper: no file to read, no line to parse. None if memory
        does not hold the one right after ``after`` (then the files do)."""
        with self._lock:
            kept, durable = self._kept, self.fsynced.seq
            while kept and kept[0][0] <= after:
                kept.popleft()  # stored
            if durable <= after:
                return []
            if not kept or kept[0][0] != after + 1:
                return None
            # Kept records are consecutive (written in order, cut back from the newest).
            return list(itertools.islice(kept, min(durable - after, limit)))

    def committed(self) -> tuple[int, int]:
        """(first sequence number of the segment being written, bytes of it made durable)."""
        return self._committed

    # -- writing (the caller's thread, holding the lock) ---------------------------------

    def _put(
        self,
        body: dict[str, Any],
        waiter: Waiter | None = None,
        settles: tuple[str, int] | None = None,
        durable: Durable | None = None,
    ) -> None:
        """Seal ``body`` into the chain and write it; SpoolError if it is not written (then
        counted as lost if nobody waits for it)."""
        if self.broken or not self._accepting:
            self.failures += waiter is None and durable is None
            raise SpoolError(self.error or "the audit spool is closed")
        head, lines, records, written = self.head, [], [], []
        unstated = self.lost - self._noting
        if unstated > 0:  # the first write that works says how many records could not be
            note = {"kind": "event", "event": "records_lost", "count": unstated,
                    "time": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")}  # fmt: skip
            line, record, head = head.seal_line(self.key, note)
            lines.append(line)
            records.append(record)
            written.append(_Written(head.seq, "event", "", notes=unstated))
        try:
            line, record, head = head.seal_line(self.key, body)
        except (TypeError, ValueError) as exc:  # one bad record fails only its own request
            logger.error("audit record refused: %s", exc)
            self._lose(waiter or durable, settles, 1)
            raise SpoolError(f"audit record cannot be written: {exc}") from None
        lines.append(line)
        records.append(record)
        kind, request_id = str(body.get("kind", "")), str(body.get("request_id", ""))
        written.append(_Written(head.seq, kind, request_id, waiter, durable, settles))
        data = lines[0] if len(lines) == 1 else b"".join(lines)
        segment = self._segment
        offset = segment.end if segment is not None else 0
        try:
            if segment is None:
                segment = self._segment = self._open_segment(self.head.seq + 1)
                offset = segment.end
            view = memoryview(data)
            while view:
                view = view[os.write(segment.fd, view) :]
        except OSError as exc:
            self._undo(offset, exc)
            self._lose(waiter or durable, settles, len(written))
            raise SpoolError(self.error) from None
        segment.end = offset + len(data)
        self.head = head
        for line, record in zip(lines, records, strict=True):
            offset += len(line)
            self._kept.append((record["seq"], record, line, segment.first, offset))
        while len(self._kept) > KEPT_RECORDS:
            self._kept.popleft()
        self._noting += unstated if unstated > 0 else 0
        self._written.extend(written)
        if segment.end >= self.segment_size:  # the next write starts a new segment
            self._full.append(segment)
            self._segment = None

    def _lose(self, waiter: object, settles: tuple[str, int] | None, tried: int) -> None:
        """Count records that could not be written: the one nobody waits for as lost (an
        awaited one is not: its request is refused instead; a summary's refusals stay counted
        in the head and are summarized again at the latest on close)."""
        self.failures += tried
        if waiter is None and settles is None:
            self.lost += 1
            self._head_changed()  # a crash now still says how many were lost

    def _undo(self, offset: int, exc: OSError) -> None:
        """Cut a failed write back off the file, or stop accepting records if that fails."""
        first = self.healthy
        self.healthy = False
        self.error = f"audit spool write failed: {exc.strerror or exc}"
        if self._segment is None:
            if first:
                logger.error("%s", self.error)
            return
        try:
            os.ftruncate(self._segment.fd, offset)
            if first:
                logger.error("%s; requests are refused until it can be written", self.error)
        except OSError as again:
            self._break(f"cutting it back failed too ({again.strerror})")

    def _break(self, why: str) -> None:
        self.broken, self.healthy = True, False
        self.error += f"; {why}: restart the gateway"
        logger.critical("%s", self.error)

    def _segments(self) -> list[_Segment]:
        """The segments open: those written to their size and not all fsynced, oldest first,
        then the one being written."""
        return [*self._full, self._segment] if self._segment is not None else list(self._full)

    def _open_segment(self, first_seq: int) -> _Segment:
        """A new segment file; its name is fsynced into the directory by the next fsync."""
        path = self.directory / segment_name(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        size = os.fstat(fd).st_size
        return _Segment(fd, first_seq, size, size, named=False)

    def _ring(self) -> None:
        """Have what is written fsynced. Called on an event loop while fsyncs are quick: on
        that loop, once the callbacks ready now have run (they may write too: one fsync for
        all of them), with no thread to wake and none to wake the loop again; its CPU is the
        fsync's own. Else by the spool's thread, the loop serving on meanwhile."""
        if (
            self.loop_fsync_limit > 0
            and (loop := running_loop()) is not None
            and time.monotonic() >= self._thread_until
        ):
            if self._soon is not loop:  # (one dropped with a loop that stopped does not count)
                self._soon = loop
                loop.call_soon(self._sync_on_loop)
            return
        self._bell_thread()

    def _bell_thread(self) -> None:
        """Wake the fsync thread (once, however many ring before it wakes)."""
        with contextlib.suppress(RuntimeError):  # rung already
            self._bell.release()

    def _sync_on_loop(self) -> None:
        self._soon = None
        if not self._syncing.acquire(blocking=False):
            self._bell_thread()  # the thread is fsyncing: it fsyncs again once done
            return
        started = time.perf_counter()
        try:
            self._commit()
        finally:
            self._syncing.release()
            took = time.perf_counter() - started  # (failed or not)
            self._loop_commits += (took - self._loop_commits) / LOOP_WINDOW
            if self._loop_commits > self.loop_fsync_limit:
                self._thread_until = time.monotonic() + LOOP_RETRY
                self._loop_commits = self.loop_fsync_limit  # the next try decides afresh

    # -- the fsync thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._bell.acquire(timeout=FLUSH_INTERVAL)
            with self._syncing:
                stopping = self._commit()
            if stopping:
                return

    def _commit(self) -> bool:
        """One group commit of what is due (holding ``_syncing``); whether the spool is
        stopping. Survives any bug: fails loudly, never hangs a waiter."""
        stopping = False
        try:
            with self._lock:
                stopping = self._stopping
                sync = self._due()
            if sync is not None:
                self._sync(sync)
        except Exception:
            logger.exception("audit spool failed unexpectedly")
            with self._lock:
                self.error = "audit spool failed unexpectedly"
                self._break("a bug")
                # Those an fsync covered before the bug hear so; the rest fail.
                told = [*self._telling, *self._fail_written(SpoolError(self.error))]
                self._telling = []
            self._tell(told)
        return stopping

    def _due(self) -> _Sync | None:
        """What the next fsync covers: every segment written since the last one (and new
        segments' names), head.json if it changed since it was last fsynced."""
        segments = self._segments()
        ends = [(s, s.end) for s in segments if s.end > s.synced or not s.named]
        head_file = self._tallied != self._tallied_synced and self._head_fd is not None
        if not ends and not head_file:
            return None
        return self.head, ends, self._tallied if head_file else None

    def _sync(self, sync: _Sync) -> None:
        head, ends, head_file = sync
        try:
            for segment, _ in ends:
                if not segment.named:
                    _fsync_directory(self.directory)  # the new file's name is durable too
                os.fsync(segment.fd)
        except OSError as exc:
            with self._lock:
                told = self._cut_back(exc)
            self._tell(told)
            return
        head_synced = False
        if head_file is not None:  # the counts in it (they are in no record yet)
            try:
                assert self._head_fd is not None  # noqa: S101 - checked when due
                os.fsync(self._head_fd)
                head_synced = True
            except OSError as exc:  # due again with the next fsync
                logger.warning("audit head file not fsynced: %s", exc)
        with self._lock:
            if head_synced and head_file is not None:
                self._tallied_synced = head_file  # (counted since? then due again)
            told = self._synced(head, ends)
        self._tell(told)
        if ends:
            self.on_commit()

    def _synced(self, head: Head, ends: list[tuple[_Segment, int]]) -> list[_Told]:
        """Everything up to ``head`` is durable: head.json learns of it before anyone
        hears."""
        told: list[_Told] = []
        self._telling = told  # (told even if something below fails: see _run)
        records = 0
        while self._written and self._written[0].seq <= head.seq:
            record = self._written[0]  # taken off once noted: a bug leaves it to _fail_written
            self._note(record)
            records += 1
            if record.waiter is not None:
                told.append((record.waiter, None))
            elif record.durable is not None and (waiter := record.durable.settle(None)):
                told.append((waiter, None))
            self._written.popleft()
        for segment, end in ends:
            segment.named = True
            segment.synced = max(segment.synced, end)
            if segment in self._full and segment.synced >= segment.end:
                with contextlib.suppress(OSError):
                    os.close(segment.fd)
                self._full.remove(segment)
        if ends:
            last, end = ends[-1]
            self._committed = (last.first, end)
        if records:
            self.fsynced = head
            self.spooled += records
            self.commits += 1
            if not self.healthy and not self.broken:
                logger.warning("audit spool writable again")
                self.healthy, self.error = True, ""
            self._write_head()
        self._telling = []
        return told

    def _cut_back(self, exc: OSError) -> list[_Told]:
        """An fsync failed: everything written since the last one that worked is cut back off
        the files (the chain goes on from the durable head), and its waiters fail."""
        first = self.healthy
        self.healthy = False
        self.error = f"audit spool write failed: {exc.strerror or exc}"
        segments = self._segments()
        try:
            for segment in segments:
                if segment.end > segment.synced:
                    os.ftruncate(segment.fd, segment.synced)
                    segment.end = segment.synced
        except OSError as again:
            self._break(f"cutting it back failed too ({again.strerror})")
        else:
            if first:
                logger.error("%s; requests are refused until it can be written", self.error)
            # The chain goes on in the oldest: the later ones hold nothing durable.
            for segment in segments[1:]:
                with contextlib.suppress(OSError):
                    os.close(segment.fd)
                try:
                    (self.directory / segment_name(segment.first)).unlink()
                except FileNotFoundError:
                    pass
                except OSError as again:  # its name would be taken again, behind stale bytes
                    self._break(f"a segment cut back cannot be removed ({again.strerror})")
            if len(segments) > 1:
                with contextlib.suppress(OSError):  # (a failing disk: the next fsync says)
                    _fsync_directory(self.directory)  # the removals outlive a power loss
            self._full, self._segment = [], segments[0] if segments else None
            self.head = self.fsynced
            while self._kept and self._kept[-1][0] > self.head.seq:
                self._kept.pop()  # (their numbers are taken again)
        return self._fail_written(SpoolError(self.error))

    def _fail_written(self, error: SpoolError) -> list[_Told]:
        """Everything written and not durable is gone: its waiters are told, what nobody
        waited for is lost (an outcome's intent then ends in the loss instead)."""
        told: list[_Told] = []
        lost = 0
        for record in self._written:
            self.failures += 1
            if record.waiter is not None:
                told.append((record.waiter, error))
            elif record.durable is not None:
                if waiter := record.durable.settle(error):
                    told.append((waiter, error))
            elif record.notes:
                self._noting -= record.notes
            elif record.settles is None:
                lost += 1
                if record.kind == "outcome":
                    self.open_intents.pop(record.request_id, None)
        self._written.clear()
        if lost:
            logger.error("%d audit records lost: %s", lost, error)
            self.lost += lost
            self._head_changed()  # a crash now still says how many were lost
        else:
            self._write_head()
        return told

    def _tell(self, told: list[_Told]) -> None:
        """Wake the waiters: at once on the event loop running here, with one call into each
        other one."""
        if not told:
            return
        running = running_loop()
        loops: dict[asyncio.AbstractEventLoop, list[_Told]] = {}
        for waiter, error in told:
            loops.setdefault(waiter.get_loop(), []).append((waiter, error))
        for loop, some in loops.items():
            if loop is running:
                _resolve(some)
                continue
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, some)

    # -- head.json -------------------------------------------------------------------------

    def _summary(self, client: str, count: int) -> dict[str, Any]:
        return {"kind": "event", "event": "unauthenticated_refusals", "client": client,
                "unrecorded": count, "time": dt.datetime.now(dt.UTC).isoformat()}  # fmt: skip

    def _note(self, record: _Written) -> None:
        """Follow what head.json keeps: intents without outcomes, refusals not summarized,
        losses not stated."""
        if record.kind == "intent" and record.request_id:
            self.open_intents.setdefault(record.request_id, []).append(record.seq)
        elif record.kind == "outcome":
            self.open_intents.pop(record.request_id, None)
        if record.settles is not None:
            self._count(*record.settles, sign=-1)
        if record.notes:
            self.lost -= record.notes
            self._noting -= record.notes

    def _count(self, client: str, count: int, sign: int = 1) -> None:
        if sign > 0:
            if client not in self.tallies and len(self.tallies) >= MAX_TALLIES:
                client = OTHER
            self.tallies[client] = self.tallies.get(client, 0) + count
        else:
            _settle(self.tallies, client, count)
        self._tallied += 1

    def _head_changed(self) -> None:
        """head.json holds a count no record holds yet (a loss): written now, and fsynced by
        the next fsync, within FLUSH_INTERVAL at the latest."""
        self._tallied += 1
        self._write_head()

    def _write_head(self) -> None:
        """The durable head of the chain beside the spool, for ``audit verify`` to detect
        truncation, with what a crash must not lose: rewritten in place with one small
        ``pwrite`` (a rename costs as much as the fsync). A head torn by a crash reads as
        unknown, never as a wrong one."""
        head = self.fsynced
        text = f'{{"writer":{_HEAD_JSON(head.writer)},"seq":{head.seq},"mac":"{head.mac}"'
        if self.open_intents:
            opened = sorted([s, r] for r, seqs in self.open_intents.items() for s in seqs)
            text += f',"open":{_HEAD_JSON(opened)}'
        if self.tallies:
            text += f',"unrecorded":{_HEAD_JSON(self.tallies)}'
        if self.lost:
            text += f',"lost":{self.lost}'
        data = (text + "}").encode()
        # Padded to its size so far (a shorter head leaves no stale bytes behind it).
        self._head_size = max(self._head_size, -(-(len(data) + 1) // HEAD_SIZE) * HEAD_SIZE)
        data = data.ljust(self._head_size - 1) + b"\n"
        try:
            if self._head_fd is None:
                self._head_fd = os.open(self.directory / "head.json", os.O_RDWR | os.O_CREAT, 0o600)
            os.pwrite(self._head_fd, data, 0)
        except OSError as exc:
            logger.warning("audit head file not updated: %s", exc)

    # -- recovery --------------------------------------------------------------------------

    def _left_by_crash(self) -> list[dict[str, Any]]:
        """What a crash left unsaid, as records to write first: an ``outcome_unknown`` outcome
        per intent without an outcome, a summary of refusals counted but not summarized. The
        head names what it knew; the records after it (written before the head was rewritten)
        are read from the spool. Sets ``lost`` from the head."""
        saved = _read_head_file(self.directory / "head.json")
        trusted = saved is not None and saved.get("writer") == self.writer
        with contextlib.suppress(OSError):
            size = (self.directory / "head.json").stat().st_size
            self._head_size = max(self._head_size, -(-size // HEAD_SIZE) * HEAD_SIZE)
        open_: dict[str, list[int]] = {}
        tallies: dict[str, int] = {}
        after = 0
        if saved is not None and trusted:
            after = int(saved.get("seq", 0))
            for seq, request_id in saved.get("open", []):
                open_.setdefault(str(request_id), []).append(int(seq))
            tallies = {str(k): int(v) for k, v in (saved.get("unrecorded") or {}).items()}
            self.lost = int(saved.get("lost", 0))
        intents: dict[int, dict[str, Any]] = {}
        wanted = {s for seqs in open_.values() for s in seqs}
        paths = segments(self.directory)
        for index, path in enumerate(paths):
            ends_before = (
                int(paths[index + 1].stem) - 1 if index + 1 < len(paths) else self.head.seq
            )
            if ends_before <= after and not any(int(path.stem) <= s <= ends_before for s in wanted):
                continue  # neither a record after the head nor an open intent in it
            for record, _ in read_records(path):
                seq, kind = int(record.get("seq", 0)), record.get("kind")
                request_id = str(record.get("request_id", ""))
                if seq in wanted:
                    intents[seq] = record
                if seq <= after:
                    continue
                if kind == "intent" and request_id:
                    open_.setdefault(request_id, []).append(seq)
                    intents[seq] = record
                elif kind == "outcome":
                    open_.pop(request_id, None)
                elif record.get("event") == "records_lost":  # stated after the head
                    self.lost = max(0, self.lost - int(record.get("count", self.lost)))
                elif record.get("event") == "unauthenticated_refusals":
                    _settle(tallies, str(record.get("client", "")), int(record["unrecorded"]))
        self.open_intents = {r: list(seqs) for r, seqs in open_.items()}
        self.tallies = dict(tallies)
        left: list[dict[str, Any]] = []
        when = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        for request_id, seqs in sorted(open_.items(), key=lambda item: item[1][0]):
            intent = intents.get(seqs[-1], {})
            kept: dict[str, Any] = {k: intent[k] for k in _UNKNOWN_FIELDS if k in intent}
            left.append({
                **kept, "kind": "outcome", "time": when, "request_id": request_id,
                "decision": intent.get("decision", "allow"), "reason": "outcome_unknown",
                "status": 0, "intent_seq": seqs,
            })  # fmt: skip
        self.unknown = len(left)
        for client, count in sorted(tallies.items()):
            left.append({
                "kind": "event", "time": when, "event": "unauthenticated_refusals",
                "client": client, "unrecorded": count, "after_crash": True,
            })  # fmt: skip
        if left or self.lost:
            logger.warning(
                "audit spool %s: the last run did not stop cleanly; %d requests in flight get "
                "outcome_unknown, %d counted refusals are summarized, %d records were lost",
                self.directory, self.unknown, sum(tallies.values()), self.lost,
            )  # fmt: skip
        return left

    def _writer_id(self) -> str:
        path = self.directory / "writer"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            writer = f"gw-{socket.gethostname()}-{secrets.token_hex(4)}"
            path.write_text(writer + "\n")
            return writer

    def _recover(self) -> Head:
        """The head of the chain in the spool; a torn tail of the newest segment is cut off."""
        for path in reversed(segments(self.directory)):
            records = read_records(path)
            end = records[-1][1] if records else 0
            if end != path.stat().st_size:
                logger.warning("audit spool %s: cutting off a torn record at byte %d", path, end)
                with path.open("r+b") as file:
                    file.truncate(end)
                    os.fsync(file.fileno())
            if records:
                last = records[-1][0]
                if last.get("writer") != self.writer:
                    raise OSError(f"{path} belongs to writer {last.get('writer')!r}")
                self._committed = (int(path.stem), end)
                if end < self.segment_size:
                    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                    self._segment = _Segment(fd, int(path.stem), end, end, named=True)
                return Head(self.writer, int(last["seq"]), str(last["mac"]))
            path.unlink()  # a segment left empty by a failed first write
        return Head(self.writer)


# What an outcome_unknown record repeats from its intent.
_UNKNOWN_FIELDS: Final = (
    "client",
    "peer",
    "host",
    "scheme",
    "method",
    "path",
    "user_agent",
    "query",
    "principal",
    "auth_method",
    "kind_of_resource",
    "action",
    "resource",
    "resources",
    "policy_version",
    "rule",
    "changes",
)


def _read_head_file(path: Path) -> dict[str, Any] | None:
    """head.json as written, or None if missing or torn."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("seq"), int) else None


def _settle(tallies: dict[str, int], client: str, count: int) -> None:
    """A summary stands for ``count`` of ``client``'s counted refusals (those that overflowed
    the head's list of addresses were counted under "*")."""
    for name in (client, OTHER):
        taken = min(count, tallies.get(name, 0))
        count -= taken
        if taken and tallies[name] == taken:
            del tallies[name]
        elif taken:
            tallies[name] -= taken


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _resolve(told: list[_Told]) -> None:
    """In the waiters' event loop: each is told how its fsync went."""
    for waiter, error in told:
        if not waiter.done():  # (a waiter may have given up)
            waiter.set_result(error)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
