"""Dump every (method, path) pair the installed MLflow server serves, and check the route table.

Usage (from the repository root, with the project venv)::

    .venv/bin/python tests/dump_mlflow_routes.py            # JSON list on stdout, counts on stderr
    .venv/bin/python tests/dump_mlflow_routes.py --check    # also check guard/route_table.toml

Importable: ``dump_routes() -> list[dict]`` and ``check_table() -> list[str]`` (problems found).

What is introspected (nothing is started, no socket is opened):

* (a) the Flask ``url_map`` of ``mlflow.server.app`` -- Werkzeug rule strings such as
  ``/api/2.0/mlflow/logged-models/<model_id>``; HEAD and OPTIONS (added implicitly by Flask)
  are left out;
* (b) the native FastAPI routes of ``mlflow.server.fastapi_app:app``, the app ``mlflow server``
  serves under uvicorn (no ``--app-name``). Since FastAPI 0.16x, ``include_router`` stores lazy
  ``_IncludedRouter`` entries in ``app.routes`` instead of copying the routes, so they are
  expanded with ``fastapi.routing.iter_route_contexts`` (which yields every effective route with
  its full prefixed path, e.g. ``/v1/traces``); the catch-all ``Mount("/")`` of the Flask app is
  not a route of its own and is skipped.

The default surface is dumped: ``_MLFLOW_STATIC_PREFIX`` and the Prometheus exporter variable are
removed from the environment before MLflow is imported (``--static-prefix`` prefixes every route
except the native artifact router; ``--expose-prometheus`` adds ``/metrics``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

IGNORED_METHODS = frozenset({"HEAD", "OPTIONS"})
TABLE_PATH = Path(__file__).resolve().parent.parent / "guard" / "route_table.toml"

KINDS = frozenset(
    {
        "experiment", "run", "logged_model", "registered_model", "model_version", "trace",
        "dataset", "artifact", "scorer", "prompt_optimization", "webhook", "gateway", "job",
        "assistant", "workspace", "user_admin", "server",
    }
)  # fmt: skip
ACTIONS = frozenset({"read", "create", "update", "delete", "manage", "promote"})
ROW_KEYS = frozenset(
    {"method", "path", "kind", "id_from", "action", "open", "refuse", "why", "note"}
)


def _default_environment() -> None:
    # Must run before mlflow.server is first imported (routes are registered at import time).
    # = mlflow.server.handlers.STATIC_PREFIX_ENV_VAR and
    #   mlflow.server.constants.PROMETHEUS_EXPORTER_ENV_VAR
    for name in ("_MLFLOW_STATIC_PREFIX", "prometheus_multiproc_dir"):
        os.environ.pop(name, None)


def _flask_routes() -> list[dict[str, str]]:
    from mlflow.server import app as flask_app

    routes = []
    for rule in flask_app.url_map.iter_rules():
        for method in sorted((rule.methods or set()) - IGNORED_METHODS):
            routes.append({"method": method, "path": rule.rule, "source": "flask"})
    return routes


def _iter_fastapi_routes(app: Any) -> list[tuple[str, set[str] | None, str]]:
    """(path, methods, route type) of every effective route, included routers expanded."""
    from starlette.routing import Mount

    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before lazy included routers: app.routes is already flat
        return [
            (r.path, getattr(r, "methods", None), type(r).__name__)
            for r in app.router.routes
            if not isinstance(r, Mount)
        ]

    found = []
    low_priority = list(getattr(app.router, "_low_priority_routes", []))
    for route in app.router.routes:
        if hasattr(route, "effective_low_priority_routes"):
            low_priority.extend(route.effective_low_priority_routes())
    for context in [*iter_route_contexts(app.router.routes), *iter_route_contexts(low_priority)]:
        if isinstance(context.original_route, Mount):
            continue  # the Flask app mounted at "/" (its rules are dumped from the url_map)
        found.append((context.path, context.methods, type(context.original_route).__name__))
    return found


def _fastapi_routes() -> list[dict[str, str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette.middleware.wsgi deprecation
        from mlflow.server.fastapi_app import app

    routes = []
    for path, methods, route_type in _iter_fastapi_routes(app):
        if not path:
            raise RuntimeError(f"FastAPI route without a path: {route_type}")
        if methods is None:  # a WebSocket route: none exist in MLflow 3.17; keep it visible
            methods = {"WEBSOCKET"}
        for method in sorted(set(methods) - IGNORED_METHODS):
            routes.append({"method": method, "path": path, "source": "fastapi"})
    return routes


def dump_routes() -> list[dict[str, str]]:
    """Every (method, path) pair the installed MLflow server serves, sorted by path then method.

    Each dict is ``{"method", "path", "source": "flask" | "fastapi"}``. A pair served by both a
    native FastAPI route and the Flask mount (``/health``, server-info) appears once per source,
    since the two are different handlers (the FastAPI one wins under uvicorn).
    """
    _default_environment()
    seen: set[tuple[str, str, str]] = set()
    routes = []
    for route in [*_flask_routes(), *_fastapi_routes()]:
        key = (route["method"], route["path"], route["source"])
        if key not in seen:
            seen.add(key)
            routes.append(route)
    routes.sort(key=lambda r: (r["path"], r["method"], r["source"]))
    return routes


def load_table(path: Path = TABLE_PATH) -> list[dict[str, Any]]:
    with path.open("rb") as f:
        return list(tomllib.load(f).get("route", []))


def check_table(path: Path = TABLE_PATH, routes: list[dict[str, str]] | None = None) -> list[str]:
    """Problems with the route table: every dumped (method, path) needs exactly one valid row."""
    routes = dump_routes() if routes is None else routes
    rows = load_table(path)
    problems: list[str] = []
    wanted = {(r["method"], r["path"]) for r in routes}
    count: Counter[tuple[str, str]] = Counter()
    for i, row in enumerate(rows):
        where = f"row {i} ({row.get('method')} {row.get('path')})"
        count[(row.get("method"), row.get("path"))] += 1  # type: ignore[index]
        if set(row) - ROW_KEYS:
            problems.append(f"{where}: unknown keys {sorted(set(row) - ROW_KEYS)}")
        for key in ("method", "path", "kind", "id_from", "action"):
            if not isinstance(row.get(key), str) or not row[key]:
                problems.append(f"{where}: missing {key}")
        if row.get("kind") not in KINDS:
            problems.append(f"{where}: bad kind {row.get('kind')!r}")
        if row.get("action") not in ACTIONS:
            problems.append(f"{where}: bad action {row.get('action')!r}")
        for flag in ("open", "refuse"):
            if flag in row and not isinstance(row[flag], bool):
                problems.append(f"{where}: {flag} must be a boolean")
        if row.get("open") and row.get("refuse"):
            problems.append(f"{where}: both open and refuse")
        if (row.get("open") or row.get("refuse")) and not row.get("why"):
            problems.append(f"{where}: open/refuse row without 'why'")
        if (row.get("method"), row.get("path")) not in wanted:
            problems.append(f"{where}: not served by the installed MLflow")
    for key in sorted(wanted, key=lambda k: (k[1], k[0])):
        if count[key] != 1:
            problems.append(f"{key[0]} {key[1]}: {count[key]} rows (want exactly 1)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help=f"also check {TABLE_PATH.name}")
    args = parser.parse_args(argv)

    routes = dump_routes()
    json.dump(routes, sys.stdout, indent=1)
    sys.stdout.write("\n")
    by_source = Counter(r["source"] for r in routes)
    pairs = {(r["method"], r["path"]) for r in routes}
    print(
        f"flask: {by_source['flask']}  fastapi: {by_source['fastapi']}  "
        f"total: {len(routes)}  distinct (method, path): {len(pairs)}",
        file=sys.stderr,
    )
    if not args.check:
        return 0
    problems = check_table(routes=routes)
    for problem in problems:
        print(f"route_table: {problem}", file=sys.stderr)
    print(f"route_table: {len(load_table())} rows, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
