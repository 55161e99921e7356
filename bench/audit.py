"""What the audit trail costs (``make bench``): its writer, its shipper, and the gateway with it.

1. The spool: many asyncio tasks call ``Spool.append`` (each waits for its fsync) until a
   fixed number of records is on disk; records/s, fsyncs, records per fsync (group commit),
   append latency, CPU per record. Alone at 1, 8 and 64 tasks, then as the gateway runs it at
   c=8: an outcome queued after each intent, the shipper storing into SQLite meanwhile.
2. The shipper: a spool holding a backlog is drained into SQLite and into a throwaway
   PostgreSQL (tests/conftest.py's cluster; skipped with a note if it cannot start); records/s
   from spool to table, at two backlog sizes (a rate that falls as the backlog grows means the
   shipper's cost per record grows with it), then into a SQLite table already holding
   ``--prefilled`` records (a gateway that has run a while: whether each index grows at its
   end shows here; request ids are made as the gateway makes them).
3. The gateway with the audit trail on and off: direct, gateway (audit on) and gateway (audit
   off) runs interleaved at c=8 with bench/proxy.py's request mix against real MLflow (and,
   with ``--noop``, against the no-op upstream, where the trail's own cost shows; bench.proxy
   measures that as the gateway's CPU per request with audit on and off); medians, ratios to
   direct, the gateway CPU per request and a request's wait for its intent's fsync.

Target: with audit on, the c=8 ratio to direct MLflow is no more than 5% below the ratio
without audit (the per-run on/off throughput ratio; its median >= 0.95).

Defaults: 20,000 records (or 15 s) per spool row, 5 interleaved runs of 3 s per gateway
(about 2.5 minutes in all). ``--quick`` or ``BENCH_QUICK=1``: 2,000 records, 2 runs of 1 s (for
developing the harness; not for figures). Every loop is bounded in count and time; everything
listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import sqlalchemy as sa

from bench.common import (
    NOOP_MIX,
    TOKEN,
    Figure,
    ProcessTree,
    Report,
    Request,
    Run,
    bearer,
    mlflow_mix,
    quick,
    rotated,
    run_load,
    start_gateway,
    start_mlflow,
    start_noop,
)
from guard.audit.chain import Head, derive_key
from guard.audit.shipper import Shipper
from guard.audit.spool import Spool
from guard.audit.store import AuditStore
from guard.edge.requestid import new_request_id
from guard.settings import AuditSettings
from guard.store.db import audit_records, build_engine, migrate

TARGET_RELATIVE = 0.95  # audit-on ratio >= 0.95 x audit-off ratio
KEY = derive_key(b"bench" * 8, "audit-chain")
DEFAULTS = AuditSettings()


def record_body(i: int) -> dict[str, Any]:
    """An intent record shaped like the gateway's for a log-metric call (about 800 bytes
    sealed)."""
    return {
        "kind": "intent", "time": "2026-12-01T12:00:00.123456+00:00",
        "request_id": f"{i:032x}", "client": "127.0.0.1", "peer": "127.0.0.1",
        "host": "127.0.0.1:5000", "scheme": "http", "method": "POST",
        "path": "/api/2.0/mlflow/runs/log-metric", "user_agent": "mlflow-python-client/3.17.2",
        "principal": "token:bench-user", "auth_method": "token", "kind_of_resource": "run",
        "action": "update", "resource": "experiment:bench-1764590400.123",
        "policy_version": 12, "rule": "p, token:bench-user, editor, experiment:bench-*",
        "decision": "allow",
        "changes": {"run_id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0", "key": "loss", "value": 0.5},
    }  # fmt: skip


def outcome_body(i: int) -> dict[str, Any]:
    """The outcome that closes ``record_body(i)``'s intent, as the gateway writes it."""
    return {**record_body(i), "kind": "outcome", "reason": "", "status": 200,
            "upstream_status": 200, "bytes_in": 212, "bytes_out": 2, "latency_ms": 4.211,
            "upstream_ms": 3.87}  # fmt: skip


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


# -- 1. the spool alone ---------------------------------------------------------------------


@dataclass
class SpoolRun:
    label: str
    records: int  # all records made durable (intents and outcomes)
    seconds: float
    commits: int
    latencies: list[float]  # of the appends that waited (intents)
    writer_cpu: float
    process_cpu: float

    def row(self) -> str:
        per_fsync = self.records / max(self.commits, 1)
        writer_us = self.writer_cpu / max(self.records, 1) * 1e6
        process_us = self.process_cpu / max(self.records, 1) * 1e6
        return (f"{self.label:>7} {self.records:>8} {self.records / self.seconds:>10.0f} "
                f"{self.commits:>7} {per_fsync:>9.1f} {quantile(self.latencies, 0.5) * 1e3:>8.2f} "
                f"{quantile(self.latencies, 0.99) * 1e3:>8.2f} {writer_us:>10.0f} "
                f"{process_us:>10.0f}")  # fmt: skip


def thread_cpu(thread: threading.Thread | None) -> float:
    """User + system seconds one thread of this process has used."""
    for t in psutil.Process().threads():
        if thread is not None and t.id == thread.native_id:
            return float(t.user_time + t.system_time)
    return 0.0


async def spool_run(
    directory: Path, tasks: int, count: int, max_seconds: float, ship_to: str | None = None,
    reads: bool = False,
) -> SpoolRun:  # fmt: skip
    """``count`` requests recorded from ``tasks`` tasks, as the gateway records them: an intent
    waited for (``Spool.append``), then its outcome queued (``append_nowait``), so no intent
    stays open. With ``ship_to``, a shipper stores records into ``ship_to`` meanwhile. With
    ``reads``, the intent as the gateway records a read's: ``Spool.write`` (the latency is the
    wait until the record is written, when a read is forwarded), then the wait for its
    fsync."""
    spool = Spool(directory, KEY, segment_size=DEFAULTS.segment_size)
    spool.open()
    writer = spool._thread  # its CPU: the fsyncs that left the event loop
    shipper = None
    if ship_to is not None:
        engine = build_engine(ship_to)
        migrate(engine)
        shipper = Shipper(spool, AuditStore(engine), batch_size=DEFAULTS.batch_size)
        spool.on_commit = shipper.notify
        await shipper.start()
    latencies: list[float] = []
    issued = 0
    stop_at = time.monotonic() + max_seconds
    try:
        await spool.append(record_body(-1))  # segment created, head recovered: not measured
        before = spool.spooled, spool.commits, thread_cpu(writer), time.process_time()

        async def task() -> None:
            nonlocal issued
            while issued < count and time.monotonic() < stop_at:
                issued += 1
                started = time.perf_counter()
                if reads:
                    done = await spool.write(record_body(issued))
                    latencies.append(time.perf_counter() - started)
                    await spool.durable(done)
                else:
                    await spool.append(record_body(issued))
                    latencies.append(time.perf_counter() - started)
                spool.append_nowait(outcome_body(issued))

        started = time.perf_counter()
        await asyncio.gather(*(task() for _ in range(tasks)))
        elapsed = time.perf_counter() - started
        after = spool.spooled, spool.commits, thread_cpu(writer), time.process_time()
    finally:
        if shipper is not None:
            await shipper.stop(DEFAULTS.shutdown_grace)  # bounded
        spool.close()
    label = f"{tasks}+ship" if shipper is not None else f"{tasks}{' rd' if reads else ''}"
    d = [b - a for a, b in zip(before, after, strict=True)]
    return SpoolRun(label, int(d[0]), elapsed, int(d[1]), latencies, d[2], d[3])


def bench_spool(root: Path, levels: list[int], count: int, max_seconds: float) -> list[SpoolRun]:
    print(f"\n== spool: requests recorded from concurrent tasks (an intent waited for, then its "
          f"outcome queued), {count} per row, at most {max_seconds:.0f} s ==")  # fmt: skip
    print(f"{'tasks':>7} {'records':>8} {'records/s':>10} {'fsyncs':>7} {'rec/fsync':>9} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'writer us':>10} {'process us':>10}")  # fmt: skip
    runs = []
    for tasks in levels:
        run = asyncio.run(spool_run(root / f"spool-{tasks}", tasks, count, max_seconds))
        print(run.row(), flush=True)
        runs.append(run)
    run = asyncio.run(spool_run(root / "spool-ship", 8, count, max_seconds,
                                f"sqlite:///{root}/spool-ship.db"))  # fmt: skip
    print(run.row(), flush=True)
    runs.append(run)
    run = asyncio.run(spool_run(root / "spool-reads", 8, count, max_seconds, reads=True))
    print(run.row(), flush=True)
    runs.append(run)
    print("  writer us / process us: CPU per record of the spool's thread (its fsyncs: those of\n"
          "  records nobody waits for, and all of them while the loop's are slow) / of the whole\n"
          "  process (the event loop does the commits while they are quick)\n"
          "  records counts both kinds; p50/p99: the wait for the intent's fsync\n"
          "  8+ship: as in the gateway at c=8, with the shipper storing into SQLite meanwhile\n"
          "  8 rd: as the gateway records reads (Spool.write): p50/p99 are the wait until the\n"
          "  record is written, when a read is forwarded; its fsync is awaited after")  # fmt: skip
    return runs


# -- 2. the shipper -------------------------------------------------------------------------


def fill_spool(directory: Path, count: int) -> None:
    spool = Spool(directory, KEY, segment_size=DEFAULTS.segment_size)
    spool.open()
    request_id = ""
    for i in range(count):
        # An intent, then its outcome: no request is left open, so the next start recovers
        # nothing (it would add an outcome_unknown record for each open intent). Request ids
        # are made as the gateway makes them: how they sort decides where the table's index
        # of them grows.
        request_id = new_request_id() if i % 2 == 0 else request_id
        body = record_body(i // 2) | {"request_id": request_id}
        if i % 2:
            body |= {"kind": "outcome", "status": 200}
        spool.append_nowait(body)
    spool.close()  # writes everything queued


def prefill(uri: str, count: int) -> None:
    """``count`` records of an earlier writer stored in the table at ``uri`` (a gateway that
    has run a while), inserted as the shipper does, in batches."""
    engine = build_engine(uri)
    migrate(engine)
    store = AuditStore(engine)
    head = Head("gw-earlier")
    batch: list[dict[str, Any]] = []
    lines: list[str] = []
    for i in range(count):
        line, record, head = head.seal_line(KEY, record_body(i) | {"request_id": new_request_id()})
        batch.append(record)
        lines.append(line.decode().rstrip("\n"))
        if len(batch) == DEFAULTS.batch_size or i == count - 1:
            store.insert(batch, KEY, lines)
            batch, lines = [], []
    engine.dispose()


async def drain(
    directory: Path, uri: str, batch_size: int, max_seconds: float
) -> tuple[int, float]:
    """(records stored, seconds) for a fresh shipper to move the whole spool into ``uri``."""
    engine = build_engine(uri)
    migrate(engine)
    spool = Spool(directory, KEY, segment_size=DEFAULTS.segment_size)
    spool.open()
    shipper = Shipper(spool, AuditStore(engine), batch_size=batch_size)
    spool.on_commit = shipper.notify
    try:
        started = time.perf_counter()
        await shipper.start()
        deadline = time.monotonic() + max_seconds
        # The shipper has no event for "stored"; polling costs little next to an insert.
        while shipper.replayed < spool.head.seq and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        await shipper.stop(0)
    finally:
        spool.close()
    with engine.connect() as conn:
        stored = conn.execute(sa.select(sa.func.count()).select_from(audit_records)).scalar()
    engine.dispose()
    return int(stored or 0), elapsed


def bench_shipper(
    root: Path, backlogs: list[int], batch_size: int, max_seconds: float, prefilled: int = 0
) -> dict[str, dict[int, float]]:
    print(f"\n== shipper: a backlog drained from the spool into the table, {batch_size} records "
          f"per transaction (audit.batch_size), at most {max_seconds:.0f} s each ==")  # fmt: skip
    results: dict[str, dict[int, float]] = {}
    with ExitStack() as stack:  # PostgreSQL stops before the gateway runs
        targets: list[tuple[str, Callable[[int], str]]] = [
            ("sqlite", lambda n: f"sqlite:///{root}/ship-{n}.db")
        ]
        if (pg_uri := start_postgres(stack)) is not None:
            targets.append(("postgresql", lambda n: pg_uri()))
        print(f"{'database':>10} {'backlog':>8} {'stored':>8} {'seconds':>8} {'records/s':>10}")
        for name, uri in targets:
            rates = results.setdefault(name, {})
            for backlog in backlogs:
                directory = root / f"ship-{name}-{backlog}"
                fill_spool(directory, backlog)
                stored, seconds = asyncio.run(
                    drain(directory, uri(backlog), batch_size, max_seconds)
                )
                rates[backlog] = stored / seconds
                note = "" if stored >= backlog else f"  (stopped at the time limit of {backlog})"
                print(f"{name:>10} {backlog:>8} {stored:>8} {seconds:>8.2f} "
                      f"{rates[backlog]:>10.0f}{note}", flush=True)  # fmt: skip
            fewest, most = min(rates), max(rates)
            if fewest >= 5000 and most > fewest and rates[most] < 0.7 * rates[fewest]:
                print(f"{'':>10} records/s falls {rates[fewest] / rates[most]:.1f}x as the "
                      f"backlog grows {most / fewest:.0f}x: the cost per record grows with "
                      "it")  # fmt: skip
    if prefilled:
        # The same backlog into a table that already holds many records: where each index
        # grows (at its end, or on a random page each time) decides the cost per record here.
        backlog, uri = max(backlogs), f"sqlite:///{root}/ship-prefilled.db"
        prefill(uri, prefilled)
        directory = root / "ship-prefilled"
        fill_spool(directory, backlog)
        in_table, seconds = asyncio.run(drain(directory, uri, batch_size, max_seconds))
        stored = in_table - prefilled
        name = f"sqlite holding {prefilled}"
        results[name] = {backlog: stored / seconds}
        print(f"{'sqlite':>10} {backlog:>8} {stored:>8} {seconds:>8.2f} "
              f"{stored / seconds:>10.0f}  (into a table holding {prefilled} records)",
              flush=True)  # fmt: skip
    return results


def start_postgres(stack: ExitStack) -> Callable[[], str] | None:
    """A throwaway cluster from tests/conftest.py, or None (with a note) if there is none."""
    try:
        from tests.conftest import PostgresCluster
    except ImportError as exc:
        print(f"  PostgreSQL skipped: tests/conftest.py cannot be imported ({exc})")
        return None
    try:
        cluster = PostgresCluster()
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"  PostgreSQL skipped: the throwaway cluster did not start ({exc}); "
              "`make system-packages` installs it")  # fmt: skip
        return None
    stack.callback(cluster.stop)
    print("  PostgreSQL: the test suite's throwaway cluster (fsync=off, synchronous_commit=off: "
          "commits cost less than on a durable server)")  # fmt: skip
    return cluster.create_database


# -- 3. the gateway with audit on and off ---------------------------------------------------


def intent_wait(url: str) -> tuple[float, float] | None:
    """(seconds, requests) waited for intent fsyncs so far, from /guard/metrics if it has them."""
    try:
        text = httpx.get(url + "/guard/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in (
            "mlflow_guard_audit_write_seconds_sum",
            "mlflow_guard_audit_write_seconds_count",
        ):
            found[name.rsplit("_", 1)[1]] = float(value)
    return (found["sum"], found["count"]) if len(found) == 2 else None


@dataclass
class Triple:
    direct: Run
    on: Run
    off: Run


def three_way(
    label: str, direct: str, on: tuple[str, ProcessTree], off: tuple[str, ProcessTree],
    mix: list[Request], c: int, repeats: int, seconds: float, target: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Direct, audit on and audit off, interleaved (the order rotates each repeat). Without
    ``target`` (the no-op upstream) the audit-on/off ratio is the trail's own cost: printed,
    not judged."""
    print(f"\n== {label}: c={c}, {repeats} interleaved runs of {seconds:g} s each, medians ==")
    triples: list[Triple] = []
    waits: list[float] = []
    for r in range(repeats):
        got: dict[str, Run] = {}
        for name in rotated(["direct", "on", "off"], r):
            if name == "direct":
                got[name] = run_load(direct, mix, c, seconds)
            elif name == "on":
                before = intent_wait(on[0])
                got[name] = run_load(on[0], mix, c, seconds, bearer(TOKEN), on[1])
                after = intent_wait(on[0])
                if before is not None and after is not None and after[1] > before[1]:
                    waits.append((after[0] - before[0]) / (after[1] - before[1]))
            else:
                got[name] = run_load(off[0], mix, c, seconds, bearer(TOKEN), off[1])
            time.sleep(0.3)  # let the audit-on gateway's shipper catch up outside the next run
        triples.append(Triple(got["direct"], got["on"], got["off"]))
    d = statistics.median(t.direct.rps for t in triples)
    on_rps = statistics.median(t.on.rps for t in triples)
    off_rps = statistics.median(t.off.rps for t in triples)
    paired = [t.on.rps / t.off.rps for t in triples]

    def cpu(run: Run) -> float:
        return run.cpu_ms

    errors = sum(t.direct.errors + t.on.errors + t.off.errors for t in triples)

    def kinds(runs: list[Run]) -> str:  # p50 of reads and of writes, printed separately
        return "".join(
            f" {statistics.median(r.quantile(0.5, kind) for r in runs) * 1e3:>7.2f}"
            if any(kind in r.kinds for r in runs) else f" {'-':>7}"
            for kind in ("read", "write")
        )  # fmt: skip

    print(f"{'':>14} {'rps':>9} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} {'gw cpu/req ms':>14} "
          f"{'p50 rd':>7} {'p50 wr':>7}")  # fmt: skip
    print(f"{'direct':>14} {d:>9.1f} {1:>6.2f} "
          f"{statistics.median(t.direct.quantile(0.5) for t in triples) * 1e3:>7.2f} "
          f"{statistics.median(t.direct.quantile(0.99) for t in triples) * 1e3:>7.2f} "
          f"{'':>14}{kinds([t.direct for t in triples])}")  # fmt: skip
    for name, rps, runs in (("gateway, on", on_rps, [t.on for t in triples]),
                            ("gateway, off", off_rps, [t.off for t in triples])):  # fmt: skip
        print(f"{name:>14} {rps:>9.1f} {rps / d:>6.2f} "
              f"{statistics.median(r.quantile(0.5) for r in runs) * 1e3:>7.2f} "
              f"{statistics.median(r.quantile(0.99) for r in runs) * 1e3:>7.2f} "
              f"{statistics.median(cpu(r) for r in runs):>14.3f}{kinds(runs)}")  # fmt: skip
    ratio_on, ratio_off = on_rps / d, off_rps / d
    relative = ratio_on / ratio_off
    print(
        f"  ratio on {ratio_on:.3f}, off {ratio_off:.3f}, difference {ratio_on - ratio_off:+.3f}"
        f" ({(relative - 1) * 100:+.1f}%; per-run on/off {min(paired):.3f}..{max(paired):.3f})"
    )
    if target:
        verdict = "met" if relative >= TARGET_RELATIVE else "NOT MET: audit on is > 5% below"
        print(f"  target: audit-on ratio >= {TARGET_RELATIVE:.2f} x audit-off ratio: {verdict}")
    if waits:
        print(f"  audit on: a request waits {statistics.median(waits) * 1e3:.2f} ms on average "
              "for its intent record's fsync (the gateway's /guard/metrics)")  # fmt: skip
    if errors:
        print(f"  {errors} non-200 answers: these numbers measure refusals, not work")
    return {"direct_rps": d, "on_rps": on_rps, "off_rps": off_rps, "ratio_on": ratio_on,
            "ratio_off": ratio_off, "relative": relative, "errors": errors,
            "on_off_per_run": paired, "intent_wait_ms": [w * 1e3 for w in waits]}  # fmt: skip


def gateways(
    stack: ExitStack, home: Path, name: str, upstream: str
) -> tuple[tuple[str, ProcessTree], tuple[str, ProcessTree]]:
    """Two gateways in front of ``upstream``: audit on, audit off."""
    on = start_gateway(stack, home / f"{name}-on", upstream)
    off = start_gateway(stack, home / f"{name}-off", upstream, MLFLOW_GUARD_AUDIT_ENABLED="false")
    return on, off


def bench_gateway(
    home: Path, c: int, repeats: int, seconds: float, mlflow: bool, noop: bool
) -> dict[str, dict[str, Any]]:
    results = {}
    if noop:
        with ExitStack() as stack:
            print("\nstarting a no-op upstream and two gateways in front of it (audit on, off) "
                  "...", flush=True)  # fmt: skip
            upstream = start_noop(stack, home)
            on, off = gateways(stack, home, "noop", upstream)
            title = "no-op upstream (the gateway's own cost)"
            results["noop"] = three_way(title, upstream, on, off, NOOP_MIX, c, repeats, seconds,
                                        target=False)  # fmt: skip
    if mlflow:
        with ExitStack() as stack:
            print("\nstarting MLflow and two gateways in front of it (audit on, off) ...",
                  flush=True)  # fmt: skip
            (home / "mlflow").mkdir()
            upstream = start_mlflow(stack, home / "mlflow")
            on, off = gateways(stack, home, "mlflow", upstream)
            mix = mlflow_mix(on[0])  # the bootstrap token is admin on both gateways
            results["mlflow"] = three_way("MLflow", upstream, on, off, mix, c, repeats, seconds)
    return results


def report(
    spool_runs: list[SpoolRun], shipped: dict[str, dict[int, float]],
    gateway: dict[str, dict[str, Any]], c: int, out: Report,
) -> Report:  # fmt: skip
    """The figures for the summary: group commit, shipping rate, and the gateway's ratios."""
    for run in spool_runs:
        if run.label == "8+ship":
            out.add(Figure("spool, 8 tasks + shipper: records per fsync",
                           [run.records / max(run.commits, 1)], ""))  # fmt: skip
    for database, rates in shipped.items():
        most = max(rates)
        out.add(Figure(f"shipper, {most} into {database}: records/s", [rates[most]], ""))
    if "mlflow" in gateway:
        result = gateway["mlflow"]
        out.add(Figure(f"MLflow, c={c}: gateway rps audit on / off", result["on_off_per_run"],
                       "x", TARGET_RELATIVE))  # fmt: skip
        if result["intent_wait_ms"]:
            out.add(Figure(f"MLflow, c={c}: wait for the intent fsync",
                           result["intent_wait_ms"], "ms"))  # fmt: skip
    if "noop" in gateway:
        result = gateway["noop"]
        out.add(Figure(f"own cost (no-op), c={c}: rps audit on / off", result["on_off_per_run"],
                       "x"))  # fmt: skip
        if result["intent_wait_ms"]:
            out.add(Figure(f"own cost (no-op), c={c}: wait for the intent fsync",
                           result["intent_wait_ms"], "ms"))  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", default=quick(),
                        help="small counts, short runs (also BENCH_QUICK=1)")  # fmt: skip
    parser.add_argument("--records", type=int, default=20000, help="records per spool run")
    parser.add_argument("--tasks", default="1,8,64", help="concurrent appenders per spool run")
    parser.add_argument("--backlogs", default="5000,20000", help="records the shipper drains")
    parser.add_argument("--prefilled", type=int, default=300000,
                        help="records the table holds before the last shipper row")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each gateway run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--no-mlflow", action="store_true", help="not against MLflow")
    parser.add_argument("--noop", action="store_true",
                        help="also against the no-op upstream (bench.proxy measures the "
                        "gateway's own cost with audit on and off)")  # fmt: skip
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.records, args.backlogs = min(args.records, 2000), "500,2000"
        args.prefilled = min(args.prefilled, 20000)
        args.seconds, args.repeats = min(args.seconds, 1.0), min(args.repeats, 2)
    limit = 60.0 if not args.quick else 15.0  # seconds any one spool or shipper run may take
    # A spool row's rate needs no more than this (1 appender waits for every fsync: at 4 ms
    # each, 20,000 records would take 80 s); a row that stops early still gives its rate.
    spool_limit = min(limit, 15.0)
    results: dict[str, object] = {}
    figures = Report("audit")
    with tempfile.TemporaryDirectory(prefix="guard-bench-audit-") as tmp:
        home = Path(tmp)
        spool_runs = bench_spool(home, [int(t) for t in args.tasks.split(",")], args.records,
                                 spool_limit)  # fmt: skip
        results["spool"] = {
            r.label: {"records_per_s": r.records / r.seconds, "fsyncs": r.commits,
                      "records_per_fsync": r.records / max(r.commits, 1),
                      "p50_ms": quantile(r.latencies, 0.5) * 1e3,
                      "p99_ms": quantile(r.latencies, 0.99) * 1e3}
            for r in spool_runs
        }  # fmt: skip
        backlogs = [int(n) for n in args.backlogs.split(",")]
        shipped = bench_shipper(home, backlogs, DEFAULTS.batch_size, limit, args.prefilled)
        results["shipper"] = shipped
        gateway = bench_gateway(home, args.concurrency, args.repeats, args.seconds,
                                not args.no_mlflow, args.noop)  # fmt: skip
        results["gateway"] = gateway
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    report(spool_runs, shipped, gateway, args.concurrency, figures).finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
