"""Run the embedded MLflow server as a supervised child process on a private loopback port.

The child runs lean (one uvicorn worker, no job execution: ~4 s and ~0.5 GB to start instead of
~10 s and ~2.5 GB), in its own process group so that stopping it stops everything it spawned,
with a scrubbed environment (no inherited ``MLFLOW_*`` settings, none of the gateway's secrets),
and accepts only its own loopback Host. A single uvicorn process keeps TCP_NODELAY on its
sockets; ``--workers N`` would make keep-alive requests wait for delayed ACKs (uvicorn #3149).
If it dies it is restarted with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp

logger = logging.getLogger("guard.mlflow")

HEALTHY_RESET_AFTER = 60.0  # a child that ran this long restarts after the shortest pause
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL; MLflow needs ~2 s to exit cleanly
_LOG_TAIL = 4000


class StartupError(Exception):
    """The embedded MLflow did not become healthy; the message includes its log's tail."""


@dataclass(frozen=True)
class EmbeddedConfig:
    data_dir: Path
    backend_store_uri: str
    default_artifact_root: str
    artifacts_destination: str
    serve_artifacts: bool
    startup_timeout: float
    restart_backoff_max: float

    @property
    def home(self) -> Path:
        return self.data_dir / "mlflow"

    @property
    def log_file(self) -> Path:
        return self.home / "server.log"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment minus every MLflow and gateway setting, plus the lean switches."""
    env = {k: v for k, v in environ.items() if not k.upper().lstrip("_").startswith("MLFLOW")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def mlflow_command(config: EmbeddedConfig, port: int) -> list[str]:
    home = config.home
    backend = config.backend_store_uri or f"sqlite:///{home / 'mlflow.db'}"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", backend,
        "--allowed-hosts", f"127.0.0.1:{port}",
        # Longer than the gateway's pool keeps idle connections, so MLflow never closes one
        # the gateway is about to reuse.
        "--uvicorn-opts", "--timeout-keep-alive 30",
    ]  # fmt: skip
    if config.serve_artifacts:
        destination = config.artifacts_destination or str(home / "artifacts")
        command += ["--serve-artifacts", "--artifacts-destination", destination]
    else:
        command += ["--no-serve-artifacts"]
    if config.default_artifact_root:
        command += ["--default-artifact-root", config.default_artifact_root]
    return command


class MlflowSupervisor:
    """Start, watch, restart and stop one embedded MLflow server."""

    def __init__(
        self,
        config: EmbeddedConfig,
        environ: Mapping[str, str],
        port: int | None = None,
    ) -> None:
        self.config = config
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.environ = dict(environ)
        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped: asyncio.Future[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Launch MLflow and wait until it answers /health; raises StartupError."""
        self.config.home.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        logger.info("starting embedded MLflow on %s (log: %s)", self.url, self.config.log_file)
        await self._launch()
        await self._wait_healthy(self.config.startup_timeout)
        logger.info("embedded MLflow ready in %.1f s", time.monotonic() - started)
        self._monitor = asyncio.ensure_future(self._watch())

    async def _launch(self) -> None:
        command = mlflow_command(self.config, self.port)
        log: IO[bytes]
        with open(self.config.log_file, "ab") as log:  # noqa: ASYNC230 - opened once at start
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=child_environment(self.environ),
                cwd=self.config.home,
                start_new_session=True,
            )

    async def _wait_healthy(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        async with aiohttp.ClientSession(trust_env=False) as session:
            while time.monotonic() < deadline:
                process = self._process
                if process is None or process.returncode is not None:
                    code = None if process is None else process.returncode
                    raise StartupError(f"MLflow exited with code {code}.\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(
                        self.url + "/health", timeout=aiohttp.ClientTimeout(total=2)
                    ) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.2)
        await self._terminate()
        raise StartupError(
            f"MLflow did not become healthy within {seconds:.0f} s "
            f"(raise mlflow.startup_timeout?).\n{self.log_tail()}"
        )

    def log_tail(self) -> str:
        try:
            data = self.config.log_file.read_bytes()[-_LOG_TAIL:]
        except OSError:
            return "(no MLflow log)"
        return "--- last lines of the MLflow log ---\n" + data.decode(errors="replace")

    async def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self._process is not None  # noqa: S101 - set by _launch
            launched = time.monotonic()
            code = await self._process.wait()
            if self._stopping:
                return
            await self._kill_group(signal.SIGKILL)  # leftovers of the dead server
            if time.monotonic() - launched > HEALTHY_RESET_AFTER:
                backoff = 1.0
            logger.error("embedded MLflow exited with code %s; restarting in %.0f s", code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.restart_backoff_max)
            if self._stopping:
                return
            self.restarts += 1
            await self._launch()
            try:
                await self._wait_healthy(self.config.startup_timeout)
            except StartupError as exc:
                logger.error("embedded MLflow restart failed: %s", exc)
                continue
            logger.info("embedded MLflow restarted (restart %d)", self.restarts)

    async def _kill_group(self, sig: signal.Signals) -> None:
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, sig)

    def _group_alive(self) -> bool:
        if self._process is None:
            return False
        try:
            os.killpg(self._process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    async def _terminate(self) -> None:
        """SIGTERM the whole group, give it STOP_GRACE seconds, then SIGKILL what is left."""
        process = self._process
        if process is None:
            return
        await self._kill_group(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        # No event fires when a process group empties; polling it is the only way.
        while self._group_alive() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self._group_alive():
            logger.warning("embedded MLflow did not stop on SIGTERM; killing it")
            await self._kill_group(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), STOP_GRACE)

    async def stop(self) -> None:
        """Stop watching and stop the server: SIGTERM, then SIGKILL after a short grace.

        Safe to call more than once; later calls wait for the first to finish."""
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopped)

    def begin_stop(self) -> None:
        """Start stopping without waiting (MLflow drains its in-flight requests meanwhile)."""
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self._terminate()
        logger.info("embedded MLflow stopped")
