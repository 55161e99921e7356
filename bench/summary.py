"""The one-screen summary at the end of ``make bench``: every module's figures in one table.

Each bench module (bench.authz, bench.proxy, bench.workers, bench.audit, bench.ldap,
bench.oidc) writes its figures as ``<module>.json`` into the directory named by the
``BENCH_RESULTS`` environment variable (bench/common.py's ``Report``); this reads them back
and prints figure, median, spread (min..max over the interleaved runs), target and whether the
median meets it. Targets appear only for figures that have one; a module that wrote nothing is
named as missing. The exit status is 0 whether targets are met or not (the table is the
report); 2 if the directory holds no results at all.

Usage: ``python -m bench.summary [DIRECTORY]`` (default: $BENCH_RESULTS, else build/bench).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench.common import Figure, table

ORDER = ("proxy", "workers", "audit", "authz", "ldap", "oidc")


def read(directory: Path) -> list[dict[str, Any]]:
    """The results in ``directory``, in ORDER (then any others, by name)."""
    found = {path.stem: json.loads(path.read_text()) for path in directory.glob("*.json")}
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    return [found[n] for n in names]


def lines(results: list[dict[str, Any]]) -> list[str]:
    rows: list[tuple[str, Figure]] = []
    for result in results:
        for raw in result["figures"]:
            figure = Figure(**raw)
            rows.append((f"{result['module']}: {figure.name}", figure))
    out = table(rows)
    width = max(len(line) for line in out)
    targets = [f for _, f in rows if f.met is not None]
    met = sum(1 for f in targets if f.met)
    seconds = sum(float(r["seconds"]) for r in results)
    out.insert(1, "-" * width)
    out.append("-" * width)
    out.append(f"{met} of {len(targets)} targets met; medians of interleaved runs, spread "
               f"min..max over them; modules took {seconds / 60:.1f} min")  # fmt: skip
    out.append("(" + ", ".join(f"{r['module']} {float(r['seconds']):.0f} s" for r in results) + ")")
    out.extend(f"{name}: {figure.note}" for name, figure in rows if figure.note)
    if any(len(f.values) == 1 for _, f in rows):
        out.append("min..max '-': one run (a rate over many operations)")
    missing = [n for n in ORDER if n not in {r["module"] for r in results}]
    if missing:
        out.append(f"no results from: {', '.join('bench.' + n for n in missing)}")
    if any(r.get("quick") for r in results):
        out.append("QUICK MODE (BENCH_QUICK): too few and too short runs to report these figures")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", nargs="?",
                        default=os.environ.get("BENCH_RESULTS", "build/bench"))  # fmt: skip
    args = parser.parse_args()
    results = read(Path(args.directory))
    if not results:
        print(f"no bench results in {args.directory}", file=sys.stderr)
        return 2
    print("\n== make bench: summary ==")
    print("\n".join(lines(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
