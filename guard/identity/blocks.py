"""Who is blocked, as this replica knows it, and the upkeep of the session table.

``mlflow-guard user block`` writes a row to ``guard_user_block`` and ends the subject's sessions
in the same transaction, so sessions stop at once on every replica (``SessionStore.get`` joins
the block table). Directory Basic logins are not rows: each replica keeps the blocked subjects
in memory. A block moves the revocation counter (``guard.identity.revocations``), and each
replica re-reads the blocked subjects when its poll sees the counter move, so a block stops a
person's Basic logins everywhere within ``authz.revocation_poll_interval``; they are also
re-read every ``authz.poll_interval`` (one small SELECT), which is how an unblock is seen.
Only ``user:`` subjects are blocked: gateway tokens are not people and are revoked with
``token revoke``.

The same loop prunes ended session rows (at start and then hourly, at most ``PRUNE_BATCH`` rows
a time, so the work per tick is bounded whatever piled up).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

import sqlalchemy as sa

from guard.identity.sessions import SessionStore, UserBlocks
from guard.store.polling import Poller, in_poll_thread

logger = logging.getLogger("guard.sessions")

PRUNE_EVERY: Final = 3600.0


def blockable(subject: str) -> bool:
    """Whether a block can apply to ``subject``: people (``user:``), not tokens."""
    return subject.startswith("user:")


class BlockedSubjects:
    """The blocked subjects, followed from the database (see the module docstring)."""

    def __init__(
        self,
        blocks: UserBlocks,
        poll_interval: float,
        sessions: SessionStore | None = None,
        prune_every: float = PRUNE_EVERY,
    ) -> None:
        self.blocks = blocks
        self.sessions = sessions
        self.prune_every = prune_every
        self.subjects: frozenset[str] = frozenset()
        self._pruned_at: float | None = None
        self._refreshing = asyncio.Lock()  # its own poll's and a revocation's, one at a time
        self._poller = Poller(
            self._poll, poll_interval, logger,
            failing=lambda error: f"reading user blocks failed ({error}); keeping "
            f"{len(self.subjects)} blocked subjects",
            recovered="user blocks readable again",
        )  # fmt: skip

    def __contains__(self, subject: object) -> bool:
        return isinstance(subject, str) and blockable(subject) and subject in self.subjects

    async def refresh(self) -> None:
        """Read who is blocked. One read at a time (its own poll and the revocation counter's
        listener both read): a slower read that began before a block must not land last and
        put the older set back."""
        async with self._refreshing:
            self.subjects = await in_poll_thread(self.blocks.subjects)

    async def start(self) -> None:
        await self.refresh()
        await self._prune()
        self._poller.start()

    async def stop(self) -> None:
        await self._poller.stop()

    async def _poll(self) -> None:
        await self.refresh()
        if self._pruned_at is None or time.monotonic() - self._pruned_at >= self.prune_every:
            await self._prune()

    async def _prune(self) -> None:
        if self.sessions is None:
            return
        self._pruned_at = time.monotonic()
        try:
            count = await in_poll_thread(self.sessions.prune)
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("session prune failed (%s)", type(exc).__name__)
            return
        if count:
            logger.info("pruned %d ended sessions", count)
