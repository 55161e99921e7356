"""Machine logins with identity-provider JWTs against the token path and direct MLflow, in one
run (``make bench``).

Starts the tests' throwaway OpenID Connect provider (tests/idp.py, oidc-provider under node), a
lean MLflow server and a gateway in front of it that trusts the provider for bearer tokens
(``[[oidc.bearer]]`` alias ``ci``, audience ``urn:mlflow-guard``). The same request mix as
bench.proxy runs over keep-alive connections directly against MLflow, through the gateway with
a gateway token (Bearer ``mlg_``) and with a client-credentials JWT from the provider (Bearer
JWT), interleaved (taking turns going first), at each concurrency level, ``--repeats`` times;
the medians are printed as throughput ratios; the same again through a second gateway in front
of a no-op upstream (bench.noop), where MLflow's own time and noise do not hide the gateway's
cost. Both identities hold the same grant (editor on experiment:*), so only the way of logging
in differs. Each run gets a fresh JWT (its first verification falls in the warm-up:
the measured requests are the cached hot path, as for a CI job's many calls with one token).

The cost of a verification the cache does not answer is printed in process:
``Issuer.verify_access_token`` with the keys cached (signature, header and claim checks), and
``BearerProvider.authenticate`` for a token already verified (the hot path: one SHA-256, one
dict lookup).

Target (issue 11): the bearer-JWT path keeps >= 0.90 of the token path's throughput (per pair
of runs; the median), against MLflow and against the no-op upstream.

Defaults: 5 interleaved runs of 2 s per level and path (about 2.5 minutes in all).
``BENCH_QUICK=1``: 2 runs of 1 s (for developing the harness; not for figures). Every loop is
bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from bench.common import (
    NOOP_MIX,
    Figure,
    Report,
    Request,
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
    start_noop,
)
from guard.identity.base import Credentials, Principal
from guard.identity.bearer import BearerIssuer, BearerProvider
from guard.identity.oidc import Issuer, ProviderHttp
from tests.idp import OidcProvider

TARGET = 0.90
ALIAS = "ci"
TOKEN_PATH = "token (Bearer mlg_)"  # noqa: S105 - a label
JWT_PATH = "IdP JWT (Bearer)"
MAX_VERIFICATIONS = 5000  # in-process verifications per variant, at most


def in_process_ms(idp: OidcProvider, seconds: float) -> dict[str, float]:
    """Median ms of one uncached verification and of one cached authentication."""

    async def measure() -> dict[str, float]:
        http = ProviderHttp()
        issuer = Issuer(idp.issuer, http=http)
        provider = BearerProvider(
            [BearerIssuer(ALIAS, issuer, idp.resource, groups_claim="groups")]
        )
        token = idp.token_for_robot()
        results: dict[str, float] = {}
        try:
            await issuer.verify_access_token(
                token, audience=idp.resource, algorithms=("RS256",), leeway=60
            )  # keys fetched once, outside the measurement
            times: list[float] = []
            stop_at = time.monotonic() + seconds
            while time.monotonic() < stop_at and len(times) < MAX_VERIFICATIONS:
                started = time.perf_counter()
                await issuer.verify_access_token(
                    token, audience=idp.resource, algorithms=("RS256",), leeway=60
                )
                times.append(time.perf_counter() - started)
            results["verify_access_token (keys cached)"] = statistics.median(times) * 1000
            credentials = Credentials("bearer", token)
            if not isinstance(await provider.authenticate(credentials), Principal):
                raise SystemExit("the in-process bearer login failed")
            times = []
            stop_at = time.monotonic() + seconds
            while time.monotonic() < stop_at and len(times) < MAX_VERIFICATIONS:
                started = time.perf_counter()
                await provider.authenticate(credentials)
                times.append(time.perf_counter() - started)
            results["BearerProvider.authenticate (cached)"] = statistics.median(times) * 1000
        finally:
            await http.close()
        return results

    return asyncio.run(measure())


Auth = str | None | Callable[[], str]  # a header, none, or one made per run (a fresh JWT)


def compare(
    title: str,
    paths: dict[str, tuple[str, Auth]],
    mix: list[Request],
    levels: list[int],
    repeats: int,
    seconds: float,
) -> dict[int, list[float]]:
    """Interleaved runs of every path; prints medians; returns JWT/token throughput per level
    (per run)."""
    print(f"\n== {title}: {repeats} interleaved runs of {seconds:g} s per level, medians ==")
    print(f"{'c':>3} {'path':<22} {'rps':>8} {'p50 ms':>7} {'/first':>7} {'/token':>7} "
          f"{'errors':>6}")  # fmt: skip
    first = next(iter(paths))
    ratios: dict[int, list[float]] = {}
    for c in levels:
        runs: dict[str, list[Run]] = {label: [] for label in paths}
        for r in range(repeats):
            for label in rotated(list(paths), r):
                base, auth = paths[label]
                header = auth() if callable(auth) else auth
                runs[label].append(run_load(base, mix, c, seconds, header))
        rps = {label: statistics.median(r.rps for r in rs) for label, rs in runs.items()}
        for label, rs in runs.items():
            p50 = statistics.median(r.quantile(0.5) for r in rs) * 1000
            errors = sum(r.errors for r in rs)
            print(f"{c:>3} {label:<22} {rps[label]:>8.1f} {p50:>7.2f} "
                  f"{rps[label] / rps[first]:>7.2f} {rps[label] / rps[TOKEN_PATH]:>7.2f} "
                  f"{errors:>6}")  # fmt: skip
        pairs = zip(runs[TOKEN_PATH], runs[JWT_PATH], strict=True)
        ratios[c] = [jwt.rps / token.rps for token, jwt in pairs]
    return ratios


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
    report = Report("oidc")
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="guard-bench-oidc-") as tmp:
        home = Path(tmp)
        (home / "mlflow").mkdir()
        print("starting the OpenID Connect provider, MLflow, a no-op upstream and two gateways",
              flush=True)  # fmt: skip
        idp = OidcProvider(free_port())
        stack.callback(idp.stop)
        idp.start()
        mlflow = start_mlflow(stack, home / "mlflow")
        noop = start_noop(stack, home)
        issuers = json.dumps([{"alias": ALIAS, "issuer": idp.issuer, "audience": idp.resource,
                              "groups_claim": "groups"}])  # fmt: skip
        gateways = {}
        tokens = {}
        for name, upstream in (("gateway", mlflow), ("noop-gw", noop)):
            gateways[name], _ = start_gateway(
                stack, home / name, upstream, MLFLOW_GUARD_OIDC_BEARER=issuers
            )
            cli(
                home / name,
                "policy",
                "add",
                f"p, client:{ALIAS}/mlflow-robot, editor, experiment:*",
            )
            tokens[name] = cli(
                home / name, "token", "create", "--name", "bench-ci", "--role", "editor",
                "--resource", "experiment:*", "--quiet",
            )  # fmt: skip
        time.sleep(2.5)  # the gateways pick the new policy up (authz.poll_interval)

        def jwt() -> str:  # a fresh JWT per run (600 s lifetime), verified in the warm-up
            return bearer(idp.token_for_robot())

        gateway = gateways["gateway"]
        verdicts = compare("MLflow", {
            "direct MLflow": (mlflow, None),
            TOKEN_PATH: (gateway, bearer(tokens["gateway"])),
            JWT_PATH: (gateway, jwt),
        }, mlflow_mix(gateway), levels, args.repeats, args.seconds)  # fmt: skip
        noop_verdicts = compare("no-op upstream (the gateway's own cost)", {
            "direct no-op": (noop, None),
            TOKEN_PATH: (gateways["noop-gw"], bearer(tokens["noop-gw"])),
            JWT_PATH: (gateways["noop-gw"], jwt),
        }, NOOP_MIX, levels, args.repeats, args.seconds)  # fmt: skip
        print()
        for label, ms in in_process_ms(idp, min(args.seconds, 2.0)).items():
            print(f"in process, {label}: {ms:.3f} ms")
    for title, results in (("MLflow", verdicts), ("no-op", noop_verdicts)):
        for c, ratios in results.items():
            report.add(Figure(f"{title}, c={c}: IdP JWT / token rps", ratios, "x", TARGET))
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
