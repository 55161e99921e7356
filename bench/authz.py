"""Decision cost at 1k, 10k and 100k policy rows: the gateway's index against plain casbin.

Prints p50/p99 per decision for the index and for casbin's ``enforce_ex`` (which scans every
row), the index build time, and the index's p99 while another thread rebuilds it, as a policy
reload does. Target (issue 3): index p99 under 100 us at 100k rows (and so at every size).
Bounded: a fixed number of questions per size (20,000 for the index, asked ``--repeats``
times: the p99 of each run, their median and spread; casbin: 200 questions or 5 s per size,
whichever ends first).
``BENCH_QUICK=1``: 1k and 10k rows only (for developing the harness).
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from functools import partial

from bench.common import Figure, Report, quick
from guard.authz.casbin_adapter import build_enforcer, casbin_decide, default_policy_text
from guard.authz.engine import PolicyIndex
from guard.authz.policy import ACTIONS, Grant, Membership, PolicySet

TARGET_P99_US = 100.0


def make_policy(rows: int, rng: random.Random) -> tuple[PolicySet, list[tuple[str, str, str]]]:
    """A realistic shape: many users with a few grants each, teams as groups, some denies."""
    base = PolicySet.from_csv(default_policy_text())
    roles = sorted(base.role_names())
    users = [f"user:u{i}" for i in range(max(10, rows // 4))]
    groups = [f"group:team{i}" for i in range(max(5, rows // 100))]
    memberships = {Membership(rng.choice(users), rng.choice(groups)) for _ in range(rows // 5)}
    grants = set()
    while len(grants) + len(memberships) < rows:
        subject = rng.choice(users) if rng.random() < 0.8 else rng.choice(groups)
        team = rng.randrange(len(groups))
        resource = rng.choice([
            f"experiment:team{team}/*", f"experiment:team{team}/exp-{rng.randrange(50)}",
            f"model:team{team}-*", f"model:team{team}-model-{rng.randrange(20)}",
        ])  # fmt: skip
        effect = "deny" if rng.random() < 0.05 else "allow"
        grants.add(Grant(subject, rng.choice(roles), resource, effect))  # type: ignore[arg-type]
    policy = PolicySet(frozenset(grants), frozenset(memberships), base.roles)
    questions = []
    for _ in range(20000):
        team = rng.randrange(len(groups))
        resource = rng.choice(
            [f"experiment:team{team}/exp-{rng.randrange(50)}", f"model:team{team}-model-1"]
        )
        questions.append((rng.choice(users), resource, rng.choice(ACTIONS)))
    return policy, questions


def timed(decide, questions: list[tuple[str, str, str]], max_seconds: float = 60.0) -> list[float]:  # type: ignore[no-untyped-def]
    """Microseconds per decision, for each question until ``max_seconds`` have passed."""
    samples = []
    stop_at = time.monotonic() + max_seconds
    for question in questions:
        if time.monotonic() > stop_at:
            break
        started = time.perf_counter_ns()
        decide(*question)
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


def rebuild(policy: PolicySet, stop: threading.Event) -> None:
    """What a reload does off the request path, over and over."""
    while not stop.is_set():
        PolicyIndex(policy)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,10000" if quick() else "1000,10000,100000")
    parser.add_argument("--repeats", type=int, default=5, help="runs of the index's questions")
    parser.add_argument("--casbin-questions", type=int, default=200)
    parser.add_argument("--casbin-seconds", type=float, default=5.0,
                        help="at most this long asking casbin, per size")  # fmt: skip
    args = parser.parse_args()
    rng = random.Random(7)
    print(f"{'rows':>7} {'build ms':>9} {'index p50 us':>13} {'index p99 us':>13} "
          f"{'reload p99 us':>14} {'casbin p50 us':>14} {'casbin p99 us':>14}")  # fmt: skip
    report = Report("authz")
    for size in (int(s) for s in args.sizes.split(",")):
        policy, questions = make_policy(size, rng)
        started = time.perf_counter()
        index = PolicyIndex(policy)
        build_ms = (time.perf_counter() - started) * 1000
        timed(index.decide, questions[:2000])  # warm the memo caches, as traffic does
        p99s = []
        for _ in range(args.repeats):  # the steady p99 once per run (~0.1 s each)
            steady = timed(index.decide, questions)
            p99s.append(pct(steady, 0.99))

        stop = threading.Event()
        builder = threading.Thread(target=rebuild, args=(policy, stop), daemon=True)
        builder.start()
        during = timed(index.decide, questions[:5000])
        stop.set()
        builder.join()

        enforcer = build_enforcer(policy)
        reference = timed(partial(casbin_decide, enforcer), questions[: args.casbin_questions],
                          args.casbin_seconds)  # fmt: skip
        print(f"{size:>7} {build_ms:>9.0f} {statistics.median(steady):>13.1f} "
              f"{statistics.median(p99s):>13.1f} {pct(during, 0.99):>14.1f} "
              f"{statistics.median(reference):>14.0f} {pct(reference, 0.99):>14.0f}")  # fmt: skip
        report.add(Figure(f"decision index p99, {size} policy rows", p99s, "us",
                          TARGET_P99_US, at_least=False))  # fmt: skip
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
