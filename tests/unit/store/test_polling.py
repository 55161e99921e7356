"""The poller every replica follows the database with: a poll per interval, an outage said once
when it starts and once when it ends, never once per poll; stopped, it polls no more."""

from __future__ import annotations

import asyncio
import logging

import pytest
import sqlalchemy as sa

from guard.store.polling import Poller

logger = logging.getLogger("guard.test_polling")


def test_an_outage_is_said_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcomes = [None, "down", "down", "down", None, None, "down", None]  # one poll each
    polls = 0

    async def poll() -> None:
        nonlocal polls
        outcome = outcomes[min(polls, len(outcomes) - 1)]
        polls += 1
        if outcome == "down":
            raise sa.exc.OperationalError("SELECT 1", {}, Exception("database is locked"))

    async def main() -> int:
        poller = Poller(poll, 0.001, logger, failing=lambda error: f"down ({error})",
                        recovered="back")  # fmt: skip
        poller.start()
        for _ in range(5000):  # (bounded: at most ~5 s)
            if polls >= len(outcomes) + 2:
                break
            await asyncio.sleep(0.001)
        await poller.stop()
        stopped_at = polls
        await asyncio.sleep(0.02)
        assert polls == stopped_at  # no poll after stop
        return stopped_at

    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert asyncio.run(main()) >= len(outcomes) + 2
    said = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert said == ["down (OperationalError)", "back", "down (OperationalError)", "back"]


def test_a_bug_is_said_with_its_traceback_and_polling_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    polls = 0

    async def poll() -> None:
        nonlocal polls
        polls += 1
        if polls <= 3:
            raise RuntimeError("a bug")

    async def main() -> None:
        poller = Poller(poll, 0.001, logger, failing=lambda e: f"down ({e})", recovered="back")
        poller.start()
        for _ in range(5000):  # (bounded: at most ~5 s)
            if polls >= 5:
                break
            await asyncio.sleep(0.001)
        await poller.stop()

    with caplog.at_level(logging.WARNING, logger=logger.name):
        asyncio.run(main())
    records = [r for r in caplog.records if r.name == logger.name]
    assert [r.getMessage() for r in records] == ["down (RuntimeError)", "back"]
    assert records[0].exc_info is not None and records[1].exc_info is None
    assert polls >= 5


def test_stop_before_start_and_twice_is_fine() -> None:
    async def poll() -> None:
        return None

    async def main() -> None:
        poller = Poller(poll, 10.0, logger, failing=str, recovered="")
        await poller.stop()
        poller.start()
        await poller.stop()
        await poller.stop()

    asyncio.run(main())
