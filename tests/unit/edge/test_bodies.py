"""Bodies: a request carries one only where the gateway reads it as MLflow does, and its lists of
ids are counted before anything is looked up.

MLflow reads a GET's fields from the query string, or from a JSON body when the query string is
empty, and a HEAD's from its body alone. The route table marks (``get_body``) the GET rows whose
handler reads that body; the marks are checked here against the installed MLflow itself.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.app import build_gateway
from guard.authz.graphql import graphql_plan
from guard.authz.routes import (
    ReleaseTables,
    Route,
    RouteClassifierMiddleware,
    RouteTable,
    load_routes,
    release_key,
)
from guard.config import load_settings
from guard.edge.bodies import BodyMiddleware
from guard.edge.requestdata import RequestDataError
from tests.servers import ServerThread, read_request_body
from tests.unit.asgi import Recorder, Result, call
from tests.unit.authz.test_route_authorization import ALLOWED, REFUSED, FakeMlflow, governance_setup

ROUTES = load_routes()
TABLE = RouteTable(ROUTES)
PREFIXES = ("/api", "/ajax-api")
FRAMINGS = ("content-length", "chunked")
BODY = b'{"run_id": "r2"}'
# GET rows whose MLflow handler reads a body, left unmarked on purpose (route_table.toml says why).
UNMARKED_ON_PURPOSE = frozenset(
    {
        "/graphql",
        "/api/2.0/mlflow/registered-models/search",
        "/ajax-api/2.0/mlflow/registered-models/search",
        "/api/2.0/mlflow/model-versions/search",
        "/ajax-api/2.0/mlflow/model-versions/search",
    }
)
SAMPLES = {"artifact_path": "1/abc/artifacts/x.txt", "path": "x.txt"}
_PARAM = re.compile(r"<(?:(path):)?(\w+)>|\{(\w+)(?::(path))?\}")


def fill(template: str) -> str:
    """A concrete path for a route template."""
    return _PARAM.sub(lambda m: SAMPLES.get(m.group(2) or m.group(3), "s1"), template)


def stack(max_ids: int = 1000) -> tuple[RouteClassifierMiddleware, Recorder]:
    recorder = Recorder()
    body = BodyMiddleware(recorder, max_body_size=1 << 24, max_ids_per_request=max_ids)
    return RouteClassifierMiddleware(body, tables=ReleaseTables(ROUTES)), recorder


def send(
    method: str, path: str, body: bytes = b"", framing: str = "content-length",
    query: bytes = b"", max_ids: int = 1000,
) -> tuple[Result, Recorder]:  # fmt: skip
    app, recorder = stack(max_ids)
    headers = [("host", "localhost"), ("content-type", "application/json")]
    if framing == "chunked":
        headers.append(("transfer-encoding", "chunked"))
    elif body or framing == "content-length: 0":
        headers.append(("content-length", str(len(body))))
    return call(app, method=method, path=path, headers=headers, body=body, query=query), recorder


def refused(result: Result, recorder: Recorder, reason: str) -> None:
    assert (result.status, result.reason) == (400, reason), (result.status, result.body)
    assert recorder.scopes == []  # nothing further in was asked, so nothing was looked up


GET_ROWS = [r for r in ROUTES if r.method == "GET" and not r.refuse]
MARKED = [r for r in GET_ROWS if r.get_body]
UNMARKED = [r for r in GET_ROWS if not r.get_body]


# -- HEAD -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("query", [b"run_id=r1", b""])
@pytest.mark.parametrize(
    "path",
    [f"{p}/2.0/mlflow/runs/get" for p in PREFIXES]
    + [f"{p}/2.0/mlflow/logged-models/m-1" for p in PREFIXES]
    + [f"{p}/2.0/mlflow-artifacts/artifacts/1/r1/artifacts/x.txt" for p in PREFIXES]
    + ["/get-artifact", "/graphql", "/"],
)
def test_a_head_with_a_body_is_refused(path: str, query: bytes, framing: str) -> None:
    refused(*send("HEAD", path, BODY, framing, query), "body_not_allowed")


@pytest.mark.parametrize("route", GET_ROWS[::7], ids=lambda r: r.path)
def test_a_head_is_forwarded_as_a_get_without_a_body(route: Route) -> None:
    for framing in ("none", "content-length: 0", "chunked"):
        result, recorder = send("HEAD", fill(route.path), b"", framing, b"x=1")
        assert result.status == 200, (framing, result.body)
        (scope,) = recorder.scopes
        assert scope["method"] == "HEAD"  # what the client sent, for the audit trail
        assert scope["guard.forward_method"] == "GET"
        assert scope["guard.body"] == b""


# -- GET ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("route", MARKED, ids=lambda r: r.path)
def test_a_get_with_a_body_and_a_query_string_is_refused(route: Route, framing: str) -> None:
    refused(*send("GET", fill(route.path), BODY, framing, b"run_id=r1"), "body_not_allowed")
    # An empty-looking query string is still one: Werkzeug reads "&" as no parameters (MLflow
    # would read the body), the gateway would not.
    refused(*send("GET", fill(route.path), BODY, framing, b"&"), "body_not_allowed")


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("route", UNMARKED, ids=lambda r: r.path)
def test_a_get_with_a_body_on_an_unmarked_row_is_refused(route: Route, framing: str) -> None:
    refused(*send("GET", fill(route.path), BODY, framing), "body_not_allowed")


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("route", MARKED, ids=lambda r: r.path)
def test_a_get_with_a_body_on_a_marked_row_is_forwarded(route: Route, framing: str) -> None:
    result, recorder = send("GET", fill(route.path), BODY, framing)
    assert result.status == 200, result.body
    (scope,) = recorder.scopes
    assert scope["guard.body"] == BODY
    assert "guard.forward_method" not in scope


@pytest.mark.parametrize("framing", ["content-length: 0", "chunked"])
@pytest.mark.parametrize("route", UNMARKED[::5], ids=lambda r: r.path)
def test_an_empty_body_is_no_body(route: Route, framing: str) -> None:
    result, recorder = send("GET", fill(route.path), b"", framing, b"x=1")
    assert result.status == 200, result.body
    assert recorder.scopes[0]["guard.body"] == b""


@pytest.mark.parametrize("framing", FRAMINGS)
def test_a_get_to_graphql_with_a_body_is_a_400(framing: str) -> None:
    document = json.dumps(
        {"query": '{ mlflowGetRun(input: {runId: "r1"}) { run { info { runId } } } }'}
    )
    refused(*send("GET", "/graphql", document.encode(), framing), "body_not_allowed")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_other_methods_keep_their_bodies_whatever_the_query(prefix: str) -> None:
    result, recorder = send("POST", f"{prefix}/2.0/mlflow/runs/update", BODY, query=b"run_id=r1")
    assert result.status == 200
    assert recorder.scopes[0]["guard.body"] == BODY


# -- the marks, checked against the installed MLflow ----------------------------------------------


class _Recording:
    """A WSGI input that notes whether the application read from it."""

    def __init__(self, inner: Any, reads: list[str]) -> None:
        self.inner, self.reads = inner, reads

    def read(self, *args: Any) -> Any:
        self.reads.append("read")
        return self.inner.read(*args)

    def readinto(self, buffer: Any) -> Any:
        self.reads.append("readinto")
        return self.inner.readinto(buffer)

    def readline(self, *args: Any) -> Any:
        self.reads.append("readline")
        return self.inner.readline(*args)

    def __iter__(self) -> Any:
        self.reads.append("iter")
        return iter(self.inner)


def _fastapi_get_routes() -> dict[str, Any]:
    from fastapi.routing import iter_route_contexts
    from starlette.routing import Mount

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mlflow.server.fastapi_app import app

    return {
        c.path: c.original_route
        for c in iter_route_contexts(app.router.routes)
        if not isinstance(c.original_route, Mount) and "GET" in (c.methods or ())
    }


def _flask_reads_body(path: str) -> bool:
    """Whether MLflow's Flask handler for ``GET path`` (no query string) reads its body."""
    from mlflow.server import app
    from werkzeug.test import EnvironBuilder, run_wsgi_app

    app.url_map.bind("localhost").match(path, method="GET")  # raises unless Flask routes it
    reads: list[str] = []
    environ = EnvironBuilder(
        path=path, method="GET", data=b'{"a": 1}', content_type="application/json"
    ).get_environ()
    environ["wsgi.input"] = _Recording(environ["wsgi.input"], reads)
    app_iter, _, _ = run_wsgi_app(app, environ)
    try:
        b"".join(app_iter)
    finally:
        getattr(app_iter, "close", lambda: None)()
    return bool(reads)


def test_get_body_marks_match_what_mlflow_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each forwarded GET row is sent to MLflow's own handler with a body and no query string;
    a row is marked exactly when the handler reads that body (less the rows left unmarked on
    purpose). The stores fail on first use, so a handler reads what it reads before any lookup;
    native FastAPI routes answer before the Flask mount and read no body of a GET."""
    assert "_MLFLOW_STATIC_PREFIX" not in os.environ  # the routes would be registered elsewhere
    from mlflow.server import handlers

    monkeypatch.setenv("_MLFLOW_SERVER_SERVE_ARTIFACTS", "true")  # as the gateway runs MLflow
    for name in ("_get_tracking_store", "_get_model_registry_store", "_get_job_store",
                 "_get_artifact_repo_mlflow_artifacts", "_get_artifact_repository_for_uri",
                 "_get_artifact_repo"):  # fmt: skip
        monkeypatch.setattr(handlers, name, mock.Mock(side_effect=RuntimeError("no store")))
    fastapi = _fastapi_get_routes()
    reads, native = set(), set()
    installed = release_key(importlib.metadata.version("mlflow"))
    for route in (r for r in GET_ROWS if r.applies_to(installed)):  # later releases' rows aside
        if route.path in fastapi:
            endpoint = fastapi[route.path]
            source = inspect.getsource(endpoint.endpoint)
            assert endpoint.body_field is None, route.path
            assert not re.search(r"\.(json|body|form|stream)\(", source), route.path
            native.add(route.path)
        elif _flask_reads_body(fill(route.path)):
            reads.add(route.path)
    marked = {r.path for r in MARKED}
    assert reads >= UNMARKED_ON_PURPOSE
    assert marked == reads - UNMARKED_ON_PURPOSE
    assert not marked & native
    assert len(marked) >= 50  # the handlers built on _get_request_message


# -- lists of ids ---------------------------------------------------------------------------------

LIST_ROWS = [r for r in ROUTES if not r.refuse and r.id_lists[1]]


def _many(route: Route, count: int) -> tuple[bytes, bytes]:
    """(query string, body) naming ``count`` ids in the row's own list."""
    source, (field, *_) = route.id_lists
    ids = [f"{i}" for i in range(count)]
    if source == "query":
        return "&".join(f"{field}={i}" for i in ids).encode(), b""
    if "." in route.id_from:  # locations[].mlflow_experiment.experiment_id
        items = [{"mlflow_experiment": {"experiment_id": i}} for i in ids]
        return b"", json.dumps({field: items}).encode()
    return b"", json.dumps({field: ids}).encode()


def test_every_list_row_is_covered_on_both_prefixes() -> None:
    paths = {r.path for r in LIST_ROWS}
    assert len(LIST_ROWS) >= 20
    for path in paths:
        if path.startswith("/api/"):
            assert path.replace("/api/", "/ajax-api/", 1) in paths, path


@pytest.mark.parametrize("route", LIST_ROWS, ids=lambda r: f"{r.method} {r.path}")
def test_ten_thousand_ids_are_refused_before_any_lookup(route: Route) -> None:
    query, body = _many(route, 10_000)
    refused(*send(route.method, fill(route.path), body, query=query), "too_many_ids")
    query, body = _many(route, 1000)  # the limit itself passes
    result, recorder = send(route.method, fill(route.path), body, query=query)
    assert result.status == 200 and len(recorder.scopes) == 1


@pytest.mark.parametrize("route", [r for r in LIST_ROWS if r.get_body], ids=lambda r: r.path)
def test_ids_in_a_gets_body_are_counted(route: Route) -> None:
    _, (field, *_) = route.id_lists
    body = json.dumps({field: [str(i) for i in range(1001)]}).encode()
    refused(*send("GET", fill(route.path), body, "chunked"), "too_many_ids")


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/2.0/mlflow/runs/search", "experimentIds"),  # the other spelling of the row's list
        ("/3.0/mlflow/datasets/search", "experimentIds"),
        ("/3.0/mlflow/traces/search", "locations"),
        # Not the row's id (the dataset) but looked up as well: the experiments it links.
        ("/3.0/mlflow/datasets/d-1/add-experiments", "experimentIds"),
        ("/3.0/mlflow/datasets/d-1/remove-experiments", "experiment_ids"),
    ],
)
def test_every_spelling_counts(prefix: str, path: str, field: str) -> None:
    items: list[Any] = [str(i) for i in range(1001)]
    if field == "locations":
        items = [{"mlflowExperiment": {"experimentId": i}} for i in items]
    encoded = json.dumps({field: items}).encode()
    refused(*send("POST", prefix + path, encoded, "chunked"), "too_many_ids")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_ids_in_a_get_query_string_are_counted(prefix: str) -> None:
    query = "&".join(f"trace_ids=t{i}" for i in range(1001)).encode()
    refused(*send("GET", f"{prefix}/3.0/mlflow/traces/batchGet", query=query), "too_many_ids")
    query = b"run_ids=" + b"&run_ids=".join(str(i).encode() for i in range(1001))
    path = f"{prefix}/2.0/mlflow/metrics/get-history-bulk-interval"
    refused(*send("GET", path, query=query), "too_many_ids")


def test_ids_in_a_graphql_document_are_counted() -> None:
    ids = json.dumps([str(i) for i in range(1001)])
    document = (
        f"{{ mlflowSearchRuns(input: {{experimentIds: {ids}}}) {{ runs {{ info {{ runId }} }} }} }}"
    )
    body = json.dumps({"query": document}).encode()
    needs, _ = graphql_plan("POST", b"", body)  # without a limit, each one is a lookup
    assert len(needs) == 1001
    with pytest.raises(RequestDataError) as caught:
        graphql_plan("POST", b"", body, max_ids=1000)
    assert caught.value.refusal.reason == "too_many_ids"
    fine = json.dumps({"query": document.replace(ids, json.dumps(["1", "2"]))}).encode()
    assert len(graphql_plan("POST", b"", fine, max_ids=2)[0]) == 2


def test_the_limit_is_left_for_other_readers_of_ids() -> None:
    result, recorder = send("POST", "/api/2.0/mlflow/runs/search", b"{}", max_ids=7)
    assert result.status == 200
    assert recorder.scopes[0]["guard.max_ids"] == 7


# -- through the whole gateway, against a fake MLflow ---------------------------------------------


class RecordingMlflow:
    """FakeMlflow (route authorization's), noting every request the gateway sends it."""

    def __init__(self) -> None:
        self.inner = FakeMlflow()
        self.seen: list[tuple[str, str, bytes, bytes, bool]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_request_body(receive)
        forwarded = any(k == b"x-forwarded-for" for k, _ in scope["headers"])
        self.seen.append((scope["method"], scope["path"], scope["query_string"], body, forwarded))
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return {"type": "http.disconnect"}
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.inner(scope, replay, send)

    def forwarded(self) -> list[tuple[str, str, bytes, bytes, bool]]:
        return [s for s in self.seen if s[4]]


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, RecordingMlflow]]:
    upstream_app = RecordingMlflow()
    with ServerThread(upstream_app, lifespan="off") as upstream:
        yield upstream.url, upstream_app


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, fake: tuple[str, RecordingMlflow]
) -> Iterator[str]:
    data: Path = tmp_path_factory.mktemp("bodies")
    settings = load_settings(
        {"upstream.url": fake[0], "storage.data_dir": str(data),
         "authz.max_ids_per_request": "3"}, {}, None,
    ).settings  # fmt: skip
    env = {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": "mlg_" + "b" * 43, "MLFLOW_GUARD_SECRET_KEY": "k" * 40}
    built = build_gateway(settings, env)
    with ServerThread(built) as server:
        governance_setup(built, data)
        deadline = time.monotonic() + 10
        while built.policies.index.version != built.policies.store.version():
            assert time.monotonic() < deadline, "the policy change was not picked up"
            time.sleep(0.05)
        yield server.url


def _content(body: bytes, framing: str) -> bytes | Iterator[bytes]:
    return body if framing == "content-length" else iter([body])  # an iterator goes chunked


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_gets_body_is_authorized_as_mlflow_reads_it(
    gateway: str, fake: tuple[str, RecordingMlflow], prefix: str, framing: str
) -> None:
    url = f"{gateway}{prefix}/2.0/mlflow/runs/get"
    body = b'{"run_id": "r1"}'  # r1 lives in experiment 1: the allowed caller's, not the other's
    for token, status, reason in ((ALLOWED, 200, None), (REFUSED, 403, "permission_denied")):
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        response = httpx.request("GET", url, headers=headers, content=_content(body, framing))
        assert (response.status_code, response.headers.get("x-guard-reason")) == (status, reason)
    method, path, query, forwarded_body, _ = fake[1].forwarded()[-1]
    assert (method, path, query, forwarded_body) == ("GET", f"{prefix}/2.0/mlflow/runs/get", b"",
                                                     body)  # fmt: skip


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        *(("HEAD", f"{p}/2.0/mlflow/runs/get?run_id=r1") for p in PREFIXES),  # MLflow: the body
        *(("GET", f"{p}/2.0/mlflow/runs/get?run_id=r1") for p in PREFIXES),
        *(("GET", f"{p}/2.0/mlflow/logged-models/m-1") for p in PREFIXES),  # path only
        ("GET", "/graphql"),  # a 400 before GraphQL is looked at, not a 403
    ],
)
def test_a_body_mlflow_would_read_otherwise_is_refused(
    gateway: str, fake: tuple[str, RecordingMlflow], method: str, path: str, framing: str
) -> None:
    before = len(fake[1].seen)
    document = json.dumps(
        {"query": '{ mlflowGetRun(input: {runId: "r2"}) { run { info { runId } } } }'}
    )
    for token in (ALLOWED, REFUSED):
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        content = _content(document.encode() if "graphql" in path else BODY, framing)
        response = httpx.request(method, gateway + path, headers=headers, content=content)
        assert (response.status_code, response.headers.get("x-guard-reason")) == (
            400, "body_not_allowed"
        )  # fmt: skip
    assert len(fake[1].seen) == before  # not forwarded, nothing looked up


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_head_is_answered_as_the_get_would_be(
    gateway: str, fake: tuple[str, RecordingMlflow], prefix: str
) -> None:
    url = f"{gateway}{prefix}/2.0/mlflow/runs/get?run_id=r1"
    response = httpx.head(url, headers={"Authorization": f"Bearer {REFUSED}"})
    assert (response.status_code, response.headers["x-guard-reason"]) == (403, "permission_denied")
    response = httpx.head(url, headers={"Authorization": f"Bearer {ALLOWED}"})
    assert response.status_code == 200
    assert response.content == b""
    method, path, query, body, _ = fake[1].forwarded()[-1]
    assert (method, path, query, body) == ("GET", f"{prefix}/2.0/mlflow/runs/get", b"run_id=r1",
                                           b"")  # fmt: skip


@pytest.mark.parametrize("prefix", PREFIXES)
def test_too_many_ids_are_refused_before_any_lookup(
    gateway: str, fake: tuple[str, RecordingMlflow], prefix: str
) -> None:
    headers = {"Authorization": f"Bearer {REFUSED}"}  # the caller whose ids would be looked up
    before = len(fake[1].seen)
    url = f"{gateway}{prefix}/2.0/mlflow/runs/search"
    response = httpx.post(url, headers=headers, json={"experiment_ids": ["7", "8", "9", "10"]})
    assert (response.status_code, response.headers["x-guard-reason"]) == (400, "too_many_ids")
    url = f"{gateway}{prefix}/2.0/mlflow/metrics/get-history-bulk-interval"
    response = httpx.get(url, headers=headers, params={"run_ids": ["a", "b", "c", "d"]})
    assert (response.status_code, response.headers["x-guard-reason"]) == (400, "too_many_ids")
    assert len(fake[1].seen) == before
    # Three are within the limit: looked up, and refused as anyone's request for them would be.
    fresh = [f"{len(prefix)}{i}" for i in range(3)]  # ids no earlier test had looked up
    url = f"{gateway}{prefix}/2.0/mlflow/runs/search"
    response = httpx.post(url, headers=headers, json={"experiment_ids": fresh})
    assert response.headers["x-guard-reason"] == "permission_denied"
    assert len(fake[1].seen) > before
