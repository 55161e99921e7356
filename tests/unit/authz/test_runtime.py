"""The policy in force: a refusal waits for a look at the stored policy made after the request
arrived, and such looks are shared and paced."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from guard.authz.policy import Grant
from guard.authz.runtime import PolicyRuntime
from guard.authz.store import PolicyStore
from guard.store.db import build_engine, migrate


@pytest.fixture
def store(database_uri: str) -> Iterator[PolicyStore]:
    engine = build_engine(database_uri)
    migrate(engine)
    policies = PolicyStore(engine)
    policies.seed_defaults("test", [Grant("token:admin", "admin", "*")])
    yield policies
    engine.dispose()


class CountingStore:
    """The store, counting how often its version is asked for."""

    def __init__(self, store: PolicyStore) -> None:
        self.store, self.asked = store, 0
        self.workspaces = store.workspaces

    def version(self) -> int:
        self.asked += 1
        return self.store.version()

    def load(self):  # type: ignore[no-untyped-def]
        return self.store.load()


def test_a_grant_stored_just_after_a_poll_is_in_force_for_the_next_refusal(
    store: PolicyStore,
) -> None:
    """The poll ran a moment before the grant, so the old rate limit skipped the re-check and
    the grantee's first request was refused on the previous policy."""

    async def scenario() -> tuple[bool, bool]:
        runtime = PolicyRuntime(store, poll_interval=60)  # no poll during the test
        await runtime.refresh()  # "the poll had just run"
        store.change("test", add=[Grant("user:bob", "viewer", "experiment:x")])
        arrived = time.monotonic()
        before = runtime.index.decide("user:bob", "experiment:x", "read").allowed
        changed = await runtime.refresh_soon(arrived, "user:bob")
        return before, changed and runtime.index.decide("user:bob", "experiment:x", "read").allowed

    assert asyncio.run(scenario()) == (False, True)


def test_waiting_refusals_share_paced_looks(store: PolicyStore) -> None:
    async def scenario() -> tuple[int, int, float]:
        counting = CountingStore(store)
        runtime = PolicyRuntime(counting, poll_interval=60)  # type: ignore[arg-type]
        await runtime.refresh()
        counting.asked = 0
        arrived = time.monotonic()
        await asyncio.gather(*(runtime.refresh_soon(arrived, f"user:{i}") for i in range(50)))
        shared = counting.asked
        # The same caller refused again within a poll interval does not wait: the poll covers it.
        started = time.monotonic()
        await runtime.refresh_soon(time.monotonic(), "user:1")
        return shared, counting.asked, time.monotonic() - started

    shared, after, _ = asyncio.run(scenario())
    assert shared == 1  # fifty refusals, one look at the store
    assert after == shared


@pytest.mark.parametrize("database_uri", ["sqlite"], indirect=True)
def test_a_failing_store_does_not_keep_a_refusal_waiting(database_uri: str) -> None:
    class Broken:
        def version(self) -> int:
            import sqlalchemy as sa

            raise sa.exc.OperationalError("select", {}, Exception("down"))

    async def scenario() -> bool:
        runtime = PolicyRuntime(Broken(), poll_interval=60)  # type: ignore[arg-type]
        return await asyncio.wait_for(runtime.refresh_soon(time.monotonic(), "user:x"), 5)

    assert asyncio.run(scenario()) is False


class SlowLoad(CountingStore):
    """The store; the first load after ``hold()`` keeps what it read (a large policy's slow
    load and build, in the poll's worker thread) until ``release``."""

    def __init__(self, store: PolicyStore) -> None:
        super().__init__(store)
        self.held, self.release = threading.Event(), threading.Event()
        self.holding = False

    def load(self):  # type: ignore[no-untyped-def]
        loaded = self.store.load()
        if self.holding:
            self.holding = False
            self.held.set()
            self.release.wait(10)
        return loaded


def test_the_policy_in_force_never_goes_back_a_version(store: PolicyStore) -> None:
    """A poll that read version 2 and builds it slowly, while a refusal's look puts version 3
    (a grant removed) in force: the poll, finishing last, swapped version 2 back in, the
    removed grant in force again until the next poll. Looks are taken one at a time now."""

    async def scenario() -> tuple[int, bool]:
        slow = SlowLoad(store)
        runtime = PolicyRuntime(slow, poll_interval=60)  # type: ignore[arg-type]
        await runtime.refresh()
        store.change("test", add=[Grant("user:bob", "viewer", "experiment:x")])  # version 2
        slow.holding = True
        poll = asyncio.ensure_future(runtime.refresh())  # as the poller calls it
        await asyncio.to_thread(slow.held.wait, 10)  # it read version 2 and is building it
        store.change("test", remove=[Grant("user:bob", "viewer", "experiment:x")])  # version 3
        refusal = asyncio.ensure_future(runtime.refresh_soon(time.monotonic(), "user:bob"))
        await asyncio.wait([refusal], timeout=2)  # (done at once before: it built version 3)
        slow.release.set()
        await asyncio.gather(poll, refusal)
        return runtime.index.version, runtime.decide("user:bob", "experiment:x", "read").allowed

    assert asyncio.run(scenario()) == (3, False)
