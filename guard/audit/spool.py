"""The spool: a local journal every audit record reaches, fsynced, before the database does.

One thread owns the files. Callers queue records; the thread takes whatever has queued up,
seals it into the chain, appends it with one ``write`` and one ``fsync`` (group commit), then
wakes the callers. A request waits for its intent record this way before it is forwarded, or
(``write``: a read, see ``guard.audit.trail``) only until the ``write`` is done (the record is
in the kernel: a crash of the process no longer loses it), and for the ``fsync`` before its
answer leaves.
Records nobody waits for (outcomes: the request already happened) are written at once and
fsynced with the next intent, or within ``FLUSH_INTERVAL``.

The journal is a directory of segments named by their first sequence number
(``00000000000000000001.jsonl``), one canonical JSON record per line. Only bytes up to the last
fsync are offered to the shipper. A failed write is cut back off the file, its callers get
``SpoolError`` and the spool reports unhealthy until a write succeeds again (a full disk that
gets space back recovers by itself). If even cutting back fails, the spool stops accepting
records until the gateway restarts: sequence numbers are never reused. On open, a torn last
line (a crash mid-write) is cut off and the chain continues from the last whole record.

What a crash must not lose is kept in ``head.json`` beside the chain's head, rewritten after
every commit: the intents whose outcome is not written yet, the refusals a flood summary counts
but has not written yet (per address), and the records that could not be written. On open, a
writer that did not stop cleanly writes an ``outcome_unknown`` outcome for each of its intents
left open, a summary of the refusals still counted, and a ``records_lost`` event: every intent
ends with exactly one outcome or an explicit loss.

How far the chain is stored in the database is kept beside it too, in ``stored.json``, signed,
written by the shipper after each batch it stores and never moved back: records at or below it
that the database no longer holds were deleted from it, even if its head row went with them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import fcntl
import hmac
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

from guard.audit.chain import Head, canonical, sign_head

logger = logging.getLogger("guard.audit")

SUFFIX: Final = ".jsonl"
MAX_BATCH: Final = 1024
HEAD_SIZE: Final = 512  # head.json is rewritten in place, padded to a multiple of this size
MAX_TALLIES: Final = 64  # addresses whose unwritten refusals the head names; the rest are "*"
OTHER: Final = "*"
FLUSH_INTERVAL: Final = 0.1  # longest a record nobody waits for stays written but not fsynced


STORED: Final = "stored.json"


class SpoolError(Exception):
    """The record could not be made durable; the message says why."""


@dataclass(slots=True)
class _Item:
    body: dict[str, Any]
    done: concurrent.futures.Future[None] | None
    written: concurrent.futures.Future[None] | None = None  # set once in the kernel
    tally: str | None = None  # not a record: one refusal from this address, counted
    settles: tuple[str, int] | None = None  # a summary: this many of an address's refusals


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
        self.unknown = 0  # intents left open by a crash, given outcome_unknown on open
        # Kept in head.json so a crash cannot lose them (see the module docstring):
        self.open_intents: dict[str, list[int]] = {}  # request id -> its intents' seq
        self.tallies: dict[str, int] = {}  # address -> refusals counted, not yet summarized
        self._tallies_synced = True  # the head's counts are fsynced as they stand
        self._head_size = HEAD_SIZE
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
            left = self._left_by_crash()
        except OSError as exc:
            self.close()
            raise SpoolError(f"audit spool {self.directory} cannot be recovered: {exc}") from None
        self._committed = (self._segment_first, self._offset)
        self._thread = threading.Thread(target=self._run, name="audit-spool", daemon=True)
        self._thread.start()
        for body in left:
            self.append_nowait(body)
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

    async def write(self, body: dict[str, Any]) -> concurrent.futures.Future[None]:
        """Queue ``body`` and return once it is written, before its fsync: in the kernel, so a
        crash of this process no longer loses it (a power loss still may). The future returned
        is done once the record is fsynced too, or fails with SpoolError; SpoolError at once if
        it could not even be written."""
        if self.broken or self._thread is None:
            raise SpoolError(self.error or "the audit spool is closed")
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        written: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put(_Item(body, done, written))
        await asyncio.wrap_future(written)
        return done

    def append_nowait(self, body: dict[str, Any]) -> None:
        """Queue ``body`` without waiting (an outcome: the request already happened)."""
        if self.broken or self._thread is None:
            self.failures += 1
            logger.error("audit record lost, the spool is unavailable: %s", self.error)
            return
        self._queue.put(_Item(body, None))

    def tally(self, client: str) -> None:
        """Count one refusal a flood summary will stand for (it gets no record of its own):
        in head.json at once, fsynced with the next fsync."""
        if self.broken or self._thread is None:
            self.failures += 1
            self.lost += 1
            return
        self._queue.put(_Item({}, None, tally=client))

    async def count(self, client: str) -> None:
        """``tally``, returning once the count is in head.json: a refusal counted this way
        before its answer goes out cannot be lost to a crash of the process."""
        if self.broken or self._thread is None:
            self.tally(client)
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put(_Item({}, done, tally=client))
        await asyncio.wrap_future(done)

    def summarize(self, body: dict[str, Any], client: str, count: int) -> None:
        """Write a flood summary standing for ``count`` of ``client``'s counted refusals."""
        if self.broken or self._thread is None:
            self.append_nowait(body)
            return
        self._queue.put(_Item(body, None, settles=(client, count)))

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
            counted = [item for item in items if item.tally is not None]
            items = [item for item in items if item.tally is None]
            for item in counted:
                self._count(str(item.tally), 1)
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
            if counted:  # in head.json before the counted refusals' answers go out
                self._write_head()
                self._dirty = True  # fsynced (the head with it) within FLUSH_INTERVAL
                for item in counted:
                    if item.done is not None and not item.done.done():
                        item.done.set_result(None)
            if len(items) + len(counted) < len(batch):
                if self.tallies and not self.broken:  # counted, never summarized: say so now
                    self._write([self._summary(c, n) for c, n in sorted(self.tallies.items())])
                self._flush()
                return

    def _flush(self) -> None:
        """fsync what was written without anyone waiting (outcomes), at most FLUSH_INTERVAL
        after it was written."""
        if not self._tallies_synced and self._head_fd is not None:
            try:
                os.fsync(self._head_fd)
                self._tallies_synced = True
            except OSError as exc:
                logger.warning("audit head file not fsynced: %s", exc)
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
        seqs: list[int] = []
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
            seqs.append(head.seq)
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
            for item in items:  # a read goes on now; its answer waits for the fsync below
                if item.written is not None and not item.written.done():
                    item.written.set_result(None)
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
        for item, seq in zip(items, seqs, strict=True):
            self._note(item, seq)
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

    def _summary(self, client: str, count: int) -> _Item:
        body = {"kind": "event", "event": "unauthenticated_refusals", "client": client,
                "unrecorded": count, "time": dt.datetime.now(dt.UTC).isoformat()}  # fmt: skip
        return _Item(body, None, settles=(client, count))

    def _note(self, item: _Item, seq: int) -> None:
        """Follow what head.json keeps: intents without outcomes, refusals not summarized."""
        kind, request_id = item.body.get("kind"), str(item.body.get("request_id", ""))
        if kind == "intent" and request_id:
            self.open_intents.setdefault(request_id, []).append(seq)
        elif kind == "outcome":
            self.open_intents.pop(request_id, None)
        if item.settles is not None:
            self._count(*item.settles, sign=-1)

    def _count(self, client: str, count: int, sign: int = 1) -> None:
        if sign > 0:
            if client not in self.tallies and len(self.tallies) >= MAX_TALLIES:
                client = OTHER
            self.tallies[client] = self.tallies.get(client, 0) + count
        else:
            _settle(self.tallies, client, count)
        self._tallies_synced = False

    def _fail(self, items: list[_Item], error: str) -> None:
        self.failures += len(items)
        for item in items:  # an outcome that cannot be written is counted as lost instead
            if item.body.get("kind") == "outcome":
                self.open_intents.pop(str(item.body.get("request_id", "")), None)
        self.lost += sum(
            1
            for i in items
            if i.done is None and i.settles is None and i.body.get("event") != "records_lost"
        )  # (an awaited record is not lost: its request is refused instead; a summary's
        # refusals stay counted in the head and are summarized again at the latest on close)
        for item in items:
            if item.written is not None and not item.written.done():
                item.written.set_exception(SpoolError(error))
            if item.done is not None:
                if not item.done.done():
                    item.done.set_exception(SpoolError(error))
            else:
                logger.error("audit record lost, the spool is unavailable: %s", error)
        if self.lost:
            self._tallies_synced = False
            self._write_head()  # a crash now still says how many were lost

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
        head: dict[str, Any] = {
            "writer": self.head.writer, "seq": self.head.seq, "mac": self.head.mac,
        }  # fmt: skip
        if self.open_intents:
            head["open"] = sorted([s, r] for r, seqs in self.open_intents.items() for s in seqs)
        if self.tallies:
            head["unrecorded"] = self.tallies
        if self.lost:
            head["lost"] = self.lost
        text = json.dumps(head, separators=(",", ":")).encode()
        # Padded to its size so far (a shorter head leaves no stale bytes behind it).
        self._head_size = max(self._head_size, -(-(len(text) + 1) // HEAD_SIZE) * HEAD_SIZE)
        text = text.ljust(self._head_size - 1) + b"\n"
        try:
            if self._head_fd is None:
                self._head_fd = os.open(self.directory / "head.json", os.O_RDWR | os.O_CREAT, 0o600)
            os.pwrite(self._head_fd, text, 0)
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
                elif record.get("event") == "records_lost":
                    self.lost = 0  # written before the head said so
                elif record.get("event") == "unauthenticated_refusals":
                    _settle(tallies, str(record.get("client", "")), int(record["unrecorded"]))
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
                self._segment_first, self._offset = int(path.stem), end
                if end < self.segment_size:
                    self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
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
