"""Revocations seen by every replica within a poll: one counter, and caches that obey it.

Every revocation moves one counter (``guard_revocation``, one row) in the same transaction as
the revocation itself (``bump``): a token revoked (gateway or personal, through the CLI,
``/guard/api`` or ``/guard/tokens``, or because its owner's name changed hands), a session ended
(logout, ``session revoke``, a provider's back-channel logout, a token session whose token
ended) and a person blocked. Each replica reads the counter every
``authz.revocation_poll_interval`` (``Revocations``, one single-row SELECT) and keeps it in one
int attribute. Every cache of credentials (token rows, a token session's token, LDAP logins,
verified JWTs) remembers the counter it was filled under and trusts an entry only while the
counter is still there, so one revocation anywhere drops every cached credential on every
replica at the next poll, and the request path reads one attribute to know it. Refilled entries
cost one lookup each however many requests want them at once (``RevocableCache``).

The counter is not the policy version: audit records carry that one, and a revocation must
not rebuild the policy index. An entry is stamped with the counter as it was *before* its
lookup began, so a lookup that raced a revocation is stamped too old and read again once the
poll sees the revocation.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Final, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from guard.store.db import revocation_state
from guard.store.polling import Poller, in_poll_thread

logger = logging.getLogger("guard.revocations")

ROW: Final = 1
POLL_INTERVAL: Final = 0.5

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
Listener = Callable[[], Awaitable[None]]


def bump(conn: sa.Connection) -> None:
    """Move the counter inside the caller's transaction: it moves if and only if the
    revocation commits. (The row is created by migration 0008; made again if it is gone.)"""
    now = dt.datetime.now(dt.UTC)
    moved = conn.execute(
        sa.update(revocation_state)
        .where(revocation_state.c.id == ROW)
        .values(counter=revocation_state.c.counter + 1, updated_at=now)
    )
    if not moved.rowcount:
        conn.execute(sa.insert(revocation_state).values(id=ROW, counter=1, updated_at=now))


def read(engine: Engine) -> int:
    """The counter as stored (0 before the first revocation)."""
    with engine.connect() as conn:
        value = conn.execute(
            sa.select(revocation_state.c.counter).where(revocation_state.c.id == ROW)
        ).scalar()
    return int(value or 0)


class Counter:
    """The counter as this replica last read it; a plain one never moves (unit tests, CLI)."""

    def __init__(self, counter: int = 0) -> None:
        self.counter = counter


class Revocations(Counter):
    """The counter followed from the database: read at start, then every ``poll_interval``
    in a background task. ``listen`` adds what must follow a move besides the caches (the
    blocked subjects: a block is a revocation too)."""

    def __init__(self, engine: Engine, poll_interval: float = POLL_INTERVAL) -> None:
        super().__init__()
        self.engine = engine
        self._listeners: list[Listener] = []
        self._owed = False  # a move the listeners have not all followed yet
        self._listening: asyncio.Task[None] | None = None
        self._poller = Poller(
            self.refresh, poll_interval, logger,
            failing=lambda error: f"following revocations failed ({error}); cached "
            "credentials are trusted for their cache time only, blocks as last read",
            recovered="revocations followed again",
        )  # fmt: skip

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def refresh(self) -> bool:
        """Read the counter; True if it moved. The listeners then run in a task of their own,
        waited for at most one poll interval: one that hangs (a read behind a locked table)
        must not keep this replica from reading the counter again, so the next revocation is
        still seen within a poll. A move seen while they run is owed to them too; a listener's
        error is raised here, when it is seen, and the listeners are called again."""
        value = await in_poll_thread(lambda: read(self.engine))
        moved = value != self.counter
        self.counter = value  # from here on no cached credential of before is trusted
        self._owed = self._owed or moved
        error = self._finished()  # (a task that ended after the last wait: raised below)
        if self._listening is None and self._owed:
            self._listening = asyncio.ensure_future(self._call_listeners())
        if (task := self._listening) is not None:
            await asyncio.wait([task], timeout=self._poller.interval)
            error = self._finished() or error
        if error is not None:
            raise error
        return moved

    def _finished(self) -> BaseException | None:
        """Forget the listeners' task if it ended; its error, if it failed."""
        task = self._listening
        if task is None or not task.done():
            return None
        self._listening = None
        return None if task.cancelled() else task.exception()

    async def _call_listeners(self) -> None:
        while self._owed:
            self._owed = False
            try:
                for listener in self._listeners:
                    await listener()
            except BaseException:
                self._owed = True
                raise

    async def start(self) -> None:
        await self.refresh()
        self._poller.start()

    async def stop(self) -> None:
        await self._poller.stop()
        if (task := self._listening) is not None:
            self._listening = None
            task.cancel()  # (a read it began in a worker thread finishes there on its own)
            await asyncio.wait([task], timeout=self._poller.interval)
            if task.done() and not task.cancelled():
                task.exception()  # (retrieved: it failed as it was being stopped)


class RevocableCache(Generic[K, V]):
    """Values trusted for ``ttl`` seconds and only while the revocation counter stays where it
    was when their lookup began; one lookup per key at a time (a burst, or every cached key
    after a revocation, costs one lookup per key, not one per request). ``keep`` says which
    values are remembered (unknown secrets are not: no memory to flood); at most ``size``."""

    def __init__(
        self,
        revocations: Counter,
        ttl: float,
        *,
        size: int = 10_000,
        keep: Callable[[V], bool] = lambda value: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.revocations = revocations
        self.ttl = ttl
        self.size = size
        self.keep = keep
        self.clock = clock
        self._entries: OrderedDict[K, tuple[V, int, float]] = OrderedDict()
        self._flights: dict[K, tuple[asyncio.Future[V], int]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        """The value for ``key``: cached, or from ``load`` (shared with concurrent callers
        whose lookup began under the same counter). ``load``'s exceptions reach every caller
        waiting for it."""
        stamp = self.revocations.counter
        entry = self._entries.get(key)
        if entry is not None and entry[1] == stamp and self.clock() < entry[2]:
            return entry[0]
        flight = self._flights.get(key)
        if flight is None or flight[1] != stamp:
            future = asyncio.ensure_future(self._load(key, load, stamp))
            future.add_done_callback(lambda done: self._landed(key, done))
            flight = self._flights[key] = (future, stamp)
        return await asyncio.shield(flight[0])

    def forget(self, key: K) -> None:
        self._entries.pop(key, None)

    async def _load(self, key: K, load: Callable[[], Awaitable[V]], stamp: int) -> V:
        value = await load()
        if self.ttl <= 0 or not self.keep(value):
            self._entries.pop(key, None)
            return value
        current = self._entries.get(key)
        if current is None or current[1] <= stamp:  # a slower, older lookup never wins
            self._entries[key] = (value, stamp, self.clock() + self.ttl)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    def _landed(self, key: K, done: asyncio.Future[V]) -> None:
        flight = self._flights.get(key)
        if flight is not None and flight[0] is done:
            del self._flights[key]
        if not done.cancelled():
            done.exception()  # retrieved: callers that left must not leave it unretrieved
