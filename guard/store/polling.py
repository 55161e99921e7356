"""Following the database from every replica: what each gateway process reads again every few
seconds (the policy's version, the revocation counter, the blocked users), so that a change
made through any replica reaches all of them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import sqlalchemy as sa


class Poller:
    """Calls ``poll`` every ``interval`` seconds, in a task of its own, from ``start`` until
    ``stop``. While the database cannot be read, what was read last stays in use: ``logger``
    says so once when the polls start failing (``failing`` words it, given the error's type)
    and once when they work again (``recovered``), not once per poll. Any other error (a bug)
    is said the same way, with its traceback, and polling goes on: it never stops silently."""

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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _follow(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except Exception as exc:  # the database, or a bug (with its traceback): polled again
                if not failing:
                    database = isinstance(exc, sa.exc.SQLAlchemyError)
                    self.logger.warning(
                        "%s", self.failing(type(exc).__name__), exc_info=not database
                    )
                failing = True
                continue
            if failing:
                self.logger.warning("%s", self.recovered)
            failing = False
