"""MLflow workspaces: qualified resources, membership, the per-workspace index and resolver, the
workspace middleware, and what a policy may hold with workspaces on or off."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.authz.casbin_adapter import build_enforcer, casbin_decide
from guard.authz.engine import PolicyIndex
from guard.authz.identifiers import Unresolved
from guard.authz.policy import Grant, PolicyError, PolicySet, parse_lines, parse_row
from guard.authz.resolve import Resolver
from guard.authz.routes import load_routes
from guard.authz.runtime import PolicyRuntime
from guard.authz.workspaces import (
    WorkspaceMiddleware,
    problems,
    qualify,
    qualify_policy,
    reaches,
    unqualified,
    valid_name,
)
from guard.edge.context import RequestContext
from guard.edge.requestdata import RequestData
from guard.identity.base import Principal
from guard.patterns import resource_match, split_workspace
from guard.upstream.client import UpstreamClient

ROLES = ["g2, viewer, read", "g2, editor, viewer", "g2, editor, update", "g2, admin, editor"]


def index_of(*rows: str) -> PolicyIndex:
    return PolicyIndex(PolicySet.from_rules(parse_lines([*ROLES, *rows])))


# --- names and qualified resources ----------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "team-a", "a1", "x" * 63, "0-0"])
def test_names_mlflow_accepts(name: str) -> None:
    assert valid_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "a", "Team-a", "team_a", "-team", "team-", "x" * 64, "api", "ajax-api", "workspaces",
     "static-files", "team a", "team/a", "team:a", "../x", "teäm", "team\x00a", " team-a"],
)  # fmt: skip
def test_names_mlflow_refuses(name: str) -> None:
    assert not valid_name(name)


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ("team-a/experiment:fraud/train", ("team-a", "experiment:fraud/train")),
        ("team-a/model:a:b", ("team-a", "model:a:b")),
        ("team-a/skill:@acme/sql", ("team-a", "skill:@acme/sql")),
        ("team-a/*", ("team-a", "*")),
        ("*/experiment:*", ("*", "experiment:*")),
        ("team-*/model:x", ("team-*", "model:x")),
        ("team-a/*:x", ("team-a", "*:x")),
        # not qualified: the part before the first ':' has no '/' or names no workspace kind
        ("experiment:team-a/experiment:x", (None, "experiment:team-a/experiment:x")),
        ("model:a/b", (None, "model:a/b")),
        ("server:mlflow", (None, "server:mlflow")),
        ("team-a/server:mlflow", (None, "team-a/server:mlflow")),
        ("Team/experiment:x", (None, "Team/experiment:x")),
        ("*", (None, "*")),
    ],
)
def test_split(resource: str, expected: tuple[str | None, str]) -> None:
    assert split_workspace(resource) == expected


def test_qualify_touches_only_what_lives_in_workspaces() -> None:
    assert qualify("experiment:a/b:c", "team-a") == "team-a/experiment:a/b:c"
    assert qualify("model:m", "team-a") == "team-a/model:m"
    assert qualify("skill:@o/s", "team-a") == "team-a/skill:@o/s"
    assert qualify("server:mlflow", "team-a") == "server:mlflow"
    assert qualify("guard:policy", "team-a") == "guard:policy"
    assert qualify("team-b/experiment:x", "team-a") == "team-b/experiment:x"  # already is


def _brute_reaches(pattern: str, workspace: str) -> bool:
    prefix = f"{workspace}/"
    alphabet = "ab/:"
    for length in range(len(pattern) + 2):
        for tail in itertools.product(alphabet, repeat=length):
            if resource_match(prefix + "".join(tail), pattern):
                return True
    return False


def test_reaches_agrees_with_brute_force() -> None:
    rng = random.Random(12)
    for _ in range(600):
        pattern = "".join(rng.choice("ab/:*?") for _ in range(rng.randint(1, 6)))
        workspace = "".join(rng.choice("ab") for _ in range(rng.randint(1, 3)))
        assert reaches(pattern, workspace) == _brute_reaches(pattern, workspace), (
            pattern,
            workspace,
        )


@pytest.mark.parametrize(
    ("pattern", "workspace", "expected"),
    [
        ("*", "team-a", True),
        ("*:*", "team-a", True),
        ("team-a/*", "team-a", True),
        ("team-a/experiment:x", "team-a", True),
        ("*/model:*", "team-b", True),
        ("team-*", "team-b", True),
        ("team-a/*", "team-ab", False),
        ("team-ab/*", "team-a", False),
        ("team-a/experiment:x", "team-b", False),
        ("server:mlflow", "team-a", False),
        ("guard:*", "team-a", False),
        ("experiment:*", "team-a", False),
    ],
)
def test_reaches(pattern: str, workspace: str, expected: bool) -> None:
    assert reaches(pattern, workspace) is expected


# --- policies with and without workspaces ---------------------------------------------------


@pytest.mark.parametrize(
    "resource",
    ["team-a/experiment:fraud/train", "team-a/model:m", "team-a/skill:@o/s", "team-a/*",
     "*/experiment:*", "team-*/model:x", "team-a/experiment:a:b"],
)  # fmt: skip
def test_qualified_grants_parse(resource: str) -> None:
    assert parse_row(["p", "user:a", "viewer", resource]) == Grant("user:a", "viewer", resource)


@pytest.mark.parametrize(
    "resource", ["team-a/server:mlflow", "team-a/guard:policy", "Team/experiment:x",
                 "team_a/experiment:x", "team-a/run:x", "a/b/experiment:x"],
)  # fmt: skip
def test_qualified_grants_of_other_kinds_do_not_parse(resource: str) -> None:
    with pytest.raises(ValueError, match="unknown resource kind"):
        parse_row(["p", "user:a", "viewer", resource])


def grants(*resources: str) -> PolicySet:
    return PolicySet.from_rules(
        parse_lines([*ROLES, *(f"p, user:a, viewer, {r}" for r in resources)])
    )


def test_with_workspaces_on_every_grant_on_what_they_hold_names_one() -> None:
    policy = grants(
        "experiment:x", "model:*", "skill:s", "*:fraud", "e*",  # refused
        "*", "*:*", "server:mlflow", "guard:audit", "team-a/*", "*/experiment:y",  # fine
    )  # fmt: skip
    found = problems(policy, enabled=True)
    named = sorted(
        p.split(": names")[0].removeprefix("grant user:a, viewer, ").removesuffix(", allow")
        for p in found
    )
    assert named == sorted(["experiment:x", "model:*", "skill:s", "*:fraud", "e*"])
    by_hand = [p for p in found if "rewrite it by hand" in p]
    assert [p.split(",")[2].strip() for p in by_hand] == ["e*"]  # a glob over kinds
    assert all(
        "mlflow-guard policy qualify --workspace default" in p for p in found if p not in by_hand
    )
    assert problems(policy, enabled=False) == [
        "grant user:a, viewer, */experiment:y, allow: names a workspace, and upstream.workspaces "
        "is off (it could never match; remove it or turn workspaces on)",
        "grant user:a, viewer, team-a/*, allow: names a workspace, and upstream.workspaces is off "
        "(it could never match; remove it or turn workspaces on)",
    ]


def test_qualify_policy_rewrites_only_the_unqualified() -> None:
    policy = grants("experiment:x", "model:*", "*:fraud", "*", "server:mlflow", "team-a/*")
    rewritten = qualify_policy(policy, "default")
    assert {g.resource for g in rewritten.grants} == {
        "default/experiment:x", "default/model:*", "default/*:fraud", "*", "server:mlflow",
        "team-a/*",
    }  # fmt: skip
    assert problems(rewritten, enabled=True) == []
    assert rewritten.roles == policy.roles and rewritten.memberships == policy.memberships
    assert not any(unqualified(g) for g in rewritten.grants)


# --- deciding in a workspace ----------------------------------------------------------------


def test_a_grant_in_one_workspace_never_reaches_another() -> None:
    index = index_of(
        "p, user:a, editor, team-a/experiment:fraud",
        "p, user:a, viewer, team-a/model:*",
        "p, user:b, viewer, team-b/*",
    )
    a, b = index.in_workspace("team-a"), index.in_workspace("team-b")
    assert a.decide("user:a", "experiment:fraud", "update").allowed
    assert not b.decide("user:a", "experiment:fraud", "read").allowed
    assert a.decide("user:a", "model:anything", "read").allowed
    assert not b.decide("user:a", "model:anything", "read").allowed
    assert b.decide("user:b", "skill:@o/s", "read").allowed
    assert not a.decide("user:b", "experiment:fraud", "read").allowed
    # without a workspace the qualified grants match nothing
    assert not index.decide("user:a", "experiment:fraud", "read").allowed


@pytest.mark.parametrize(
    "name",
    ["team-b/experiment:x", "experiment:x", "team-b", "/experiment:x", "team-b/*", ":x", "x:y/z"],
)
def test_names_holding_slashes_and_colons_cannot_pose_as_a_workspace(name: str) -> None:
    """An experiment in team-a named like another workspace's resource is judged in team-a."""
    index = index_of("p, user:a, viewer, team-b/experiment:x", "p, user:a, viewer, team-b/*")
    view = index.in_workspace("team-a")
    for kind in ("experiment", "model", "skill"):
        assert not view.decide("user:a", f"{kind}:{name}", "read").allowed
        assert view.qualify(f"{kind}:{name}") == f"team-a/{kind}:{name}"


def test_denies_in_a_workspace() -> None:
    index = index_of(
        "p, user:a, admin, *",
        "p, user:a, viewer, team-a/experiment:secret, deny",
        "p, user:b, viewer, team-a/*",
        "p, user:b, viewer, team-a/model:hidden, deny",
    )
    a = index.in_workspace("team-a")
    assert not a.decide("user:a", "experiment:secret", "read").allowed
    assert a.decide("user:a", "experiment:other", "read").allowed
    assert index.in_workspace("team-b").decide("user:a", "experiment:secret", "read").allowed
    # unconditional must see the deny of its workspace only
    assert not a.unconditional("user:a", "experiment", "read")
    assert index.in_workspace("team-b").unconditional("user:a", "experiment", "read")
    assert a.unconditional("user:a", "model", "read")
    assert a.unconditional("user:b", "experiment", "read")
    assert not a.unconditional("user:b", "model", "read")
    assert not index.in_workspace("team-b").unconditional("user:b", "experiment", "read")
    assert a.unconditional("user:a", "server", "update")  # server: is not per workspace


def test_unconditional_recognises_every_spelling_of_everything() -> None:
    for resource in ("*", "*:*", "team-a/*", "*/experiment:*", "team-a/*:*",
                     "team-a/experiment:*"):  # fmt: skip
        index = index_of(f"p, user:a, viewer, {resource}").in_workspace("team-a")
        assert index.unconditional("user:a", "experiment", "read"), resource


def test_index_agrees_with_casbin_on_qualified_resources() -> None:
    rng = random.Random(3)
    workspaces = ["team-a", "team-b", "default"]
    names = ["x", "y", "a/b", "a:b", "team-b/experiment:x", "*"]
    patterns = [
        *(f"{w}/*" for w in workspaces), "*", "*:*", "*/experiment:*", "team-*/model:*",
        *(f"{w}/{k}:{n}" for w in workspaces for k in ("experiment", "model", "skill")
          for n in ("x", "a/b", "team-b/experiment:x", "y*")),
    ]  # fmt: skip
    rows = [
        f"p, user:u{rng.randint(0, 3)}, {rng.choice(['viewer', 'editor'])}, "
        f"{rng.choice(patterns)}, {rng.choice(['allow', 'allow', 'deny'])}"
        for _ in range(40)
    ]
    policy = PolicySet.from_rules(parse_lines([*ROLES, *rows]))
    index, enforcer = PolicyIndex(policy), build_enforcer(policy)
    for _ in range(1500):
        workspace = rng.choice(workspaces)
        kind, name = rng.choice(["experiment", "model", "skill"]), rng.choice(names)
        subject, action = f"user:u{rng.randint(0, 3)}", rng.choice(["read", "update"])
        view = index.in_workspace(workspace)
        expected, _ = casbin_decide(enforcer, subject, f"{workspace}/{kind}:{name}", action)
        assert view.decide(subject, f"{kind}:{name}", action).allowed == expected


def test_membership() -> None:
    index = index_of(
        "p, user:a, viewer, team-a/experiment:x",
        "p, user:b, viewer, team-*/model:*",
        "p, user:c, admin, *",
        "p, user:d, viewer, server:mlflow",
        "p, user:e, viewer, team-a/*, deny",
        "g, user:f, group:team-a",
        "p, group:team-a, editor, team-a/*",
    )
    assert index.member_of("user:a", "team-a") and not index.member_of("user:a", "team-b")
    assert index.member_of("user:b", "team-b") and not index.member_of("user:b", "default")
    assert index.member_of("user:c", "anything")
    assert not index.member_of("user:d", "team-a")  # a server grant is in no workspace
    assert not index.member_of("user:e", "team-a")  # a deny makes no member
    assert index.member_of("user:f", "team-a")  # through a group


# --- the middleware -------------------------------------------------------------------------


class Runtime:
    def __init__(self, index: PolicyIndex) -> None:
        self.index = index

    async def refresh_soon(self, since: float | None = None, key: str = "") -> bool:
        return False  # no newer policy


SEARCH = next(r for r in load_routes() if r.path == "/api/2.0/mlflow/experiments/search")
SERVER_INFO = next(r for r in load_routes() if r.path == "/api/3.0/mlflow/server-info")


def call_middleware(
    headers: list[tuple[bytes, bytes]], subject: str = "user:a", route: Any = SEARCH
) -> httpx.Response:
    seen: dict[str, Any] = {}

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen["workspace"] = scope.get("guard.workspace")
        body = json.dumps(seen).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    index = index_of("p, user:a, viewer, team-a/*", "p, user:d, viewer, default/experiment:x")
    app = WorkspaceMiddleware(inner, policies=cast(PolicyRuntime, Runtime(index)))

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        context = RequestContext("r", "127.0.0.1", "127.0.0.1", "http", "gateway")
        context.principal = Principal(subject, subject.partition(":")[2], "test", ())
        scope["guard"] = context
        scope["headers"] = headers
        scope["guard.route"] = route
        await app(scope, receive, send)

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=wrapped)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await client.get("/api/2.0/mlflow/experiments/search")

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("value", "workspace"),
    [(None, "default"), (b"", "default"), (b"   ", "default"), (b"team-a", "team-a"),
     (b"  team-a\t", "team-a")],
)  # fmt: skip
def test_the_request_workspace(value: bytes | None, workspace: str) -> None:
    headers = [] if value is None else [(b"x-mlflow-workspace", value)]
    subject = "user:a" if workspace == "team-a" else "user:d"
    response = call_middleware(headers, subject)
    assert response.status_code == 200 and response.json()["workspace"] == workspace


@pytest.mark.parametrize("value", [None, b"", b" ", b"default"])
def test_the_default_workspace_needs_membership_however_it_is_named(value: bytes | None) -> None:
    headers = [] if value is None else [(b"x-mlflow-workspace", value)]
    response = call_middleware(headers, "user:a")
    assert response.status_code == 403
    assert response.json()["reason"] == "workspace_forbidden"
    # ... except where no workspace's content is read (server info, the UI's files)
    outside = call_middleware(headers, "user:a", SERVER_INFO)
    assert outside.status_code == 200 and outside.json()["workspace"] == "default"
    # another workspace named there still needs membership
    assert (
        call_middleware([(b"x-mlflow-workspace", b"team-b")], "user:a", SERVER_INFO).status_code
        == 403
    )


@pytest.mark.parametrize(
    "value", [b"Team-A", b"a", b"api", b"../team-a", b"team-a/x", b"x" * 64, b"team%2Da"]
)
def test_names_mlflow_refuses_are_refused(value: bytes) -> None:
    response = call_middleware([(b"x-mlflow-workspace", value)])
    assert response.status_code == 400
    assert response.json()["reason"] == "workspace_invalid"


@pytest.mark.parametrize("value", [b"team-b", b"default", b"nonexistent"])
def test_a_stranger_to_a_workspace_is_refused_whether_it_exists_or_not(value: bytes) -> None:
    response = call_middleware([(b"x-mlflow-workspace", value)])
    assert response.status_code == 403
    body = response.json()
    assert body["reason"] == "workspace_forbidden"
    assert body["message"] == (
        f"You may not use this workspace. user:a may not use workspace {value.decode()!r}."
    )


def test_an_underscore_spelling_selects_nothing() -> None:
    """Only X-MLflow-Workspace selects; the proxy forwards no caller's X-MLflow-* header."""
    response = call_middleware([(b"x_mlflow_workspace", b"team-b")], "user:d")
    assert response.json()["workspace"] == "default"


# --- looking up in a workspace --------------------------------------------------------------


class FakeResponse:
    def __init__(self, status: int, data: bytes) -> None:
        self.status, self.data = status, data

    async def body(self) -> AsyncIterator[bytes]:
        yield self.data

    async def __aenter__(self) -> FakeResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class WorkspacedMlflow:
    """Experiments per workspace, as MLflow's stores answer: another workspace's id is unknown."""

    host_header = "mlflow"

    def __init__(self) -> None:
        self.experiments = {"team-a": {"1": "shared", "3": "a-only"}, "team-b": {"2": "shared"}}
        self.runs = {"team-a": {"r1": "1"}, "team-b": {"r2": "2"}}
        self.asked: list[tuple[str | None, str]] = []

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: object
    ) -> FakeResponse:
        workspace = dict(headers).get("x-mlflow-workspace")
        self.asked.append((workspace, target))
        path, _, query = target.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        if path == "/api/2.0/mlflow/experiments/get":
            name = self.experiments.get(workspace or "", {}).get(params["experiment_id"])
            if name is not None:
                return FakeResponse(200, json.dumps({"experiment": {"name": name}}).encode())
        if path == "/api/2.0/mlflow/runs/get":
            experiment = self.runs.get(workspace or "", {}).get(params["run_id"])
            if experiment is not None:
                answer = {"run": {"info": {"experiment_id": experiment}}}
                return FakeResponse(200, json.dumps(answer).encode())
        return FakeResponse(404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}')


ROUTES = {(r.method, r.path): r for r in load_routes()}


def resources(resolver: Resolver, path: str, query: bytes, **params: str) -> list[str]:
    route = ROUTES[("GET", path)]
    data = RequestData.build("GET", query, b"")
    return asyncio.run(resolver.resources(route, params, data, {}))


def test_lookups_carry_the_workspace_and_are_cached_per_workspace() -> None:
    mlflow = WorkspacedMlflow()
    resolver = Resolver(cast(UpstreamClient, mlflow), 100, 60, 5)
    a, b = resolver.bound("team-a"), resolver.bound("team-b")
    get = "/api/2.0/mlflow/experiments/get"
    assert resources(a, get, b"experiment_id=1") == ["experiment:shared"]
    assert resources(b, get, b"experiment_id=2") == ["experiment:shared"]
    # team-b's experiment 2 asked in team-a: MLflow does not know it there
    with pytest.raises(Unresolved):
        resources(a, get, b"experiment_id=2")
    # team-a's id 1 is cached in team-a only: asked in team-b it is looked up there (unknown)
    with pytest.raises(Unresolved):
        resources(b, get, b"experiment_id=1")
    assert ("team-b", f"{get}?experiment_id=1") in mlflow.asked
    asked = len(mlflow.asked)
    assert resources(a, get, b"experiment_id=1") == ["experiment:shared"]
    assert len(mlflow.asked) == asked  # from team-a's cache
    runs = "/api/2.0/mlflow/runs/get"
    assert resources(a, runs, b"run_id=r1") == ["experiment:shared"]
    with pytest.raises(Unresolved):
        resources(a, runs, b"run_id=r2")
    assert all(workspace in ("team-a", "team-b") for workspace, _ in mlflow.asked)


def test_forgetting_is_per_workspace() -> None:
    mlflow = WorkspacedMlflow()
    resolver = Resolver(cast(UpstreamClient, mlflow), 100, 60)
    a, b = resolver.bound("team-a"), resolver.bound("team-b")
    get = "/api/2.0/mlflow/experiments/get"
    resources(a, get, b"experiment_id=1")
    resources(b, get, b"experiment_id=2")
    b.forget("experiment", "2")
    asked = len(mlflow.asked)
    resources(a, get, b"experiment_id=1")
    assert len(mlflow.asked) == asked
    resources(b, get, b"experiment_id=2")
    assert len(mlflow.asked) == asked + 1


ARTIFACT = "/api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>"


@pytest.mark.parametrize(
    ("workspace", "path", "expected"),
    [
        ("team-a", "1/abc/artifacts/x", "experiment:shared"),
        ("team-a", "workspaces/team-a/1/abc/artifacts/x", "experiment:shared"),
        ("team-a", "workspaces/team-a/3/x", "experiment:a-only"),
        ("team-b", "workspaces/team-b/2/x", "experiment:shared"),
    ],
)
def test_artifact_paths_in_a_workspace(workspace: str, path: str, expected: str) -> None:
    resolver = Resolver(cast(UpstreamClient, WorkspacedMlflow()), 100, 60).bound(workspace)
    route = ROUTES[("GET", ARTIFACT)]
    data = RequestData.build("GET", b"", b"")
    found = asyncio.run(resolver.resources(route, {"artifact_path": path}, data, {}))
    assert found == [expected]


@pytest.mark.parametrize(
    "path",
    ["workspaces/team-b/2/x", "workspaces/team-b/1/x", "workspaces//1/x", "workspaces/team-a",
     "workspaces/team-a/", "workspaces/team-a/workspaces/team-a/1/x", "2/x", "workspaces"],
)  # fmt: skip
def test_artifact_paths_of_another_workspace_are_refused(path: str) -> None:
    resolver = Resolver(cast(UpstreamClient, WorkspacedMlflow()), 100, 60).bound("team-a")
    route = ROUTES[("GET", ARTIFACT)]
    data = RequestData.build("GET", b"", b"")
    with pytest.raises(Unresolved):
        asyncio.run(resolver.resources(route, {"artifact_path": path}, data, {}))


def test_without_workspaces_a_workspace_artifact_path_names_nothing() -> None:
    resolver = Resolver(cast(UpstreamClient, WorkspacedMlflow()), 100, 60)
    route = ROUTES[("GET", ARTIFACT)]
    data = RequestData.build("GET", b"", b"")
    with pytest.raises(Unresolved):
        asyncio.run(resolver.resources(route, {"artifact_path": "workspaces/team-a/1/x"}, data, {}))


# --- the policy store and runtime -----------------------------------------------------------


def test_policy_writes_are_refused_when_they_would_break_the_setting(tmp_path: Any) -> None:
    from guard.authz.store import PolicyStore
    from guard.store.db import build_engine, migrate

    engine = build_engine(f"sqlite:///{tmp_path / 'g.db'}")
    migrate(engine)
    on = PolicyStore(engine, workspaces=True)
    on.seed_defaults("test")
    with pytest.raises(PolicyError, match="names no workspace"):
        on.change("test", add=parse_lines(["p, user:a, viewer, experiment:x"]))
    on.change("test", add=parse_lines(["p, user:a, viewer, team-a/experiment:x"]))
    off = PolicyStore(engine, workspaces=False)
    with pytest.raises(PolicyError, match="names a workspace"):
        off.change("test", add=parse_lines(["p, user:b, viewer, team-a/*"]))
    engine.dispose()


def test_start_up_refuses_a_policy_it_cannot_enforce(tmp_path: Any) -> None:
    from guard.authz.store import PolicyStore
    from guard.store.db import build_engine, migrate

    engine = build_engine(f"sqlite:///{tmp_path / 'g.db'}")
    migrate(engine)
    PolicyStore(engine).seed_defaults("test", parse_lines(["p, group:ds, viewer, experiment:x"]))
    runtime = PolicyRuntime(PolicyStore(engine, workspaces=True), 1.0)
    with pytest.raises(PolicyError) as refused:
        asyncio.run(runtime.start())
    assert str(refused.value).startswith(
        "the stored policy cannot be enforced; grant group:ds, viewer, experiment:x, allow: names "
        "no workspace"
    )
    assert "mlflow-guard policy qualify --workspace default" in str(refused.value)
    runtime = PolicyRuntime(PolicyStore(engine), 1.0)

    async def start_and_stop() -> None:
        await runtime.start()
        await runtime.stop()

    asyncio.run(start_and_stop())  # workspaces off: the same policy is fine
    engine.dispose()


@pytest.mark.parametrize("pattern", ["*/fraud*", "exp*/x?", "a*/b*:c"])
def test_globs_over_unqualified_names_keep_their_meaning(pattern: str) -> None:
    """Only WORKSPACE/KIND:... and WORKSPACE/* are qualified: a policy written before workspaces
    with a '/' in a glob means what it meant, and is no problem with workspaces off."""
    assert split_workspace(pattern) == (None, pattern)
    policy = grants(pattern)
    assert problems(policy, enabled=False) == []
    index = PolicyIndex(policy)
    assert index.decide("user:a", "experiment:team/fraud-x", "read").allowed == (
        pattern == "*/fraud*"
    )


def test_a_glob_over_kinds_is_left_for_a_human_to_rewrite() -> None:
    policy = grants("*/fraud*", "e*", "experiment:x")
    rewritten = qualify_policy(policy, "default")
    assert {g.resource for g in rewritten.grants} == {"*/fraud*", "e*", "default/experiment:x"}
    found = problems(rewritten, enabled=True)
    assert len(found) == 2 and all("rewrite it by hand" in p for p in found)
