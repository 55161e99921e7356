import time

import pytest

from guard.resolve import TTLCache, Unresolved, _artifact_experiment, _dig


@pytest.mark.parametrize(
    ("path", "experiment"),
    [("1/abc/artifacts/x", "1"), ("12", "12"), ("0/models/m-1/x", "0")],
)
def test_artifact_paths_name_their_experiment(path: str, experiment: str) -> None:
    assert _artifact_experiment(path) == experiment


@pytest.mark.parametrize(
    "path", ["", "x/1", "01/abc", "+1/abc", " 1/abc", "workspaces/w/1/abc", "-1/x", "\uff11/abc"]
)
def test_artifact_paths_that_name_no_experiment(path: str) -> None:
    with pytest.raises(Unresolved):
        _artifact_experiment(path)


def test_dig() -> None:
    data = {"run": {"info": {"experiment_id": "3", "flag": True, "n": 4}}}
    assert _dig(data, "run", "info", "experiment_id") == "3"
    assert _dig(data, "run", "info", "n") == "4"
    assert _dig(data, "run", "info", "flag") is None
    assert _dig(data, "run", "missing") is None
    assert _dig(None, "run") is None
    assert _dig({"run": ["x"]}, "run", "info") is None


def test_cache_is_bounded_expires_and_forgets() -> None:
    cache = TTLCache(size=2, ttl=0.2)
    cache.put("experiment:1", "a")
    cache.put("experiment:2", "b")
    cache.put("run:r", "1")  # evicts the oldest
    assert cache.get("experiment:1") == (False, None)
    assert cache.get("experiment:2") == (True, "b")
    cache.forget("experiment:2")
    assert cache.get("experiment:2") == (False, None)
    time.sleep(0.25)
    assert cache.get("run:r") == (False, None)
