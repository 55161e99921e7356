"""What every bench module shares: processes on loopback ports, the request mixes, the load
generator, and the figures each module reports for ``python -m bench.summary``.

Processes: ``spawn`` starts one in its own session and registers its stop (SIGTERM to its
process group by pid, SIGKILL after 15 s) on an ExitStack; everything listens on 127.0.0.1.
``start_mlflow`` (a lean MLflow: SQLite, one worker, no job execution), ``start_noop``
(bench/noop.py, to show the gateway's own cost), ``start_hop`` (bench/hop.py: the floor, a hop
with no layers) and ``start_gateway`` build on it.

Load: ``load`` runs a request mix over keep-alive connections at a concurrency for a number of
seconds (and at most MAX_REQUESTS_PER_RUN requests), after one warm-up request per connection,
and reads a gateway's CPU (its whole process tree) before and after.

Figures: each module adds ``Figure``s (one value per interleaved run) to a ``Report``;
``Report.finish`` prints them with their medians, spreads (min..max over runs) and, only where a
figure has one, its target, and writes them as JSON into the directory named by the
``BENCH_RESULTS`` environment variable (when set), which ``python -m bench.summary`` reads.

Quick mode: ``BENCH_QUICK=1`` makes every module's defaults small (2 runs of 1 s, smaller
sizes): for developing the harness, not for figures (the summary marks them as quick).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import httpx
import psutil

TOKEN = "mlg_" + "b" * 43  # the bootstrap (admin) token of every gateway started here
MAX_REQUESTS_PER_RUN = 20000
ROOT = Path(__file__).resolve().parents[1]


def quick() -> bool:
    """Whether BENCH_QUICK asks for small, short runs (development only)."""
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def rounds(repeats: int, seconds: float) -> tuple[int, float]:
    """A module's default (runs, seconds per run): as given, or 2 runs of 1 s in quick mode."""
    return (2, min(seconds, 1.0)) if quick() else (repeats, seconds)


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without MLflow's or the gateway's settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "_MLFLOW"))}
    return env | extra


def wait_for(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{url} not ready after {timeout} s")


def spawn(
    stack: ExitStack, args: list[str], env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """``args`` in a new session, output to ``log``; stopped by pid when ``stack`` closes."""
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)

    stack.callback(stop)
    return proc


def cli(data_dir: Path, *args: str, timeout: float = 300) -> str:
    """``mlflow-guard ARGS --data-dir DATA_DIR``; its output, stripped."""
    result = subprocess.run(
        [sys.executable, "-m", "guard", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, env=clean_env(), check=True, timeout=timeout,
    )  # fmt: skip
    return result.stdout.strip()


class ProcessTree:
    """A process and its children (a gateway's workers, multiprocessing's helpers), read as
    ``load`` reads a gateway: user and system CPU seconds of all of them."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process

    def cpu_times(self) -> tuple[float, float]:
        user = system = 0.0
        for process in [self.process, *self.process.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            user, system = user + times.user, system + times.system
        return user, system


def start_mlflow(stack: ExitStack, home: Path) -> str:
    port = free_port()
    proc = spawn(
        stack,
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
         "--serve-artifacts", "--artifacts-destination", str(home / "artifacts")],
        clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        home / "mlflow.log",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for(url + "/health", proc)
    return url


def start_uvicorn(
    stack: ExitStack, app: str, log: Path, **env: str
) -> tuple[str, subprocess.Popen[bytes]]:
    """A bench ASGI app (``bench.noop:app``, ``bench.hop:app``) under uvicorn, ``env`` added to
    its environment: its URL, once it answers, and its process."""
    port = free_port()
    proc = spawn(
        stack,
        [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
         "--no-access-log", "--log-level", "warning"],
        clean_env(PYTHONPATH=str(ROOT), **env),
        log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for(url + "/health", proc)
    return url, proc


def start_noop(stack: ExitStack, home: Path) -> str:
    return start_uvicorn(stack, "bench.noop:app", home / "noop.log")[0]


def start_hop(stack: ExitStack, home: Path, upstream: str) -> tuple[str, ProcessTree]:
    """bench/hop.py (a hop and nothing else) in front of ``upstream``: its URL and process."""
    url, proc = start_uvicorn(stack, "bench.hop:app", home / "hop.log", UPSTREAM=upstream)
    return url, ProcessTree(psutil.Process(proc.pid))


def start_gateway(
    stack: ExitStack, home: Path, upstream: str, **env: str
) -> tuple[str, ProcessTree]:
    """A gateway in front of ``upstream``; ``env`` adds settings (MLFLOW_GUARD_<SECTION>_<KEY>).
    Its URL and its process tree (for CPU readings)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = spawn(
        stack,
        [sys.executable, "-m", "guard", "serve", "--upstream-url", upstream, "--port", str(port),
         "--data-dir", str(home)],
        clean_env(MLFLOW_GUARD_BOOTSTRAP_TOKEN=TOKEN, MLFLOW_GUARD_GATEWAY_LOG_LEVEL="warning",
                  **env),
        home / "gateway.log",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for(url + "/guard/ready", proc)
    return url, ProcessTree(psutil.Process(proc.pid))


# -- load -----------------------------------------------------------------------------------

Request = tuple[str, str, dict[str, object] | None, dict[str, str] | None]


def bearer(token: str) -> str:
    return f"Bearer {token}"


def mlflow_mix(base: str) -> list[Request]:
    """log-metric, log-batch, runs/get and experiments/search on a fresh bench-* experiment's
    run, created through ``base`` with the bootstrap token."""
    headers = {"Authorization": bearer(TOKEN)}
    experiment = httpx.post(
        f"{base}/api/2.0/mlflow/experiments/create",
        json={"name": f"bench-{time.time()}"}, headers=headers,
    ).json()["experiment_id"]  # fmt: skip
    run = httpx.post(
        f"{base}/api/2.0/mlflow/runs/create", json={"experiment_id": experiment}, headers=headers
    ).json()["run"]["info"]["run_id"]
    now = int(time.time() * 1000)
    return [
        ("POST", "/api/2.0/mlflow/runs/log-metric",
         {"run_id": run, "key": "loss", "value": 0.5, "timestamp": now, "step": 1}, None),
        ("POST", "/api/2.0/mlflow/runs/log-batch",
         {"run_id": run, "metrics": [{"key": f"m{i}", "value": i, "timestamp": now, "step": 0}
                                     for i in range(5)]}, None),
        ("GET", "/api/2.0/mlflow/runs/get", None, {"run_id": run}),
        ("POST", "/api/2.0/mlflow/experiments/search", {"max_results": 10}, None),
    ]  # fmt: skip


NOOP_MIX: list[Request] = [("GET", "/api/2.0/mlflow/runs/get", None, {"run_id": "x"})]


def kind_of(request: Request) -> str:
    """Whether ``request`` is a read (the gateway overlaps its fsync with MLflow) or a write."""
    method, path = request[0], request[1]
    return "read" if method == "GET" or path.endswith("/search") else "write"


@dataclass
class Run:
    requests: int
    seconds: float
    latencies: list[float]
    errors: int
    gateway_cpu: float | None  # seconds of the gateway's CPU over the run, if one was watched
    kinds: list[str] = field(default_factory=list)  # read or write, one per latency

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_ms(self) -> float:
        """The gateway's CPU per answered request, in ms (0 if none was watched)."""
        return (self.gateway_cpu or 0.0) / max(self.requests, 1) * 1000

    def quantile(self, q: float, kind: str = "") -> float:
        """The ``q`` quantile of the latencies (of ``kind``'s requests only, if given)."""
        chosen = [t for t, k in zip(self.latencies, self.kinds, strict=True) if k == kind]
        ordered = sorted(chosen if kind else self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def load(
    base: str, mix: list[Request], concurrency: int, seconds: float,
    authorization: str | None = None, gateway: ProcessTree | None = None,
) -> Run:  # fmt: skip
    """``concurrency`` keep-alive clients cycle through ``mix`` for ``seconds`` (at most
    MAX_REQUESTS_PER_RUN requests in all), after one warm-up request each (pool and caches)."""
    headers = {"Authorization": authorization} if authorization else {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    latencies: list[float] = []
    kinds: list[str] = []
    errors = 0
    stop_at = time.monotonic() + seconds
    async with aiohttp.ClientSession(base, connector=connector, headers=headers) as session:

        async def one(i: int) -> None:
            nonlocal errors
            request = mix[i % len(mix)]
            method, path, body, params = request
            started = time.perf_counter()
            async with session.request(method, path, json=body, params=params) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - started)
            kinds.append(kind_of(request))

        async def worker(offset: int) -> None:
            i = offset
            while time.monotonic() < stop_at and len(latencies) < MAX_REQUESTS_PER_RUN:
                await one(i)
                i += concurrency

        await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm the pool
        latencies.clear()
        kinds.clear()
        cpu_before = sum(gateway.cpu_times()) if gateway else 0.0
        stop_at = time.monotonic() + seconds
        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.monotonic() - started
        cpu = (sum(gateway.cpu_times()) - cpu_before) if gateway else None
    return Run(len(latencies), elapsed, latencies, errors, cpu, kinds)


def run_load(
    base: str, mix: list[Request], concurrency: int, seconds: float,
    authorization: str | None = None, gateway: ProcessTree | None = None,
) -> Run:  # fmt: skip
    """``load`` in its own event loop."""
    return asyncio.run(load(base, mix, concurrency, seconds, authorization, gateway))


def rotated(names: list[str], r: int) -> list[str]:
    """``names`` starting at the ``r``-th: interleaved runs take turns going first."""
    k = r % len(names)
    return names[k:] + names[:k]


# -- figures --------------------------------------------------------------------------------


def spread(values: list[float], digits: int = 3) -> str:
    """``median (min..max)`` of ``values``."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f}..{max(values):.{digits}f})")  # fmt: skip


@dataclass
class Figure:
    """One figure of the summary: one value per run, its unit, and a target if it has one
    (``at_least``: the median must be >= ``target``; else <=)."""

    name: str
    values: list[float]
    unit: str
    target: float | None = None
    at_least: bool = True
    note: str = ""  # e.g. "the gateway's own cost", "1 run of 20000 decisions"

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def met(self) -> bool | None:
        if self.target is None or not self.values:
            return None
        return self.median >= self.target if self.at_least else self.median <= self.target

    def target_text(self) -> str:
        if self.target is None:
            return ""
        return f"{'>=' if self.at_least else '<='} {self.target:g}{unit_text(self.unit)}"


def number(value: float) -> str:
    if value != value:  # NaN: nothing measured
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def unit_text(unit: str) -> str:
    return unit if unit == "x" else f" {unit}"


def verdict(figure: Figure) -> str:
    return {None: "", True: "met", False: "NOT MET"}[figure.met]


def table(rows: list[tuple[str, Figure]]) -> list[str]:
    """The summary's lines: figure, median, spread, target, met."""
    width = max([len(name) for name, _ in rows] + [6])
    lines = [f"{'figure':<{width}} {'median':>11} {'min..max':>15} {'target':>10} met?"]
    for name, figure in rows:
        values = figure.values
        span = f"{number(min(values))}..{number(max(values))}" if len(values) > 1 else "-"
        median = number(figure.median) + unit_text(figure.unit)
        line = f"{name:<{width}} {median:>11} {span:>15} {figure.target_text():>10} "
        lines.append((line + verdict(figure)).rstrip())
    return lines


class Report:
    """The figures one module measured; ``finish`` prints them and saves them for the summary."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.figures: list[Figure] = []
        self.started = time.monotonic()

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def finish(self) -> None:
        elapsed = time.monotonic() - self.started
        print(f"\n-- {self.module}: figures for the summary ({elapsed:.0f} s"
              f"{', QUICK MODE: not for reporting' if quick() else ''}) --")  # fmt: skip
        for line in table([(f.name, f) for f in self.figures]):
            print(line)
        for f in self.figures:
            if f.note:
                print(f"  {f.name}: {f.note}")
        directory = os.environ.get("BENCH_RESULTS")
        if directory:
            path = Path(directory) / f"{self.module}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({
                "module": self.module, "seconds": elapsed, "quick": quick(),
                "figures": [asdict(f) for f in self.figures],
            }, indent=2))  # fmt: skip
