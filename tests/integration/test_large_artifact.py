"""A 500 MB artifact through the gateway: streamed both ways, never held in memory."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration

SIZE = 500 * 1024 * 1024
CHUNK = 4 * 1024 * 1024
RSS_GROWTH_LIMIT = 150 * 1024 * 1024  # far below the artifact: nothing is buffered whole


def write_random_file(path: Path) -> str:
    digest = hashlib.sha256()
    block = os.urandom(CHUNK)
    with path.open("wb") as out:
        for i in range(SIZE // CHUNK):
            # Vary each block cheaply so no layer can get away with deduplicating.
            chunk = i.to_bytes(8, "big") + block[8:]
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.samples += 1


def test_500_mb_artifact_round_trip(
    gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", gateway.token)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")
    source = tmp_path / "big.bin"
    expected = write_random_file(source)
    client = MlflowClient(tracking_uri=gateway.url)
    run = client.create_run(client.create_experiment("large-artifacts"))

    sampler = RssSampler(gateway.proc.pid)
    sampler.start()
    try:
        client.log_artifact(run.info.run_id, str(source), artifact_path="blobs")
        source.unlink()  # keep the disk footprint at one copy
        downloaded = Path(
            client.download_artifacts(run.info.run_id, "blobs/big.bin", str(tmp_path))
        )
    finally:
        sampler.done.set()
        sampler.join()
    assert downloaded.stat().st_size == SIZE
    assert sha256(downloaded) == expected
    assert sampler.samples > 10
    growth = sampler.peak - sampler.baseline
    assert growth < RSS_GROWTH_LIMIT, f"gateway RSS grew by {growth / 2**20:.0f} MiB"
    print(
        f"gateway RSS: baseline {sampler.baseline / 2**20:.0f} MiB, "
        f"peak growth {growth / 2**20:.0f} MiB"
    )
