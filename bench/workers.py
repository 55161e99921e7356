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

Target (issue 13): CPU per request with 2 workers within 10% of one worker's (the ratio of the
two, per pair of runs; its median <= 1.10). Below saturation the same load in all leaves each
of two workers half of it, and a process's CPU per request rises as its own load falls; the
last row (2 workers at twice a paced rate against one at that rate) compares equal load per
worker, which is what running N workers on N cores is.

Defaults: 5 interleaved runs of 3 s per row and gateway (about 3 minutes in all).
``BENCH_QUICK=1``: 2 runs of 1 s (for developing the harness; not for figures).
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

from bench.common import (
    NOOP_MIX,
    TOKEN,
    Figure,
    ProcessTree,
    Report,
    Run,
    bearer,
    rotated,
    rounds,
    run_load,
    spread,
    start_gateway,
    start_noop,
)

TARGET = 1.10  # most CPU per request of 2 workers, as a multiple of one worker's


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


def main() -> int:
    repeats, seconds = rounds(5, 3.0)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=seconds, help="length of each run")
    parser.add_argument("--repeats", type=int, default=repeats)
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
    report = Report("workers")
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="guard-bench-") as tmp:
        home = Path(tmp)
        print("starting a no-op upstream, a gateway with 1 worker and one with 2 ...", flush=True)
        noop = start_noop(stack, home)
        gateways = {
            "1": start_gateway(stack, home / "one", noop, **env),
            "2": start_gateway(stack, home / "two", noop, MLFLOW_GUARD_GATEWAY_WORKERS="2", **env),
        }
        print(f"\n== --workers 1 vs 2, no-op upstream (the gateway's own cost), audit "
              f"{args.audit}: {args.repeats} interleaved runs of {args.seconds:g} s per row; "
              "median (min..max) ==")  # fmt: skip
        print(f"{'load':>6} {'rps 1w':>8} {'rps 2w':>8} {'cpu/req ms 1w':>22} "
              f"{'cpu/req ms 2w':>22} {'2w/1w':>22} {'errors':>7}")  # fmt: skip
        rows = [f"c={c}" for c in levels] + [f"{r}/s" for r in args.rates.split(",") if r]
        cpu_of: dict[str, dict[str, list[float]]] = {}  # row -> workers -> CPU/request per run
        for row in rows:
            runs: dict[str, list[Run]] = {"1": [], "2": []}
            for r in range(args.repeats):
                for workers in rotated(["1", "2"], r):
                    url, tree = gateways[workers]
                    if row.startswith("c="):
                        run = run_load(url, NOOP_MIX, int(row[2:]), args.seconds, bearer(TOKEN),
                                       tree)  # fmt: skip
                    else:
                        run = asyncio.run(paced(url, float(row[:-2]), args.seconds, tree))
                    runs[workers].append(run)
            cpu = cpu_of[row] = {w: [r.cpu_ms for r in rs] for w, rs in runs.items()}
            rps = {w: statistics.median(r.rps for r in rs) for w, rs in runs.items()}
            ratios = [two / one for one, two in zip(cpu["1"], cpu["2"], strict=True)]
            errors = sum(r.errors for rs in runs.values() for r in rs)
            print(f"{row:>6} {rps['1']:>8.0f} {rps['2']:>8.0f} {spread(cpu['1']):>22} "
                  f"{spread(cpu['2']):>22} {spread(ratios):>22} {errors:>7}",
                  flush=True)  # fmt: skip
            name = f"CPU/request 2 workers / 1, {row}{', audit off' if args.audit == 'off' else ''}"
            note = f"{errors} non-200 answers" if errors else ""
            report.add(Figure(name, ratios, "x", TARGET, at_least=False, note=note))
        per_worker(cpu_of, report, ", audit off" if args.audit == "off" else "")
    report.finish()
    return 0


def per_worker(cpu_of: dict[str, dict[str, list[float]]], report: Report, suffix: str) -> None:
    """Two workers at twice a paced rate against one at that rate: each worker then carries
    what the single one does. The rows above give both gateways the same load in all, so each
    of two workers carries half of it, and a process's CPU per request rises as its own load
    falls (fewer requests share each wake of the loop, each group commit, the warm caches;
    the 400/s and 800/s rows of one worker show how much). This row compares equal load per
    process: how far N workers on N cores serve N times what one does."""
    paced = {float(row[:-2]): row for row in cpu_of if row.endswith("/s")}
    for rate, row in sorted(paced.items()):
        if (double := paced.get(rate * 2)) is None:
            continue
        one, two = cpu_of[row]["1"], cpu_of[double]["2"]
        ratios = [b / a for a, b in zip(one, two, strict=True)]
        print(f"  2 workers at {double} vs 1 at {row} (the same load per worker): CPU/request "
              f"{spread(two)} vs {spread(one)} ms, ratio {spread(ratios)}")  # fmt: skip
        name = f"CPU/request 2 workers at {double} / 1 at {row}{suffix}"
        report.add(Figure(name, ratios, "x", TARGET, at_least=False))


if __name__ == "__main__":
    sys.exit(main())
