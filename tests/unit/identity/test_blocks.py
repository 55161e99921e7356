"""BlockedSubjects: the in-memory view of user blocks each replica polls, and session pruning."""

from __future__ import annotations

import asyncio
import datetime as dt
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
