"""From the ids in a request to the resources policies speak of, through MLflow's own API.

Policies name experiments and registered models by name (``experiment:fraud/train``,
``model:fraud-detector``). A request names them by id, by name, or through something that
belongs to them: a run, a logged model, a trace, an artifact path. Lookups go to the upstream
MLflow and are cached (bounded in size and age); the gateway forgets an entry when it forwards a
request that renames, deletes or restores it.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

from guard.errors import Refusal
from guard.requestdata import RequestData, RequestDataError, canonical_experiment_id
from guard.routes import Route
from guard.upstream import UpstreamClient, UpstreamError

# Fields whose values name an experiment through a lookup, by the kind they point at.
RUN_FIELDS = ("run_id", "run_uuid", "run_ids")
EXPERIMENT_FIELDS = ("experiment_id", "experiment_ids")
LOGGED_MODEL_FIELDS = ("model_id",)
TRACE_FIELDS = ("trace_id", "request_id", "trace_ids", "request_ids")
MODEL_KINDS = ("registered_model", "model_version")


class Unresolved(Exception):
    """The resource cannot be determined; carries the refusal to send."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


class TTLCache:
    def __init__(self, size: int, ttl: float) -> None:
        self.size, self.ttl = size, ttl
        self._items: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def get(self, key: str) -> tuple[bool, str | None]:
        item = self._items.get(key)
        if item is None or time.monotonic() - item[0] > self.ttl:
            return False, None
        self._items.move_to_end(key)
        return True, item[1]

    def put(self, key: str, value: str) -> None:
        self._items[key] = (time.monotonic(), value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def forget(self, prefix: str) -> None:
        for key in [k for k in self._items if k.startswith(prefix)]:
            del self._items[key]


class Resolver:
    def __init__(self, upstream: UpstreamClient, cache_size: int, cache_ttl: float) -> None:
        self.upstream = upstream
        self.cache = TTLCache(cache_size, cache_ttl)

    async def _get(self, path: str, params: dict[str, str]) -> dict[str, Any] | None:
        """GET an MLflow API path; None when MLflow does not know the resource."""
        target = f"{path}?{urlencode(params)}"
        try:
            response = await self.upstream.request(
                "GET", target, [("host", self.upstream.host_header)], None
            )
        except UpstreamError as exc:
            raise Unresolved(exc.refusal) from exc
        async with response:
            data = b"".join([chunk async for chunk in response.body()])
            if response.status != 200:
                return None
        try:
            value = json.loads(data)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    async def _cached(self, key: str, fetch: Callable[[], Awaitable[str | None]]) -> str | None:
        hit, value = self.cache.get(key)
        if hit:
            return value
        value = await fetch()
        if value is not None:  # "unknown" is not remembered: the id may exist a moment later
            self.cache.put(key, value)
        return value

    async def experiment_name(self, experiment_id: str) -> str | None:
        async def fetch() -> str | None:
            data = await self._get(
                "/api/2.0/mlflow/experiments/get", {"experiment_id": experiment_id}
            )
            return _dig(data, "experiment", "name")

        return await self._cached(f"experiment:{experiment_id}", fetch)

    async def run_experiment(self, run_id: str) -> str | None:
        async def fetch() -> str | None:
            data = await self._get("/api/2.0/mlflow/runs/get", {"run_id": run_id})
            return _dig(data, "run", "info", "experiment_id")

        return await self._cached(f"run:{run_id}", fetch)

    async def logged_model_experiment(self, model_id: str) -> str | None:
        async def fetch() -> str | None:
            data = await self._get(f"/api/2.0/mlflow/logged-models/{model_id}", {})
            return _dig(data, "model", "info", "experiment_id")

        return await self._cached(f"logged_model:{model_id}", fetch)

    async def trace_experiment(self, trace_id: str) -> str | None:
        async def fetch() -> str | None:
            data = await self._get(f"/api/3.0/mlflow/traces/{trace_id}/info", {})
            return _dig(
                data, "trace", "trace_info", "trace_location", "mlflow_experiment", "experiment_id"
            )

        return await self._cached(f"trace:{trace_id}", fetch)

    async def model_version_aliases(self, name: str, version: str) -> list[str]:
        """The aliases a model version holds now (never cached: they are what changes)."""
        data = await self._get(
            "/api/2.0/mlflow/model-versions/get", {"name": name, "version": version}
        )
        aliases = (data or {}).get("model_version", {}).get("aliases", [])
        return [a for a in aliases if isinstance(a, str)] if isinstance(aliases, list) else []

    async def source_resources(self, uri: str) -> list[str] | None:
        """The resources an artifact address reads from, or None for an address the gateway
        cannot vouch for (a file path, an object store, anything else)."""
        parts = urlsplit(uri)
        path = parts.path.lstrip("/")
        if ".." in path.split("/") or "\\" in uri:
            return None
        if parts.scheme == "runs" and not parts.netloc:
            run_id = path.split("/", 1)[0]
            experiment_id = await self.run_experiment(run_id) if run_id else None
            if experiment_id is None:
                raise Unresolved(Refusal("resource_unresolved", f"Unknown run {run_id!r}."))
            return [await self._experiment(experiment_id)]
        if parts.scheme == "models" and not parts.netloc:
            name = path.split("/", 1)[0].split("@", 1)[0]
            if name.startswith("m-"):  # a logged model id
                experiment_id = await self.logged_model_experiment(name)
                if experiment_id is None:
                    raise Unresolved(Refusal("resource_unresolved", f"Unknown model {name!r}."))
                return [await self._experiment(experiment_id)]
            return [f"model:{name}"] if name else None
        if parts.scheme == "mlflow-artifacts":
            return [await self._experiment(_artifact_experiment(path))]
        return None

    def forget(self, kind: str, key: str) -> None:
        self.cache.forget(f"{kind}:{key}")

    async def resources(
        self, route: Route, params: dict[str, str], data: RequestData, headers: dict[str, str]
    ) -> list[str]:
        """The policy resources a request acts on (``experiment:NAME`` / ``model:NAME``)."""
        spec = route.id_from
        if spec == "none":
            raise Unresolved(Refusal("resource_unresolved", "This route names no resource."))
        source, _, field_spec = spec.partition(":")
        if source == "artifact_path":
            path = params.get("artifact_path") or data.single("path") or ""
            return [await self._experiment(_artifact_experiment(str(path)))]
        if "+" in field_spec or "." in field_spec:
            raise Unresolved(Refusal("resource_unresolved", "This route is not yet resolvable."))
        is_list = field_spec.endswith("[]")
        fields = field_spec.removesuffix("[]").split("|")
        values = self._values(source, fields, is_list, params, data, headers)
        if not values:
            raise Unresolved(Refusal("invalid_request_body", f"The request names no {fields[0]}."))
        field = fields[0]
        if route.kind == "artifact" and field == "path":  # listing a proxied artifact folder
            return [await self._experiment(_artifact_experiment(_text(v))) for v in values]
        if route.kind in MODEL_KINDS and field == "name":
            return [f"model:{_text(v)}" for v in values]
        if field in ("name", "experiment_name") and route.kind == "experiment":
            return [f"experiment:{_text(v)}" for v in values]
        if field in EXPERIMENT_FIELDS:
            return [await self._experiment(canonical_experiment_id(v)) for v in values]
        lookups: dict[str, Callable[[str], Awaitable[str | None]]] = {
            **dict.fromkeys(RUN_FIELDS, self.run_experiment),
            **dict.fromkeys(LOGGED_MODEL_FIELDS, self.logged_model_experiment),
            **dict.fromkeys(TRACE_FIELDS, self.trace_experiment),
        }
        lookup = lookups.get(field)
        if lookup is None:
            raise Unresolved(Refusal("resource_unresolved", "This route is not yet resolvable."))
        result = []
        for value in values:
            experiment_id = await lookup(_text(value))
            if experiment_id is None:
                raise Unresolved(Refusal("resource_unresolved", f"Unknown {field} {value!r}."))
            result.append(await self._experiment(experiment_id))
        return result

    def _values(
        self,
        source: str,
        fields: list[str],
        is_list: bool,
        params: dict[str, str],
        data: RequestData,
        headers: dict[str, str],
    ) -> list[Any]:
        found: list[tuple[str, list[Any]]] = []
        for field in fields:
            if source == "path":
                values: list[Any] = [params[field]] if field in params else []
            elif source == "header":
                values = [headers[field.lower()]] if field.lower() in headers else []
            elif source == "query" and data.method not in ("GET", "HEAD"):
                # A query field on a POST (upload-artifact): that handler reads the query only.
                values = data.query_only().values(field)
            else:
                values = data.values(field)
            if values:
                found.append((field, values))
        # The MLflow client sends run_id and the legacy run_uuid with the same value; two
        # different values leave open which one MLflow acts on.
        if len(found) > 1 and any(values != found[0][1] for _, values in found[1:]):
            raise RequestDataError(
                Refusal("ambiguous_parameter", f"Both {found[0][0]!r} and {found[1][0]!r} given.")
            )
        if not found:
            return []
        if len(found[0][1]) > 1 and not is_list:
            raise RequestDataError(
                Refusal("ambiguous_parameter", f"The parameter {found[0][0]!r} is repeated.")
            )
        return found[0][1]

    async def _experiment(self, experiment_id: str) -> str:
        name = await self.experiment_name(experiment_id)
        if name is None:
            raise Unresolved(
                Refusal("resource_unresolved", f"Unknown experiment {experiment_id!r}.")
            )
        return f"experiment:{name}"


def _dig(data: Any, *keys: str) -> str | None:
    """``data[k1][k2]...`` if every step is a JSON object and the end a string or number."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return str(data) if isinstance(data, str | int) and not isinstance(data, bool) else None


def _text(value: Any) -> str:
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise RequestDataError(Refusal("invalid_request_body", "An id is malformed."))
    return str(value)


def _artifact_experiment(path: str) -> str:
    """The experiment a proxied artifact path lives under: its leading numeric segment."""
    first = path.split("/", 1)[0]
    # MLflow stores experiment 1's artifacts under "1/", so "01/" is no experiment's folder.
    if not first.isdigit() or first != str(int(first)):
        raise Unresolved(Refusal("resource_unresolved", "The artifact path names no experiment."))
    return str(int(first))
