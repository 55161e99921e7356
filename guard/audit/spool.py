"""The spool: a local journal every audit record reaches, fsynced, before the database does.

One thread owns the files. Callers queue records; the thread takes whatever has queued up,
seals it into the chain, appends it with one ``write`` and one ``fsync`` (group commit), then
wakes the callers. A request waits for its intent record this way before it is forwarded.
Records nobody waits for (outcomes: the request already happened) are written at once and
fsynced with the next intent, or within ``FLUSH_INTERVAL``.

The journal is a directory of segments named by their first sequence number
(``00000000000000000001.jsonl``), one canonical JSON record per line. Only bytes up to the last
fsync are offered to the shipper. A failed write is cut back off the file, its callers get
``SpoolError`` and the spool reports unhealthy until a write succeeds again (a full disk that
gets space back recovers by itself). If even cutting back fails, the spool stops accepting
records until the gateway restarts: sequence numbers are never reused. On open, a torn last
line (a crash mid-write) is cut off and the chain continues from the last whole record.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from guard.audit.chain import Head, canonical

logger = logging.getLogger("guard.audit")

SUFFIX: Final = ".jsonl"
MAX_BATCH: Final = 1024
HEAD_SIZE: Final = 512  # head.json is rewritten in place at this fixed size
FLUSH_INTERVAL: Final = 0.1  # longest a record nobody waits for stays written but not fsynced


class SpoolError(Exception):
    """The record could not be made durable; the message says why."""


@dataclass(slots=True)
class _Item:
    body: dict[str, Any]
    done: concurrent.futures.Future[None] | None


_STOP: Final = _Item({}, None)


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
    records: list[tuple[dict[str, Any], int]] = []
    offset = start
    with path.open("rb") as file:
        file.seek(start)
        for line in file:
            if (end is not None and offset + len(line) > end) or not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not isinstance(record, dict):
                break
            offset += len(line)
            records.append((record, offset))
            if limit is not None and len(records) >= limit:
                break
    return records


class Spool:
    def __init__(
        self,
        directory: Path,
        key: bytes,
        *,
        segment_size: int,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.directory = directory
        self.key = key
        self.segment_size = segment_size
        self.on_commit = on_commit or (lambda: None)
        self.writer = ""
        self.head = Head("")
        self.healthy = True
        self.broken = False
        self.error = ""
        self.spooled = 0
        self.commits = 0
        self.failures = 0
        self.lost = 0  # records queued without waiting that could not be written
        self.last_fsync = 0.0  # seconds the last group commit's fsync took
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._head_fd: int | None = None
        self._fd: int | None = None
        self._dirty = False  # written since the last fsync
        self._segment_first = 0  # first sequence number of the segment being written
        self._offset = 0
        self._committed = (0, 0)

    # -- lifecycle -------------------------------------------------------------------------

    def open(self, wait: bool = False) -> None:
        """Lock the directory (``wait``: until the process holding it is done), recover the
        chain's head, start the writer thread."""
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
            self.head = self._recover()
        except OSError as exc:
            self.close()
            raise SpoolError(f"audit spool {self.directory} cannot be recovered: {exc}") from None
        self._committed = (self._segment_first, self._offset)
        self._thread = threading.Thread(target=self._run, name="audit-spool", daemon=True)
        self._thread.start()
        logger.info(
            "audit spool %s: writer %s continues at record %d",
            self.directory, self.writer, self.head.seq + 1,
        )  # fmt: skip

    def close(self) -> None:
        """Write everything queued, then stop. Safe to call twice."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        for name in ("_fd", "_head_fd"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- appending -------------------------------------------------------------------------

    async def append(self, body: dict[str, Any]) -> None:
        """Queue ``body`` and return once it is on disk; SpoolError if it could not be."""
        if self.broken or self._thread is None:
            raise SpoolError(self.error or "the audit spool is closed")
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put(_Item(body, done))
        await asyncio.wrap_future(done)

    def append_nowait(self, body: dict[str, Any]) -> None:
        """Queue ``body`` without waiting (an outcome: the request already happened)."""
        if self.broken or self._thread is None:
            self.failures += 1
            logger.error("audit record lost, the spool is unavailable: %s", self.error)
            return
        self._queue.put(_Item(body, None))

    def committed(self) -> tuple[int, int]:
        """(first sequence number of the segment being written, bytes of it made durable)."""
        return self._committed

    # -- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                batch = [self._queue.get(timeout=FLUSH_INTERVAL if self._dirty else None)]
            except queue.Empty:
                self._flush()
                continue
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [item for item in batch if item is not _STOP]
            if items:
                try:
                    self._write(items)
                except Exception:  # the thread must outlive any bug: fail loudly, never hang
                    logger.exception("audit spool failed unexpectedly")
                    self.broken, self.healthy = True, False
                    self.error = "audit spool failed unexpectedly: restart the gateway"
                    self._fail(
                        [i for i in items if i.done is None or not i.done.done()], self.error
                    )
            if len(items) < len(batch):
                self._flush()
                return

    def _flush(self) -> None:
        """fsync what was written without anyone waiting (outcomes), at most FLUSH_INTERVAL
        after it was written."""
        if not self._dirty or self._fd is None:
            self._dirty = False
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:  # written but maybe not durable, and nothing to cut back
            self.broken, self.healthy = True, False
            self.error = f"audit spool fsync failed: {exc.strerror or exc}: restart the gateway"
            logger.critical("%s", self.error)
        else:
            self._committed = (self._segment_first, self._offset)
            self.on_commit()
        self._dirty = False

    def _write(self, items: list[_Item]) -> None:
        if self.broken:
            self._fail(items, self.error)
            return
        if self.lost:  # the first write that works says how many records could not be written
            note = {"kind": "event", "event": "records_lost", "count": self.lost,
                    "time": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")}  # fmt: skip
            items = [_Item(note, None), *items]
        head, lines, sealed = self.head, [], []
        for item in items:
            try:
                record, after = head.seal(self.key, item.body)
                line = canonical(record) + b"\n"
            except (TypeError, ValueError) as exc:  # one bad record fails only its own request
                logger.error("audit record refused: %s", exc)
                self._fail([item], f"audit record cannot be written: {exc}")
                continue
            head = after
            lines.append(line)
            sealed.append(item)
        items = sealed
        if not items:
            return
        data = b"".join(lines)
        offset = self._offset
        try:
            if self._fd is None:
                self._open_segment(self.head.seq + 1)
                offset = self._offset
            assert self._fd is not None  # noqa: S101 - opened just above
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            # A record someone waits for (an intent) is fsynced now, with everything before it;
            # records nobody waits for (outcomes) within FLUSH_INTERVAL, or with the next intent.
            if any(item.done is not None for item in items) or (
                offset + len(data) >= self.segment_size
            ):
                started = time.perf_counter()
                os.fsync(self._fd)
                self.last_fsync = time.perf_counter() - started
                self._dirty = False
            else:
                self._dirty = True
        except OSError as exc:
            self._undo(offset, exc)
            self._fail(items, self.error)
            return
        self._offset = offset + len(data)
        self.head = head
        self.spooled += len(items)
        self.commits += 1
        self.lost = 0
        if not self._dirty:  # only what is fsynced is offered to the shipper
            self._committed = (self._segment_first, self._offset)
        if not self.healthy:
            logger.warning("audit spool writable again")
        self.healthy, self.error = True, ""
        self._write_head()  # before anyone hears "done": the head is never behind what was told
        for item in items:
            if item.done is not None and not item.done.done():  # a waiter may have given up
                item.done.set_result(None)
        if self._offset >= self.segment_size:
            os.close(self._fd)
            self._fd = None  # the next write starts a new segment
        self.on_commit()

    def _fail(self, items: list[_Item], error: str) -> None:
        self.failures += len(items)
        self.lost += sum(
            1 for i in items if i.done is None and i.body.get("event") != "records_lost"
        )  # (an awaited record is not lost: its request is refused instead)
        for item in items:
            if item.done is not None:
                if not item.done.done():
                    item.done.set_exception(SpoolError(error))
            else:
                logger.error("audit record lost, the spool is unavailable: %s", error)

    def _undo(self, offset: int, exc: OSError) -> None:
        """Cut a failed write back off the file, or stop accepting records if that fails."""
        first = self.healthy
        self.healthy = False
        self.error = f"audit spool write failed: {exc.strerror or exc}"
        if self._fd is None:
            if first:
                logger.error("%s", self.error)
            return
        try:
            os.ftruncate(self._fd, offset)
            if first:
                logger.error("%s; requests are refused until it can be written", self.error)
        except OSError as again:
            self.broken = True
            self.error += f"; cutting it back failed too ({again.strerror}): restart the gateway"
            logger.critical("%s", self.error)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _open_segment(self, first_seq: int) -> None:
        path = self.directory / segment_name(first_seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segment_first = first_seq
        self._offset = os.fstat(self._fd).st_size
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new file's name is durable too
        finally:
            os.close(dir_fd)

    def _write_head(self) -> None:
        """The chain's head beside the spool, for ``audit verify`` to detect truncation:
        rewritten in place with one small ``pwrite`` (a rename per commit costs as much as the
        fsync). A head torn by a crash reads as unknown, never as a wrong one."""
        head = {"writer": self.head.writer, "seq": self.head.seq, "mac": self.head.mac}
        text = json.dumps(head).encode().ljust(HEAD_SIZE - 1) + b"\n"
        try:
            if self._head_fd is None:
                self._head_fd = os.open(self.directory / "head.json", os.O_RDWR | os.O_CREAT, 0o600)
            os.pwrite(self._head_fd, text, 0)
        except OSError as exc:
            logger.warning("audit head file not updated: %s", exc)

    # -- recovery --------------------------------------------------------------------------

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
                self._segment_first, self._offset = int(path.stem), end
                if end < self.segment_size:
                    self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                return Head(self.writer, int(last["seq"]), str(last["mac"]))
            path.unlink()  # a segment left empty by a failed first write
        return Head(self.writer)
