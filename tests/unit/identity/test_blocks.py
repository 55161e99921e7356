"""BlockedSubjects: the in-memory view of user blocks each replica polls, and session pruning."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from pathlib import Path

import pytest

from guard.identity.base import Principal
from guard.identity.blocks import BlockedSubjects, blockable
from guard.identity.sessions import SessionStore, UserBlocks
from guard.store.db import build_engine, migrate


@pytest.mark.parametrize(
    ("subject", "expected"),
    [("user:alice", True), ("token:ci", False), ("group:ldap/x", False), ("alice", False)],
)
def test_only_people_are_blockable(subject: str, expected: bool) -> None:
    assert blockable(subject) is expected


def test_follows_blocks_and_prunes(tmp_path: Path) -> None:
    engine = build_engine(f"sqlite:///{tmp_path / 'guard.db'}")
    migrate(engine)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    past = SessionStore(engine, b"k" * 32, idle_timeout=60, absolute_timeout=120, clock=lambda: old)
    past.create(Principal("user:bob", "bob", "ldap", ()), client="a")
    store = SessionStore(engine, b"k" * 32, idle_timeout=60, absolute_timeout=120)
    blocks = UserBlocks(engine)
    blocks.block("user:alice", "test")
    blocks.block("token:ci", "test")  # written by hand: still never honoured for a token
    blocked = BlockedSubjects(blocks, poll_interval=0.01, sessions=store)

    async def scenario() -> None:
        await blocked.start()
        try:
            assert "user:alice" in blocked and "token:ci" not in blocked
            assert "user:carol" not in blocked and 42 not in blocked
            assert store.list(include_ended=True) == []  # the month-old session was pruned
            blocks.block("user:carol", "test")
            blocks.unblock("user:alice")
            for _ in range(500):  # bounded: 5 s at most
                if "user:carol" in blocked and "user:alice" not in blocked:
                    break
                await asyncio.sleep(0.01)
            assert "user:carol" in blocked and "user:alice" not in blocked
        finally:
            await blocked.stop()

    asyncio.run(scenario())
    engine.dispose()


def test_a_slower_older_read_never_puts_a_block_back_out() -> None:
    """Its own poll and the revocation counter's listener both read who is blocked: a read
    that began before a block and ended after the listener's read of it put the older set
    back, and the block went unseen until the next poll. They read one at a time now."""

    class Blocks:
        def __init__(self) -> None:
            self.stored: frozenset[str] = frozenset()
            self.reading, self.release = threading.Event(), threading.Event()
            self.slow = True

        def subjects(self) -> frozenset[str]:
            snapshot = self.stored  # what the SELECT sees when it starts
            if self.slow:
                self.slow = False
                self.reading.set()
                self.release.wait(10)
            return snapshot

    async def scenario() -> bool:
        blocks = Blocks()
        blocked = BlockedSubjects(blocks, poll_interval=3600)  # type: ignore[arg-type]
        own_poll = asyncio.ensure_future(blocked.refresh())
        await asyncio.to_thread(blocks.reading.wait, 10)
        blocks.stored = frozenset({"user:alice"})  # `user block alice` commits
        listener = asyncio.ensure_future(blocked.refresh())  # the counter moved
        await asyncio.wait([listener], timeout=1)  # (done at once before: it read alice)
        blocks.release.set()
        await asyncio.gather(own_poll, listener)
        return "user:alice" in blocked

    assert asyncio.run(scenario())
