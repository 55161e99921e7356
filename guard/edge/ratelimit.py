"""Refusals of callers who did not log in, counted per client address.

Past ``limit`` such refusals in one ``interval`` an address is answered ``429
too_many_failures`` where it would have got a 401 (valid credentials still work: many people can
share one address), and its further refusals of any kind are no longer recorded one by one: the
audit trail gets one summary per address and interval instead, so a flood of bad requests cannot
fill the spool or the table. The table of addresses is bounded; the oldest go first.

Some refusals are counted for the record only (``blocking=False``): a browser page load without
a session, sent to the login page, is what anyone can send by the thousand, so past the limit
those go into the summary too; but they never make the address ``blocked``, or an office behind
one address whose people open the UI after their sessions ended could not log in.

With ``gateway.workers`` above 1 the counts that decide (refusals and failures per address and
window) are kept in ``SharedWindows``, a file every worker of one gateway maps, so the limit holds
for the gateway as a whole wherever each connection lands; each worker still summarizes the
refusals it left unrecorded itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

SLOT: Final = struct.Struct("<16sdII")  # address digest, window start, refused, failed
SLOTS: Final = 65536  # ~1.5 MiB; addresses beyond it take the slot of the oldest window probed
PROBES: Final = 8
EMPTY: Final = bytes(16)


class SharedWindows:
    """Each address's current window (start, refusals, failures), in a file the workers of one
    gateway map, updated under an exclusive ``flock`` (released by the kernel if a worker dies
    holding it). Addresses are stored as a keyed BLAKE2b digest: ``key`` is made per start by
    the parent, so nobody outside can aim addresses at another's slots. Window starts are
    ``time.monotonic()``, one clock for every process on the machine."""

    def __init__(self, path: Path, key: bytes, slots: int = SLOTS) -> None:
        self.key = key
        self.slots = slots
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = slots * SLOT.size
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)  # zeros: every slot empty
        self._map = mmap.mmap(self._fd, size)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def _find(self, digest: bytes, now: float, interval: float) -> tuple[int, float, int, int]:
        """The slot of ``digest`` (a new window there if it had none, or it ended)."""
        first = int.from_bytes(digest[:8], "little") % self.slots
        chosen, oldest = -1, float("inf")
        for step in range(PROBES):
            index = (first + step) % self.slots
            found, started, refused, failed = SLOT.unpack_from(self._map, index * SLOT.size)
            if found == digest:
                if now - started >= interval:  # that window ended: a new one
                    return index, now, 0, 0
                return index, started, refused, failed
            # an empty slot or an ended window first, else the window that started first
            age = started if found != EMPTY and now - started < interval else -1.0
            if age < oldest:
                chosen, oldest = index, age
        return chosen, now, 0, 0

    def add(self, client: str, now: float, interval: float, blocking: bool) -> tuple[int, int]:
        """Count one refusal of ``client`` (a failure too, if ``blocking``); the window's
        refusals and failures so far, every worker's."""
        digest = hashlib.blake2b(client.encode(), key=self.key, digest_size=16).digest()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            index, started, refused, failed = self._find(digest, now, interval)
            refused, failed = refused + 1, failed + blocking
            SLOT.pack_into(self._map, index * SLOT.size, digest, started, refused, failed)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return refused, failed

    def failures(self, client: str, now: float, interval: float) -> tuple[float, int]:
        """When ``client``'s window started, and its failures so far (0 without one)."""
        digest = hashlib.blake2b(client.encode(), key=self.key, digest_size=16).digest()
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            _, started, _, failed = self._find(digest, now, interval)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return started, failed


@dataclass
class _Window:
    started: float
    refused: int = 0  # every refusal counted (past the limit: no record each)
    failed: int = 0  # those that count toward blocking the address
    unrecorded: int = 0


class FailureLimiter:
    def __init__(
        self,
        limit: int,
        interval: float,
        max_addresses: int = 100_000,
        shared: SharedWindows | None = None,
    ) -> None:
        self.limit = limit
        self.shared = shared
        self.interval = interval
        self.max_addresses = max_addresses
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._ended: list[dict[str, Any]] = []
        self._swept = 0.0

    def _window(self, client: str, now: float) -> _Window:
        window = self._windows.get(client)
        if window is not None and now - window.started >= self.interval:
            self._end(client, window, now)
            window = None
        if window is None:
            window = self._windows[client] = _Window(now)
            while len(self._windows) > self.max_addresses:
                old_client, old = self._windows.popitem(last=False)
                self._end(old_client, old, now)
        return window

    def _end(self, client: str, window: _Window, now: float) -> None:
        if window.unrecorded:
            self._ended.append({
                "client": client, "refused": window.refused, "unrecorded": window.unrecorded,
                "window_seconds": round(min(now - window.started, self.interval), 3),
            })  # fmt: skip
        self._windows.pop(client, None)

    def blocked(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: it may now)."""
        now = time.monotonic()
        if self.shared is not None:
            started, failed = self.shared.failures(client, now, self.interval)
        else:
            window = self._window(client, now)
            started, failed = window.started, window.failed
        if failed < self.limit:
            return 0.0
        return max(0.0, self.interval - (now - started))

    def refused(self, client: str, blocking: bool = True) -> bool:
        """Count one refusal (toward blocking the address unless ``blocking`` is False); True if
        it should still be recorded on its own."""
        now = time.monotonic()
        window = self._window(client, now)
        window.refused += 1
        window.failed += blocking
        refused = window.refused
        if self.shared is not None:  # every worker's refusals decide
            refused, _ = self.shared.add(client, now, self.interval, blocking)
        if refused <= self.limit:
            return True
        window.unrecorded += 1
        return False

    def summaries(self, final: bool = False) -> list[dict[str, Any]]:
        """Ended windows that left refusals unrecorded (all of them when ``final``). Looks at
        every address at most once a second, so it may be called per request."""
        now = time.monotonic()
        if not final and now - self._swept < 1.0:
            ended, self._ended = self._ended, []
            return ended
        self._swept = now
        for client, window in list(self._windows.items()):
            if final or now - window.started >= self.interval:
                self._end(client, window, now)
        ended, self._ended = self._ended, []
        return ended
