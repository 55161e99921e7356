"""Real processes: `mlflow-guard serve` (with its embedded MLflow) or a separate `mlflow server`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psutil
import pytest

from tests.conftest import free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 180


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "_MLFLOW"))}
    env.update(extra)
    return env


def wait_ready(
    url: str, proc: subprocess.Popen[bytes], log: Path, path: str = "/guard/ready"
) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"not ready in {BOOT_TIMEOUT} s:\n{log.read_text()[-5000:]}")


@dataclass
class Gateway:
    url: str
    port: int
    token: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "guard", *args, "--data-dir", str(self.data_dir)],
            capture_output=True, text=True, env=self.env, timeout=60, check=False,
        )  # fmt: skip

    def mlflow_processes(self) -> list[psutil.Process]:
        return [
            p for p in psutil.Process(self.proc.pid).children(recursive=True)
            if "mlflow" in " ".join(p.cmdline())
        ]  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_gateway(
    data_dir: Path,
    *args: str,
    token: str | None = None,
    port: int | None = None,
    ready_path: str = "/guard/ready",
    **env_extra: str,
) -> Gateway:
    """A gateway process, once ``ready_path`` answers 200 (``/guard/health`` for one that is
    meant never to be ready: in front of an MLflow it refuses to forward to)."""
    port = port or free_port()
    token = token or "mlg_" + os.urandom(32).hex()
    settings = {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": token, "MLFLOW_GUARD_TOKENS_CACHE_TTL": "0.5s"}
    env = clean_env(**(settings | env_extra))
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "gateway.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "guard", "serve", "--data-dir", str(data_dir),
             "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    gateway = Gateway(f"http://127.0.0.1:{port}", port, token, data_dir, proc, log, env)
    try:
        wait_ready(gateway.url, proc, log, ready_path)
    except RuntimeError:
        gateway.stop()
        raise
    return gateway


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway with its embedded MLflow, shared by the tests that do not break it."""
    running = start_gateway(tmp_path_factory.mktemp("gateway"))
    yield running
    running.stop()


@dataclass
class Mlflow:
    url: str
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="session")
def external_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mlflow]:
    """A separately started, lean `mlflow server`, as an operator would already run."""
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = home / "server.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
             "--serve-artifacts", "--artifacts-destination", str(home / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, cwd=home, start_new_session=True,
            env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log, "/health")
    yield Mlflow(url, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=15)


# Debian's chromium, driven by Playwright (never `playwright install`); --no-sandbox as root.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """One headless Chromium per test module (launching takes ~0.3 s); each test opens its own
    context (cookie jar). Not per session: while Playwright's sync API is open, the main thread
    has a running event loop, so every later ``asyncio.run`` in the session would fail.
    Missing, it skips, which the browser marker turns into a failure (tests/conftest.py)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (make test installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()
