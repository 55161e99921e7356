"""``serve --workers N`` (N > 1): a parent process and N workers sharing one listening socket.

The parent does what happens once per start: it binds the socket (TCP, so asyncio sets
TCP_NODELAY on every accepted connection, as for one process: uvicorn #3149 was a socket made
without the protocol number), runs the migrations, makes the first admin token and prints its
banner, stores what the spools of workers beyond N left behind, and starts and supervises the
embedded MLflow. Then it spawns N fresh interpreters; each builds its own gateway
(``guard.app.WorkerRole``): its own audit chain, policy runtime and upstream pool, forwarding to
the one MLflow, failures per address counted in one table with the others, metrics in files the
others read too; and serves the shared socket with uvicorn. A worker that dies is started again;
one that fails to start stops everything. SIGTERM or SIGINT to the parent stops the workers
(each drains as one process would), then MLflow. A worker whose parent is gone stops itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from guard.app import Gateway, WorkerRole
from guard.settings import Settings

logger = logging.getLogger("guard")

RESTART_PAUSE = 1.0  # seconds before a worker that died is started again
KILL_AFTER = 10.0  # seconds beyond the drain a stopping worker gets before SIGKILL
PARENT_CHECK = 0.5  # seconds between a worker's looks at whether its parent is still there


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket every worker accepts on. Made with IPPROTO_TCP: asyncio sets
    TCP_NODELAY only on connections accepted from such a socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_worker(
    settings: Settings,
    role: WorkerRole,
    sock: socket.socket,
    started: multiprocessing.synchronize.Event,
) -> None:
    """A worker process: one gateway served on the parent's socket."""
    import uvicorn

    from guard.app import build_gateway, uvicorn_options
    from guard.cli.common import EXIT_STARTUP

    os.setpgrp()  # a terminal's Ctrl-C reaches the parent only, which stops us once
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # see guard.cli.serve
    logging.basicConfig(
        level=settings.gateway.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[worker {role.index}]: %(message)s",
    )
    gateway = build_gateway(settings, os.environ, worker=role)
    config = uvicorn.Config(gateway, **uvicorn_options(settings))  # type: ignore[arg-type]

    class WorkerServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                started.set()

    server = WorkerServer(config)
    parent = os.getppid()

    def watch_parent() -> None:
        while not server.should_exit:
            if os.getppid() != parent:  # the parent died without stopping us
                server.should_exit = True
            time.sleep(PARENT_CHECK)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    server.run(sockets=[sock])
    sys.exit(0 if server.started else EXIT_STARTUP)


class Workers:
    """The parent's view of its workers."""

    def __init__(
        self,
        settings: Settings,
        sock: socket.socket,
        upstream_url: str,
        bootstrapped: bool,
        directory: Path,
    ) -> None:
        self.settings = settings
        # The failure windows every worker counts in (guard.edge.ratelimit.SharedWindows; the
        # first worker to open it makes it), keyed anew each start.
        self.failures_file = directory / "failures"
        self.failures_key = os.urandom(32)
        self.sock = sock
        self.upstream_url = upstream_url
        self.bootstrapped = bootstrapped
        self.context = multiprocessing.get_context("spawn")
        self.count = settings.gateway.workers
        self.processes: list[BaseProcess | None] = [None] * self.count
        self.started = [self.context.Event() for _ in range(self.count)]

    def spawn(self, index: int) -> None:
        role = WorkerRole(
            index, self.count, self.upstream_url, self.bootstrapped,
            str(self.failures_file), self.failures_key,
        )  # fmt: skip
        self.started[index].clear()
        process = self.context.Process(
            target=run_worker,
            args=(self.settings, role, self.sock, self.started[index]),
            name=f"mlflow-guard-worker-{index}",
        )
        process.start()
        self.processes[index] = process
        logger.info("worker %d started (pid %s)", index, process.pid)

    def failed_to_start(self) -> int | None:
        """A worker that exited before it ever served (then everything stops), if any."""
        for index, process in enumerate(self.processes):
            if process is not None and not process.is_alive() and not self.started[index].is_set():
                return index
        return None

    def dead(self) -> list[int]:
        return [i for i, p in enumerate(self.processes) if p is not None and not p.is_alive()]

    def reap(self, index: int) -> None:
        """Forget a dead worker; its live gauges leave the shared metrics."""
        from prometheus_client import multiprocess

        process = self.processes[index]
        if process is not None and process.pid is not None:
            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
        self.processes[index] = None

    def stop(self, wait: float) -> None:
        """SIGTERM to every worker, SIGKILL to those still there after ``wait`` seconds."""
        alive = [p for p in self.processes if p is not None and p.is_alive()]
        for process in alive:
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.error("worker pid %s did not stop in time: killed", process.pid)
                process.kill()
                process.join(5)


def serve_workers(settings: Settings, gateway: Gateway) -> int:
    """Run the parent until SIGTERM or SIGINT; the exit status. ``gateway`` is built but not
    started: the parent uses its store for the migrations and bootstrap, and its supervisor."""
    from guard.cli.common import EXIT_STARTUP

    g = settings.gateway
    try:
        sock = bind_socket(g.host, g.port)
    except OSError as exc:
        print(f"gateway.port: cannot listen on {g.host}:{g.port}: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    # Every worker's counters and histograms go here, for /guard/metrics to add them up (set
    # before the workers start, so their prometheus-client writes its values to files there),
    # and the failure windows they share.
    directory = tempfile.mkdtemp(prefix="mlflow-guard-workers-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        return asyncio.run(_parent(settings, sock, gateway, Path(directory)))
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


async def _parent(
    settings: Settings, sock: socket.socket, gateway: Gateway, directory: Path
) -> int:
    from guard.cli.common import EXIT_STARTUP

    supervisor = gateway.supervisor
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        secret = await gateway.prepare(settings.gateway.workers)
        if supervisor is not None:
            await supervisor.start()
    except Exception as exc:  # noqa: BLE001 - as Gateway's lifespan: reported, and we exit
        logger.error("gateway failed to start: %s", exc)
        if supervisor is not None:
            await supervisor.stop()
        gateway.engine.dispose()
        return EXIT_STARTUP
    gateway.engine.dispose()  # the workers open their own
    upstream_url = supervisor.url if supervisor is not None else settings.upstream.url
    workers = Workers(settings, sock, upstream_url, secret is not None, directory)
    status = 0
    restart_at: dict[int, float] = {}
    try:
        for index in range(workers.count):
            workers.spawn(index)
        workers.bootstrapped = False  # recorded by the first worker 0, not by a restarted one
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.2)
            if (failed := workers.failed_to_start()) is not None:
                logger.error("worker %d failed to start: stopping", failed)
                status = EXIT_STARTUP
                break
            now = time.monotonic()
            for index in workers.dead():
                logger.error("worker %d exited: starting it again", index)
                workers.reap(index)
                restart_at[index] = now + RESTART_PAUSE
            for index, when in list(restart_at.items()):
                if now >= when:
                    del restart_at[index]
                    workers.spawn(index)
    finally:
        if supervisor is not None:
            supervisor.begin_stop()  # MLflow drains while the workers do
        wait = settings.gateway.shutdown_timeout + settings.audit.shutdown_grace + KILL_AFTER
        await asyncio.to_thread(workers.stop, wait)
        if supervisor is not None:
            await supervisor.stop()
    return status
