"""Fixtures the upstream client's tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.slapd import make_certificates


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 it signed, and an unrelated CA."""
    directory = tmp_path_factory.mktemp("tls")
    make_certificates(directory)
    return directory
