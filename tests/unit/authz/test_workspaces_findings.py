"""Findings: each test FAILS on main at the time of the review (see the report)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import pytest

from guard.admin.delegation import delegation_refusal
from guard.authz.authorization import AuthorizationMiddleware
from guard.authz.policy import Grant, PolicySet, parse_lines
from guard.authz.promotion import PromotionRules
from guard.authz.resolve import Resolver
from guard.authz.runtime import PolicyRuntime
from guard.authz.workspaces import qualify_policy, reaches
from guard.edge.context import RequestContext
from guard.identity.base import Principal
from guard.upstream.client import UpstreamClient
from tests.unit.authz.test_workspaces_review import (
    ROUTES,
    Recorder,
    Runtime,
    index_of,
    workspace_of,
)

# --- F1: the workspace part of a qualified pattern runs into the kind and the name ----------


@pytest.mark.parametrize(
    ("grant", "resource"),
    [
        ("*-prod/*", "experiment:churn-prod/v2"),  # meant: every workspace ending in -prod
        ("*b/experiment:x", "experiment:team-b/experiment:x"),  # meant: x in *b workspaces
        ("*/model:*", "experiment:notes/model:y"),  # meant: every model, not experiments
        ("team-*/model:x", "experiment:notes/model:x"),  # meant: model x in team-* workspaces
        ("*/experiment:x", "experiment:a/experiment:x"),  # meant: experiment x everywhere
    ],
)
def test_a_workspace_glob_never_runs_into_the_kind_or_the_name(grant: str, resource: str) -> None:
    view = index_of(f"p, user:a, admin, {grant}").in_workspace("team-a")
    assert not view.decide("user:a", resource, "update").allowed


def test_a_workspace_glob_makes_no_member_of_workspaces_it_does_not_name() -> None:
    index = index_of("p, user:a, editor, *-prod/*", "p, user:b, viewer, *b/experiment:x")
    assert index.member_of("user:a", "risk-prod") and index.member_of("user:b", "team-b")
    assert not reaches("*-prod/*", "team-a")
    assert not index.member_of("user:a", "team-a")
    assert not index.member_of("user:b", "team-a")


# --- F2: delegation refuses every qualified resource (and must stay in its workspace) --------


def test_a_manager_delegates_on_what_it_manages_in_its_workspace_only() -> None:
    index = index_of("p, user:m, admin, team-a/experiment:x")
    mine = Grant("user:b", "viewer", "team-a/experiment:x")
    assert delegation_refusal(index, "user:m", mine) is None
    for resource in ("team-b/experiment:x", "team-*/experiment:x", "*/experiment:x",
                     "team-a/experiment:x*", "team-a/*", "experiment:x"):  # fmt: skip
        assert delegation_refusal(index, "user:m", Grant("user:b", "viewer", resource)), resource


# --- F3: read on server:* skips the workspace membership of the workspace routes -------------


def workspace_route(method: str, path: str, params: dict[str, str], subject: str,
                    index: Any) -> tuple[int, Any]:  # fmt: skip
    route = ROUTES[(method, path)]

    async def mlflow(scope: Any, receive: Any, send: Any) -> None:
        names = ["default", "team-a", "team-b"]
        if "workspace_name" in params:
            answer: dict[str, Any] = {"workspace": {"name": params["workspace_name"]}}
        else:
            answer = {"workspaces": [{"name": n} for n in names]}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    app = AuthorizationMiddleware(
        mlflow, policies=cast(PolicyRuntime, Runtime(index)),
        resolver=Resolver(cast(UpstreamClient, Recorder()), 100, 60),
        promotion=PromotionRules((), ()),
    )  # fmt: skip
    context = RequestContext("r", "127.0.0.1", "127.0.0.1", "http", "gateway")
    context.principal = Principal(subject, subject.partition(":")[2], "test", ())
    scope = {
        "type": "http", "method": method, "path": path, "query_string": b"", "headers": [],
        "guard": context, "guard.route": route, "guard.params": params, "guard.body": b"",
        "guard.workspace": "team-a",
    }  # fmt: skip
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(sent[-1]["body"])


@pytest.mark.parametrize(
    "prefix", ["/api/3.0/mlflow/workspaces", "/ajax-api/3.0/mlflow/workspaces"]
)
def test_read_on_every_server_resource_does_not_open_other_workspaces(prefix: str) -> None:
    index = index_of("p, user:s, viewer, server:*", "p, user:s, viewer, team-a/*")
    status, listed = workspace_route("GET", prefix, {}, "user:s", index)
    assert status == 200 and [w["name"] for w in listed["workspaces"]] == ["team-a"]
    by_name = f"{prefix}/<workspace_name>"
    status, _ = workspace_route("GET", by_name, {"workspace_name": "team-b"}, "user:s", index)
    assert status == 403


# --- F4: a deny on everything in a workspace leaves its subject a member ----------------------


def test_a_deny_on_everything_in_a_workspace_ends_membership() -> None:
    index = index_of("p, user:a, admin, *", "p, user:a, admin, team-b/*, deny")
    assert index.member_of("user:a", "team-a")
    assert not index.member_of("user:a", "team-b")
    group = index_of("g, user:c, group:all", "p, group:all, viewer, *",
                     "p, user:c, viewer, team-b/*, deny")  # fmt: skip
    assert not group.member_of("user:c", "team-b")


# --- F5: no header (or a blank one) is 'default' without membership; 'default' needs it -------


def test_the_default_workspace_needs_membership_however_it_is_named() -> None:
    index = index_of("p, user:a, viewer, team-a/*")
    explicit = workspace_of(b"default", index)
    assert explicit[0] == 403
    assert workspace_of(b"", index) == explicit
    assert workspace_of(b"   ", index) == explicit


# --- F6: every workspace name a caller sends is remembered for the policy's lifetime -----------


def test_names_sent_by_callers_do_not_grow_the_index_without_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from guard.authz import engine

    monkeypatch.setattr(engine, "MEMO_LIMIT", 1000)
    index = index_of("p, user:a, viewer, team-a/*", "p, user:root, admin, *")
    for n in range(10000):
        assert not index.member_of("user:a", f"ws-{n}")
        view = index.in_workspace(f"ws-{n}")
        assert view.unconditional("user:root", "experiment", "read")
    assert len(index._unconditional) <= 1000
    assert len(index._views) <= 1024


# --- F7: qualify moves denies into one workspace, where they used to hold everywhere -----------


def test_qualifying_keeps_every_deny_as_wide_as_it_was() -> None:
    policy = PolicySet.from_rules(parse_lines([
        *["g2, viewer, read"], "p, user:a, viewer, *",
        "p, user:a, viewer, experiment:secret*, deny", "p, user:a, viewer, *:pii-*, deny",
    ]))  # fmt: skip
    from guard.authz.engine import PolicyIndex

    index = PolicyIndex(qualify_policy(policy, "default"))
    for workspace in ("default", "team-b"):
        view = index.in_workspace(workspace)
        assert not view.decide("user:a", "experiment:secret-plan", "read").allowed, workspace
        assert not view.decide("user:a", "model:pii-scores", "read").allowed, workspace


# --- F8: deleting a workspace leaves what the gateway looked up in it cached ---------------------


def test_deleting_a_workspace_forgets_its_lookups() -> None:
    route = ROUTES[("DELETE", "/api/3.0/mlflow/workspaces/<workspace_name>")]
    resolver = Resolver(cast(UpstreamClient, Recorder()), 100, 600)
    resolver.cache.put("team-a/experiment:5", "secret")
    resolver.cache.put("team-a/run:r5", "5")

    async def mlflow(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = AuthorizationMiddleware(
        mlflow, policies=cast(PolicyRuntime, Runtime(index_of("p, user:root, admin, *"))),
        resolver=resolver, promotion=PromotionRules((), ()),
    )  # fmt: skip
    context = RequestContext("r", "127.0.0.1", "127.0.0.1", "http", "gateway")
    context.principal = Principal("user:root", "root", "test", ())
    scope = {
        "type": "http", "method": "DELETE", "path": "/api/3.0/mlflow/workspaces/team-a",
        "query_string": b"mode=CASCADE", "headers": [], "guard": context, "guard.route": route,
        "guard.params": {"workspace_name": "team-a"}, "guard.body": b"",
        "guard.workspace": "default",
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        return None

    asyncio.run(app(scope, receive, send))
    assert resolver.cache.get("team-a/experiment:5") == (False, None)
    assert resolver.cache.get("team-a/run:r5") == (False, None)


# --- F9: a member granted a moment ago is refused until the next poll ---------------------------


def test_a_membership_refusal_is_decided_on_the_newest_policy() -> None:
    from guard.authz.workspaces import WorkspaceMiddleware

    before, after = index_of(), index_of("p, user:a, viewer, team-a/*")

    class Polling:
        index = before

        async def refresh_soon(self, since: float | None = None, key: str = "") -> bool:
            Polling.index = after
            return True

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = WorkspaceMiddleware(inner, policies=cast(PolicyRuntime, Polling()))
    context = RequestContext("r", "127.0.0.1", "127.0.0.1", "http", "gateway")
    context.principal = Principal("user:a", "a", "test", ())
    scope = {"type": "http", "headers": [(b"x-mlflow-workspace", b"team-a")], "guard": context,
             "method": "GET", "path": "/api/2.0/mlflow/experiments/search"}  # fmt: skip
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 200


# --- N5: a grant on a workspace MLflow would never accept passes validation silently ----------


@pytest.mark.parametrize(
    "resource", ["a/experiment:x", "api/*", "workspaces/model:m", "team-/experiment:x",
                 "-team/*", "team--a-/skill:s"],
)  # fmt: skip
def test_a_grant_on_a_workspace_that_cannot_exist_is_a_problem(resource: str) -> None:
    from guard.authz.workspaces import problems

    policy = PolicySet.from_rules(
        parse_lines(["g2, viewer, read", f"p, user:a, viewer, {resource}"])
    )
    assert problems(policy, enabled=True), resource


# --- F0: wide grants in a workspace skip the lookup that puts an artifact path's experiment in it -


ARTIFACT_ROUTES = sorted(
    (r.method, r.path) for r in ROUTES.values() if r.kind == "artifact"
)  # GET/PUT/DELETE, listings, multipart create/complete/abort, presigned; /api and /ajax-api


@pytest.mark.parametrize(
    ("workspace", "grant"),
    [("team-a", "team-a/*"), ("default", "default/experiment:*"), ("default", "default/*")],
)
@pytest.mark.parametrize(("method", "template"), ARTIFACT_ROUTES)
def test_an_artifact_path_of_an_experiment_moved_out_of_the_workspace_is_refused(
    workspace: str, grant: str, method: str, template: str
) -> None:
    """Experiment 7 was moved to team-b with ``mlflow db move-resources`` (artifacts preserved
    where they were: ``workspaces/team-a/7/...`` or, from default, the legacy root ``7/...``).
    MLflow serves ``7/...`` in the source workspace from there without asking whose it is; the
    gateway must ask, also for callers allowed every experiment of that workspace."""
    route = ROUTES[(method, template)]
    upstream = Recorder()  # experiment 7 is unknown in the request's workspace
    forwarded: list[str] = []

    async def mlflow(scope: Any, receive: Any, send: Any) -> None:
        forwarded.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"model bytes"})

    app = AuthorizationMiddleware(
        mlflow, policies=cast(PolicyRuntime, Runtime(index_of(f"p, user:d, admin, {grant}"))),
        resolver=Resolver(cast(UpstreamClient, upstream), 100, 60),
        promotion=PromotionRules((), ()),
    )  # fmt: skip
    context = RequestContext("r", "127.0.0.1", "127.0.0.1", "http", "gateway")
    context.principal = Principal("user:d", "d", "test", ())
    path = "7/0123456789abcdef0123456789abcdef/artifacts/model.pkl"
    listing = route.id_from == "query:path"
    scope = {
        "type": "http", "method": method, "path": route.path,
        "query_string": f"path={path}".encode() if listing else b"",
        "headers": [], "guard": context, "guard.route": route,
        "guard.params": {} if listing else {"artifact_path": path}, "guard.body": b"",
        "guard.workspace": workspace,
    }  # fmt: skip
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert forwarded == [] and sent[0]["status"] == 403


# --- F0b: a skill's content path is decided by its name alone, held by the workspace or not


@pytest.mark.parametrize("workspace", ["default", "team-a"])
def test_a_skill_content_path_of_a_skill_the_workspace_does_not_hold_is_refused(
    workspace: str,
) -> None:
    """Skill @acme/sql was moved to team-b (``mlflow db move-resources``) or its workspace was
    deleted and made again: its content stays under the old prefix, and a grant on the old
    qualified name (its creator's, ``WORKSPACE/*``) still reads and lists it."""
    from guard.authz.identifiers import Unresolved

    resolver = Resolver(cast(UpstreamClient, Recorder()), 100, 60).bound(workspace)
    route = ROUTES[("GET", "/api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>")]
    from guard.edge.requestdata import RequestData

    data = RequestData.build("GET", b"", b"")
    path = "skills/@acme/sql/0123456789abcdef0123456789abcdef/SKILL.md"
    with pytest.raises(Unresolved):
        asyncio.run(resolver.resources(route, {"artifact_path": path}, data, {}))
