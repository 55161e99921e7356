"""The poller every replica follows the database with: a poll per interval, an outage said once
when it starts and once when it ends, never once per poll; stopped, it polls no more."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable

import pytest
import sqlalchemy as sa

from guard.store.polling import Poller

logger = logging.getLogger("guard.test_polling")


def scripted(outcomes: list[str | None]) -> tuple[Callable[[], Awaitable[None]], list[int]]:
    """A poll failing as ``outcomes`` say, one per poll, the last repeated ("down": a database
    error, "bug": any other), and the count of polls so far (in a list, to be read live)."""
    polls = [0]

    async def poll() -> None:
        outcome = outcomes[min(polls[0], len(outcomes) - 1)]
        polls[0] += 1
        if outcome == "down":
            raise sa.exc.OperationalError("SELECT 1", {}, Exception("database is locked"))
        if outcome == "bug":
            raise KeyError("grants")

    return poll, polls


async def polled(poller: Poller, enough: Callable[[], bool]) -> None:
    poller.start()
    for _ in range(5000):  # (bounded: at most ~5 s)
        if enough():
            break
        await asyncio.sleep(0.001)
    await poller.stop()


def test_an_outage_is_said_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcomes = [None, "down", "down", "down", None, None, "down", None]  # one poll each
    poll, polls = scripted(outcomes)

    async def main() -> int:
        poller = Poller(poll, 0.001, logger, failing=lambda error: f"down ({error})",
                        recovered="back")  # fmt: skip
        await polled(poller, lambda: polls[0] >= len(outcomes) + 2)
        stopped_at = polls[0]
        await asyncio.sleep(0.02)
        assert polls[0] == stopped_at  # no poll after stop
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


def test_a_failure_of_another_kind_is_said_too(caplog: pytest.LogCaptureFixture) -> None:
    """A bug that shows during an outage (or an outage during a bug) is said when it starts,
    with its traceback: one flag for both would hide it for as long as it lasts."""
    outcomes = ["down", "down", "bug", "bug", "down", None]
    poll, polls = scripted(outcomes)
    poller = Poller(poll, 0.001, logger, failing=lambda e: f"down ({e})", recovered="back")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        asyncio.run(polled(poller, lambda: polls[0] >= len(outcomes) + 2))
    records = [r for r in caplog.records if r.name == logger.name]
    assert [(r.getMessage(), bool(r.exc_info)) for r in records] == [
        ("down (OperationalError)", False), ("down (KeyError)", True),
        ("down (OperationalError)", False), ("back", False),
    ]  # fmt: skip


def test_a_cancellation_from_inside_a_poll_is_a_bug_and_polling_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only stop() ends the polling: a poll that awaited something another task cancelled
    is said (with its traceback) and polled past."""
    polls = 0

    async def poll() -> None:
        nonlocal polls
        polls += 1
        if polls == 2:
            cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            cancelled.cancel()
            await cancelled

    poller = Poller(poll, 0.001, logger, failing=lambda e: f"down ({e})", recovered="back")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        asyncio.run(polled(poller, lambda: polls >= 5))
    assert polls >= 5
    records = [r for r in caplog.records if r.name == logger.name]
    assert [r.getMessage() for r in records] == ["down (CancelledError)", "back"]
    assert records[0].exc_info is not None


def test_stop_leaves_the_callers_own_cancellation_alone() -> None:
    """A shutdown task cancelled while it stops a poller (its deadline passed) is cancelled:
    stop() must not swallow that cancellation as if it were the poller's."""
    went_on: list[str] = []

    async def main() -> None:
        release = asyncio.Event()
        polling = asyncio.Event()

        async def poll() -> None:  # a read that finishes before it ends (as a worker thread's)
            polling.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                await release.wait()
                raise

        poller = Poller(poll, 0.0, logger, failing=str, recovered="")
        poller.start()
        await polling.wait()

        async def shutdown() -> None:
            await poller.stop()
            went_on.append("after stop")

        task = asyncio.ensure_future(shutdown())
        for _ in range(100):  # until stop() waits for the poll (bounded)
            await asyncio.sleep(0)
        task.cancel()
        release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(main())
    assert went_on == []


def test_a_slow_poll_is_not_followed_back_to_back() -> None:
    """Polls that take longer than the interval (a database answering slowly) start an
    interval apart from start to start, but a tenth of one at least after the last ended."""
    spans: list[tuple[float, float]] = []

    async def poll() -> None:
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(0.03)  # three intervals
        spans.append((started, asyncio.get_running_loop().time()))

    poller = Poller(poll, 0.01, logger, failing=str, recovered="")
    asyncio.run(polled(poller, lambda: len(spans) >= 4))
    gaps = [after[0] - before[1] for before, after in itertools.pairwise(spans)]
    assert len(gaps) >= 3 and min(gaps) >= 0.001 - 1e-6  # (sleeps never end early)
