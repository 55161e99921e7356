"""Directory logins against the token path and direct MLflow, in one run (``make bench``).

Starts the tests' throwaway slapd (tests/slapd.py), a lean MLflow server and two gateways in
front of it configured for that directory: one with the login cache (``ldap.cache_ttl`` 60 s,
the default) and one without it (every request binds). The same request mix as bench.proxy
runs over keep-alive connections directly against MLflow, through the cached gateway with a
gateway token (Bearer), with HTTP Basic as a directory user (cached), and through the uncached
gateway with Basic, interleaved, at each concurrency level, ``--repeats`` times, taking turns
going first; the medians are printed as throughput ratios. Both identities hold the same
grant (editor on experiment:*), so only the way of logging in differs.

The cost of one uncached login is printed two ways: the added median latency of the uncached
gateway over the token path at c=1 (end to end: search, bind, rebind, groups, the identity
claim and the per-user throttle's rows), and in-process, LdapProvider.authenticate with the
cache off, with and without the throttle (its own database round trips).

Target (issue 10): cached Basic via LDAP keeps >= 0.90 of the token path's throughput (per
pair of runs; the median).

Defaults: 5 interleaved runs of 2 s per level and path (about 2 minutes in all).
``BENCH_QUICK=1``: 2 runs of 1 s (for developing the harness; not for figures). Every loop is
bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.common import (
    Figure,
    Report,
    Run,
    bearer,
    cli,
    free_port,
    mlflow_mix,
    rotated,
    rounds,
    run_load,
    start_gateway,
    start_mlflow,
)
from guard.identity.base import Credentials, Principal
from guard.identity.ldap import LdapConfig, LdapProvider
from guard.identity.throttle import LoginThrottle
from guard.store.db import build_engine, migrate
from tests.slapd import Slapd

TARGET = 0.90
USER, PASSWORD = "alice", "alice-password"
MAX_LOGINS = 2000  # in-process uncached logins per variant, at most


def ldap_env(slapd: Slapd, cache_ttl: str) -> dict[str, str]:
    return {
        "MLFLOW_GUARD_LDAP_URLS": slapd.url,
        "MLFLOW_GUARD_LDAP_BIND_DN": slapd.service_dn,
        "MLFLOW_GUARD_LDAP_BIND_PASSWORD": slapd.service_password,
        "MLFLOW_GUARD_LDAP_USER_BASE": slapd.people_base,
        "MLFLOW_GUARD_LDAP_USE_MEMBEROF": "true",
        "MLFLOW_GUARD_LDAP_CACHE_TTL": cache_ttl,
    }


def in_process_login_ms(slapd: Slapd, home: Path, seconds: float) -> dict[str, float]:
    """Median ms of one uncached LdapProvider.authenticate, without and with the throttle."""
    engine = build_engine(f"sqlite:///{home / 'throttle.db'}")
    migrate(engine)
    config = LdapConfig(
        urls=(slapd.url,), bind_dn=slapd.service_dn, bind_password=slapd.service_password,
        user_base=slapd.people_base, use_memberof=True, cache_ttl=0.0,
    )  # fmt: skip
    variants = {
        "no throttle": LdapProvider(config),
        "throttle (SQLite)": LdapProvider(
            config, throttle=LoginThrottle(engine, b"k" * 40, limit=3, interval=1800)
        ),
    }
    credentials = Credentials("basic", PASSWORD, USER, "127.0.0.1")
    results: dict[str, float] = {}
    for label, provider in variants.items():

        async def measure(provider: LdapProvider = provider) -> list[float]:
            times: list[float] = []
            stop_at = time.monotonic() + seconds
            while time.monotonic() < stop_at and len(times) < MAX_LOGINS:
                started = time.perf_counter()
                result = await provider.authenticate(credentials)
                times.append(time.perf_counter() - started)
                if not isinstance(result, Principal):
                    raise SystemExit(f"the in-process login failed: {result}")
            return times

        results[label] = statistics.median(asyncio.run(measure())) * 1000
        provider.close()
    engine.dispose()
    return results


def main() -> int:
    repeats, seconds = rounds(5, 2.0)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=seconds, help="length of each run")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--levels", default="1,8")
    args = parser.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    report = Report("ldap")
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="guard-bench-ldap-") as tmp:
        home = Path(tmp)
        (home / "mlflow").mkdir()
        print("starting slapd, MLflow and two gateways (LDAP cached, uncached) ...", flush=True)
        slapd = Slapd(free_port())
        stack.callback(slapd.stop)
        slapd.start()
        mlflow = start_mlflow(stack, home / "mlflow")
        cached, _ = start_gateway(stack, home / "cached", mlflow, **ldap_env(slapd, "60s"))
        uncached, _ = start_gateway(stack, home / "uncached", mlflow, **ldap_env(slapd, "0s"))
        for name in ("cached", "uncached"):
            cli(home / name, "policy", "add", "p, user:alice, editor, experiment:*")
        token = cli(
            home / "cached", "token", "create", "--name", "bench-user", "--role", "editor",
            "--resource", "experiment:*", "--quiet",
        )  # fmt: skip
        time.sleep(2.5)  # both gateways pick the new policy up (authz.poll_interval)
        mix = mlflow_mix(cached)
        basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        paths = {
            "direct MLflow": (mlflow, None),
            "token (Bearer)": (cached, bearer(token)),
            "LDAP Basic, cached": (cached, basic),
            "LDAP Basic, uncached": (uncached, basic),
        }
        print(f"\n== {args.repeats} interleaved runs of {args.seconds:g} s per level and path, "
              "medians ==")  # fmt: skip
        print(f"{'c':>3} {'path':<22} {'rps':>8} {'p50 ms':>7} {'/direct':>8} {'/token':>7} "
              f"{'errors':>6}")  # fmt: skip
        for c in levels:
            runs: dict[str, list[Run]] = {label: [] for label in paths}
            for r in range(args.repeats):
                for label in rotated(list(paths), r):
                    base, authorization = paths[label]
                    runs[label].append(run_load(base, mix, c, args.seconds, authorization))
            rps = {label: statistics.median(r.rps for r in rs) for label, rs in runs.items()}
            for label, rs in runs.items():
                p50 = statistics.median(r.quantile(0.5) for r in rs) * 1000
                errors = sum(r.errors for r in rs)
                print(f"{c:>3} {label:<22} {rps[label]:>8.1f} {p50:>7.2f} "
                      f"{rps[label] / rps['direct MLflow']:>8.2f} "
                      f"{rps[label] / rps['token (Bearer)']:>7.2f} {errors:>6}")  # fmt: skip
            pairs = list(zip(runs["token (Bearer)"], runs["LDAP Basic, cached"], strict=True))
            report.add(Figure(f"MLflow, c={c}: cached LDAP Basic / token rps",
                              [b.rps / t.rps for t, b in pairs], "x", TARGET))  # fmt: skip
            if c == 1:
                pairs = list(zip(runs["token (Bearer)"], runs["LDAP Basic, uncached"],
                                 strict=True))  # fmt: skip
                report.add(Figure("MLflow, c=1: an uncached login (added p50)",
                                  [(u.quantile(0.5) - t.quantile(0.5)) * 1000 for t, u in pairs],
                                  "ms"))  # fmt: skip
        print()
        for label, ms in in_process_login_ms(slapd, home, min(args.seconds, 2.0)).items():
            print(f"one uncached login in process ({label}): {ms:.2f} ms")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
