from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import pytest

from guard.authz.identifiers import Headers, Unresolved
from guard.authz.resolve import ISSUE, Resolver, TTLCache, _artifact_experiment, _dig
from guard.authz.routes import load_routes
from guard.edge.requestdata import RequestData, RequestDataError, _camel
from guard.upstream.client import UpstreamClient


@pytest.mark.parametrize(
    ("path", "experiment"),
    [("1/abc/artifacts/x", "1"), ("12", "12"), ("0/models/m-1/x", "0")],
)
def test_artifact_paths_name_their_experiment(path: str, experiment: str) -> None:
    assert _artifact_experiment(path) == experiment


@pytest.mark.parametrize(
    "path", ["", "x/1", "01/abc", "+1/abc", " 1/abc", "workspaces/w/1/abc", "-1/x", "\uff11/abc"]
)
def test_artifact_paths_that_name_no_experiment(path: str) -> None:
    with pytest.raises(Unresolved):
        _artifact_experiment(path)


def test_dig() -> None:
    data = {"run": {"info": {"experiment_id": "3", "flag": True, "n": 4}}}
    assert _dig(data, "run", "info", "experiment_id") == "3"
    assert _dig(data, "run", "info", "n") == "4"
    assert _dig(data, "run", "info", "flag") is None
    assert _dig(data, "run", "missing") is None
    assert _dig(None, "run") is None
    assert _dig({"run": ["x"]}, "run", "info") is None


def test_cache_is_bounded_expires_and_forgets() -> None:
    cache = TTLCache(size=2, ttl=0.2)
    cache.put("experiment:1", "a")
    cache.put("experiment:2", "b")
    cache.put("run:r", "1")  # evicts the oldest
    assert cache.get("experiment:1") == (False, None)
    assert cache.get("experiment:2") == (True, "b")
    cache.forget("experiment:2")
    assert cache.get("experiment:2") == (False, None)
    time.sleep(0.25)
    assert cache.get("run:r") == (False, None)


# --- The resolver against a fake MLflow API -------------------------------------------------

Answers = Mapping[str, tuple[int, object]]
NOT_FOUND = (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})
EXPERIMENTS = {
    "/api/2.0/mlflow/experiments/get?experiment_id=1": (200, {"experiment": {"name": "exp-1"}}),
    "/api/2.0/mlflow/experiments/get?experiment_id=2": (200, {"experiment": {"name": "exp-2"}}),
}


class FakeResponse:
    def __init__(self, status: int, data: bytes) -> None:
        self.status, self.data = status, data

    async def body(self) -> AsyncIterator[bytes]:
        yield self.data

    async def __aenter__(self) -> FakeResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class FakeUpstream:
    """Answers GETs from a table keyed by target (path and query), then by path alone."""

    host_header = "mlflow"

    def __init__(self, answers: Answers) -> None:
        self.answers = {**EXPERIMENTS, **answers}
        self.asked: list[str] = []

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: object
    ) -> FakeResponse:
        assert method == "GET"
        self.asked.append(target)
        answer = self.answers.get(target) or self.answers.get(target.partition("?")[0])
        status, payload = answer or NOT_FOUND
        return FakeResponse(status, json.dumps(payload).encode())


ROWS = {(r.method, r.path): r for r in load_routes()}


def resolve(
    answers: Answers,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    query: bytes = b"",
    body: object = None,
    headers: Headers | None = None,
) -> list[str]:
    resolver = Resolver(cast(UpstreamClient, FakeUpstream(answers)), 100, 60)
    data = RequestData.build(method, query, b"" if body is None else json.dumps(body).encode())
    route = ROWS[(method, path)]
    return asyncio.run(resolver.resources(route, params or {}, data, headers or {}))


def refusal(answers: Answers, *args: str, **kwargs: Any) -> str:
    """The reason the resolver refuses with."""
    with pytest.raises((Unresolved, RequestDataError)) as caught:
        resolve(answers, *args, **kwargs)
    assert isinstance(caught.value, Unresolved | RequestDataError)
    return caught.value.refusal.reason


SEARCH = ("POST", "/api/3.0/mlflow/traces/search")
START = ("POST", "/api/3.0/mlflow/traces")


def loc(experiment_id: object) -> dict[str, object]:
    return {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}}


def test_trace_search_needs_every_location_in_either_spelling() -> None:
    body = {"locations": [loc("1"), {"mlflowExperiment": {"experimentId": "2"}}, loc("01")]}
    assert resolve({}, *SEARCH, body=body) == ["experiment:exp-1", "experiment:exp-2"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # Both spellings of one field, at each depth: which one MLflow reads is not ours to guess.
        ({"locations": [loc("1")], "locations_": 1, "Locations": 2}, None),
        ({"locations": [{**loc("1"), "mlflowExperiment": {"experimentId": "2"}}]}, "ambiguous"),
        ({"locations": [{"mlflow_experiment": {"experiment_id": "1", "experimentId": "2"}}]},
         "ambiguous"),
        # One unreadable element spoils the list: protobuf would stop there, MLflow go on.
        ({"locations": [loc("1"), "2"]}, "invalid_request_body"),
        ({"locations": [loc("1"), None]}, "invalid_request_body"),
        ({"locations": [loc("1"), {"mlflow_experiment": "2"}]}, "invalid_request_body"),
        ({"locations": [loc("1"), {"mlflow_experiment": ["2"]}]}, "invalid_request_body"),
        ({"locations": [loc("1"), loc(2)]}, "invalid_request_body"),
        ({"locations": [loc("1"), loc(True)]}, "invalid_request_body"),
        ({"locations": [loc("1"), loc(["2"])]}, "invalid_request_body"),
        ({"locations": loc("1")}, "invalid_request_body"),
        # Locations that are no MLflow experiment, or name none.
        ({"locations": [loc("1"), {"inference_table": {"full_table_name": "c.s.t"}}]},
         "resource_unresolved"),
        ({"locations": [{"type": "UC_SCHEMA", "uc_schema": {"catalog_name": "c"}}]},
         "resource_unresolved"),
        ({"locations": [loc("1"), {"mlflow_experiment": None}]}, "resource_unresolved"),
        ({"locations": [loc("1"), {"mlflow_experiment": {}}]}, "resource_unresolved"),
        ({"locations": [loc("1"), loc(None)]}, "resource_unresolved"),
        ({"locations": [loc("1"), {}]}, "resource_unresolved"),
        # Nothing named, or an experiment MLflow does not know.
        ({"locations": []}, "invalid_request_body"),
        ({"locations": None}, "invalid_request_body"),
        ({}, "invalid_request_body"),
        ({"locations": [loc("1"), loc("9")]}, "resource_unresolved"),
    ],
)  # fmt: skip
def test_trace_search_refuses_what_it_cannot_read_exactly(
    body: dict[str, object], reason: str | None
) -> None:
    if reason is None:  # unknown fields are ignored, by MLflow too
        assert resolve({}, *SEARCH, body=body) == ["experiment:exp-1"]
        return
    got = refusal({}, *SEARCH, body=body)
    assert got == ("ambiguous_parameter" if reason == "ambiguous" else reason)


def test_a_duplicate_key_deep_in_the_body_is_refused() -> None:
    raw = b'{"locations": [{"mlflow_experiment": {"experiment_id": "1", "experiment_id": "2"}}]}'
    with pytest.raises(RequestDataError):
        RequestData.build("POST", b"", raw)


def test_start_trace_reads_the_nested_location() -> None:
    snake = {"trace": {"trace_info": {"trace_location": loc("2")}}}
    camel = {"trace": {"traceInfo": {"traceLocation": {"mlflowExperiment": {"experimentId": "2"}}}}}
    assert resolve({}, *START, body=snake) == ["experiment:exp-2"]
    assert resolve({}, *START, body=camel) == ["experiment:exp-2"]
    assert refusal({}, *START, body={"trace": {}}) == "resource_unresolved"
    assert refusal({}, *START, body={"trace": {"trace_info": {}}}) == "resource_unresolved"
    assert refusal({}, *START, body={"trace": "x"}) == "invalid_request_body"
    assert refusal({}, *START, body={"trace": [snake["trace"]]}) == "invalid_request_body"
    assert refusal({}, *START, body={}) == "invalid_request_body"
    both = {"trace": {"trace_info": {"trace_location": loc("1")}, "traceInfo": {}}}
    assert refusal({}, *START, body=both) == "ambiguous_parameter"


def test_nested_paths_are_not_read_from_the_query_string() -> None:
    assert refusal({}, *SEARCH, query=b"locations=1") == "invalid_request_body"


OTLP = ("POST", "/v1/traces")


def test_otlp_header_is_read_only_when_every_value_is_known() -> None:
    assert resolve({}, *OTLP, headers={"x-mlflow-experiment-id": ["2"]}) == ["experiment:exp-2"]
    # MLflow (Starlette) reads the first of a repeated header; a gateway that kept the last
    # would check the wrong experiment.
    two = {"x-mlflow-experiment-id": ["1", "2"]}
    assert refusal({}, *OTLP, headers=two) == "ambiguous_parameter"
    # One string per name may already have folded a repeat away.
    assert refusal({}, *OTLP, headers={"x-mlflow-experiment-id": "1"}) == "resource_unresolved"
    assert refusal({}, *OTLP, headers={}) == "invalid_request_body"
    assert refusal({}, *OTLP, headers={"x-mlflow-experiment-id": ["x"]}) == "invalid_request_body"


def test_scorer_composite_keys_are_authorized_on_their_experiment() -> None:
    get = ("GET", "/api/3.0/mlflow/scorers/get")
    assert resolve({}, *get, query=b"experiment_id=1&name=judge") == ["experiment:exp-1"]
    assert refusal({}, *get, query=b"experiment_id=1&experiment_id=2&name=j") == (
        "ambiguous_parameter"
    )
    assert refusal({}, *get, query=b"experiment_id=1&experimentId=2") == "ambiguous_parameter"
    delete = ("DELETE", "/api/3.0/mlflow/scorers/delete")
    assert resolve({}, *delete, body={"experimentId": "2", "name": "j"}) == ["experiment:exp-2"]
    assert refusal({}, *delete, body={"name": "j"}) == "invalid_request_body"


CONFIGS = "/api/3.0/mlflow/scorers/online-configs"


def test_scorer_ids_are_looked_up_to_their_configurations_experiments() -> None:
    route = ("GET", CONFIGS)
    configs = {"configs": [{"scorer_id": "a", "experiment_id": "1"},
                           {"scorer_id": "b", "experiment_id": 2}]}  # fmt: skip
    answers = {f"{CONFIGS}?scorer_ids=a&scorer_ids=b&scorer_ids=c": (200, configs)}
    query = b"scorer_ids=a&scorer_ids=b&scorer_ids=c"
    assert resolve(answers, *route, query=query) == ["experiment:exp-1", "experiment:exp-2"]
    # A scorer without an online configuration: MLflow returns nothing, nothing to check.
    assert resolve({CONFIGS: (200, {})}, *route, query=b"scorer_ids=z") == []
    unreadable: list[object] = [
        {"configs": [{"scorer_id": "a"}]},
        {"configs": {}},
        {"configs": [1]},
    ]
    for bad in unreadable:
        assert refusal({CONFIGS: (200, bad)}, *route, query=b"scorer_ids=a") == (
            "resource_unresolved"
        )
    assert refusal({CONFIGS: (500, {})}, *route, query=b"scorer_ids=a") == "resource_unresolved"
    assert refusal({}, *route, query=b"") == "invalid_request_body"


DATASET = "/api/3.0/mlflow/datasets/<dataset_id>"
LINKS = "/api/3.0/mlflow/datasets/d-1/experiment-ids"


def test_datasets_need_every_linked_experiment() -> None:
    answers = {LINKS: (200, {"experiment_ids": ["1", "2"]})}
    params = {"dataset_id": "d-1"}
    assert resolve(answers, "GET", DATASET, params=params) == [
        "experiment:exp-1",
        "experiment:exp-2",
    ]
    # Linked to none (or unknown: MLflow answers both the same): nobody's by policy.
    assert refusal({LINKS: (200, {})}, "GET", DATASET, params=params) == "resource_unresolved"
    assert refusal({}, "GET", DATASET, params=params) == "resource_unresolved"
    unreadable: list[object] = [
        {"experiment_ids": "1"},
        {"experiment_ids": [None]},
        {"experiment_ids": [{}]},
    ]
    for bad in unreadable:
        assert refusal({LINKS: (200, bad)}, "GET", DATASET, params=params) == (
            "resource_unresolved"
        )
    linked_to_9 = {LINKS: (200, {"experiment_ids": ["1", "9"]})}
    assert refusal(linked_to_9, "DELETE", DATASET, params=params) == "resource_unresolved"


def test_dataset_links_also_need_the_experiments_in_the_body() -> None:
    answers = {LINKS: (200, {"experiment_ids": ["1"]})}
    for action in ("add-experiments", "remove-experiments"):
        path = f"{DATASET}/{action}"
        got = resolve(answers, "POST", path, params={"dataset_id": "d-1"},
                      body={"experiment_ids": ["2"]})  # fmt: skip
        assert got == ["experiment:exp-1", "experiment:exp-2"]
        both = {"experiment_ids": ["1"], "experimentIds": ["2"]}
        assert refusal(answers, "POST", path, params={"dataset_id": "d-1"}, body=both) == (
            "ambiguous_parameter"
        )
        assert refusal(answers, "POST", path, params={"dataset_id": "d-1"},
                       body={"experiment_ids": ["9"]}) == "resource_unresolved"  # fmt: skip


def test_dataset_ids_are_quoted_into_the_lookup_path() -> None:
    upstream = FakeUpstream({})
    resolver = Resolver(cast(UpstreamClient, upstream), 100, 60)
    with pytest.raises(Unresolved):
        asyncio.run(resolver.dataset_experiments("d-1/../../experiments/get?x="))
    assert upstream.asked == [
        "/api/3.0/mlflow/datasets/d-1%2F..%2F..%2Fexperiments%2Fget%3Fx%3D/experiment-ids"
    ]


ISSUE_AT = ("/api/3.0/mlflow/issues/is-1", {"issue": {"experiment_id": "2"}})
SCHEMA_AT = (
    "/api/3.0/mlflow/label-schemas/get?schema_id=is-1",
    {"label_schema": {"experiment_id": "2"}},
)
QUEUE_AT = (
    "/api/3.0/mlflow/review-queues/get?queue_id=is-1",
    {"review_queue": {"experiment_id": "2"}},
)


@pytest.mark.parametrize(
    ("method", "path", "where", "lookup"),
    [
        ("GET", "/api/3.0/mlflow/issues/<issue_id>", "params", ISSUE_AT),
        ("PATCH", "/api/3.0/mlflow/issues/<issue_id>", "params", ISSUE_AT),
        ("GET", "/api/3.0/mlflow/label-schemas/get", "query", SCHEMA_AT),
        ("PATCH", "/api/3.0/mlflow/label-schemas/update", "body", SCHEMA_AT),
        ("DELETE", "/api/3.0/mlflow/label-schemas/delete", "body", SCHEMA_AT),
        ("GET", "/api/3.0/mlflow/review-queues/get", "query", QUEUE_AT),
        ("POST", "/api/3.0/mlflow/review-queues/items/add", "body", QUEUE_AT),
    ],
)
def test_issues_schemas_and_queues_are_looked_up_to_their_experiment(
    method: str, path: str, where: str, lookup: tuple[str, dict[str, object]]
) -> None:
    target, answer = lookup
    field = ROWS[(method, path)].id_from.partition(":")[2]
    places: dict[str, dict[str, Any]] = {
        "params": {"params": {field: "is-1"}},
        "query": {"query": f"{field}=is-1".encode()},
        "body": {"body": {field: "is-1"}},
    }
    kwargs = places[where]
    assert resolve({target: (200, answer)}, method, path, **kwargs) == ["experiment:exp-2"]
    assert refusal({}, method, path, **kwargs) == "resource_unresolved"  # unknown id
    unreadable = {target: (200, {key: {"experiment_id": None} for key in answer})}
    assert refusal(unreadable, method, path, **kwargs) == "resource_unresolved"
    known = {target: (200, answer)}
    if where == "query":  # a repeated singular parameter: MLflow reads the first
        twice = f"{field}=is-1&{field}=x".encode()
        assert refusal(known, method, path, query=twice) == "ambiguous_parameter"
    if where == "body":
        both = {field: "is-1", _camel(field): "x"}
        assert refusal(known, method, path, body=both) == "ambiguous_parameter"
        assert refusal(known, method, path, body={field: {"id": "is-1"}}) == "invalid_request_body"


def test_lookups_are_cached() -> None:
    upstream = FakeUpstream(
        {"/api/3.0/mlflow/issues/is-1": (200, {"issue": {"experiment_id": "1"}})}
    )
    resolver = Resolver(cast(UpstreamClient, upstream), 100, 60)
    for _ in range(2):
        assert asyncio.run(resolver.experiment_of(ISSUE, "is-1")) == "1"
    assert upstream.asked == ["/api/3.0/mlflow/issues/is-1"]


REGISTERED = "/api/2.0/mlflow/registered-models/get"
BY_NAME = "/api/2.0/mlflow/experiments/get-by-name"


def test_a_case_variant_model_name_is_the_model_mlflow_stores() -> None:
    # MySQL compares names ignoring case: "fraud" is the model MLflow stores as "Fraud".
    answers = {f"{REGISTERED}?name=fraud": (200, {"registered_model": {"name": "Fraud"}})}
    assert resolve(answers, "GET", REGISTERED, query=b"name=fraud") == ["model:Fraud"]
    versions = ("GET", "/api/2.0/mlflow/model-versions/get")
    assert resolve(answers, *versions, query=b"name=fraud&version=1") == ["model:Fraud"]
    # A prompt is a registered model with a tag; registered-models/get answers for it too.
    prompt = {f"{REGISTERED}?name=QA": (200, {"registered_model": {
        "name": "qa", "tags": [{"key": "mlflow.prompt.is_prompt", "value": "true"}]}})}  # fmt: skip
    assert resolve(prompt, "GET", REGISTERED, query=b"name=QA") == ["model:qa"]


def test_an_unknown_model_name_stays_as_given_and_an_error_is_refused() -> None:
    create = ("POST", "/api/2.0/mlflow/registered-models/create")
    assert resolve({}, *create, body={"name": "New"}) == ["model:New"]
    broken = {REGISTERED: (500, {"error_code": "INTERNAL_ERROR"})}
    assert refusal(broken, *create, body={"name": "New"}) == "resource_unresolved"
    odd: Answers = {REGISTERED: (200, {"registered_model": {}})}
    assert refusal(odd, *create, body={"name": "New"}) == "resource_unresolved"
    assert refusal({}, *create, body={"name": {"n": 1}}) == "invalid_request_body"


def test_model_names_are_cached_and_forgotten_on_rename_and_delete() -> None:
    upstream = FakeUpstream({f"{REGISTERED}?name=fraud": (200, {"registered_model": {
        "name": "Fraud"}})})  # fmt: skip
    resolver = Resolver(cast(UpstreamClient, upstream), 100, 60)
    for _ in range(2):
        assert asyncio.run(resolver.model_resource("fraud")) == "model:Fraud"
    assert len(upstream.asked) == 1
    resolver.forget("model", "Fraud")
    assert asyncio.run(resolver.model_resource("fraud")) == "model:Fraud"
    assert len(upstream.asked) == 2
    # Checking a rename or delete drops them too, so none outlives the change by long.
    rename = ROWS[("POST", "/api/2.0/mlflow/registered-models/rename")]
    data = RequestData.build("POST", b"", b'{"name": "fraud", "new_name": "x"}')
    assert asyncio.run(resolver.resources(rename, {}, data, {})) == ["model:Fraud"]
    assert asyncio.run(resolver.model_resource("fraud")) == "model:Fraud"
    assert len(upstream.asked) == 3


def test_experiment_names_are_the_names_mlflow_stores() -> None:
    answers = {f"{BY_NAME}?experiment_name=EXP-1": (200, {"experiment": {"name": "exp-1"}})}
    get = ("GET", BY_NAME)
    assert resolve(answers, *get, query=b"experiment_name=EXP-1") == ["experiment:exp-1"]
    assert resolve({}, *get, query=b"experiment_name=new") == ["experiment:new"]
    create = ("POST", "/api/2.0/mlflow/experiments/create")
    assert resolve(answers, *create, body={"name": "EXP-1"}) == ["experiment:exp-1"]
    assert refusal({BY_NAME: (503, {})}, *create, body={"name": "x"}) == "resource_unresolved"


def test_experiment_names_are_forgotten_with_the_experiment() -> None:
    upstream = FakeUpstream({f"{BY_NAME}?experiment_name=a": (200, {"experiment": {"name": "A"}})})
    resolver = Resolver(cast(UpstreamClient, upstream), 100, 60)
    for _ in range(2):
        assert asyncio.run(resolver.experiment_resource_by_name("a")) == "experiment:A"
    resolver.forget("experiment", "7")  # what the gateway does after a rename/delete/restore
    assert asyncio.run(resolver.experiment_resource_by_name("a")) == "experiment:A"
    assert len(upstream.asked) == 2


def test_model_sources_use_the_stored_name() -> None:
    answers = {f"{REGISTERED}?name=fraud": (200, {"registered_model": {"name": "Fraud"}})}
    resolver = Resolver(cast(UpstreamClient, FakeUpstream(answers)), 100, 60)
    assert asyncio.run(resolver.source_resources("models:/fraud@prod")) == ["model:Fraud"]
