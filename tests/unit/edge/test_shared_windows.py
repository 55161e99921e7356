"""The failure windows the workers of one gateway share (``gateway.workers``): what one worker
counts, the others see, so an address gets ``failed_login_limit`` in all, not per worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guard.edge.ratelimit import FailureLimiter, SharedWindows

KEY = b"k" * 32


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "failures"


def test_two_workers_count_into_the_same_windows(path: Path) -> None:
    one, two = SharedWindows(path, KEY), SharedWindows(path, KEY)
    try:
        assert one.add("10.0.0.1", 100.0, 60.0, True) == (1, 1)
        assert two.add("10.0.0.1", 101.0, 60.0, False) == (2, 1)
        assert one.add("10.0.0.2", 101.0, 60.0, True) == (1, 1)  # another address
        assert two.failures("10.0.0.1", 102.0, 60.0) == (100.0, 1)
        assert one.failures("10.0.0.3", 102.0, 60.0) == (102.0, 0)  # none yet
    finally:
        one.close()
        two.close()


def test_a_window_ends_after_its_interval(path: Path) -> None:
    windows = SharedWindows(path, KEY)
    try:
        windows.add("10.0.0.1", 100.0, 60.0, True)
        assert windows.add("10.0.0.1", 160.0, 60.0, True) == (1, 1)
        assert windows.failures("10.0.0.1", 170.0, 60.0) == (160.0, 1)
    finally:
        windows.close()


def test_a_full_neighbourhood_gives_up_its_oldest_window(path: Path) -> None:
    windows = SharedWindows(path, KEY, slots=4)  # every address probes all four slots
    try:
        for n in range(4):
            windows.add(f"10.0.0.{n}", 100.0 + n, 60.0, True)
        windows.add("10.0.1.1", 110.0, 60.0, True)  # takes 10.0.0.0's slot, the oldest
        assert windows.failures("10.0.0.0", 111.0, 60.0) == (111.0, 0)
        assert windows.failures("10.0.0.3", 111.0, 60.0) == (103.0, 1)
        assert windows.failures("10.0.1.1", 111.0, 60.0) == (110.0, 1)
    finally:
        windows.close()


def test_the_file_is_private_and_keyed(path: Path) -> None:
    SharedWindows(path, KEY).close()
    assert os.stat(path).st_mode & 0o777 == 0o600
    windows = SharedWindows(path, KEY)
    try:
        windows.add("10.0.0.1", 100.0, 60.0, True)
        assert b"10.0.0.1" not in path.read_bytes()
    finally:
        windows.close()
    other = SharedWindows(path, b"o" * 32)  # another start's key: nothing of the old windows
    try:
        assert other.failures("10.0.0.1", 101.0, 60.0) == (101.0, 0)
    finally:
        other.close()


@pytest.mark.parametrize("blocking", [True, False])
def test_two_limiters_sharing_windows_allow_the_limit_once(path: Path, blocking: bool) -> None:
    shared = [SharedWindows(path, KEY), SharedWindows(path, KEY)]
    workers = [FailureLimiter(4, 60.0, shared=s) for s in shared]
    try:
        recorded = [workers[n % 2].refused("10.0.0.9", blocking) for n in range(10)]
        assert recorded == [True] * 4 + [False] * 6  # 4 in all, not 4 per worker
        for worker in workers:
            assert (worker.blocked("10.0.0.9") > 0) is blocking
            assert worker.blocked("10.0.0.8") == 0
        unrecorded = sum(s["unrecorded"] for w in workers for s in w.summaries(final=True))
        assert unrecorded == 6  # each worker summarizes the refusals it left unrecorded
    finally:
        for s in shared:
            s.close()
