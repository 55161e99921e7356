import os
import threading
from pathlib import Path

import pytest

from guard.keys import SecretKeyError, load_secret_key


def test_key_file_is_created_once_with_private_permissions(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "secret.key"
    first = load_secret_key(path, {})
    assert len(first) == 64
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_secret_key(path, {}) == first
    assert list(path.parent.iterdir()) == [path]  # no draft left behind


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    load_secret_key(path, {})
    assert load_secret_key(path, {"MLFLOW_GUARD_SECRET_KEY": "e" * 32}) == b"e" * 32


def test_short_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SecretKeyError, match="shorter than 32"):
        load_secret_key(tmp_path / "k", {"MLFLOW_GUARD_SECRET_KEY": "short"})
    (tmp_path / "k").write_text("tiny\n")
    with pytest.raises(SecretKeyError, match="fewer than 32"):
        load_secret_key(tmp_path / "k", {})


def test_missing_file_without_create(tmp_path: Path) -> None:
    with pytest.raises(SecretKeyError, match="does not exist"):
        load_secret_key(tmp_path / "k", {}, create=False)


def test_concurrent_creation_agrees_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(load_secret_key(path, {})))
               for _ in range(8)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert os.listdir(tmp_path) == ["secret.key"]
