"""Following the database from every replica: what each gateway process reads again every few
seconds (the policy's version, the revocation counter, the blocked users), so that a change
made through any replica reaches all of them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import anyio
import anyio.to_thread
import sqlalchemy as sa
from anyio.lowlevel import RunVar

T = TypeVar("T")

# Worker threads of the pollers' own, apart from anyio's default pool (40 threads) that the
# request path's database lookups share: requests holding every one of those (a slow database
# under load) must not hold back the read that makes a revocation seen.
POLL_THREADS: Final = 4
_threads: RunVar[anyio.CapacityLimiter] = RunVar("guard_poll_threads")


async def in_poll_thread(call: Callable[[], T]) -> T:
    """``call()`` in one of the pollers' worker threads (of this event loop)."""
    try:
        limiter = _threads.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(POLL_THREADS)
        _threads.set(limiter)
    return await anyio.to_thread.run_sync(call, limiter=limiter)


class Poller:
    """Calls ``poll`` every ``interval`` seconds (from the start of one poll to the start of the
    next, so a slow poll does not stretch the period), in a task of its own, from ``start``
    until ``stop``. While the database cannot be read, what was read last stays in use:
    ``logger`` says so once when the polls start failing (``failing`` words it, given the
    error's type) and once when they work again (``recovered``), not once per poll. Any other
    error (a bug) is said the same way, with its traceback, and polling goes on: it never stops
    silently. A failure of another kind than the one last said (a bug during an outage) is said
    too."""

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
        due = loop.time() + self.interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            due = max(due + self.interval, loop.time())
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
            if failing:
                self.logger.warning("%s", self.recovered)
            failing = ""
