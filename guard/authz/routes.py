"""The MLflow route table (``route_table.toml``) and the layer that applies it.

Every (method, path) the installed MLflow serves has one row: the resource kind it acts on,
where MLflow reads the resource's id, the action it needs, and whether it is open to any
authenticated caller or refused outright. A request is matched on its canonical path, which is
also what gets forwarded, so the decision is made on exactly the string MLflow routes on. What
matches no row is refused with ``route_not_classified`` and never reaches MLflow.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Final, Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from guard.authz.policy import ACTIONS
from guard.errors import Refusal, send_refusal

KINDS: Final = frozenset(
    {
        "experiment", "run", "logged_model", "registered_model", "model_version", "trace",
        "dataset", "artifact", "scorer", "prompt_optimization", "webhook", "gateway", "job",
        "assistant", "workspace", "user_admin", "server",
    }
)  # fmt: skip
# The MLflow releases whose routes the table was checked against (tests/unit/authz/test_routes.py).
VERIFIED_MLFLOW_VERSIONS: Final = frozenset({"3.17.2"})
# Dataset rows whose body also names the experiments being linked or unlinked (their notes).
DATASET_LINKS: Final = ("/add-experiments", "/remove-experiments")
_KEYS: Final = frozenset(
    {"method", "path", "kind", "id_from", "action", "open", "refuse", "why", "note", "body",
     "get_body"}
)  # fmt: skip
_PARAM: Final = re.compile(r"<(?:(path):)?(\w+)>|\{(\w+)(?::(path))?\}")


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # the template as MLflow declares it (Werkzeug <x> or Starlette {x})
    kind: str
    id_from: str
    action: str
    open: bool
    refuse: bool
    body: Literal["buffer", "stream"]
    why: str
    pattern: re.Pattern[str]
    literal: int  # characters outside parameters: more literal wins, as in Werkzeug
    # A GET whose MLflow handler reads a JSON body when the query string is empty: only such
    # a GET may carry a body through the gateway (guard/edge/bodies.py).
    get_body: bool = False

    @property
    def id_lists(self) -> tuple[str, tuple[str, ...]]:
        """(source, fields) of the lists of ids the resolver looks up for this route: the list
        its ``id_from`` names (``body:experiment_ids[]`` -> ("body", ("experiment_ids",)); a
        nested path counts the elements of its outer list,
        ``locations[].mlflow_experiment.experiment_id``), and the experiments a dataset is
        linked to or unlinked from. Other references in a body are counted where they are read
        (guard/authz/references.py). The edge's body layer counts them (guard/edge/bodies.py)."""
        return _id_lists(self)

    def params(self, path: str) -> dict[str, str] | None:
        match = self.pattern.fullmatch(path)
        return None if match is None else match.groupdict()


@cache
def _id_lists(route: Route) -> tuple[str, tuple[str, ...]]:
    source, _, spec = route.id_from.partition(":")
    key = spec.split("+", 1)[0]
    if route.kind == "dataset" and route.path.endswith(DATASET_LINKS):
        return "body", ("experiment_ids",)
    if source not in ("query", "body") or "[]" not in key:
        return source, ()
    if "." in key:
        return source, (key.split("[]", 1)[0],)
    return source, tuple(key.removesuffix("[]").split("|"))


def _compile(template: str) -> tuple[re.Pattern[str], int]:
    parts, literal, end = [], 0, 0
    for match in _PARAM.finditer(template):
        text = template[end : match.start()]
        parts.append(re.escape(text))
        literal += len(text)
        is_path = bool(match.group(1) or match.group(4))
        name = match.group(2) or match.group(3)
        parts.append(f"(?P<{name}>.+)" if is_path else f"(?P<{name}>[^/]+)")
        end = match.end()
    parts.append(re.escape(template[end:]))
    literal += len(template) - end
    return re.compile("".join(parts), re.DOTALL), literal


def load_routes(text: str | None = None) -> tuple[Route, ...]:
    """Parse and check the route table (the packaged one unless ``text`` is given)."""
    if text is None:
        text = resources.files("guard.authz").joinpath("route_table.toml").read_text()
    routes, problems = [], []
    for i, row in enumerate(tomllib.loads(text).get("route", [])):
        where = f"route {i} ({row.get('method')} {row.get('path')})"
        if unknown := set(row) - _KEYS:
            problems.append(f"{where}: unknown keys {sorted(unknown)}")
        path, method = row.get("path", ""), row.get("method", "")
        if not isinstance(path, str) or not path.startswith("/") or not method:
            problems.append(f"{where}: needs a method and a path starting with /")
            continue
        if row.get("kind") not in KINDS or row.get("action") not in ACTIONS:
            problems.append(f"{where}: unknown kind or action")
        if (row.get("open") or row.get("refuse")) and not row.get("why"):
            problems.append(f"{where}: open and refused rows must say why")
        if row.get("open") and row.get("refuse"):
            problems.append(f"{where}: a row cannot be both open and refused")
        if row.get("body", "buffer") not in ("buffer", "stream"):
            problems.append(f"{where}: body must be buffer or stream")
        if row.get("body") == "stream" and method == "GET":
            problems.append(f"{where}: a GET carries no body to stream")
        if not isinstance(row.get("get_body", False), bool):
            problems.append(f"{where}: get_body must be true or false")
        elif row.get("get_body") and (method != "GET" or row.get("refuse")):
            problems.append(f"{where}: get_body marks forwarded GET rows only")
        pattern, literal = _compile(path)
        routes.append(
            Route(method, path, row.get("kind", ""), row.get("id_from", "none"),
                  row.get("action", ""), bool(row.get("open")), bool(row.get("refuse")),
                  row.get("body", "buffer"), row.get("why", ""), pattern, literal,
                  row.get("get_body") is True)
        )  # fmt: skip
    seen = set()
    for route in routes:
        if (route.method, route.path) in seen:
            problems.append(f"{route.method} {route.path}: more than one row")
        seen.add((route.method, route.path))
    if problems:
        raise ValueError("route table: " + "; ".join(problems))
    return tuple(routes)


def validate_path(path: str) -> bool:
    """True for a canonical absolute path: no empty, '.' or '..' segment, no '\\' or controls.

    The ASGI server has already percent-decoded the path once, so ``%2e%2e`` and ``%2F`` arrive
    here as ``..`` and ``/`` and are judged like their plain spellings.
    """
    if not path.startswith("/") or "\\" in path or "//" in path:
        return False
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return False
    return all(segment not in {".", ".."} for segment in path.split("/"))


def validate_query(query: bytes) -> bool:
    """True for a query string that can be forwarded byte for byte: printable ASCII only."""
    return all(0x20 < b < 0x7F for b in query)


class RouteTable:
    """Finds the row for a request: exact paths by dict, templates by most literal first."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes
        self._exact: dict[tuple[str, str], Route] = {}
        self._templates: dict[str, list[Route]] = {}
        for route in routes:
            if _PARAM.search(route.path):
                self._templates.setdefault(route.method, []).append(route)
            else:
                self._exact[(route.method, route.path)] = route
        for templates in self._templates.values():
            # Native FastAPI routes answer before the Flask mount; then Werkzeug's order.
            templates.sort(key=lambda r: ("{" not in r.path, -r.literal))

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        """The row and its path parameters. HEAD is classified as GET: the gateway forwards it
        as a body-less GET and sends back only the headers (guard/edge/bodies.py)."""
        method = "GET" if method == "HEAD" else method
        route = self._exact.get((method, path))
        if route is not None:
            return route, {}
        for route in self._templates.get(method, ()):
            params = route.params(path)
            if params is not None:
                return route, params
        return None


class RouteClassifierMiddleware:
    """Refuse non-canonical requests and routes the table refuses or lacks; tag the rest."""

    def __init__(self, app: ASGIApp, *, table: RouteTable) -> None:
        self.app = app
        self.table = table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if not validate_path(path) or not validate_query(scope["query_string"]):
            await send_refusal(scope, send, Refusal("path_not_canonical"))
            return
        found = self.table.match(scope["method"], path)
        if found is None or found[0].refuse:
            await send_refusal(scope, send, Refusal("route_not_classified"))
            return
        scope["guard.route"], scope["guard.params"] = found
        await self.app(scope, receive, send)
