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

import anyio.to_thread
import sqlalchemy as sa

from guard.authz.engine import EMPTY, Decision, PolicyIndex
from guard.authz.policy import PolicyError
from guard.authz.store import PolicyStore

logger = logging.getLogger("guard.authz")

RECHECK_INTERVAL = 0.25


class PolicyRuntime:
    def __init__(self, store: PolicyStore, poll_interval: float) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.index: PolicyIndex = EMPTY
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None
        self._last_check = 0.0

    def decide(self, subject: str, resource: str, action: str) -> Decision:
        return self.index.decide(subject, resource, action)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.ensure_future(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh_soon(self) -> bool:
        """Before a refusal: pick up a change not yet polled (a token or grant made a moment
        ago), at most four times a second however many refusals there are."""
        if time.monotonic() - self._last_check < RECHECK_INTERVAL:
            return False
        try:
            return await self.refresh()
        except sa.exc.SQLAlchemyError:
            return False

    async def refresh(self) -> bool:
        """Load and swap in the stored policy if its version moved; True if it did."""
        self._last_check = time.monotonic()
        version = await anyio.to_thread.run_sync(self.store.version)
        if version == self.index.version and self.index is not EMPTY:
            return False
        started = time.monotonic()
        try:
            index = await anyio.to_thread.run_sync(self._build)
        except PolicyError as exc:
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
        version, policy = self.store.load()
        return PolicyIndex(policy, version)

    async def _follow(self) -> None:
        failing = False  # one line per failed poll, a traceback never (it is always the same)
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.refresh()
            except sa.exc.SQLAlchemyError as exc:
                logger.warning(
                    "policy poll failed (%s); keeping version %d",
                    type(exc).__name__, self.index.version,
                )  # fmt: skip
                failing = True
            else:
                if failing:
                    logger.warning("policy store reachable again")
                failing = False
