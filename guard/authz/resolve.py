"""From the ids in a request to the resources policies speak of, through MLflow's own API.

Policies name experiments and registered models by name (``experiment:fraud/train``,
``model:fraud-detector``). A request names them by id, by name, or through something that
belongs to them: a run, a logged model, a trace, an issue, an evaluation dataset, an artifact
path. Lookups go to the upstream MLflow and are cached (bounded in size and age); the gateway
forgets an entry when it forwards a request that renames, deletes or restores it. What changes
by design (dataset links, online-scoring configurations, aliases) is asked for every time.

Names are compared as MLflow compares them: its SQL store matches a name with the database's
``=``, which ignores case (and trailing blanks) on MySQL and MSSQL, so a name in a request is
replaced by the name MLflow stores for it before any policy sees it. Which ids a request names,
and how they are read from it, is ``guard.authz.identifiers``.
"""

from __future__ import annotations

import copy
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, urlencode, urlsplit

from guard.authz import skills
from guard.authz.identifiers import Headers, Unresolved, as_id, field_values, named
from guard.authz.routes import DATASET_LINKS, Route
from guard.authz.workspaces import HEADER as WORKSPACE_HEADER
from guard.edge.requestdata import RequestData, canonical_experiment_id
from guard.errors import Refusal
from guard.upstream.client import UpstreamClient, UpstreamError

# Fields whose values name an experiment through a lookup, by the kind they point at.
RUN_FIELDS = ("run_id", "run_uuid", "run_ids")
EXPERIMENT_FIELDS = ("experiment_id", "experiment_ids")
LOGGED_MODEL_FIELDS = ("model_id",)
TRACE_FIELDS = ("trace_id", "request_id", "trace_ids", "request_ids")
MODEL_KINDS = ("registered_model", "model_version")
# Registry writes after which a model name may belong to another model.
MODEL_NAME_CHANGES: Final = ("/registered-models/rename", "/registered-models/delete")
WORKSPACES_DIR: Final = "workspaces"  # MLflow's artifact folder of per-workspace paths


@dataclass(frozen=True, slots=True)
class Lookup:
    """Where MLflow answers which experiment a thing belongs to."""

    kind: str  # the cache key's prefix
    path: str  # the GET path; ``{id}`` is the id when it goes in the path
    param: str | None  # the query parameter holding the id, when it goes in the query
    answer: tuple[str, ...]  # the experiment id's place in the answer


RUN: Final = Lookup("run", "/api/2.0/mlflow/runs/get", "run_id", ("run", "info", "experiment_id"))
LOGGED_MODEL: Final = Lookup(
    "logged_model", "/api/2.0/mlflow/logged-models/{id}", None, ("model", "info", "experiment_id")
)
TRACE: Final = Lookup(
    "trace",
    "/api/3.0/mlflow/traces/{id}",  # GetTraceInfoV3; MLflow 3.17 serves no .../info there
    None,
    ("trace", "trace_info", "trace_location", "mlflow_experiment", "experiment_id"),
)
ISSUE: Final = Lookup("issue", "/api/3.0/mlflow/issues/{id}", None, ("issue", "experiment_id"))
LABEL_SCHEMA: Final = Lookup(
    "label_schema", "/api/3.0/mlflow/label-schemas/get", "schema_id",
    ("label_schema", "experiment_id"),
)  # fmt: skip
REVIEW_QUEUE: Final = Lookup(
    "review_queue", "/api/3.0/mlflow/review-queues/get", "queue_id",
    ("review_queue", "experiment_id"),
)  # fmt: skip
LOOKUPS: Final = {
    **dict.fromkeys(RUN_FIELDS, RUN),
    **dict.fromkeys(LOGGED_MODEL_FIELDS, LOGGED_MODEL),
    **dict.fromkeys(TRACE_FIELDS, TRACE),
    "issue_id": ISSUE,
    "schema_id": LABEL_SCHEMA,
    "queue_id": REVIEW_QUEUE,
}


class TTLCache:
    """Lookups by key, bounded in number and age. "Unknown" is remembered too, for a shorter
    time: otherwise an unknown id would cost an upstream call on every request and a known but
    forbidden one none, and the difference in latency would tell which ids exist."""

    def __init__(self, size: int, ttl: float, negative_ttl: float = 0.0) -> None:
        self.size, self.ttl, self.negative_ttl = size, ttl, min(negative_ttl, ttl)
        self._items: OrderedDict[str, tuple[float, str | None]] = OrderedDict()

    def get(self, key: str) -> tuple[bool, str | None]:
        item = self._items.get(key)
        if item is None:
            return False, None
        age = time.monotonic() - item[0]
        if age > (self.ttl if item[1] is not None else self.negative_ttl):
            return False, None
        self._items.move_to_end(key)
        return True, item[1]

    def put(self, key: str, value: str | None) -> None:
        if value is None and self.negative_ttl <= 0:
            return
        self._items[key] = (time.monotonic(), value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def forget(self, prefix: str) -> None:
        for key in [k for k in self._items if k.startswith(prefix)]:
            del self._items[key]

    def forget_unknown(self) -> None:
        """Something was created: an id or name remembered as unknown may exist now."""
        for key in [k for k, (_, value) in self._items.items() if value is None]:
            del self._items[key]


class Resolver:
    def __init__(
        self,
        upstream: UpstreamClient,
        cache_size: int,
        cache_ttl: float,
        negative_ttl: float = 0.0,
    ) -> None:
        self.upstream = upstream
        self.cache = TTLCache(cache_size, cache_ttl, negative_ttl)
        # The MLflow workspace lookups are made in (``bound``); None: workspaces are off.
        self.workspace: str | None = None

    def bound(self, workspace: str) -> Resolver:
        """This resolver looking things up in an MLflow workspace: every lookup carries it to
        MLflow (which answers another workspace's id or name with "does not exist") and every
        cache entry is filed under it, so a same-named thing of another workspace never
        answers. Shares the upstream client and the cache."""
        view = copy.copy(self)
        view.workspace = workspace
        return view

    def _key(self, key: str) -> str:
        return key if self.workspace is None else f"{self.workspace}/{key}"

    async def _fetch(
        self, path: str, params: Mapping[str, str | list[str]]
    ) -> tuple[int, dict[str, Any] | None]:
        """GET an MLflow API path: its status and JSON object (None if it sent none)."""
        target = f"{path}?{urlencode(params, doseq=True)}" if params else path
        headers = [("host", self.upstream.host_header)]
        if self.workspace is not None:
            headers.append((WORKSPACE_HEADER, self.workspace))
        try:
            response = await self.upstream.request("GET", target, headers, None)
        except UpstreamError as exc:
            raise Unresolved(exc.refusal) from exc
        async with response:
            data = b"".join([chunk async for chunk in response.body()])
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            return response.status, None
        return response.status, value if isinstance(value, dict) else None

    async def _get(self, path: str, params: Mapping[str, str | list[str]]) -> dict[str, Any] | None:
        """GET an MLflow API path; None when MLflow does not know the resource."""
        status, data = await self._fetch(path, params)
        return data if status == 200 else None

    async def _cached(self, key: str, fetch: Callable[[], Awaitable[str | None]]) -> str | None:
        key = self._key(key)
        hit, value = self.cache.get(key)
        if hit:
            return value
        value = await fetch()
        self.cache.put(key, value)  # "unknown" for a short while (negative_ttl)
        return value

    async def experiment_name(self, experiment_id: str) -> str | None:
        async def fetch() -> str | None:
            data = await self._get(
                "/api/2.0/mlflow/experiments/get", {"experiment_id": experiment_id}
            )
            return _dig(data, "experiment", "name")

        return await self._cached(f"experiment:{experiment_id}", fetch)

    async def experiment_of(self, lookup: Lookup, value: str) -> str | None:
        """The id of the experiment a run, trace, issue... belongs to; None if MLflow does not
        know it."""

        async def fetch() -> str | None:
            path = lookup.path.format(id=quote(value, safe=""))
            data = await self._get(path, {lookup.param: value} if lookup.param else {})
            return _dig(data, *lookup.answer)

        return await self._cached(f"{lookup.kind}:{value}", fetch)

    async def run_experiment(self, run_id: str) -> str | None:
        return await self.experiment_of(RUN, run_id)

    async def logged_model_experiment(self, model_id: str) -> str | None:
        return await self.experiment_of(LOGGED_MODEL, model_id)

    async def trace_experiment(self, trace_id: str) -> str | None:
        return await self.experiment_of(TRACE, trace_id)

    async def dataset_experiments(self, dataset_id: str) -> list[str]:
        """The experiments an evaluation dataset is linked to (never cached: the links are what
        add/remove-experiments change). MLflow answers an unknown id with none."""
        path = f"/api/3.0/mlflow/datasets/{quote(dataset_id, safe='')}/experiment-ids"
        data = await self._get(path, {})
        ids = _ids(data.get("experiment_ids", []) if data is not None else None)
        if ids is None:
            raise Unresolved(Refusal("resource_unresolved", f"Unknown dataset {dataset_id!r}."))
        return ids

    async def scorer_experiments(self, scorer_ids: list[str]) -> list[str]:
        """The experiments of the online-scoring configurations MLflow would return for
        ``scorer_ids`` (asked every time: configurations come and go). A scorer without one
        adds nothing, as MLflow returns nothing for it."""
        data = await self._get("/api/3.0/mlflow/scorers/online-configs", {"scorer_ids": scorer_ids})
        ids = _ids(data.get("configs", []) if data is not None else None, "experiment_id")
        if ids is None:
            raise Unresolved(Refusal("resource_unresolved", "Unreadable scorer configurations."))
        return ids

    async def model_resource(self, name: str) -> str:
        """``model:NAME`` with the name MLflow stores for ``name`` (a prompt is a registered
        model too); a name MLflow does not know (one being created) stays as given."""
        stored = await self.stored_model_name(name)
        return f"model:{stored or name}"

    async def stored_model_name(self, name: str) -> str | None:
        """The name MLflow stores for the registered model ``name``; None if there is none."""
        return await self._stored_name(
            "model_name", name, "/api/2.0/mlflow/registered-models/get", "name", "registered_model"
        )

    async def stored_experiment_name(self, name: str) -> str | None:
        """The name MLflow stores for the experiment ``name``; None if there is none."""
        return await self._stored_name(
            "experiment_name", name, "/api/2.0/mlflow/experiments/get-by-name",
            "experiment_name", "experiment",
        )  # fmt: skip

    async def experiment_resource_by_name(self, name: str) -> str:
        """``experiment:NAME`` with the name MLflow stores for ``name``; one it does not know
        stays as given."""
        stored = await self.stored_experiment_name(name)
        return f"experiment:{stored or name}"

    async def _stored_name(
        self, kind: str, name: str, path: str, param: str, entity: str
    ) -> str | None:
        async def fetch() -> str | None:
            status, data = await self._fetch(path, {param: name})
            if status == 404:  # RESOURCE_DOES_NOT_EXIST: nothing else answers to this name
                return None
            stored = _dig(data, entity, "name") if status == 200 else None
            if stored is None:  # an error is not "unknown": the name as given might be wrong
                raise Unresolved(Refusal("resource_unresolved", f"Cannot look up {name!r}."))
            return stored

        return await self._cached(f"{kind}:{name}", fetch)

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
            return [await self.model_resource(name)] if name else None
        if parts.scheme == "mlflow-artifacts":
            return [await self._experiment(_artifact_experiment(self._in_workspace(path)))]
        return None

    def forget(self, kind: str, key: str) -> None:
        """Drop what a forwarded rename, delete or restore of ``kind`` may have made stale. Every
        name looked up to a stored name goes too: the change may free that name (or, where the
        database ignores case, a case variant of it) for another resource."""
        self.cache.forget(self._key(f"{kind}:{key}"))
        if kind in ("experiment", "model"):
            self.cache.forget(self._key(f"{kind}_name:"))

    def forget_workspace(self, workspace: str) -> None:
        """A workspace was deleted: what was looked up in it must not decide in one made later
        with its name, and what it held may now be in ``default`` (MLflow's SET_DEFAULT mode),
        where it was remembered as unknown."""
        self.cache.forget(f"{workspace}/")
        self.created()

    def created(self) -> None:
        """A create was forwarded: ids and names remembered as unknown may exist now."""
        self.cache.forget_unknown()

    async def resources(
        self, route: Route, params: dict[str, str], data: RequestData, headers: Headers
    ) -> list[str]:
        """The policy resources a request acts on (``experiment:NAME`` / ``model:NAME``); empty
        only for a request that can reach nothing a policy governs (scorer ids without an
        online configuration). ``headers`` maps each lowercase name to every value it came
        with; a single string per name hides repeats, so no id is read from it."""
        if route.id_from.startswith("artifact_path"):
            path = params.get("artifact_path") or data.single("path") or ""
            return [await self._artifact(str(path))]
        if route.kind == "skill":
            return skills.requested(route, params, data)
        field, values = named(route, params, data, headers)
        if not values:
            raise Unresolved(Refusal("invalid_request_body", f"The request names no {field}."))
        result = await self._resolve(route, field, values)
        if route.kind == "dataset" and route.path.endswith(DATASET_LINKS):
            linked = field_values("body", ["experiment_ids"], True, params, data)
            result += [await self._experiment(canonical_experiment_id(v)) for v in linked]
        if route.path.endswith(MODEL_NAME_CHANGES):
            self.forget("model", "")  # again once forwarded, if the caller does (see forget)
        return list(dict.fromkeys(result))

    async def _resolve(self, route: Route, field: str, values: list[Any]) -> list[str]:
        if route.kind == "artifact" and field == "path":  # listing a proxied artifact folder
            return [await self._artifact(as_id(v)) for v in values]
        if route.kind in MODEL_KINDS and field == "name":
            return [await self.model_resource(as_id(v)) for v in values]
        if field in ("name", "experiment_name") and route.kind == "experiment":
            return [await self.experiment_resource_by_name(as_id(v)) for v in values]
        if field in EXPERIMENT_FIELDS:
            return [await self._experiment(canonical_experiment_id(v)) for v in values]
        if field == "dataset_id":
            result = []
            for value in values:
                experiment_ids = await self.dataset_experiments(as_id(value))
                if not experiment_ids:
                    # Nobody's by policy: only callers allowed on every experiment (who never get
                    # here) may use it, not whoever asks first.
                    raise Unresolved(
                        Refusal("resource_unresolved", f"Dataset {value!r} has no experiment.")
                    )
                result += [await self._experiment(i) for i in experiment_ids]
            return result
        if field == "scorer_ids":
            experiment_ids = await self.scorer_experiments([as_id(v) for v in values])
            return [await self._experiment(i) for i in experiment_ids]
        lookup = LOOKUPS.get(field)
        if lookup is None:
            raise Unresolved(Refusal("resource_unresolved", "This route is not yet resolvable."))
        result = []
        for value in values:
            experiment_id = await self.experiment_of(lookup, as_id(value))
            if experiment_id is None:
                raise Unresolved(Refusal("resource_unresolved", f"Unknown {field} {value!r}."))
            result.append(await self._experiment(experiment_id))
        return result

    async def _artifact(self, path: str) -> str:
        """A proxied artifact path's owner: a skill under ``skills/``, else an experiment."""
        path = self._in_workspace(path)
        if path.split("/", 1)[0] == "skills":
            resource = skills.artifact_skill(path)
            if self.workspace is not None and not await self.skill_exists(resource):
                # its files outlive a skill moved to another workspace (or a deleted workspace)
                raise Unresolved(Refusal("resource_unresolved", "No such skill here."))
            return resource
        return await self._experiment(_artifact_experiment(path))

    def _in_workspace(self, path: str) -> str:
        """An artifact path without its ``workspaces/<ws>/`` prefix, which must name the
        request's workspace (as MLflow, which serves ``X/…`` in workspace W from
        ``workspaces/W/X/…`` and refuses another workspace's prefix). Without workspaces the
        prefix names no experiment and is refused like any such path."""
        if self.workspace is None or path.split("/", 1)[0] != WORKSPACES_DIR:
            return path
        _, workspace, rest = [*path.split("/", 2), "", ""][:3]
        if workspace != self.workspace:
            raise Unresolved(
                Refusal("resource_unresolved", "The artifact path is in another workspace.")
            )
        return rest

    async def skill_exists(self, resource: str) -> bool:
        """Whether MLflow holds the skill ``skill:NAME`` / ``skill:@ORG/NAME`` (asked every
        time: registering a version creates it)."""
        identity = resource.removeprefix("skill:")
        status, data = await self._fetch(f"/api/3.0/mlflow/skills/{identity}", {})
        if status == 404 and (data or {}).get("error_code") == "RESOURCE_DOES_NOT_EXIST":
            return False
        if status != 200:  # a 404 without it is no answer about skills (an older server)
            raise Unresolved(Refusal("resource_unresolved", f"Cannot look up {resource!r}."))
        return True

    async def skill_version_aliases(self, resource: str, version: str) -> list[str]:
        """The aliases a skill version holds now (never cached: they are what changes)."""
        identity = resource.removeprefix("skill:")
        path = f"/api/3.0/mlflow/skills/{identity}/versions/{quote(version, safe='')}"
        status, data = await self._fetch(path, {})
        aliases = (data or {}).get("aliases", []) if status == 200 else []
        return [a for a in aliases if isinstance(a, str)] if isinstance(aliases, list) else []

    async def experiment_resource(self, experiment_id: str) -> str:
        """``experiment:NAME`` for an experiment id (canonical, as MLflow reads it)."""
        return await self._experiment(canonical_experiment_id(experiment_id))

    async def _experiment(self, experiment_id: str) -> str:
        name = await self.experiment_name(experiment_id)
        if name is None:
            raise Unresolved(
                Refusal("resource_unresolved", f"Unknown experiment {experiment_id!r}.")
            )
        return f"experiment:{name}"

    async def trace_experiment_if_known(self, trace_id: str) -> str | None:
        """The experiment of a trace, or None when MLflow answers that there is no such trace
        (one being created); any other answer is unresolved. Only hits are cached: a new trace
        id is asked again, since it may belong to someone a moment later. (GetTraceInfoV3:
        MLflow 3.17 serves no ``/api/3.0/.../traces/<id>/info``, and a 404 for a route it does
        not serve must not read as "no such trace".)"""
        hit, value = self.cache.get(self._key(f"{TRACE.kind}:{trace_id}"))
        if hit and value is not None:
            return value
        status, data = await self._fetch(f"/api/3.0/mlflow/traces/{quote(trace_id, safe='')}", {})
        if status == 404 and (data or {}).get("error_code") == "RESOURCE_DOES_NOT_EXIST":
            return None
        experiment_id = _dig(data, *TRACE.answer) if status == 200 else None
        if experiment_id is None:
            raise Unresolved(Refusal("resource_unresolved", f"Cannot look up {trace_id!r}."))
        self.cache.put(self._key(f"{TRACE.kind}:{trace_id}"), experiment_id)
        return experiment_id


def _dig(data: Any, *keys: str) -> str | None:
    """``data[k1][k2]...`` if every step is a JSON object and the end a string or number."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return str(data) if isinstance(data, str | int) and not isinstance(data, bool) else None


def _ids(items: Any, *keys: str) -> list[str] | None:
    """Every element of a JSON list read as an id (at ``keys`` inside it); None when the list
    or any element is unreadable."""
    if not isinstance(items, list):
        return None
    ids = [_dig(item, *keys) for item in items]
    return None if None in ids else [i for i in ids if i is not None]


def _artifact_experiment(path: str) -> str:
    """The experiment a proxied artifact path lives under: its leading numeric segment."""
    first = path.split("/", 1)[0]
    # MLflow stores experiment 1's artifacts under "1/", so "01/" is no experiment's folder;
    # isdigit() alone admits digits int() refuses (superscripts), hence ASCII only.
    if not (first.isascii() and first.isdigit()) or first != str(int(first)):
        raise Unresolved(Refusal("resource_unresolved", "The artifact path names no experiment."))
    return str(int(first))
