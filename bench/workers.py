"""The gateway's CPU per request with ``--workers 2`` against one process (``make bench``).

Two gateways in front of the same no-op upstream, everything on (token auth, RBAC, audit):
one with ``gateway.workers = 1``, one with 2. The same keep-alive GET runs against each,
interleaved, at each concurrency level, ``--repeats`` times; the gateway's CPU is that of its
whole process tree (the parent, the workers, multiprocessing's resource tracker) over the run,
divided by the requests answered. Printed: medians with their spread (min..max over runs).

This 2-core box also runs the load generator and the upstream, so the throughput of 2 workers
cannot show what they do on a bigger machine; CPU per request can: if it stays the same, N
workers on N free cores serve N times what one does until the upstream or the database is the
bottleneck.

Target (issue 13): CPU per request with 2 workers within 10% of one worker's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import psutil

from bench.proxy import NOOP_MIX, TOKEN, Run, load, start_gateway, start_noop

TARGET = 1.10  # most CPU per request of 2 workers, as a multiple of one worker's


class ProcessTree:
    """A gateway and its children, as ``load`` reads a process: user and system CPU seconds."""

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


async def paced(url: str, rate: float, seconds: float, tree: ProcessTree) -> Run:
    """GETs at ``rate`` per second in all (8 keep-alive connections), for ``seconds``: the same
    load for either gateway, below what one worker serves, so neither is saturated."""
    method, path, _, params = NOOP_MIX[0]
    latencies: list[float] = []
    errors = 0
    headers = {"Authorization": f"Bearer {TOKEN}"}
    connector = aiohttp.TCPConnector(limit=8)
    async with aiohttp.ClientSession(url, connector=connector, headers=headers) as session:

        async def one() -> None:
            nonlocal errors
            started = time.perf_counter()
            async with session.request(method, path, params=params) as response:
                await response.read()
                errors += response.status != 200
            latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one() for _ in range(8)))  # warm the pool
        latencies.clear()
        count = int(rate * seconds)
        cpu_before = sum(tree.cpu_times())
        started = time.monotonic()
        tasks = []
        for i in range(count):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        elapsed = time.monotonic() - started
        cpu = sum(tree.cpu_times()) - cpu_before
    return Run(len(latencies), elapsed, latencies, errors, cpu)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}..{max(values):.3f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument(
        "--rates", default="400,800", help="paced rows: requests/s in all, below saturation"
    )
    parser.add_argument(
        "--audit", default="on", choices=("on", "off"), help="audit trail (default on)"
    )
    args = parser.parse_args()
    env = {"MLFLOW_GUARD_AUDIT_ENABLED": "true" if args.audit == "on" else "false"}
    levels = [int(c) for c in args.levels.split(",")]
    verdicts = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="guard-bench-") as tmp:
        home = Path(tmp)
        for name in ("one", "two"):
            (home / name).mkdir()
        print("starting a no-op upstream, a gateway with 1 worker and one with 2 ...", flush=True)
        noop = start_noop(stack, home)
        one_url, one = start_gateway(stack, home / "one", noop, **env)
        two_url, two = start_gateway(
            stack, home / "two", noop, MLFLOW_GUARD_GATEWAY_WORKERS="2", **env
        )
        trees = {"1": (one_url, ProcessTree(one)), "2": (two_url, ProcessTree(two))}
        print(f"\n== --workers 1 vs 2, no-op upstream (the gateway's own cost), audit "
              f"{args.audit}: "
              f"{args.repeats} interleaved runs of {args.seconds:.0f} s per level; median "
              "(min..max) ==")  # fmt: skip
        print(f"{'load':>6} {'rps 1w':>8} {'rps 2w':>8} {'cpu/req ms 1w':>22} "
              f"{'cpu/req ms 2w':>22} {'2w/1w':>6} {'errors':>7}")  # fmt: skip
        rows = [f"c={c}" for c in levels] + [f"{r}/s" for r in args.rates.split(",") if r]
        for row in rows:
            runs: dict[str, list[Run]] = {"1": [], "2": []}
            for _ in range(args.repeats):
                for workers, (url, tree) in trees.items():
                    if row.startswith("c="):
                        c = int(row[2:])
                        run = asyncio.run(load(url, NOOP_MIX, c, args.seconds, TOKEN, tree))  # type: ignore[arg-type]
                    else:
                        run = asyncio.run(paced(url, float(row[:-2]), args.seconds, tree))
                    runs[workers].append(run)
            cpu = {w: [(r.gateway_cpu or 0) / max(r.requests, 1) * 1000 for r in rs]
                   for w, rs in runs.items()}  # fmt: skip
            rps = {w: statistics.median(r.rps for r in rs) for w, rs in runs.items()}
            ratio = statistics.median(cpu["2"]) / statistics.median(cpu["1"])
            errors = sum(r.errors for rs in runs.values() for r in rs)
            print(f"{row:>6} {rps['1']:>8.0f} {rps['2']:>8.0f} {spread(cpu['1']):>22} "
                  f"{spread(cpu['2']):>22} {ratio:>6.2f} {errors:>7}", flush=True)  # fmt: skip
            verdicts.append((row, ratio))
    for row, ratio in verdicts:
        verdict = "met" if ratio <= TARGET else "MISSED"
        print(f"target (workers, {row}): CPU per request with 2 workers <= {TARGET:.2f}x one "
              f"worker's: {verdict} ({ratio:.2f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
