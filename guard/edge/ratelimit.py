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
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class _Window:
    started: float
    refused: int = 0  # every refusal counted (past the limit: no record each)
    failed: int = 0  # those that count toward blocking the address
    unrecorded: int = 0


class FailureLimiter:
    def __init__(self, limit: int, interval: float, max_addresses: int = 100_000) -> None:
        self.limit = limit
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
        window = self._window(client, now)
        if window.failed < self.limit:
            return 0.0
        return max(0.0, self.interval - (now - window.started))

    def refused(self, client: str, blocking: bool = True) -> bool:
        """Count one refusal (toward blocking the address unless ``blocking`` is False); True if
        it should still be recorded on its own."""
        window = self._window(client, time.monotonic())
        window.refused += 1
        window.failed += blocking
        if window.refused <= self.limit:
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
