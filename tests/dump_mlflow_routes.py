"""Dump every (method, path) pair the installed MLflow server serves, and check the route table.

Usage (from the repository root, with the project venv)::

    .venv/bin/python tests/dump_mlflow_routes.py           # JSON list on stdout, counts on stderr
    .venv/bin/python tests/dump_mlflow_routes.py --pairs   # "METHOD PATH" lines, sorted, distinct
    .venv/bin/python tests/dump_mlflow_routes.py --fields  # JSON: what each route reads (below)

``--pairs`` is what is checked in as ``tests/mlflow_routes/<release>.txt``.

``--fields`` is what ``make verify-mlflow`` compares between two releases to find fields whose
reading changed: (1) every protobuf message of ``mlflow.protos`` (the request messages Flask
handlers parse with ``_get_request_message``), as its fields' ``name number type label``;
(2) every native FastAPI route's parameters (``query:name``, ``path:name``, ``body:name``, and
a pydantic body model's field names); (3) per Flask (method, path), the SHA-256 of its view
function's source, so a handler whose code changed (a new field read from ``request.args`` or
``_get_validated_flask_request_json``, a changed default) is listed for review.

Importable: ``dump_routes() -> list[dict]``. ``tests/unit/authz/test_routes.py`` runs it and fails
if any route lacks a row in ``guard/authz/route_table.toml``.

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

import json
import os
import sys
import warnings
from collections import Counter
from typing import Any

IGNORED_METHODS = frozenset({"HEAD", "OPTIONS"})

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


def pair_lines(routes: list[dict[str, str]]) -> list[str]:
    """The distinct "METHOD PATH" lines of a dump, sorted: the checked-in per-release list."""
    return sorted({f"{r['method']} {r['path']}" for r in routes})


def _repeated(field: Any) -> str:
    repeated = getattr(field, "is_repeated", None)
    if repeated is None:
        repeated = getattr(field, "label", 0) == 3  # LABEL_REPEATED
    return "repeated" if repeated else "single"


def _proto_fields() -> dict[str, list[str]]:
    import importlib
    import pkgutil

    import mlflow.protos

    found: dict[str, list[str]] = {}

    def walk(message: Any) -> None:
        found["proto:" + message.full_name] = sorted(
            f"{f.name} {f.number} {f.type} {_repeated(f)}" for f in message.fields
        )
        for nested in message.nested_types:
            walk(nested)

    for module in pkgutil.iter_modules(mlflow.protos.__path__):
        if not module.name.endswith("_pb2"):
            continue
        try:
            loaded = importlib.import_module(f"mlflow.protos.{module.name}")
        except ImportError:
            continue
        for message in loaded.DESCRIPTOR.message_types_by_name.values():
            walk(message)
    return found


def _fastapi_params() -> dict[str, list[str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.routing import APIRoute
        from mlflow.server.fastapi_app import app
    from fastapi.routing import iter_route_contexts

    found: dict[str, list[str]] = {}
    for context in iter_route_contexts(app.router.routes):
        route = context.original_route
        if not isinstance(route, APIRoute):
            continue
        dependant = route.dependant
        params = [f"query:{p.name}" for p in dependant.query_params]
        params += [f"path:{p.name}" for p in dependant.path_params]
        params += [f"header:{p.name}" for p in dependant.header_params]
        for body in dependant.body_params:
            params.append(f"body:{body.name}")
            model_fields = getattr(getattr(body, "type_", None), "model_fields", None) or {}
            params += [f"body:{body.name}.{name}" for name in model_fields]
        for method in sorted(set(context.methods or ()) - IGNORED_METHODS):
            found[f"fastapi:{method} {context.path}"] = sorted(params)
    return found


def _flask_handlers() -> dict[str, list[str]]:
    import hashlib
    import inspect

    from mlflow.server import app as flask_app

    found: dict[str, list[str]] = {}
    for rule in flask_app.url_map.iter_rules():
        view = flask_app.view_functions.get(rule.endpoint)
        view = inspect.unwrap(view) if view is not None else None
        try:
            source = inspect.getsource(view) if view is not None else ""
        except (OSError, TypeError):
            source = repr(view)
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        for method in sorted((rule.methods or set()) - IGNORED_METHODS):
            found.setdefault(f"handler:{method} {rule.rule}", []).append(digest)
    return found


def dump_fields() -> dict[str, list[str]]:
    """What each route reads, for comparing two releases (see the module docstring)."""
    _default_environment()
    return _proto_fields() | _fastapi_params() | _flask_handlers()


def main() -> int:
    if "--fields" in sys.argv[1:]:
        json.dump(dump_fields(), sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    routes = dump_routes()
    if "--pairs" in sys.argv[1:]:
        sys.stdout.write("".join(line + "\n" for line in pair_lines(routes)))
        return 0
    json.dump(routes, sys.stdout, indent=1)
    sys.stdout.write("\n")
    by_source = Counter(r["source"] for r in routes)
    pairs = {(r["method"], r["path"]) for r in routes}
    print(
        f"flask: {by_source['flask']}  fastapi: {by_source['fastapi']}  "
        f"total: {len(routes)}  distinct (method, path): {len(pairs)}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
