"""Following the database from every replica: what each gateway process reads again every few
seconds (the policy's version, the revocation counter, the blocked users), so that a change
made through any replica reaches all of them."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import anyio
import anyio.to_thread
import sqlalchemy as sa
from anyio.lowlevel import RunVar

T = TypeVar("T")

# Worker threads of the pollers' own, apart from anyio's default pool (40 threads) that the
# request path's database lookups share: requests holding every one of those (a slow database
# under load) must not hold back the read that makes a revocation seen. (They read through an
# engine of their own too, ``POLL_CONNECTIONS`` connections: see ``guard.app``.) Four can run
# at once (the counter, its listeners, the blocked users, the policy); the rest is margin.
POLL_THREADS: Final = 6
POLL_CONNECTIONS: Final = POLL_THREADS
_threads: RunVar[anyio.CapacityLimiter] = RunVar("guard_poll_threads")
_running = 0  # poll calls still running in a thread, those whose caller left included
_idle = threading.Condition()


async def in_poll_thread(call: Callable[[], T]) -> T:
    """``call()`` in one of the pollers' worker threads (of this event loop)."""
    try:
        limiter = _threads.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(POLL_THREADS)
        _threads.set(limiter)

    def counted() -> T:
        global _running
        with _idle:
            _running += 1
        try:
            return call()
        finally:
            with _idle:
                _running -= 1
                _idle.notify_all()

    return await anyio.to_thread.run_sync(counted, limiter=limiter)


def wait_for_poll_threads(timeout: float) -> bool:
    """Block (at most ``timeout`` seconds) until no poll call runs in a thread any more, such
    as a read whose poller was stopped while it waited for a lock, so its connection is back
    in its engine before that is disposed. Whether none is left."""
    with _idle:
        return _idle.wait_for(lambda: _running == 0, timeout)


class Poller:
    """Calls ``poll`` every ``interval`` seconds (from the start of one poll to the start of the
    next, so a slow poll does not stretch the period, but a tenth of one at least between a
    poll's end and the next), in a task of its own, from ``start`` until ``stop``. While the
    database cannot be read, what was read last stays in use: ``logger`` says so once when the
    polls start failing (``failing`` words it, given the error's type) and once when they work
    again (``recovered``), not once per poll. Any other error (a bug) is said the same way, with
    its traceback, and polling goes on: it never stops silently. A failure of another kind than
    the one last said (a bug during an outage) is said too."""

    def __init__(
        self,
        poll: Callable[[], Awaitable[object]],
        interval: float,
        logger: logging.Logger,
        *,
        failing: Callable[[str], str],
        recovered: str,
    ) -> None:
        self.poll = poll
        self.interval = interval
        self.logger = logger
        self.failing = failing
        self.recovered = recovered
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._follow())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])  # (a cancellation of the caller itself still reaches it)
        if not task.cancelled() and (error := task.exception()) is not None:
            self.logger.error("polling ended by a bug", exc_info=error)

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        failing = ""  # the kind of failure last said
        started = ended = loop.time()
        while True:
            # An interval after the last poll started, and never less than a tenth of one
            # after it ended: a database answering slowly is not asked back to back.
            due = max(started + self.interval, ended + self.interval / 10)
            await asyncio.sleep(max(0.0, due - loop.time()))
            started = loop.time()
            try:
                await self.poll()
            except (Exception, asyncio.CancelledError) as exc:  # polled again, but for stop()
                task = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and (task is None or task.cancelling()):
                    raise
                # The database, or a bug (said with its traceback), such as something the poll
                # awaited cancelled by someone else.
                if type(exc).__name__ != failing:
                    database = isinstance(exc, sa.exc.SQLAlchemyError)
                    self.logger.warning(
                        "%s", self.failing(type(exc).__name__), exc_info=not database
                    )
                failing = type(exc).__name__
                continue
            finally:
                ended = loop.time()
            if failing:
                self.logger.warning("%s", self.recovered)
            failing = ""
