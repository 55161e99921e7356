"""Adversarial review of workspaces (issue 12): what holds when a caller tries to decide in one
workspace while MLflow acts in another, to confuse the lookups and their cache across
workspaces, or to leave a workspace through an artifact address."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest
from mlflow.exceptions import MlflowException
from mlflow.store.workspace.abstract_store import WorkspaceNameValidator
from mlflow.utils.workspace_utils import _normalize_workspace
from starlette.types import Receive, Scope, Send

from guard.authz.authorization import AuthorizationMiddleware
from guard.authz.engine import PolicyIndex
from guard.authz.identifiers import Unresolved
from guard.authz.policy import PolicySet, parse_lines
from guard.authz.promotion import PromotionRules
from guard.authz.resolve import Resolver
from guard.authz.routes import load_routes
from guard.authz.runtime import PolicyRuntime
from guard.authz.search import SearchFilter
from guard.authz.workspaces import HEADER, WorkspaceMiddleware
from guard.edge.context import RequestContext
from guard.edge.requestdata import RequestData
from guard.identity.base import Principal
from guard.upstream.client import UpstreamClient
from guard.upstream.proxy import upstream_request_headers

ROLES = [
    "g2, viewer, read", "g2, editor, viewer", "g2, editor, update", "g2, editor, create",
    "g2, admin, editor", "g2, admin, manage", "g2, admin, delete",
]  # fmt: skip
ROUTES = {(r.method, r.path): r for r in load_routes()}


def index_of(*rows: str) -> PolicyIndex:
    return PolicyIndex(PolicySet.from_rules(parse_lines([*ROLES, *rows])))


class FakeResponse:
    def __init__(self, status: int, data: bytes) -> None:
        self.status, self.data = status, data

    async def body(self) -> AsyncIterator[bytes]:
        yield self.data

    async def __aenter__(self) -> FakeResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class Recorder:
    """An MLflow that records the workspace header of every request and knows nothing."""

    host_header = "mlflow"

    def __init__(self, answers: dict[str, tuple[int, Any]] | None = None) -> None:
        self.asked: list[tuple[list[str], str]] = []
        self.answers = answers or {}

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: object
    ) -> FakeResponse:
        self.asked.append(([v for k, v in headers if k.lower() == HEADER], target))
        status, answer = self.answers.get(
            target.partition("?")[0], (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})
        )
        return FakeResponse(status, json.dumps(answer).encode())


# --- the header: MLflow acts in exactly the workspace the gateway decided in ----------------


def test_the_caller_header_never_reaches_mlflow_in_any_spelling() -> None:
    caller = [
        (b"X-MLflow-Workspace", b"team-b"), (b"x_mlflow_workspace", b"team-b"),
        (b"X-MLFLOW-WORKSPACE", b"team-b"), (b"x-mlflow-workspace ", b"team-b"),
        (b"accept", b"*/*"),
    ]  # fmt: skip
    forwarded = upstream_request_headers(caller, [("x-mlflow-workspace", "team-a")])
    named = [v for k, v in forwarded if k.lower().replace("_", "-").strip() == HEADER]
    assert named == ["team-a"]


class Runtime:
    def __init__(self, index: PolicyIndex) -> None:
        self.index = index

    async def refresh_soon(self, since: float | None = None, key: str = "") -> bool:
        return False


def workspace_of(value: bytes, index: PolicyIndex, subject: str = "user:a") -> tuple[int, Any]:
    """(status, the workspace authorization would decide in) for one header value."""
    seen: dict[str, Any] = {}

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen["workspace"] = scope.get("guard.workspace")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = WorkspaceMiddleware(inner, policies=cast(PolicyRuntime, Runtime(index)))

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        context = RequestContext("r", "127.0.0.1", "127.0.0.1", "http", "gateway")
        context.principal = Principal(subject, subject.partition(":")[2], "test", ())
        scope["guard"] = context
        scope["headers"] = [(b"x-mlflow-workspace", value)]
        await app(scope, receive, send)

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=wrapped)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await client.get("/api/2.0/mlflow/experiments/search")

    response = asyncio.run(run())
    return response.status_code, seen.get("workspace")


def mlflow_reads(value: bytes) -> str | None:
    """The workspace MLflow's resolve_workspace_from_header would pick (None: it refuses)."""
    name = _normalize_workspace(value.decode("latin-1"))
    if name is None:
        return "default"
    if name != "default":
        try:
            WorkspaceNameValidator.validate(name)
        except MlflowException:
            return None
    return name


@pytest.mark.parametrize(
    "value",
    [b"team-a", b" team-a ", b"\tteam-a\t", b"team-a\xa0", b"\x85team-a", b"\x1cteam-a\x1f",
     b"team-a\x0b", b"TEAM-A", b"Team-a", b"team-a,team-b", b"team-a team-b", b"default",
     b"Default", b"", b"   ", b"team\xe4", b"workspaces", b"api", b"team-a\x00", b"-team-a",
     b"team--a", b"a" * 63, b"a" * 64, b"team-a\n"],
)  # fmt: skip
def test_the_gateway_decides_in_the_workspace_mlflow_would_pick_or_refuses(value: bytes) -> None:
    status, workspace = workspace_of(value, index_of("p, user:a, admin, *"))
    expected = mlflow_reads(value)
    if expected is None:
        assert status == 400
    else:
        assert (status, workspace) == (200, expected)


# --- every lookup carries the workspace; the cache keeps workspaces apart --------------------


def test_every_resolver_lookup_carries_the_request_workspace() -> None:
    mlflow = Recorder()
    resolver = Resolver(cast(UpstreamClient, mlflow), 100, 60, 5).bound("team-a")

    async def ask_everything() -> None:
        calls = [
            resolver.experiment_name("1"),
            resolver.run_experiment("r1"),
            resolver.logged_model_experiment("m-1"),
            resolver.trace_experiment("tr-1"),
            resolver.dataset_experiments("d-1"),
            resolver.scorer_experiments(["s-1"]),
            resolver.stored_model_name("m"),
            resolver.stored_experiment_name("e"),
            resolver.model_version_aliases("m", "1"),
            resolver.skill_exists("skill:@o/s"),
            resolver.skill_version_aliases("skill:@o/s", "1"),
            resolver.trace_experiment_if_known("tr-2"),
            resolver.source_resources("runs:/r2/model"),
            resolver.source_resources("models:/m-2"),
            resolver.source_resources("models:/m/1"),
            resolver.source_resources("mlflow-artifacts:/workspaces/team-a/7/x"),
        ]
        for call in calls:
            with contextlib.suppress(Unresolved):
                await call

    asyncio.run(ask_everything())
    assert len(mlflow.asked) >= 15
    assert all(workspaces == ["team-a"] for workspaces, _ in mlflow.asked), mlflow.asked


def test_search_pages_carry_the_request_workspace() -> None:
    mlflow = Recorder({"/api/2.0/mlflow/experiments/search": (200, {"experiments": []})})
    search = SearchFilter(cast(UpstreamClient, mlflow), b"k" * 32, 3)
    for method, query, body in [("GET", b"max_results=5", b""), ("POST", b"", b"{}")]:
        scope = {"path": "/api/2.0/mlflow/experiments/search", "guard.workspace": "team-b"}
        data = RequestData.build(method, query, body)
        asyncio.run(search._page(scope, data, None, 10))
    assert [workspaces for workspaces, _ in mlflow.asked] == [["team-b"], ["team-b"]]


def test_a_page_token_of_one_workspace_does_not_page_another() -> None:
    page = {"experiments": [{"name": "a"}, {"name": "b"}], "next_page_token": "up"}
    mlflow = Recorder({"/api/2.0/mlflow/experiments/search": (200, page)})
    search = SearchFilter(cast(UpstreamClient, mlflow), b"k" * 32, 3)
    index = index_of("p, user:a, viewer, team-a/experiment:a", "p, user:a, viewer, team-b/*")

    def respond(workspace: str, query: bytes) -> tuple[int, dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(message)

        context = RequestContext("r", "127.0.0.1", "127.0.0.1", "http", "gateway")
        context.principal = Principal("user:a", "a", "test", ())
        scope = {"path": "/api/2.0/mlflow/experiments/search", "guard.workspace": workspace,
                 "type": "http", "method": "GET", "headers": [], "guard": context}  # fmt: skip
        data = RequestData.build("GET", query, b"")
        view = index.in_workspace(workspace)
        asyncio.run(search.respond(scope, send, "user:a", view, data))
        return sent[0]["status"], json.loads(sent[-1]["body"])

    status, first = respond("team-a", b"max_results=1")
    assert status == 200 and first["experiments"] == [{"name": "a"}]
    token = first["next_page_token"].encode()
    status, refused = respond("team-b", b"max_results=1&page_token=" + token)
    assert status == 400 and refused["reason"] == "invalid_request_body"
    assert "another search" in refused["message"]
    status, again = respond("team-a", b"max_results=1&page_token=" + token)
    assert status == 200, again  # in its own workspace the token pages on


def test_the_cache_of_one_workspace_never_answers_or_forgets_for_another() -> None:
    resolver = Resolver(cast(UpstreamClient, Recorder()), 100, 60, 30)
    a, ab = resolver.bound("team-a"), resolver.bound("team-ab")
    resolver.cache.put("team-a/experiment:1", "mine")
    resolver.cache.put("team-ab/experiment:1", "theirs")
    resolver.cache.put("team-ab/experiment_name:x", "x")
    a.forget("experiment", "1")
    assert resolver.cache.get("team-ab/experiment:1") == (True, "theirs")
    assert resolver.cache.get("team-ab/experiment_name:x") == (True, "x")
    assert asyncio.run(ab.experiment_name("1")) == "theirs"
    # an id unknown in team-a (negative entry) is still asked in team-ab
    asyncio.run(a.experiment_name("9"))
    mlflow = cast(Recorder, resolver.upstream)
    before = len(mlflow.asked)
    asyncio.run(ab.experiment_name("9"))
    assert len(mlflow.asked) == before + 1 and mlflow.asked[-1][0] == ["team-ab"]


# --- artifact addresses ---------------------------------------------------------------------

ARTIFACT = ROUTES[("GET", "/api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>")]


@pytest.mark.parametrize("workspace", ["team-a", "default"])
@pytest.mark.parametrize(
    "path",
    ["Workspaces/team-b/2/x", "WORKSPACES/team-b/2/x", "workspaces/team-b/skills/s/t/f",
     "workspaces/TEAM-A/1/x", "workspaces/team-a%2F..%2Fteam-b/2/x", " workspaces/team-b/2/x",
     "workspaces/default/workspaces/team-b/2/x"],
)  # fmt: skip
def test_no_spelling_of_another_workspace_prefix_is_resolved(workspace: str, path: str) -> None:
    answers = {"/api/2.0/mlflow/experiments/get": (200, {"experiment": {"name": "n"}})}
    resolver = Resolver(cast(UpstreamClient, Recorder(answers)), 100, 60).bound(workspace)
    data = RequestData.build("GET", b"", b"")
    with pytest.raises(Unresolved):
        asyncio.run(resolver.resources(ARTIFACT, {"artifact_path": path}, data, {}))


@pytest.mark.parametrize(
    "uri",
    ["mlflow-artifacts:/workspaces/team-b/2/x", "mlflow-artifacts:///workspaces/team-b/2/x",
     "mlflow-artifacts://host/workspaces/team-b/2/x", "mlflow-artifacts:/Workspaces/team-b/2/x"],
)  # fmt: skip
def test_a_source_in_another_workspace_is_refused(uri: str) -> None:
    answers = {"/api/2.0/mlflow/experiments/get": (200, {"experiment": {"name": "n"}})}
    resolver = Resolver(cast(UpstreamClient, Recorder(answers)), 100, 60).bound("team-a")
    with pytest.raises(Unresolved):
        asyncio.run(resolver.source_resources(uri))


# --- the creator's grant ----------------------------------------------------------------------


def test_the_creator_is_granted_the_qualified_resource() -> None:
    route = ROUTES[("POST", "/api/2.0/mlflow/experiments/create")]
    index = index_of("p, user:a, editor, team-a/experiment:new*")
    granted: list[tuple[str, str]] = []

    async def on_created(subject: str, resource: str) -> None:
        granted.append((subject, resource))

    async def mlflow(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"experiment_id": "5"}'})

    upstream = Recorder()
    app = AuthorizationMiddleware(
        mlflow, policies=cast(PolicyRuntime, Runtime(index)),
        resolver=Resolver(cast(UpstreamClient, upstream), 100, 60),
        promotion=PromotionRules((), ()), on_created=on_created,
    )  # fmt: skip
    context = RequestContext("r", "127.0.0.1", "127.0.0.1", "http", "gateway")
    context.principal = Principal("user:a", "a", "test", ())
    body = b'{"name": "new-one"}'
    scope = {
        "type": "http", "method": "POST", "path": route.path, "query_string": b"",
        "headers": [(b"content-type", b"application/json")], "guard": context,
        "guard.route": route, "guard.params": {}, "guard.body": body,
        "guard.workspace": "team-a",
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body}

    async def send(message: Any) -> None:
        return None

    asyncio.run(app(scope, receive, send))
    assert granted == [("user:a", "team-a/experiment:new-one")]
    assert all(workspaces == ["team-a"] for workspaces, _ in upstream.asked)


def artifact_request(
    workspace: str, grant: str, experiment: str, answers: dict[str, tuple[int, Any]]
) -> tuple[list[str], int]:
    """(what reached MLflow, status) for a GET of a proxied artifact of ``experiment``."""
    route = ARTIFACT
    forwarded: list[str] = []

    async def mlflow(scope: Any, receive: Any, send: Any) -> None:
        forwarded.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"bytes"})

    app = AuthorizationMiddleware(
        mlflow, policies=cast(PolicyRuntime, Runtime(index_of(f"p, user:d, editor, {grant}"))),
        resolver=Resolver(cast(UpstreamClient, Recorder(answers)), 100, 60),
        promotion=PromotionRules((), ()),
    )  # fmt: skip
    context = RequestContext("r", "127.0.0.1", "127.0.0.1", "http", "gateway")
    context.principal = Principal("user:d", "d", "test", ())
    path = f"{experiment}/0123456789abcdef0123456789abcdef/artifacts/model.pkl"
    scope = {
        "type": "http", "method": "GET", "path": route.path, "query_string": b"",
        "headers": [], "guard": context, "guard.route": route,
        "guard.params": {"artifact_path": path}, "guard.body": b"",
        "guard.workspace": workspace,
    }  # fmt: skip
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return forwarded, sent[0]["status"]


def test_an_artifact_path_is_judged_on_its_experiment_in_the_request_workspace() -> None:
    known = {"/api/2.0/mlflow/experiments/get": (200, {"experiment": {"name": "e1"}})}
    # a caller granted one experiment: its id must resolve in the request's workspace
    assert artifact_request("team-a", "team-a/experiment:e1", "7", {}) == ([], 403)
    assert artifact_request("team-a", "team-b/experiment:e1", "7", known) == ([], 403)
    forwarded, status = artifact_request("team-a", "team-a/experiment:e1", "7", known)
    assert (len(forwarded), status) == (1, 200)
    # a caller granted the whole workspace, for an experiment that is in it
    forwarded, status = artifact_request("team-a", "team-a/*", "7", known)
    assert (len(forwarded), status) == (1, 200)
