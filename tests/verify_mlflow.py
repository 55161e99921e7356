"""Compare an MLflow release with the route table: the first step when MLflow releases.

Usage (``make verify-mlflow VERSION=x.y.z`` builds the release's throwaway venv and runs this)::

    .venv/bin/python tests/verify_mlflow.py --python VENV/bin/python [--release x.y.z]

Runs ``tests/dump_mlflow_routes.py`` under the release's interpreter and under the project's
(the installed 3.17.2, the baseline), and prints:

* every (method, path) pair the release serves that has no row for it in
  ``guard/authz/route_table.toml`` (rows whose since/until exclude the release do not count);
* every pair that disappeared: served by the newest checked-in release list
  (``tests/mlflow_routes/<release>.txt``) below the release, not by the release;
* every field whose reading changed, as far as introspection sees it (``--fields`` of the dump):
  protobuf messages whose fields (name, number, type, repeated) differ, native FastAPI routes
  whose parameters or body-model fields differ, and Flask routes whose view function's source
  changed (to read: a changed handler may read a new field or read one differently).

With ``--write-list`` (``make verify-mlflow VERSION=x.y.z WRITE=1``) the release's pairs are
written to ``tests/mlflow_routes/<release>.txt``, the list the tests then hold the table to.

Exit status 1 when any pair lacks a row or disappeared, so CI can use it; changed readings are
for review and do not fail it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guard.authz.routes import load_routes, release_key, routes_for  # noqa: E402

DUMP = ROOT / "tests" / "dump_mlflow_routes.py"
LISTS = ROOT / "tests" / "mlflow_routes"


def _run(python: str, *args: str) -> str:
    result = subprocess.run(
        [python, "-W", "ignore", str(DUMP), *args],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return result.stdout


def checked_in() -> dict[str, set[tuple[str, str]]]:
    """Every checked-in release list: release -> {(method, path)}."""
    lists = {}
    for path in LISTS.glob("[0-9]*.txt"):
        lines = path.read_text().splitlines()
        lists[path.stem] = {tuple(line.split(" ", 1)) for line in lines if line}  # type: ignore[misc]
    return lists


def _version(python: str) -> str:
    return subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('mlflow'))"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--python", required=True, help="the release's venv interpreter")
    parser.add_argument("--baseline", default=sys.executable, help="the installed MLflow's")
    parser.add_argument(
        "--write-list", action="store_true", help="write tests/mlflow_routes/<release>.txt"
    )
    args = parser.parse_args()
    release, baseline = _version(args.python), _version(args.baseline)
    listed = _run(args.python, "--pairs")
    served = {tuple(line.split(" ", 1)) for line in listed.splitlines() if line}
    if args.write_list:
        (LISTS / f"{release}.txt").write_text(listed)
        print(f"wrote tests/mlflow_routes/{release}.txt")
    rows = {(r.method, r.path) for r in routes_for(load_routes(), release)}
    print(f"MLflow {release}: {len(served)} (method, path) pairs; table rows for it: {len(rows)}")

    lacking = sorted(served - rows)
    print(f"\n== pairs the table lacks for {release}: {len(lacking)}")
    for method, path in lacking:
        print(f"  {method} {path}")
    extra = sorted(rows - served)
    print(
        f'\n== rows for {release} that it does not serve (need until = "{release}"): {len(extra)}'
    )
    for method, path in extra:
        print(f"  {method} {path}")

    lists = checked_in()
    older = [v for v in lists if release_key(v) < release_key(release)]
    previous = max(older, key=release_key) if older else None
    gone = sorted(lists[previous] - served) if previous else []
    print(f"\n== pairs that disappeared since {previous}: {len(gone)}")
    for method, path in gone:
        print(f"  {method} {path}")

    old = json.loads(_run(args.baseline, "--fields"))
    new = json.loads(_run(args.python, "--fields"))
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    print(f"\n== readings that changed between {baseline} and {release}: {len(changed)}")
    for key in changed:
        if key.startswith("handler:"):
            print(f"  {key}: handler source changed (read it)")
            continue
        added, removed = (
            sorted(set(new[key]) - set(old[key])),
            sorted(set(old[key]) - set(new[key])),
        )
        print(f"  {key}: +{added} -{removed}")
    for label, keys in (("new", new.keys() - old.keys()), ("removed", old.keys() - new.keys())):
        kinds = sorted(k for k in keys if not k.startswith("handler:"))
        print(f"\n== {label} messages and native routes: {len(kinds)}")
        for key in kinds:
            print(f"  {key}: {new.get(key, old.get(key))}")
    return 1 if lacking or gone or extra else 0


if __name__ == "__main__":
    sys.exit(main())
