"""Every row of the route table, exercised through the real gateway with two callers.

One caller holds every role on exactly one experiment, one registered model and the server; the
other holds the same on different ones. For each row a request is built from the row itself
(its path parameters, where its id comes from) naming the first caller's resources, and sent by
both. A fake MLflow answers the gateway's lookups (experiment names, run -> experiment, ...).
No row goes untested: each lands in exactly one of the expectations below.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.app import build_gateway
from guard.authz.routes import Route, load_routes, routes_for
from guard.config import load_settings
from tests.servers import ServerThread, read_request_body, send_response

ALLOWED = "mlg_" + "a" * 43
REFUSED = "mlg_" + "r" * 43
VALUES = {
    "experiment_id": "1", "experiment_ids": "1", "run_id": "r1", "run_uuid": "r1",
    "run_ids": "r1", "model_id": "m-1", "trace_id": "tr-1", "request_id": "tr-1",
    "trace_ids": "tr-1", "request_ids": "tr-1", "experiment_name": "exp-1",
    "artifact_path": "1/r1/artifacts/x.txt", "path": "1/r1/artifacts", "dataset_id": "d-1",
    "issue_id": "is-1", "schema_id": "ls-1", "queue_id": "rq-1", "scorer_ids": "sc-1",
    "X-Mlflow-Experiment-Id": "1",
}  # fmt: skip
RESOLVABLE_FIELDS = set(VALUES) | {"name"}
# What MLflow answers about each thing that lives in experiment 1, by lookup path.
OWNED_BY_EXPERIMENT_1 = {
    "/api/2.0/mlflow/runs/get": {"run": {"info": {"experiment_id": "1"}}},
    "/api/2.0/mlflow/logged-models/m-1": {"model": {"info": {"experiment_id": "1"}}},
    "/api/3.0/mlflow/traces/tr-1": {"trace": {"trace_info": {"trace_location": {
        "mlflow_experiment": {"experiment_id": "1"}}}}},
    "/api/3.0/mlflow/datasets/d-1/experiment-ids": {"experiment_ids": ["1"]},
    "/api/3.0/mlflow/issues/is-1": {"issue": {"issue_id": "is-1", "experiment_id": "1"}},
    "/api/3.0/mlflow/label-schemas/get": {"label_schema": {"experiment_id": "1"}},
    "/api/3.0/mlflow/review-queues/get": {"review_queue": {"experiment_id": "1"}},
    "/api/3.0/mlflow/scorers/online-configs": {"configs": [
        {"scorer_id": "sc-1", "experiment_id": "1", "sample_rate": 1.0}]},
}  # fmt: skip
# What a few routes need beside their id before the gateway can judge them.
EXTRA_FIELDS = {
    "/model-versions/delete": {"version": "1"},
    "/registered-models/rename": {"new_name": "model-a2"},
    "/experiments/update": {"new_name": "exp-1"},  # the allowed caller may create only exp-1
}


class FakeMlflow:
    """Knows experiment 1 ("exp-1") and 2 ("exp-2") and registered models named model-* (in any
    case, as on MySQL); run r1,
    logged model m-1, trace tr-1, dataset d-1, issue is-1, label schema ls-1, review queue
    rq-1 and scorer sc-1 live in experiment 1. Anything else it answers with 200 and an empty
    object."""

    def __init__(self) -> None:
        self.forwarded: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_request_body(receive)
        path, query = scope["path"], parse_qs(scope["query_string"].decode())
        status = 200
        payload: object = {}
        if path == "/version":
            await send_response(send, 200, b"3.17.2")
            return
        if path == "/api/2.0/mlflow/experiments/get":
            experiment = query.get("experiment_id", [""])[0]
            if experiment in ("1", "2"):
                payload = {"experiment": {"name": f"exp-{experiment}"}}
            else:
                status = 404
        elif path == "/api/2.0/mlflow/experiments/get-by-name":
            name = query.get("experiment_name", [""])[0]
            if name in ("exp-1", "exp-2"):
                payload = {"experiment": {"experiment_id": name[-1], "name": name}}
            else:
                status = 404
        elif path == "/api/2.0/mlflow/registered-models/get":
            name = query.get("name", [""])[0]
            if name.lower().startswith("model-"):  # as MySQL compares: ignoring case
                payload = {"registered_model": {"name": name.lower()}}
            else:
                status = 404
        elif (path := path.replace("/ajax-api/", "/api/", 1)) in OWNED_BY_EXPERIMENT_1:
            if path.endswith("/online-configs") and "sc-987654" in query.get("scorer_ids", []):
                payload = {"configs": []}  # MLflow: no configuration for that scorer
            elif any(v.endswith("987654") for values in query.values() for v in values):
                status = 404  # an id nobody has (see test_existence_oracles)
            else:
                payload = OWNED_BY_EXPERIMENT_1[path]
        elif "987654" in path and path.startswith("/api/"):
            status = 404
        else:
            self.forwarded.append((scope["method"], path))
        await send_response(send, status, json.dumps(payload).encode())


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with ServerThread(FakeMlflow(), lifespan="off") as upstream:
        yield from start_gateway(tmp_path_factory.mktemp("routes"), upstream.url)


def start_gateway(
    data: Path, upstream_url: str, setup: Callable[[Any], None] | None = None
) -> Iterator[str]:
    """A gateway in front of ``upstream_url`` with the two callers set up (and whatever
    ``setup`` adds, given the Gateway); yields its URL."""
    settings = load_settings(
        {"upstream.url": upstream_url, "storage.data_dir": str(data)}, {}, None
    ).settings
    env = {
        "MLFLOW_GUARD_BOOTSTRAP_TOKEN": "mlg_" + "b" * 43,
        "MLFLOW_GUARD_SECRET_KEY": "k" * 40,
    }
    gateway = build_gateway(settings, env)
    with ServerThread(gateway) as server:
        governance_setup(gateway, data)
        if setup is not None:
            setup(gateway)
        deadline = time.monotonic() + 10  # let the running gateway pick the policy up
        while gateway.policies.index.version != gateway.policies.store.version():
            assert time.monotonic() < deadline, "the policy change was not picked up"
            time.sleep(0.05)
        yield server.url


def governance_setup(gateway: object, data: Path) -> None:
    from guard.admin.governance import Governance

    g = Governance(gateway.tokens, gateway.policies.store)  # type: ignore[attr-defined]
    for name, secret, experiment, model in (
        ("allowed", ALLOWED, "exp-1", "model-a*"),
        ("refused", REFUSED, "exp-2", "model-b*"),
    ):
        g.tokens.create(name, "admin", 3600, secret)
        g.change(
            "test",
            add=[
                *(parse(f"p, token:{name}, {role}, experiment:{experiment}")
                  for role in ("manager", "promoter")),
                *(parse(f"p, token:{name}, {role}, model:{model}")
                  for role in ("manager", "promoter")),
                parse(f"p, token:{name}, manager, server:mlflow") if name == "allowed"
                else parse("p, token:refused, viewer, guard:audit"),
            ],
        )  # fmt: skip


def parse(text: str):  # type: ignore[no-untyped-def]
    from guard.authz.policy import parse_lines

    return parse_lines([text])[0]


def fill_path(route: Route, values: dict[str, str] = VALUES, model: str = "model-a") -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(2) or match.group(3)
        return values.get(name, model if name == "name" else "x")

    return re.sub(r"<(?:(path):)?(\w+)>|\{(\w+)(?::path)?\}", value, route.path)


def build_request(
    route: Route, values: dict[str, str] = VALUES, model: str = "model-a", experiment: str = "1"
) -> tuple[str, str, dict[str, object]]:
    """(method, url path, httpx kwargs) naming the allowed caller's resources (or, with other
    ``values``, ``model`` and ``experiment``, other ones)."""
    method = route.method
    source, _, spec = route.id_from.partition(":")
    kwargs: dict[str, object] = {}
    if route.id_from == "graphql":
        document = f'mlflowGetExperiment(input: {{experimentId: "{experiment}"}})'
        kwargs["json"] = {"query": f"{{ {document} {{ experiment {{ name }} }} }}"}
        return method, route.path, kwargs
    is_model = route.kind in ("registered_model", "model_version")
    fields: dict[str, Any] = {}
    for part in spec.split("+"):  # a composite key (scorers) sends every part
        field = part.removesuffix("[]").split("|")[0]
        value: Any = values.get(field, model if is_model else values["experiment_name"])
        if "." in part:  # a nested body path: locations[].mlflow_experiment.experiment_id
            *outer, leaf = part.split(".")
            value = {leaf: values.get(leaf, "x")}
            for segment in reversed(outer):
                name = segment.removesuffix("[]")
                value = {name: [value] if segment.endswith("[]") else value}
            fields.update(value)
            continue
        fields[field] = [value] if part.endswith("[]") else value
    if source == "query":
        kwargs["params"] = fields
    elif source == "body":
        extra = next((v for k, v in EXTRA_FIELDS.items() if route.path.endswith(k)), {})
        kwargs["json"] = {**fields, **extra}
    elif source == "header":
        kwargs["headers"] = {k: str(v) for k, v in fields.items()}
    return method, fill_path(route, values, model), kwargs


def resolvable(route: Route) -> bool:
    source, _, spec = route.id_from.partition(":")
    if route.kind == "server" or route.kind in ("webhook", "gateway", "job", "assistant",
                                                "workspace", "user_admin"):  # fmt: skip
        return True
    if source in ("artifact_path", "graphql", "header"):
        return True
    if source not in ("query", "body", "path"):
        return False
    key = spec.split("+")[0]  # a composite key is resolved on its first part
    if "." in key:  # nested body paths
        return True
    field = key.removesuffix("[]").split("|")[0]
    if field == "name":
        return route.kind in ("registered_model", "model_version", "experiment")
    return field in RESOLVABLE_FIELDS


# The rows of the release FakeMlflow reports (3.17.2): the gateway serves no other there.
ROUTES = list(routes_for(load_routes(), "3.17.2"))


def expected(route: Route) -> tuple[str | None, str | None]:
    """The x-guard-reason for (allowed caller, refused caller); None means forwarded."""
    if route.refuse:
        return "route_not_classified", "route_not_classified"
    if route.id_from == "graphql" and route.method == "GET":
        # MLflow reads a document only from a body, which no GET may carry through the gateway.
        return "body_not_allowed", "body_not_allowed"
    if route.open and route.kind == "server":
        return None, None
    if route.open or route.path.endswith("/scorers/online-configs"):
        return None, None  # searches and scorer configurations: answers filtered per caller
    if not resolvable(route):
        return "permission_denied", "permission_denied"
    return None, "permission_denied"


@pytest.mark.parametrize("route", ROUTES, ids=[f"{r.method} {r.path}" for r in ROUTES])
def test_route(gateway: str, client: httpx.Client, route: Route) -> None:
    method, path, kwargs = build_request(route)
    want_allowed, want_refused = expected(route)
    extra: dict[str, str] = kwargs.pop("headers", {})  # type: ignore[assignment]
    for token, want in ((ALLOWED, want_allowed), (REFUSED, want_refused)):
        headers = {"Authorization": f"Bearer {token}", **extra}
        response = client.request(method, gateway + path, headers=headers, **kwargs)  # type: ignore[arg-type]
        got = response.headers.get("x-guard-reason")
        assert got == want, (token[:6], method, path, kwargs, response.status_code, response.text)
        if want is not None:
            assert response.status_code in (400, 403), response.status_code


def reason(client: httpx.Client, url: str, method: str, **kwargs: Any) -> str | None:
    headers = [("authorization", f"Bearer {ALLOWED}"), *kwargs.pop("headers", [])]
    response = client.request(method, url, headers=headers, **kwargs)
    got: str | None = response.headers.get("x-guard-reason")
    return got


def exp(experiment_id: str) -> dict[str, object]:
    return {"mlflow_experiment": {"experiment_id": experiment_id}}


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "want"),
    [
        # A trace search is allowed only if every location is an experiment the caller may read.
        ("POST", "/api/3.0/mlflow/traces/search", {"json": {"locations": [exp("1"), exp("2")]}},
         "permission_denied"),
        ("POST", "/api/3.0/mlflow/traces/search",
         {"json": {"locations": [exp("1"), {"inference_table": {"full_table_name": "c.s.t"}}]}},
         "permission_denied"),
        ("POST", "/api/3.0/mlflow/traces/search",
         {"json": {"locations": [exp("1"), {"mlflowExperiment": {"experimentId": "2"}}]}},
         "permission_denied"),
        ("POST", "/api/3.0/mlflow/traces/search",
         {"json": {"locations": [{**exp("1"), "mlflowExperiment": {"experimentId": "2"}}]}},
         "ambiguous_parameter"),
        # Linking a dataset to an experiment needs update there too.
        ("POST", "/api/3.0/mlflow/datasets/d-1/add-experiments",
         {"json": {"experiment_ids": ["2"]}}, "permission_denied"),
        # MLflow reads the first of a repeated header; the gateway must not check another one.
        ("POST", "/v1/traces",
         {"headers": [("x-mlflow-experiment-id", "2"), ("x-mlflow-experiment-id", "1")]}, "any"),
        # Traces linked to a run need update on the run's experiment too.
        ("POST", "/v1/traces",
         {"headers": [("x-mlflow-experiment-id", "1"), ("x-mlflow-run-id", "r1")]}, None),
        ("POST", "/v1/traces",
         {"headers": [("x-mlflow-experiment-id", "1"), ("x-mlflow-run-id", "r1"),
                      ("x-mlflow-run-id", "r2")]}, "ambiguous_parameter"),
        # An escape that is not UTF-8: MLflow would act on "model-a-%FF", not on U+FFFD.
        ("GET", "/api/2.0/mlflow/registered-models/get?name=model-a-%FF", {},
         "invalid_request_body"),
        ("GET", "/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=exp-%ff", {},
         "invalid_request_body"),
        # A model named in another case is the model MLflow stores under that name.
        ("GET", "/api/2.0/mlflow/registered-models/get", {"params": {"name": "MODEL-A"}}, None),
        ("GET", "/api/2.0/mlflow/registered-models/get", {"params": {"name": "Model-B"}},
         "permission_denied"),
    ],
)  # fmt: skip
def test_what_tries_to_get_around_the_lookups(
    gateway: str, client: httpx.Client, method: str, path: str, kwargs: Any, want: str | None
) -> None:
    got = reason(client, gateway + path, method, **kwargs)
    assert got is not None if want == "any" else got == want
