"""Compare an MLflow release with the route table: the first step when MLflow releases.

Usage (``make verify-mlflow VERSION=x.y.z`` builds the release's throwaway venv and runs this)::

    .venv/bin/python tests/verify_mlflow.py --python VENV/bin/python [--write-list] [--diffs]

Runs ``tests/dump_mlflow_routes.py`` under the release's interpreter and under the project's
(the installed 3.17.2, the baseline), and prints:

* every (method, path) pair the release serves that has no row for it in
  ``guard/authz/route_table.toml`` (rows whose since/until exclude the release do not count);
* every pair that disappeared: served by the newest checked-in release list
  (``tests/mlflow_routes/<release>.txt``) below the release, not by the release;
* every field whose reading changed, as far as introspection sees it (``--fields`` of the dump):
  protobuf messages whose fields (name, number, type, repeated) differ, native FastAPI routes
  whose parameters or body-model fields differ;
* every handler whose source changed, grouped by function with the routes it serves: Flask view
  functions and native FastAPI endpoints with their dependencies (a native handler can change
  what it reads or refuses without any parameter changing, as 3.18's artifact PUT did). To
  read: a changed handler may read a new field or read one differently. ``--diffs`` prints each
  one's unified diff (what to review against the route table's rows).

With ``--write-list`` (``make verify-mlflow VERSION=x.y.z WRITE=1``) the release's pairs are
written to ``tests/mlflow_routes/<release>.txt``, the list the tests then hold the table to.

Exit status 1 when any pair lacks a row or disappeared, so CI can use it; changed readings are
for review and do not fail it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guard.authz.routes import load_routes, release_key, routes_for  # noqa: E402

DUMP = ROOT / "tests" / "dump_mlflow_routes.py"
# Run under each release's interpreter: every handler's function and source, by "METHOD path"
# (the paths as the route table spells them), Flask's url_map and the native FastAPI routes.
HANDLERS = r"""
import inspect, json, os, sys, warnings
warnings.simplefilter("ignore")
for name in ("_MLFLOW_STATIC_PREFIX", "prometheus_multiproc_dir"):
    os.environ.pop(name, None)
from mlflow.server import app as flask_app
from mlflow.server.fastapi_app import app

def source(function):
    function = inspect.unwrap(function)
    try:
        text = inspect.getsource(function)
    except (OSError, TypeError):
        text = repr(function)
    return f"{function.__module__}.{function.__qualname__}", text

found = {}
for rule in flask_app.url_map.iter_rules():
    view = flask_app.view_functions.get(rule.endpoint)
    if view is not None:
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            found[f"flask {method} {rule.rule}"] = source(view)
try:
    from fastapi.routing import APIRoute, iter_route_contexts
    low = list(getattr(app.router, "_low_priority_routes", []))
    for route in app.router.routes:
        if hasattr(route, "effective_low_priority_routes"):
            low.extend(route.effective_low_priority_routes())
    contexts = [(c.original_route, c.path, c.methods)
                for c in [*iter_route_contexts(app.router.routes), *iter_route_contexts(low)]]
except ImportError:
    from fastapi.routing import APIRoute
    contexts = [(r, r.path, getattr(r, "methods", None)) for r in app.router.routes]
for route, path, methods in contexts:
    if isinstance(route, APIRoute):
        name, text = source(route.endpoint)
        for dependency in route.dependant.dependencies:
            text += "\n# depends on\n" + source(dependency.call)[1]
        for method in sorted(set(methods or ()) - {"HEAD", "OPTIONS"}):
            found[f"native {method} {path}"] = (name, text)
json.dump(found, sys.stdout)
"""
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


def _handlers(python: str) -> dict[str, tuple[str, str]]:
    """ "flask|native METHOD path" -> (function, source) of every handler ``python``'s MLflow
    serves."""
    result = subprocess.run(
        [python, "-c", HANDLERS], capture_output=True, text=True, check=True, timeout=300
    )
    return {k: (v[0], v[1]) for k, v in json.loads(result.stdout).items()}


def changed_handlers(
    old: dict[str, tuple[str, str]], new: dict[str, tuple[str, str]]
) -> dict[str, tuple[list[str], str, str]]:
    """function -> (routes, old source, new source) for every handler whose source changed."""
    found: dict[str, tuple[list[str], str, str]] = {}
    for key in sorted(old.keys() & new.keys()):
        if old[key][1] != new[key][1]:
            routes, _, _ = found.setdefault(new[key][0], ([], old[key][1], new[key][1]))
            routes.append(key)
    return found


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
    parser.add_argument(
        "--diffs", action="store_true", help="print the diff of every changed handler's source"
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
    # Handler sources are compared below, by function (the dump's "handler:" keys say less).
    changed = sorted(
        k for k in old.keys() & new.keys() if old[k] != new[k] and not k.startswith("handler:")
    )
    print(f"\n== readings that changed between {baseline} and {release}: {len(changed)}")
    for key in changed:
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

    handlers = changed_handlers(_handlers(args.baseline), _handlers(args.python))
    count = sum(len(routes) for routes, _, _ in handlers.values())
    print(
        f"\n== handlers whose source changed between {baseline} and {release}: "
        f"{len(handlers)} functions serving {count} routes (read each against its rows)"
    )
    for function, (routes, before, after) in sorted(handlers.items()):
        print(f"  {function}")
        for route in routes:
            print(f"      {route}")
        if args.diffs:
            diff = difflib.unified_diff(
                before.splitlines(True), after.splitlines(True), baseline, release, n=2
            )
            print("".join("        " + line for line in diff).rstrip())
    return 1 if lacking or gone or extra else 0


if __name__ == "__main__":
    sys.exit(main())
