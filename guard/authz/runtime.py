"""The policy in force in a running gateway: loaded at start, followed as it changes.

A background task polls the policy version (one cheap query a second). When it moves, the new
policy is loaded and indexed in a worker thread, off the request path, and swapped in with one
assignment; requests in flight finish on the index they started with. A policy that fails to
load or validate is logged and the previous one stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict

import sqlalchemy as sa

from guard.authz.engine import EMPTY, Decision, PolicyIndex
from guard.authz.policy import PolicyError
from guard.authz.store import PolicyStore
from guard.authz.workspaces import problems as workspace_problems
from guard.store.polling import Poller, in_poll_thread

logger = logging.getLogger("guard.authz")

RECHECK_INTERVAL = 0.25
MAX_WAITERS = 10_000  # callers remembered as having waited for a check, oldest forgotten


class PolicyRuntime:
    """``store`` is the policy's (changes go through it); ``reads``, if given, the same store
    through the pollers' own engine, which the polls and loads read."""

    def __init__(
        self, store: PolicyStore, poll_interval: float, reads: PolicyStore | None = None
    ) -> None:
        self.store = store
        self.reads = reads or store
        self.poll_interval = poll_interval
        self.index: PolicyIndex = EMPTY
        self.last_error = ""
        self._rejected: list[str] = []  # the problems of the last policy refused
        self._poller = Poller(
            self.refresh, poll_interval, logger,
            failing=lambda error: f"policy poll failed ({error}); keeping version "
            f"{self.index.version}",
            recovered="policy store reachable again",
        )  # fmt: skip
        self._pending: asyncio.Future[None] | None = None
        self._refreshing = asyncio.Lock()  # the poll's and the refusals' checks, one at a time
        self._last_check = 0.0  # when the newest version check began
        self._last_done = 0.0  # when the newest finished check began
        self._waited: OrderedDict[str, float] = OrderedDict()

    def decide(self, subject: str, resource: str, action: str) -> Decision:
        return self.index.decide(subject, resource, action)

    async def start(self) -> None:
        """Load the stored policy; one the gateway cannot enforce as written (for instance an
        unqualified grant with workspaces on) stops the start, naming every problem."""
        await self.refresh()
        if self.index is EMPTY and self._rejected:
            raise PolicyError(["the stored policy cannot be enforced", *self._rejected])
        self._poller.start()

    async def stop(self) -> None:
        await self._poller.stop()

    async def refresh_soon(self, since: float | None = None, key: str = "") -> bool:
        """Before a refusal: make sure the stored policy version was read after ``since`` (the
        request's arrival, ``time.monotonic()``; now if not given), so a grant made a moment
        before the request is in force for it. Checks are shared and paced (one at a time, at
        most four a second however many refusals wait); a caller (``key``) refused again
        within one poll interval does not wait again: the poll covers it. True if the policy
        in force changed meanwhile."""
        now = time.monotonic()
        since = now if since is None else since
        before = self.index
        if key:
            last = self._waited.get(key)
            if last is not None and now - last < self.poll_interval:
                return False
            self._waited[key] = now
            self._waited.move_to_end(key)
            while len(self._waited) > MAX_WAITERS:
                self._waited.popitem(last=False)
        for _ in range(3):  # a check under way may have begun before ``since``: then another
            if self._last_done >= since:
                break
            if self._pending is None or self._pending.done():
                self._pending = asyncio.ensure_future(self._paced_refresh())
            await asyncio.shield(self._pending)
        return self.index is not before

    async def _paced_refresh(self) -> None:
        wait = self._last_check + RECHECK_INTERVAL - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        with contextlib.suppress(sa.exc.SQLAlchemyError):  # a failed look is still a look
            await self.refresh()

    async def refresh(self) -> bool:
        """Load and swap in the stored policy if its version moved; True if it did. One check
        at a time: two at once (the poll's and a refusal's) could swap in last an older
        version the slower of them had read, putting a removed grant back in force."""
        async with self._refreshing:
            started = self._last_check = time.monotonic()
            try:
                return await self._refresh()
            finally:
                self._last_done = max(self._last_done, started)

    async def _refresh(self) -> bool:
        version = await in_poll_thread(self.reads.version)
        if version == self.index.version and self.index is not EMPTY:
            return False
        started = time.monotonic()
        try:
            index = await in_poll_thread(self._build)
        except PolicyError as exc:
            self._rejected = exc.problems
            message = (
                f"policy version {version} rejected, keeping version {self.index.version}: {exc}"
            )
            if message != self.last_error:
                logger.error(message)
            self.last_error = message
            return False
        self.index = index
        self.last_error = ""
        logger.info(
            "policy version %d in force (%d grants, built in %.0f ms)",
            index.version, len(index.policy.grants), (time.monotonic() - started) * 1000,
        )  # fmt: skip
        return True

    def _build(self) -> PolicyIndex:
        version, policy = self.reads.load()
        if problems := workspace_problems(policy, self.reads.workspaces):
            raise PolicyError(problems)
        return PolicyIndex(policy, version)
