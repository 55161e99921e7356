"""The MLflow route table (``route_table.toml``) and the layer that applies it.

Every (method, path) the installed MLflow serves has one row: the resource kind it acts on,
where MLflow reads the resource's id, the action it needs, and whether it is open to any
authenticated caller or refused outright. A request is matched on its canonical path, which is
also what gets forwarded, so the decision is made on exactly the string MLflow routes on. What
matches no row is refused with ``route_not_classified`` and never reaches MLflow.
"""

from __future__ import annotations

import logging
import re
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Final, Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from guard.authz.policy import ACTIONS
from guard.errors import Refusal, send_refusal
from guard.upstream.client import UpstreamClient, VersionGate

logger = logging.getLogger("guard.authz")
KINDS: Final = frozenset(
    {
        "experiment", "run", "logged_model", "registered_model", "model_version", "trace",
        "dataset", "artifact", "scorer", "prompt_optimization", "webhook", "gateway", "job",
        "assistant", "workspace", "user_admin", "server", "skill",
    }
)  # fmt: skip
# The MLflow releases whose routes the table was checked against, each with its (method, path)
# list in tests/mlflow_routes/<release>.txt (tests/unit/authz/test_routes.py).
VERIFIED_MLFLOW_VERSIONS: Final = frozenset({"3.17.2", "3.18.0"})
# Dataset rows whose body also names the experiments being linked or unlinked (their notes).
DATASET_LINKS: Final = ("/add-experiments", "/remove-experiments")
_KEYS: Final = frozenset(
    {"method", "path", "kind", "id_from", "action", "open", "refuse", "why", "note", "body",
     "get_body", "since", "until"}
)  # fmt: skip
_PARAM: Final = re.compile(r"<(?:(path):)?(\w+)>|\{(\w+)(?::(path))?\}")
# A skill's {name} never starts with '@' (MLflow's SkillNamePath): Starlette takes the first
# registered route whose path matches and MLflow then refuses such a name with 400, so
# /skills/@org/x is never the org-less {name}/x and /skills/@org is no skill the gateway names.
_SKILLS: Final = "/3.0/mlflow/skills/"
_SKILL_NAME: Final = "[^@/][^/]*"


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
    # The releases the row applies to: since <= release < until (either may be absent).
    since: tuple[int, ...] = ()
    until: tuple[int, ...] | None = None

    def applies_to(self, release: tuple[int, ...]) -> bool:
        return self.since <= release and (self.until is None or release < self.until)

    @property
    def id_lists(self) -> tuple[str, tuple[str, ...]]:
        """(source, fields) of the lists of ids the resolver looks up for this route: the list
        its ``id_from`` names (``body:experiment_ids[]`` -> ("body", ("experiment_ids",)); a
        nested path counts the elements of its outer list,
        ``locations[].mlflow_experiment.experiment_id``), and the experiments a dataset is
        linked to or unlinked from. Other references in a body are counted where they are read
        (guard/authz/references.py). The edge's body layer counts them (guard/edge/bodies.py)."""
        return _id_lists(self.id_from, self.kind, self.path)  # (strings hash once; a row each time)

    def params(self, path: str) -> dict[str, str] | None:
        match = self.pattern.fullmatch(path)
        return None if match is None else match.groupdict()


@cache
def _id_lists(id_from: str, kind: str, path: str) -> tuple[str, tuple[str, ...]]:
    source, _, spec = id_from.partition(":")
    key = spec.split("+", 1)[0]
    if kind == "dataset" and path.endswith(DATASET_LINKS):
        return "body", ("experiment_ids",)
    if source not in ("query", "body") or "[]" not in key:
        return source, ()
    if "." in key:
        return source, (key.split("[]", 1)[0],)
    return source, tuple(key.removesuffix("[]").split("|"))


def release_key(version: str) -> tuple[int, ...]:
    """``"3.18.0"`` -> (3, 18, 0): the leading dotted numbers (``3.18.1.dev0`` -> (3, 18, 1))."""
    parts = []
    for part in version.strip().split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def _release_field(row: dict[str, object], key: str, problems: list[str], where: str) -> object:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(release_key(value)) != 3 or value.count(".") != 2:
        problems.append(f'{where}: {key} must be a release like "3.18.0"')
        return None
    return release_key(value)


def _compile(template: str) -> tuple[re.Pattern[str], int]:
    parts, literal, end = [], 0, 0
    for match in _PARAM.finditer(template):
        text = template[end : match.start()]
        parts.append(re.escape(text))
        literal += len(text)
        is_path = bool(match.group(1) or match.group(4))
        name = match.group(2) or match.group(3)
        if is_path:
            parts.append(f"(?P<{name}>.+)")
        elif name == "name" and _SKILLS in template:
            parts.append(f"(?P<{name}>{_SKILL_NAME})")
        else:
            parts.append(f"(?P<{name}>[^/]+)")
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
        since = _release_field(row, "since", problems, where)
        until = _release_field(row, "until", problems, where)
        if since is not None and until is not None and not since < until:  # type: ignore[operator]
            problems.append(f"{where}: since must come before until")
        routes.append(
            Route(method, path, row.get("kind", ""), row.get("id_from", "none"),
                  row.get("action", ""), bool(row.get("open")), bool(row.get("refuse")),
                  row.get("body", "buffer"), row.get("why", ""), pattern, literal,
                  row.get("get_body") is True, since or (), until)  # type: ignore[arg-type]
        )  # fmt: skip
    seen: dict[tuple[str, str], list[Route]] = {}
    for route in routes:
        for other in seen.setdefault((route.method, route.path), []):
            if _overlap(route, other):
                problems.append(
                    f"{route.method} {route.path}: more than one row for a release "
                    "(rows of one pair need since/until ranges that do not overlap)"
                )
        seen[(route.method, route.path)].append(route)
    if problems:
        raise ValueError("route table: " + "; ".join(problems))
    return tuple(routes)


def _overlap(a: Route, b: Route) -> bool:
    return (b.until is None or a.since < b.until) and (a.until is None or b.since < a.until)


def routes_for(routes: tuple[Route, ...], version: str) -> tuple[Route, ...]:
    """The rows that apply to one MLflow release."""
    release = release_key(version)
    return tuple(route for route in routes if route.applies_to(release))


def validate_path(path: str) -> bool:
    """True for a canonical absolute path: no empty, '.' or '..' segment, no '\\' or controls.

    The ASGI server has already percent-decoded the path once, so ``%2e%2e`` and ``%2F`` arrive
    here as ``..`` and ``/`` and are judged like their plain spellings.
    """
    return _CANONICAL_PATH.fullmatch(path) is not None


def validate_query(query: bytes) -> bool:
    """True for a query string that can be forwarded byte for byte: printable ASCII only."""
    return _PRINTABLE_QUERY.fullmatch(query) is not None


# Segments after a "/": none empty, ".", ".." or holding "\\" or a control character.
_SEGMENT: Final = r"(?!\.{1,2}(?:/|\Z))[^/\\\x00-\x1f\x7f]+"
_CANONICAL_PATH: Final = re.compile(rf"/(?:{_SEGMENT}(?:/{_SEGMENT})*/?)?")
_PRINTABLE_QUERY: Final = re.compile(rb"[\x21-\x7e]*")


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


class ReleaseTables:
    """One RouteTable per MLflow release, and the one in use: the upstream's.

    ``current`` is replaced whole by ``select`` (one attribute assignment, so a request sees
    either the old table or the new one, never a mix). Before the upstream's release is known,
    the table of every row (``union``) only tells a route no release serves, which is refused
    without asking MLflow anything.
    """

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes
        self.union = RouteTable(routes)
        self._tables: dict[tuple[int, ...], RouteTable] = {}
        self.version: str | None = None
        self.current: RouteTable | None = None

    def table_for(self, version: str) -> RouteTable:
        release = release_key(version)
        table = self._tables.get(release)
        if table is None:
            table = self._tables[release] = RouteTable(routes_for(self.routes, version))
        return table

    def select(self, version: str) -> RouteTable:
        """Serve ``version``'s routes from now on; returns its table."""
        table = self.table_for(version)
        self.current, self.version = table, version
        logger.info("route table: serving MLflow %s's routes (%d rows)", version, len(table.routes))
        return table


class RouteClassifierMiddleware:
    """Refuse non-canonical requests and routes the table refuses or lacks; tag the rest.

    The table is the upstream's release's: ``gate`` (guard/upstream/client.py VersionGate)
    knows that release and calls ``tables.select`` when it changes. A route no release serves is
    refused before the gate is asked; any other waits for the gate's answer (its refusal, e.g.
    503 upstream_unverified, is sent instead), so a route of a newer release never matches a
    request to an older server.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        tables: ReleaseTables,
        gate: VersionGate | None = None,
        client: UpstreamClient | None = None,
    ) -> None:
        self.app = app
        self.tables = tables
        self.gate = gate
        self.client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if not validate_path(path) or not validate_query(scope["query_string"]):
            await send_refusal(scope, send, Refusal("path_not_canonical"))
            return
        method = scope["method"]
        if self.tables.union.match(method, path) is None:
            await send_refusal(scope, send, Refusal("route_not_classified"))
            return
        if self.gate is not None and self.client is not None:
            if (refusal := await self.gate.check(self.client)) is not None:
                await send_refusal(scope, send, refusal)
                return
            version = self.gate.version
            if version is not None and version != self.tables.version:
                self.tables.select(version)  # the release changed: swap in its table
        table = self.tables.current or self.tables.union  # no gate: tests of the table alone
        found = table.match(method, path)
        if found is None or found[0].refuse:
            await send_refusal(scope, send, Refusal("route_not_classified"))
            return
        scope["guard.route"], scope["guard.params"] = found
        await self.app(scope, receive, send)
