"""Gateway overhead against direct MLflow, and the gateway's own CPU per request (``make bench``).

1. Real MLflow (a lean server: SQLite, one worker) and a gateway in front of it with everything
   on: token auth, RBAC and the audit trail. The caller is a non-admin editor (its grant:
   editor on experiment:bench-*) among ``--policy-rows`` other grants, so every request is
   resolved and decided and searches are filtered. The same request mix (log-metric,
   log-batch, runs/get, experiments/search) runs over keep-alive connections directly against
   MLflow and through the gateway, ``--repeats`` pairs of runs per level at c=1, 8 and 32, the
   two taking turns going first. Printed per level: throughput, the gateway/direct ratio, the
   added p50 and p99 latency, and the added p50 of reads and of writes apart (a read's intent
   fsync overlaps MLflow's work; a write's comes before forwarding). The hop alone
   (bench/hop.py: the gateway's upstream client behind uvicorn, no layers) runs the same mix in
   the same rounds: the floor, what any gateway written this way costs before it decides or
   records anything.
2. The gateway's own cost: two gateways in front of a no-op upstream (bench/noop.py), one
   with everything on, one with the audit trail off, the same keep-alive runs/get against
   each, interleaved, at each level; printed: the gateway's CPU per request (its process tree's
   CPU time over the run / requests answered), and the hop alone's beside them. These rows
   are the gateway's own cost, not a comparison with a direct upstream.

Each figure is the median of the runs, with its spread (min..max over them); ratios and added
latencies are computed per pair of runs. ``--admin`` also runs section 1 with the bootstrap
(admin) token, without targets.

Targets (issue 13):
- MLflow, everything on: gateway/direct throughput >= 0.95 at c=1, 8 and 32;
- added p50 latency of reads at c=1 <= 1 ms (writes: printed, no target);
- the gateway's own CPU per request, no-op upstream, everything on: <= 0.3 ms (audit off:
  printed for comparison, no target).

Defaults: 5 pairs of 3 s runs per level (about 4 minutes in all). ``BENCH_QUICK=1``: 2 pairs of
1 s runs, 1,000 policy rows (for developing the harness; not for figures). Every loop is bounded
in count and time; everything listens on 127.0.0.1; every process is stopped by its pid.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.common import (  # re-exported: /tmp tools and older scripts import them from here
    MAX_REQUESTS_PER_RUN,
    NOOP_MIX,
    TOKEN,
    Figure,
    ProcessTree,
    Report,
    Request,
    Run,
    bearer,
    clean_env,
    cli,
    free_port,
    load,
    mlflow_mix,
    quick,
    rotated,
    rounds,
    run_load,
    spread,
    start_gateway,
    start_hop,
    start_mlflow,
    start_noop,
)

__all__ = ["MAX_REQUESTS_PER_RUN", "TOKEN", "clean_env", "free_port", "load", "main"]

TARGET_RATIO = 0.95  # gateway/direct throughput, each level
TARGET_READ_MS = 1.0  # added p50 of reads at c=1
TARGET_CPU_MS = 0.3  # the gateway's own CPU per request, no-op upstream, everything on


def non_admin(data_dir: Path, rows: int) -> str:
    """A token that may edit only experiments named bench-*, among ``rows`` other grants."""
    policy = cli(data_dir, "policy", "export")
    filler = "".join(
        f"p, user:filler{i}, viewer, experiment:team{i % 100}/*\n" for i in range(rows)
    )
    (data_dir / "bench-policy.csv").write_text(policy + "\n" + filler)
    cli(data_dir, "policy", "import", str(data_dir / "bench-policy.csv"))
    return cli(data_dir, "token", "create", "--name", "bench-user", "--role", "editor",
               "--resource", "experiment:bench-*", "--quiet")  # fmt: skip


def added(pairs: list[tuple[Run, Run]], q: float, kind: str = "") -> list[float]:
    """Per pair of runs: the gateway's ``q`` latency quantile minus direct's, in ms."""
    return [(g.quantile(q, kind) - d.quantile(q, kind)) * 1000 for d, g in pairs]


def versus_direct(
    title: str, direct: str, via: str, gateway: ProcessTree, mix: list[Request],
    levels: list[int], repeats: int, seconds: float, authorization: str, hop: str | None = None,
) -> dict[int, list[tuple[Run, Run, Run | None]]]:  # fmt: skip
    """Runs (direct, gateway, and the hop alone if ``hop`` is given) per level, interleaved;
    prints a row per level."""
    print(f"\n== {title}: {repeats} interleaved pairs of {seconds:g} s runs per level; "
          "median (min..max) ==")  # fmt: skip
    print(f"{'c':>3} {'direct rps':>10} {'gateway rps':>11} {'ratio':>19} {'+p50 ms':>8} "
          f"{'+p99 ms':>8} {'gw cpu/req ms':>13} {'+p50 reads ms':>21} {'+p50 writes ms':>21} "
          f"{'hop alone ratio':>19} {'hop +p50 ms':>11} {'errors':>6}")  # fmt: skip
    results = {}
    names = ["direct", "gateway", "hop"] if hop else ["direct", "gateway"]
    for c in levels:
        runs = []
        for r in range(repeats):
            got: dict[str, Run] = {}
            for name in rotated(names, r):
                if name == "direct":
                    got[name] = run_load(direct, mix, c, seconds)
                elif name == "hop":
                    got[name] = run_load(hop or "", mix, c, seconds, authorization)
                else:
                    got[name] = run_load(via, mix, c, seconds, authorization, gateway)
            runs.append((got["direct"], got["gateway"], got.get("hop")))
        results[c] = runs
        pairs = [(d, g) for d, g, _ in runs]
        hops = [(d, h) for d, _, h in runs if h is not None]
        errors = sum(d.errors + g.errors + (h.errors if h else 0) for d, g, h in runs)
        if errors:
            print(f"    {errors} non-200 answers: the row below measures refusals, not work")
        by_kind = [spread(added(pairs, 0.5, kind), 2) if any(kind in g.kinds for _, g in pairs)
                   else "-" for kind in ("read", "write")]  # fmt: skip
        hop_ratio = spread([h.rps / d.rps for d, h in hops]) if hops else "-"
        hop_p50 = f"{statistics.median(added(hops, 0.5)):.2f}" if hops else "-"
        print(f"{c:>3} {statistics.median(d.rps for d, _ in pairs):>10.1f} "
              f"{statistics.median(g.rps for _, g in pairs):>11.1f} "
              f"{spread([g.rps / d.rps for d, g in pairs]):>19} "
              f"{statistics.median(added(pairs, 0.5)):>8.2f} "
              f"{statistics.median(added(pairs, 0.99)):>8.2f} "
              f"{statistics.median(g.cpu_ms for _, g in pairs):>13.3f} "
              f"{by_kind[0]:>21} {by_kind[1]:>21} {hop_ratio:>19} {hop_p50:>11} "
              f"{errors:>6}", flush=True)  # fmt: skip
    return results


def own_cost(
    gateways: dict[str, tuple[str, ProcessTree]], levels: list[int], repeats: int,
    seconds: float,
) -> dict[int, dict[str, list[Run]]]:  # fmt: skip
    """Runs per level and gateway against the no-op upstream, interleaved; prints CPU/request."""
    print(
        f"\n== the gateway's own cost (no-op upstream): {repeats} interleaved runs of "
        f"{seconds:g} s per level and gateway; its CPU time / requests, median (min..max) =="
    )
    names = list(gateways)
    print(f"{'c':>3} " + " ".join(f"{'rps ' + n:>12}" for n in names) + " "
          + " ".join(f"{'cpu/req ms ' + n:>25}" for n in names) + f" {'errors':>6}")  # fmt: skip
    results = {}
    for c in levels:
        runs: dict[str, list[Run]] = {name: [] for name in names}
        for r in range(repeats):
            for name in rotated(names, r):
                url, tree = gateways[name]
                runs[name].append(run_load(url, NOOP_MIX, c, seconds, bearer(TOKEN), tree))
        results[c] = runs
        errors = sum(run.errors for rs in runs.values() for run in rs)
        print(f"{c:>3} "
              + " ".join(f"{statistics.median(x.rps for x in runs[n]):>12.0f}" for n in names)
              + " " + " ".join(f"{spread([x.cpu_ms for x in runs[n]]):>25}" for n in names)
              + f" {errors:>6}", flush=True)  # fmt: skip
    return results


def report_mlflow(
    report: Report, label: str, results: dict[int, list[tuple[Run, Run, Run | None]]],
    targets: bool,
) -> None:  # fmt: skip
    for c, runs in results.items():
        errors = sum(d.errors + g.errors for d, g, _ in runs)
        report.add(Figure(f"{label} gateway/direct rps, c={c}",
                          [g.rps / d.rps for d, g, _ in runs], "x",
                          TARGET_RATIO if targets else None,
                          note=f"{errors} non-200 answers" if errors else ""))  # fmt: skip
    for c, runs in results.items():
        if hops := [(d, h) for d, _, h in runs if h is not None]:
            report.add(Figure(f"{label} hop alone/direct rps, c={c}",
                              [h.rps / d.rps for d, h in hops], "x",
                              note="the floor: bench/hop.py, no layers"))  # fmt: skip
    if 1 in results:
        pairs = [(d, g) for d, g, _ in results[1]]
        report.add(Figure(f"{label} added p50 reads, c=1", added(pairs, 0.5, "read"), "ms",
                          TARGET_READ_MS if targets else None, at_least=False))  # fmt: skip
        report.add(Figure(f"{label} added p50 writes, c=1", added(pairs, 0.5, "write"), "ms",
                          note="no target (its intent is fsynced before forwarding)"))  # fmt: skip


def main() -> int:
    repeats, seconds = rounds(5, 3.0)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=seconds, help="length of each run")
    parser.add_argument("--repeats", type=int, default=repeats, help="runs per level and side")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--policy-rows", type=int, default=1000 if quick() else 10000,
                        help="other grants in the policy of section 1")  # fmt: skip
    parser.add_argument(
        "--admin",
        action="store_true",
        help="also run section 1 with the bootstrap admin token (no targets)",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="only section 2 (no-op)")
    args = parser.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    report = Report("proxy")
    with tempfile.TemporaryDirectory(prefix="guard-bench-") as tmp:
        home = Path(tmp)
        if not args.no_mlflow:
            with ExitStack() as stack:
                print("starting MLflow and a gateway in front of it (everything on) ...",
                      flush=True)  # fmt: skip
                (home / "mlflow").mkdir()
                mlflow = start_mlflow(stack, home / "mlflow")
                via, gateway = start_gateway(stack, home / "gw", mlflow)
                hop, _ = start_hop(stack, home / "mlflow", mlflow)
                mix = mlflow_mix(via)
                token = non_admin(home / "gw", args.policy_rows)
                time.sleep(2.5)  # the gateway picks the new policy up (authz.poll_interval)
                title = (f"MLflow, everything on, a non-admin editor among {args.policy_rows} "
                         "policy rows")  # fmt: skip
                results = versus_direct(title, mlflow, via, gateway, mix, levels, args.repeats,
                                        args.seconds, bearer(token), hop)  # fmt: skip
                report_mlflow(report, "MLflow, all on:", results, targets=True)
                if args.admin:
                    results = versus_direct("MLflow, everything on, the admin token", mlflow,
                                            via, gateway, mix, levels, args.repeats,
                                            args.seconds, bearer(TOKEN))  # fmt: skip
                    report_mlflow(report, "MLflow, admin:", results, targets=False)
        with ExitStack() as stack:
            print("\nstarting a no-op upstream and two gateways in front of it (everything on; "
                  "audit off), and the hop alone ...", flush=True)  # fmt: skip
            noop = start_noop(stack, home)
            gateways = {
                "all on": start_gateway(stack, home / "noop-on", noop),
                "audit off": start_gateway(stack, home / "noop-off", noop,
                                           MLFLOW_GUARD_AUDIT_ENABLED="false"),
                "hop alone": start_hop(stack, home, noop),
            }  # fmt: skip
            costs = own_cost(gateways, levels, args.repeats, args.seconds)
        for c, runs in costs.items():
            errors = sum(x.errors for x in runs["all on"])
            report.add(Figure(f"own CPU/request (no-op), all on, c={c}",
                              [x.cpu_ms for x in runs["all on"]], "ms", TARGET_CPU_MS,
                              at_least=False,
                              note=f"{errors} non-200 answers" if errors else ""))  # fmt: skip
        for c, runs in costs.items():
            report.add(Figure(f"own CPU/request (no-op), audit off, c={c}",
                              [x.cpu_ms for x in runs["audit off"]], "ms"))  # fmt: skip
        for c, runs in costs.items():
            report.add(Figure(f"own CPU/request (no-op), hop alone, c={c}",
                              [x.cpu_ms for x in runs["hop alone"]], "ms",
                              note="the floor: bench/hop.py, no layers"))  # fmt: skip
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
