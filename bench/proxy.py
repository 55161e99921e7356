"""Gateway overhead against direct MLflow, in one run (``make bench``).

Starts a lean MLflow server and a gateway in front of it, plus a no-op upstream with its own
gateway. The same request mix (log-metric, log-batch, runs/get, experiments/search) runs over
keep-alive connections against MLflow directly and through the gateway, interleaved, at c=1, 8
and 32, three times each; the medians are printed as throughput ratios and added latency. The
no-op pair shows the gateway's own cost per request. Every loop is bounded in time and count.

Target (issue 2): at c=8 the gateway keeps >= 0.90 of direct throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import psutil

TOKEN = "mlg_" + "b" * 43
TARGET_C8 = 0.90
MAX_REQUESTS_PER_RUN = 20000


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
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

    stack.callback(stop)
    return proc


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


def start_noop(stack: ExitStack, home: Path) -> str:
    port = free_port()
    proc = spawn(
        stack,
        [sys.executable, "-m", "uvicorn", "bench.noop:app", "--host", "127.0.0.1", "--port",
         str(port), "--no-access-log", "--log-level", "warning"],
        clean_env(PYTHONPATH=str(Path(__file__).resolve().parents[1])),
        home / "noop.log",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for(url + "/health", proc)
    return url


def start_gateway(
    stack: ExitStack, home: Path, upstream: str, **env: str
) -> tuple[str, psutil.Process]:
    """A gateway in front of ``upstream``; ``env`` adds settings (MLFLOW_GUARD_<SECTION>_<KEY>)."""
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
    return url, psutil.Process(proc.pid)


Request = tuple[str, str, dict[str, object] | None, dict[str, str] | None]


def mlflow_mix(base: str) -> list[Request]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
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
    gateway_cpu: float | None
    kinds: list[str] = field(default_factory=list)  # read or write, one per latency

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def quantile(self, q: float, kind: str = "") -> float:
        """The ``q`` quantile of the latencies (of ``kind``'s requests only, if given)."""
        chosen = [t for t, k in zip(self.latencies, self.kinds, strict=True) if k == kind]
        ordered = sorted(chosen if kind else self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def load(
    base: str, mix: list[Request], concurrency: int, seconds: float, token: str | None,
    gateway: psutil.Process | None,
) -> Run:  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    latencies: list[float] = []
    kinds: list[str] = []
    errors = 0
    stop_at = time.monotonic() + seconds
    async with aiohttp.ClientSession(base, connector=connector, headers=headers) as session:

        async def one(i: int) -> None:
            nonlocal errors
            method, path, body, params = mix[i % len(mix)]
            kind = kind_of(mix[i % len(mix)])
            started = time.perf_counter()
            async with session.request(method, path, json=body, params=params) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - started)
            kinds.append(kind)

        async def worker(offset: int) -> None:
            i = offset
            while time.monotonic() < stop_at and len(latencies) < MAX_REQUESTS_PER_RUN:
                await one(i)
                i += concurrency

        await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm the pool
        latencies.clear()
        kinds.clear()
        cpu_before = sum(gateway.cpu_times()[:2]) if gateway else 0.0
        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.monotonic() - started
        cpu = (sum(gateway.cpu_times()[:2]) - cpu_before) if gateway else None
    return Run(len(latencies), elapsed, latencies, errors, cpu, kinds)


def compare(
    label: str, direct: str, via: str, gateway: psutil.Process, mix: list[Request],
    levels: list[int], repeats: int, seconds: float, token: str = TOKEN,
) -> dict[int, float]:  # fmt: skip
    print(f"\n== {label}: {repeats} interleaved runs of {seconds:.0f} s per level, medians ==")
    print(f"{'c':>3} {'direct rps':>11} {'gateway rps':>12} {'ratio':>6} {'+p50 ms':>8} "
          f"{'+p99 ms':>8} {'gw cpu/req ms':>14} {'errors':>7}  +p50 ms by kind "
          "(min..max over runs)")  # fmt: skip
    ratios = {}
    for c in levels:
        runs_direct, runs_gateway = [], []
        for _ in range(repeats):
            runs_direct.append(asyncio.run(load(direct, mix, c, seconds, None, None)))
            runs_gateway.append(asyncio.run(load(via, mix, c, seconds, token, gateway)))
        d_rps = statistics.median(r.rps for r in runs_direct)
        g_rps = statistics.median(r.rps for r in runs_gateway)
        pairs = list(zip(runs_direct, runs_gateway, strict=True))
        p50 = statistics.median(g.quantile(0.5) - d.quantile(0.5) for d, g in pairs)
        p99 = statistics.median(g.quantile(0.99) - d.quantile(0.99) for d, g in pairs)
        added = {
            kind: [(g.quantile(0.5, kind) - d.quantile(0.5, kind)) * 1000 for d, g in pairs]
            for kind in ("read", "write")
            if any(kind in g.kinds for g in runs_gateway)
        }
        split = ", ".join(
            f"{kind}s {statistics.median(v):.2f} ({min(v):.2f}..{max(v):.2f})"
            for kind, v in added.items()
        )
        cpu = statistics.median((r.gateway_cpu or 0) / max(r.requests, 1) for r in runs_gateway)
        errors = sum(r.errors for r in runs_direct + runs_gateway)
        if errors:
            print(f"    {errors} non-200 answers: the numbers below measure refusals, not work")
        ratios[c] = g_rps / d_rps
        print(f"{c:>3} {d_rps:>11.1f} {g_rps:>12.1f} {ratios[c]:>6.2f} {p50 * 1000:>8.2f} "
              f"{p99 * 1000:>8.2f} {cpu * 1000:>14.3f} {errors:>7}  {split}")  # fmt: skip
    return ratios


def non_admin(data_dir: Path, rows: int) -> str:
    """A token that may edit only experiments named bench-*, among ``rows`` other grants."""

    def cli(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "guard", *args, "--data-dir", str(data_dir)],
            capture_output=True, text=True, env=clean_env(), check=True, timeout=300,
        )  # fmt: skip
        return result.stdout

    policy = cli("policy", "export")
    filler = "".join(
        f"p, user:filler{i}, viewer, experiment:team{i % 100}/*\n" for i in range(rows)
    )
    (data_dir / "bench-policy.csv").write_text(policy + filler)
    cli("policy", "import", str(data_dir / "bench-policy.csv"))
    return cli("token", "create", "--name", "bench-user", "--role", "editor",
               "--resource", "experiment:bench-*", "--quiet").strip()  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--json", help="also write the ratios to this file")
    parser.add_argument("--policy-rows", type=int, default=10000,
                        help="policy size for the non-admin run (0 skips it)")  # fmt: skip
    args = parser.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="guard-bench-") as tmp:
        home = Path(tmp)
        (home / "mlflow").mkdir()
        (home / "gw").mkdir()
        (home / "noop-gw").mkdir()
        print("starting MLflow, a no-op upstream and a gateway in front of each ...", flush=True)
        mlflow = start_mlflow(stack, home / "mlflow")
        noop = start_noop(stack, home)
        via_mlflow, gw = start_gateway(stack, home / "gw", mlflow)
        via_noop, gw_noop = start_gateway(stack, home / "noop-gw", noop)
        mix = mlflow_mix(via_mlflow)
        noop_ratios = compare("no-op upstream (the gateway's own cost)", noop, via_noop, gw_noop,
                              NOOP_MIX, levels, args.repeats, args.seconds)  # fmt: skip
        ratios = compare("MLflow", mlflow, via_mlflow, gw, mix, levels, args.repeats, args.seconds)
        results = {"mlflow": ratios, "noop": noop_ratios}
        if args.policy_rows:
            token = non_admin(home / "gw", args.policy_rows)
            time.sleep(2.5)  # let the gateway pick the new policy up (authz.poll_interval)
            results["non_admin"] = compare(
                f"MLflow as a non-admin editor, {args.policy_rows} policy rows (searches "
                "filtered)", mlflow, via_mlflow, gw, mix, levels, args.repeats, args.seconds,
                token,
            )  # fmt: skip
    for name, measured in results.items():
        if name == "noop":
            continue
        verdict = "met" if measured.get(8, 0) >= TARGET_C8 else "MISSED"
        print(f"target ({name}): c=8 ratio >= {TARGET_C8:.2f}: {verdict} "
              f"({measured.get(8, 0):.2f})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
