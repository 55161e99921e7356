"""Workspaces for real: `mlflow server --enable-workspaces` (SQLite, served local artifacts)
behind the gateway with ``upstream.workspaces = true``, driven with the MLflow client (which
sends ``X-MLFLOW-WORKSPACE`` from ``mlflow.set_workspace``) and with httpx for what a client
would not send.

The cast: ``admin`` (the bootstrap token, ``*``); ``alice``, in ``group:team-a`` which holds
``editor`` on ``team-a/*``; ``bob``, who holds ``viewer`` on ``team-a/experiment:shared`` and
``team-a/model:shared-model`` only (and on ``team-b/experiment:x``). Team-b holds the same
names as alice's team-a (experiment ``fraud``, model ``fraud-model``), created by admin.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.integration.conftest import Gateway, Mlflow, start_gateway
from tests.integration.test_mlflow_releases import start_mlflow, stop_mlflow

pytestmark = pytest.mark.integration

WORKSPACES_SETTING = "MLFLOW_GUARD_UPSTREAM_WORKSPACES"  # upstream.workspaces
API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
WORKSPACE_PATHS = ("/api/3.0/mlflow/workspaces", "/ajax-api/3.0/mlflow/workspaces")
TEAM_B_SECRET = b"team-b's bytes"


@dataclass
class World:
    """One MLflow with workspaces, its gateway, the callers and team-b's resources."""

    release: str
    mlflow: Mlflow
    gateway: Gateway
    artifacts: Path  # MLflow's --artifacts-destination
    secrets: dict[str, str] = field(default_factory=dict)  # caller -> token
    b: dict[str, str] = field(default_factory=dict)  # team-b's experiment_id, run_id, ...

    def headers(self, caller: str, workspace: str | None = None) -> dict[str, str]:
        sent = {"Authorization": f"Bearer {self.secrets[caller]}"}
        if workspace is not None:
            sent["X-MLflow-Workspace"] = workspace
        return sent

    def call(
        self,
        caller: str,
        method: str,
        path: str,
        workspace: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        sent = list(self.headers(caller, workspace).items()) + (headers or [])
        return httpx.request(method, self.gateway.url + path, headers=sent, timeout=30, **kwargs)

    def direct(self, method: str, path: str, workspace: str, **kwargs: Any) -> httpx.Response:
        """MLflow asked directly, past the gateway."""
        sent = {"X-MLflow-Workspace": workspace}
        return httpx.request(method, self.mlflow.url + path, headers=sent, timeout=30, **kwargs)

    def grant(self, *rows: list[str]) -> None:
        response = self.call("admin", "POST", "/guard/api/policy/changes", json={"add": rows})
        assert response.status_code == 200, response.text

    def policy_on(self, resource: str) -> list[list[str]]:
        response = self.call("admin", "GET", "/guard/api/policy", params={"resource": resource})
        assert response.status_code == 200, response.text
        rules: list[list[str]] = response.json()["rules"]
        return rules

    def audited(self, request_id: str) -> dict[str, Any]:
        """The audit record of a request, once the trail has it."""
        deadline = time.monotonic() + 10
        while True:
            response = self.call(
                "admin", "GET", "/guard/api/audit", params={"request_id": request_id}
            )
            assert response.status_code == 200, response.text
            records = [r for r in response.json()["records"] if r.get("status") is not None]
            if records:
                record: dict[str, Any] = records[0]
                return record
            assert time.monotonic() < deadline, f"no audit record of {request_id}"
            time.sleep(0.1)


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _token(gateway: Gateway, name: str, role: str, resource: str) -> str:
    created = gateway.cli(
        "token", "create", "--name", name, "--role", role, "--resource", resource, "--quiet"
    )
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


def start_workspace_gateway(
    data: Path, upstream: str, token: str | None = None, ready_path: str = "/guard/ready"
) -> Gateway:
    """The gateway with upstream.workspaces on, in front of ``upstream``."""
    return start_gateway(
        data, "--upstream-url", upstream, token=token, ready_path=ready_path,
        MLFLOW_GUARD_UPSTREAM_WORKSPACES="true",
    )  # fmt: skip


def build_world(release: str, home: Path) -> Iterator[World]:
    server, _ = start_mlflow(release, home / "mlflow", flags=("--enable-workspaces",))
    try:
        gateway = start_workspace_gateway(home / "gateway", server.url)
        try:
            world = World(release, server, gateway, home / "mlflow" / "artifacts")
            world.secrets["admin"] = gateway.token
            # One workspace by the MLflow client, one by a plain request, both as admin.
            admin = MlflowClient(tracking_uri=gateway.url)
            with pytest.MonkeyPatch.context() as env:
                env.setenv("MLFLOW_TRACKING_TOKEN", gateway.token)
                admin.create_workspace("team-a", description="team a")
            created = world.call("admin", "POST", WORKSPACE_PATHS[0], json={"name": "team-b"})
            assert created.status_code == 201, created.text
            world.secrets["alice"] = _token(gateway, "alice", "viewer", "team-a/*")
            world.secrets["bob"] = _token(gateway, "bob", "viewer", "team-a/experiment:shared")
            world.grant(
                ["g", "token:alice", "group:team-a"],
                ["p", "group:team-a", "editor", "team-a/*"],
                ["p", "token:bob", "viewer", "team-a/model:shared-model"],
                ["p", "token:bob", "viewer", "team-b/experiment:x"],
            )
            _seed_team_b(world)
            yield world
        finally:
            gateway.stop()
    finally:
        stop_mlflow(server)


def _seed_team_b(world: World) -> None:
    """Team-b's experiment ``fraud`` (a run, a metric, an artifact) and model ``fraud-model``,
    the names alice uses in team-a; and an experiment ``x``."""
    b = world.b

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        return _ok(world.call("admin", "POST", API + path, "team-b", json=body))

    b["experiment_id"] = post("/experiments/create", {"name": "fraud"})["experiment_id"]
    post("/experiments/create", {"name": "x"})
    run = post("/runs/create", {"experiment_id": b["experiment_id"]})["run"]["info"]
    b["run_id"] = run["run_id"]
    post("/runs/log-metric", {"run_id": b["run_id"], "key": "auc", "value": 0.5, "timestamp": 1})
    b["artifact"] = f"workspaces/team-b/{b['experiment_id']}/{b['run_id']}/artifacts/secret.txt"
    assert run["artifact_uri"].endswith(b["artifact"].removesuffix("/secret.txt"))
    uploaded = world.call("admin", "PUT", f"{ARTIFACTS}/{b['artifact']}", "team-b",
                          content=TEAM_B_SECRET)  # fmt: skip
    assert uploaded.status_code == 200, uploaded.text
    post("/registered-models/create", {"name": "fraud-model", "description": "team-b's"})
    logged = post("/logged-models", {"experiment_id": b["experiment_id"], "name": "lm-b"})
    b["logged_model"] = logged["model"]["info"]["model_id"]
    linked = {"name": "ds-b", "experiment_ids": [b["experiment_id"]]}
    dataset = _ok(
        world.call("admin", "POST", "/api/3.0/mlflow/datasets/create", "team-b", json=linked)
    )
    b["dataset"] = dataset["dataset"]["dataset_id"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from build_world("3.17.2", tmp_path_factory.mktemp("workspaces-3.17"))


@pytest.fixture(scope="module")
def world_318(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from build_world("3.18.0", tmp_path_factory.mktemp("workspaces-3.18"))


@pytest.fixture(autouse=True)
def _client_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The MLflow client without retries or basic auth; its workspace unset afterwards (it
    lives in a context variable and ``MLFLOW_WORKSPACE``)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_WORKSPACE"):
        monkeypatch.delenv(name, raising=False)
    yield
    mlflow.set_workspace(None)


def _refusal(response: httpx.Response) -> tuple[int, str | None, str]:
    """What a refusal looks like with the ids it names blanked: status, reason, error code."""
    body = response.json()
    return response.status_code, response.headers.get("x-guard-reason"), body["error_code"]


def _shape(response: httpx.Response, *ids: str) -> tuple[int, str | None, str, str]:
    message = response.json()["message"]
    for sent in ids:
        message = message.replace(sent, "ID")
    return (*_refusal(response), message)


# -- the MLflow client in a workspace, and the same names in another ---------------------------


@pytest.mark.parametrize(
    "release", ["3.17.2", pytest.param("3.18.0", marks=pytest.mark.mlflow_release)]
)
def test_a_member_works_in_team_a_and_cannot_reach_team_b(
    release: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    w: World = request.getfixturevalue("world" if release == "3.17.2" else "world_318")
    b = w.b
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", w.secrets["alice"])
    mlflow.set_workspace("team-a")
    client = MlflowClient(tracking_uri=w.gateway.url, registry_uri=w.gateway.url)
    name, model = "fraud", "fraud-model"  # team-b's names too
    experiment_id = client.create_experiment(name)
    assert client.get_experiment(experiment_id).artifact_location == (
        f"mlflow-artifacts:/workspaces/team-a/{experiment_id}"
    )
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "auc", 0.91, step=1)
    (tmp_path / "report.txt").write_text("team-a's report")
    client.log_artifact(run_id, str(tmp_path / "report.txt"))  # PUT mlflow-artifacts/...
    assert [f.path for f in client.list_artifacts(run_id)] == ["report.txt"]
    down = Path(client.download_artifacts(run_id, "report.txt", str(tmp_path / "down")))
    assert down.read_text() == "team-a's report"
    client.create_registered_model(model)
    client.create_model_version(model, f"runs:/{run_id}/model", run_id)
    # It all landed in team-a, in MLflow itself and on its disk.
    mine = w.direct(
        "GET", f"{API}/experiments/get", "team-a", params={"experiment_id": experiment_id}
    )
    assert _ok(mine)["experiment"]["name"] == name
    stored = w.artifacts / "workspaces" / "team-a" / experiment_id / run_id / "artifacts"
    assert (stored / "report.txt").read_text() == "team-a's report"
    # Team-b holds the same names: in team-a they are team-a's.
    by_name = client.get_experiment_by_name(name)
    assert by_name is not None and by_name.experiment_id == experiment_id
    assert client.get_registered_model(model).description != "team-b's"

    # Team-b by header: refused before MLflow, whatever is asked.
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", f"{API}/experiments/get", {"params": {"experiment_id": b["experiment_id"]}}),
        ("GET", f"{API}/experiments/get-by-name", {"params": {"experiment_name": "fraud"}}),
        ("GET", f"{API}/runs/get", {"params": {"run_id": b["run_id"]}}),
        ("GET", f"{API}/registered-models/get", {"params": {"name": "fraud-model"}}),
        ("POST", f"{API}/experiments/search", {"json": {"max_results": 10}}),
        ("POST", f"{API}/runs/log-metric",
         {"json": {"run_id": b["run_id"], "key": "x", "value": 1, "timestamp": 1}}),
        ("POST", f"{API}/experiments/create", {"json": {"name": "planted"}}),
        ("GET", f"{ARTIFACTS}/{b['artifact']}", {}),
        ("PUT", f"{ARTIFACTS}/{b['artifact']}", {"content": b"overwritten"}),
    ]  # fmt: skip
    for method, path, kwargs in cases:
        refused = w.call("alice", method, path, "team-b", **kwargs)
        assert refused.status_code == 403, (method, path, refused.text)
        assert refused.headers["x-guard-reason"] == "workspace_forbidden", (method, path)
        assert "team-b's" not in refused.text

    # No header, an empty one or "default": the default workspace, of which alice is no member.
    cases = [
        ("GET", f"{API}/experiments/get", {"params": {"experiment_id": b["experiment_id"]}}),
        ("GET", f"{API}/runs/get", {"params": {"run_id": b["run_id"]}}),
        ("GET", f"{API}/registered-models/get", {"params": {"name": "fraud-model"}}),
        ("POST", f"{API}/runs/log-metric",
         {"json": {"run_id": b["run_id"], "key": "x", "value": 1, "timestamp": 1}}),
    ]  # fmt: skip
    for method, path, kwargs in cases:
        for named in ([], [("X-MLflow-Workspace", "")], [("X-MLflow-Workspace", "default")]):
            refused = w.call("alice", method, path, headers=named, **kwargs)
            assert refused.status_code == 403, (method, path, refused.text)
            assert refused.headers["x-guard-reason"] == "workspace_forbidden", (method, path)

    # Team-b's ids sent in team-a: exactly what a nonexistent id gets. Alice may do anything in
    # team-a, so MLflow is asked (in team-a) and answers "does not exist" for both.
    missing_experiment, missing_run = "987654", uuid.uuid4().hex
    for path, param, theirs, missing in [
        (f"{API}/experiments/get", "experiment_id", b["experiment_id"], missing_experiment),
        (f"{API}/runs/get", "run_id", b["run_id"], missing_run),
    ]:
        other = w.call("alice", "GET", path, "team-a", params={param: theirs})
        nothing = w.call("alice", "GET", path, "team-a", params={param: missing})
        assert other.status_code == 404, other.text
        assert _shape(other, theirs) == _shape(nothing, missing)
    for path, theirs, missing in [
        (f"{API}/logged-models/{{}}", b["logged_model"], "m-" + uuid.uuid4().hex),
        ("/api/3.0/mlflow/datasets/{}", b["dataset"], "d-" + uuid.uuid4().hex),
    ]:
        other = w.call("alice", "GET", path.format(theirs), "team-a")
        nothing = w.call("alice", "GET", path.format(missing), "team-a")
        assert other.status_code == 404, other.text
        assert _shape(other, theirs) == _shape(nothing, missing)
    for body in [
        {"run_id": b["run_id"], "key": "planted", "value": 1, "timestamp": 1},
        {"run_id": missing_run, "key": "planted", "value": 1, "timestamp": 1},
    ]:
        refused = w.call("alice", "POST", f"{API}/runs/log-metric", "team-a", json=body)
        assert refused.status_code == 404, refused.text
    tags = {"run_id": b["run_id"], "key": "planted", "value": "1"}
    assert w.call("alice", "POST", f"{API}/runs/set-tag", "team-a", json=tags).status_code == 404
    # Nothing of team-b changed.
    run_b = _ok(w.direct("GET", f"{API}/runs/get", "team-b", params={"run_id": b["run_id"]}))
    assert run_b["run"]["data"]["metrics"] == [
        {"key": "auc", "value": 0.5, "timestamp": 1, "step": 0}
    ]
    assert not any(t["key"] == "planted" for t in run_b["run"]["data"].get("tags", []))
    model_b = _ok(w.direct("GET", f"{API}/registered-models/get", "team-b",
                           params={"name": "fraud-model"}))  # fmt: skip
    assert model_b["registered_model"]["description"] == "team-b's"
    assert "latest_versions" not in model_b["registered_model"]


@pytest.mark.mlflow_release
def test_skills_are_per_workspace_on_3_18(world_318: World) -> None:
    """MLflow 3.18's skills live in workspaces: team-b's ``sql`` is nothing in team-a (alice
    gets MLflow's "not found", bob the gateway's refusal), alice's own ``sql`` in team-a is hers
    to manage as ``team-a/skill:sql``, and team-b's stays as it was."""
    w = world_318
    skills = "/api/3.0/mlflow/skills"
    made = w.call("admin", "POST", skills, "team-b", json={"name": "sql", "description": "b"})
    assert made.status_code == 200, made.text
    assert w.call("alice", "GET", f"{skills}/sql", "team-a").status_code == 404
    assert w.call("alice", "GET", f"{skills}/sql", "team-b").headers["x-guard-reason"] == (
        "workspace_forbidden"
    )
    refused = w.call("bob", "GET", f"{skills}/sql", "team-a")
    assert _refusal(refused) == (403, "permission_denied", "PERMISSION_DENIED")
    for method, path, body in [
        ("PATCH", f"{skills}/sql", {"description": "taken over"}),
        ("POST", f"{skills}/sql/tags", {"key": "planted", "value": "1"}),
        ("DELETE", f"{skills}/sql", None),
    ]:
        answer = w.call("alice", method, path, "team-a", json=body)
        assert answer.status_code == 404, (method, path, answer.text)
    mine = w.call("alice", "POST", skills, "team-a", json={"name": "sql", "description": "a"})
    assert mine.status_code == 200, mine.text
    assert mine.json()["workspace"] == "team-a"
    assert ["p", "token:alice", "manager", "team-a/skill:sql", "allow"] in w.policy_on(
        "team-a/skill:sql"
    )
    listed = _ok(w.call("alice", "GET", skills, "team-a"))["skills"]
    assert [(s["name"], s["workspace"], s["description"]) for s in listed] == [
        ("sql", "team-a", "a")
    ]
    theirs = _ok(w.direct("GET", f"{skills}/sql", "team-b"))
    assert (theirs["description"], theirs["tags"]) == ("b", {})


# -- grants on single resources: ids, searches, names that look qualified ----------------------


@pytest.fixture(scope="module")
def team_a(world: World) -> dict[str, str]:
    """Team-a's resources beside alice's, made by admin: ``shared`` (bob may read it) and
    ``private`` experiments with a run each, an experiment named like a team-b resource, and
    models ``shared-model`` and ``private-model``."""
    made: dict[str, str] = {}

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        return _ok(world.call("admin", "POST", API + path, "team-a", json=body))

    for name in ("shared", "private", "team-b/experiment:x"):
        made[name] = post("/experiments/create", {"name": name})["experiment_id"]
    for name in ("shared", "private"):
        run = post("/runs/create", {"experiment_id": made[name]})["run"]["info"]
        made[f"{name}-run"] = run["run_id"]
        made[f"{name}-artifacts"] = run["artifact_uri"].removeprefix("mlflow-artifacts:/")
        uploaded = world.call("admin", "PUT", f"{ARTIFACTS}/{made[f'{name}-artifacts']}/f.txt",
                              "team-a", content=name.encode())  # fmt: skip
        assert uploaded.status_code == 200, uploaded.text
    for name in ("shared-model", "private-model"):
        post("/registered-models/create", {"name": name})
    return made


def test_by_id_a_single_grant_refuses_team_b_as_it_refuses_nothing(
    world: World, team_a: dict[str, str]
) -> None:
    """Bob holds single resources in team-a: every id is looked up (in team-a), and team-b's
    ids are refused exactly like ids that exist nowhere."""
    b = world.b
    assert _ok(world.call("bob", "GET", f"{API}/experiments/get", "team-a",
                          params={"experiment_id": team_a["shared"]}))  # fmt: skip
    cases = [
        ("GET", f"{API}/experiments/get", "experiment_id", b["experiment_id"], "987654"),
        ("GET", f"{API}/runs/get", "run_id", b["run_id"], uuid.uuid4().hex),
        ("GET", f"{API}/metrics/get-history", "run_id", b["run_id"], uuid.uuid4().hex),
        ("GET", f"{API}/registered-models/get", "name", "fraud-model", "no-such-model"),
        ("GET", f"{API}/logged-models/{b['logged_model']}", "", b["logged_model"],
         "m-" + uuid.uuid4().hex),
        ("GET", f"/api/3.0/mlflow/datasets/{b['dataset']}", "", b["dataset"],
         "d-" + uuid.uuid4().hex),
    ]  # fmt: skip
    for method, path, param, theirs, missing in cases:
        if param:  # the id in the query, else in the path
            other = world.call(
                "bob", method, path, "team-a", params={param: theirs, "metric_key": "x"}
            )
            nothing = world.call("bob", method, path, "team-a",
                                 params={param: missing, "metric_key": "x"})  # fmt: skip
        else:
            other = world.call("bob", method, path, "team-a")
            nothing = world.call("bob", method, path.replace(theirs, missing), "team-a")
        assert _refusal(other) == (403, "permission_denied", "PERMISSION_DENIED"), other.text
        assert _shape(other, theirs) == _shape(nothing, missing), path
        assert "team-b" not in other.text and "fraud" not in other.text.replace(theirs, "")
    # A team-a experiment bob may not read is refused the same way.
    private = world.call("bob", "GET", f"{API}/experiments/get", "team-a",
                         params={"experiment_id": team_a["private"]})  # fmt: skip
    nothing = world.call("bob", "GET", f"{API}/experiments/get", "team-a",
                         params={"experiment_id": "987654"})  # fmt: skip
    assert _shape(private, team_a["private"]) == _shape(nothing, "987654")
    # Writes by id too.
    for run_id in (b["run_id"], team_a["shared-run"]):
        body = {"run_id": run_id, "key": "planted", "value": 1, "timestamp": 1}
        refused = world.call("bob", "POST", f"{API}/runs/log-metric", "team-a", json=body)
        assert _refusal(refused) == (403, "permission_denied", "PERMISSION_DENIED")


def test_a_deny_in_the_workspace_holds_against_the_group_grant(
    world: World, team_a: dict[str, str]
) -> None:
    """Hank is in group:team-a (editor on team-a/*) with a deny on team-a's ``private``: he is no
    longer allowed everything in team-a, so each request is judged, private stays closed by
    every route, and team-b's ids are refused by the gateway itself."""
    world.secrets["hank"] = _token(world.gateway, "hank", "viewer", "team-a/experiment:shared")
    world.grant(
        ["g", "token:hank", "group:team-a"],
        ["p", "token:hank", "viewer", "team-a/experiment:private", "deny"],
    )
    private, run = team_a["private"], team_a["private-run"]
    assert _ok(world.call("hank", "GET", f"{API}/experiments/get", "team-a",
                          params={"experiment_id": team_a["shared"]}))  # fmt: skip
    for method, path, kwargs in [
        ("GET", f"{API}/experiments/get", {"params": {"experiment_id": private}}),
        ("GET", f"{API}/experiments/get-by-name", {"params": {"experiment_name": "private"}}),
        ("GET", f"{API}/runs/get", {"params": {"run_id": run}}),
        ("GET", f"{ARTIFACTS}/{team_a['private-artifacts']}/f.txt", {}),
        ("POST", f"{API}/runs/search", {"json": {"experiment_ids": [private]}}),
        ("GET", f"{API}/experiments/get", {"params": {"experiment_id": world.b["experiment_id"]}}),
    ]:  # fmt: skip
        refused = world.call("hank", method, path, "team-a", **kwargs)
        assert refused.status_code == 403, (method, path, refused.text)
        assert refused.headers["x-guard-reason"] in ("explicit_deny", "permission_denied"), path
    found = _ok(world.call("hank", "POST", f"{API}/experiments/search", "team-a",
                           json={"max_results": 100}))["experiments"]  # fmt: skip
    names = {e["name"] for e in found}
    assert "shared" in names and "private" not in names


def test_searches_in_team_a_return_only_what_is_granted(
    world: World, team_a: dict[str, str]
) -> None:
    def names(path: str, key: str, body: dict[str, Any]) -> list[str]:
        found = _ok(world.call("bob", "POST", API + path, "team-a", json=body))
        return sorted(item["name"] for item in found.get(key, []))

    assert names("/experiments/search", "experiments", {"max_results": 100}) == ["shared"]
    assert names("/experiments/search", "experiments",
                 {"max_results": 100, "filter": "name LIKE '%x%'"}) == []  # fmt: skip
    models = world.call("bob", "GET", f"{API}/registered-models/search", "team-a",
                        params={"max_results": 100})  # fmt: skip
    assert [m["name"] for m in _ok(models).get("registered_models", [])] == ["shared-model"]
    runs = world.call("bob", "POST", f"{API}/runs/search", "team-a", json={
        "experiment_ids": [team_a["shared"]], "max_results": 100})  # fmt: skip
    assert [r["info"]["run_id"] for r in _ok(runs)["runs"]] == [team_a["shared-run"]]
    for ids in (
        [team_a["private"]],
        [team_a["shared"], team_a["private"]],
        [world.b["experiment_id"]],
        [team_a["shared"], world.b["experiment_id"]],
    ):
        refused = world.call("bob", "POST", f"{API}/runs/search", "team-a",
                             json={"experiment_ids": ids})  # fmt: skip
        assert refused.status_code == 403, (ids, refused.text)
        assert "team-b's" not in refused.text
    # Alice, who may read all of team-a, gets all of team-a and nothing of team-b.
    everything = _ok(world.call("alice", "POST", f"{API}/experiments/search", "team-a",
                                json={"max_results": 100}))  # fmt: skip
    seen = {e["experiment_id"] for e in everything["experiments"]}
    assert {team_a["shared"], team_a["private"]} <= seen
    assert world.b["experiment_id"] not in seen
    assert {e["workspace"] for e in everything["experiments"]} == {"team-a"}


def test_a_page_token_works_only_in_its_workspace(world: World, team_a: dict[str, str]) -> None:
    """A filtered search's page token (the gateway's) is bound to the workspace it was issued
    in: the same caller, with the same grants shape in team-b, cannot continue it there."""
    world.secrets["erin"] = _token(world.gateway, "erin", "viewer", "team-a/experiment:shared")
    world.grant(
        ["p", "token:erin", "viewer", "team-a/experiment:private"],
        ["p", "token:erin", "viewer", "team-b/experiment:fraud"],
        ["p", "token:erin", "viewer", "team-b/experiment:x"],
    )
    search = f"{API}/experiments/search"
    first = _ok(world.call("erin", "POST", search, "team-a", json={"max_results": 1}))
    token = first["next_page_token"]
    elsewhere = world.call(
        "erin", "POST", search, "team-b", json={"max_results": 1, "page_token": token}
    )
    assert _refusal(elsewhere) == (400, "invalid_request_body", "INVALID_PARAMETER_VALUE")
    assert "another search" in elsewhere.json()["message"]
    rest = _ok(world.call("erin", "POST", search, "team-a",
                          json={"max_results": 10, "page_token": token}))  # fmt: skip
    names = [e["name"] for e in first["experiments"] + rest["experiments"]]
    assert sorted(names) == ["private", "shared"]


def test_a_name_that_looks_qualified_never_matches_another_workspace(
    world: World, team_a: dict[str, str]
) -> None:
    """Team-a's experiment ``team-b/experiment:x`` is ``team-a/experiment:team-b/experiment:x``
    to the policy: bob's grant on team-b's ``x`` (``team-b/experiment:x``) does not reach it,
    by id, by name, nor in a search; in team-b that grant reads team-b's ``x``."""
    tricky = team_a["team-b/experiment:x"]
    for path, params in [
        (f"{API}/experiments/get", {"experiment_id": tricky}),
        (f"{API}/experiments/get-by-name", {"experiment_name": "team-b/experiment:x"}),
        (f"{API}/experiments/get-by-name", {"experiment_name": "x"}),
    ]:
        refused = world.call("bob", "GET", path, "team-a", params=params)
        assert _refusal(refused) == (403, "permission_denied", "PERMISSION_DENIED"), params
    found = _ok(world.call("bob", "POST", f"{API}/experiments/search", "team-a",
                           json={"filter": "name LIKE 'team-b%'"}))  # fmt: skip
    assert found.get("experiments", []) == []
    theirs = _ok(world.call("bob", "GET", f"{API}/experiments/get-by-name", "team-b",
                            params={"experiment_name": "x"}))  # fmt: skip
    assert theirs["experiment"]["workspace"] == "team-b"
    explained = _ok(world.call("admin", "GET", "/guard/api/policy/explain", params={
        "subject": "token:bob", "action": "read",
        "resource": "team-a/experiment:team-b/experiment:x"}))  # fmt: skip
    assert explained["allowed"] is False


def test_a_workspace_glob_never_reaches_into_a_name(world: World, team_a: dict[str, str]) -> None:
    """``*b/experiment:x`` is experiment ``x`` in every workspace whose name ends in ``b``; team-a
    does not, so team-a's experiment named ``team-b/experiment:x`` is not covered."""
    secret = _token(world.gateway, "dave", "viewer", "team-a/experiment:shared")
    world.grant(["p", "token:dave", "viewer", "*b/experiment:x"])
    world.secrets["dave"] = secret
    theirs = world.call("dave", "GET", f"{API}/experiments/get-by-name", "team-b",
                        params={"experiment_name": "x"})  # fmt: skip
    assert theirs.status_code == 200, theirs.text  # what the grant is for
    tricky = world.call("dave", "GET", f"{API}/experiments/get", "team-a",
                        params={"experiment_id": team_a["team-b/experiment:x"]})  # fmt: skip
    assert tricky.status_code == 403, tricky.text


@pytest.fixture(scope="module")
def gina(world: World) -> str:
    """A caller who may do anything in default (editor on default/*), and nothing elsewhere."""
    world.secrets["gina"] = _token(world.gateway, "gina", "editor", "default/*")
    return "gina"


def test_default_does_not_reach_the_workspaces_tree_by_any_spelling(
    world: World, gina: str
) -> None:
    """In default MLflow serves legacy paths from the artifact root, which also holds
    ``workspaces/``; MLflow itself (3.17.2 and 3.18.0) serves ``./workspaces/team-b/...`` there.
    Through the gateway, a caller allowed everything in default gets no spelling of it."""
    b = world.b
    theirs = b["artifact"]
    for path in (theirs, f"./{theirs}", f".//{theirs}", f"x/../{theirs}", f"%2E/{theirs}",
                 theirs.replace("workspaces/", "workspaces//"), f"Workspaces/{theirs[11:]}",
                 theirs.replace("/", "%2F")):  # fmt: skip
        for prefix in (ARTIFACTS, "/ajax-api/2.0/mlflow-artifacts/artifacts"):
            url = httpx.URL(world.gateway.url + f"{prefix}/{path}")
            got = httpx.get(url, headers=world.headers(gina), timeout=30)
            assert got.status_code in (400, 403, 404), (path, got.text)
            assert TEAM_B_SECRET not in got.content, path
    for listed in (f"./{theirs.rsplit('/', 1)[0]}", f".//workspaces/team-b/{b['experiment_id']}",
                   f"workspaces/team-b/{b['experiment_id']}"):  # fmt: skip
        got = world.call(gina, "GET", ARTIFACTS, params={"path": listed})
        assert got.status_code in (400, 403), (listed, got.text)
        assert b["run_id"] not in got.text and "secret.txt" not in got.text


def test_the_artifact_root_does_not_name_other_workspaces(world: World, gina: str) -> None:
    """Workspace names are the members' to learn (GET /workspaces is filtered): a caller who
    may read all of default cannot list them from the artifact store's root either, where
    MLflow serves default's legacy paths and keeps every workspace's tree under workspaces/."""
    mine = _ok(world.call(gina, "GET", WORKSPACE_PATHS[0]))["workspaces"]
    assert [w["name"] for w in mine] == ["default"]
    for path in ("workspaces", "workspaces/team-b"):
        listed = world.call(gina, "GET", ARTIFACTS, params={"path": path})
        assert listed.status_code in (400, 403, 404), listed.text
        assert "team-a" not in listed.text and "team-b" not in listed.text.replace(path, "")


def test_a_recreated_workspace_does_not_inherit_the_old_ones_files(world: World) -> None:
    """Team-c is deleted with SET_DEFAULT (its experiment moves to default; its files stay
    under workspaces/team-c/) and made again: ivan, allowed everything in team-c, read the file
    before and cannot read it, by either spelling, after; the experiment is not team-c's now."""
    assert world.call("admin", "POST", WORKSPACE_PATHS[0], json={"name": "team-c"}).is_success

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        return _ok(world.call("admin", "POST", API + path, "team-c", json=body))

    experiment_id = post("/experiments/create", {"name": "legacy"})["experiment_id"]
    run = post("/runs/create", {"experiment_id": experiment_id})["run"]["info"]
    stored = run["artifact_uri"].removeprefix("mlflow-artifacts:/") + "/old.txt"
    assert stored.startswith("workspaces/team-c/")
    put = world.call("admin", "PUT", f"{ARTIFACTS}/{stored}", "team-c", content=b"old")
    assert put.status_code == 200, put.text
    world.secrets["ivan"] = _token(world.gateway, "ivan", "editor", "team-c/*")
    paths = (stored, stored.removeprefix("workspaces/team-c/"))
    for path in paths:  # read once: the gateway has looked the experiment up in team-c
        assert world.call("ivan", "GET", f"{ARTIFACTS}/{path}", "team-c").content == b"old"
    gone = world.call("admin", "DELETE", f"{WORKSPACE_PATHS[0]}/team-c",
                      params={"mode": "SET_DEFAULT"})  # fmt: skip
    assert gone.status_code in (200, 204), gone.text
    assert _experiment_in(world, "legacy") == ["default"]
    assert world.call("admin", "POST", WORKSPACE_PATHS[0], json={"name": "team-c"}).is_success
    for path in paths:
        refused = world.call("ivan", "GET", f"{ARTIFACTS}/{path}", "team-c")
        assert refused.status_code in (403, 404), (path, refused.text)
        assert refused.content != b"old"
    mine = world.call("ivan", "GET", f"{API}/experiments/get", "team-c",
                      params={"experiment_id": experiment_id})  # fmt: skip
    assert mine.status_code == 404, mine.text
    assert (world.artifacts / stored).read_bytes() == b"old"  # still on disk


def test_sources_and_artifact_locations_stay_in_the_request_workspace(
    world: World, team_a: dict[str, str]
) -> None:
    """A version of alice's team-a model may not point at team-b's run or artifacts, however
    the source names them, nor a new experiment keep its artifacts in team-b's tree; team-a's
    own are fine."""
    b = world.b
    versions = f"{API}/model-versions/create"
    model = f"sourced-{uuid.uuid4().hex[:6]}"
    _ok(world.call("alice", "POST", f"{API}/registered-models/create", "team-a",
                   json={"name": model}))  # fmt: skip
    theirs = world.b["artifact"].removesuffix("/secret.txt")
    for source, run_id in [
        (f"mlflow-artifacts:/{theirs}", None),
        (f"mlflow-artifacts:///{theirs}", None),
        (f"mlflow-artifacts:/{theirs.removeprefix('workspaces/team-b/')}", None),
        (f"runs:/{b['run_id']}/model", None),
        (f"mlflow-artifacts:/{team_a['shared-artifacts']}", b["run_id"]),
        (f"file://{world.artifacts / theirs}", None),
    ]:
        body = {"name": model, "source": source} | ({"run_id": run_id} if run_id else {})
        refused = world.call("alice", "POST", versions, "team-a", json=body)
        assert refused.status_code in (403, 404), (source, refused.text)
    assert "latest_versions" not in _ok(world.call(
        "alice", "GET", f"{API}/registered-models/get", "team-a", params={"name": model}
    ))["registered_model"]  # fmt: skip
    # Nor may a new experiment keep its artifacts in team-b's tree (to read them back later
    # through its own runs).
    for location in (
        f"mlflow-artifacts:/workspaces/team-b/{b['experiment_id']}",
        f"mlflow-artifacts:/workspaces/team-b/{b['experiment_id']}/{b['run_id']}",
        f"mlflow-artifacts:/{b['experiment_id']}",
        f"file://{world.artifacts / 'workspaces' / 'team-b'}",
    ):
        name = f"located-{uuid.uuid4().hex[:6]}"
        body = {"name": name, "artifact_location": location}
        refused = world.call("alice", "POST", f"{API}/experiments/create", "team-a", json=body)
        assert refused.status_code == 403, (location, refused.text)
        assert _experiment_in(world, name) == []
    own = {"name": model, "source": f"mlflow-artifacts:/{team_a['shared-artifacts']}",
           "run_id": team_a["shared-run"]}  # fmt: skip
    assert _ok(world.call("alice", "POST", versions, "team-a", json=own))


# -- artifact paths ---------------------------------------------------------------------------


def test_artifact_paths_stay_in_the_request_workspace(world: World, team_a: dict[str, str]) -> None:
    b, theirs = world.b, world.b["artifact"]
    bare_theirs = theirs.removeprefix("workspaces/team-b/")
    shared = team_a["shared-artifacts"]  # workspaces/team-a/<exp>/<run>/artifacts
    assert shared.startswith("workspaces/team-a/")
    bare_shared = shared.removeprefix("workspaces/team-a/")
    for caller in ("alice", "bob"):
        # Team-a's own, with its prefix and without it (MLflow adds it in team-a).
        for path in (f"{shared}/f.txt", f"{bare_shared}/f.txt"):
            got = world.call(caller, "GET", f"{ARTIFACTS}/{path}", "team-a")
            assert got.status_code == 200 and got.content == b"shared", (caller, path, got.text)
        listed = world.call(caller, "GET", ARTIFACTS, "team-a", params={"path": shared})
        assert [f["path"] for f in _ok(listed)["files"]] == ["f.txt"], caller
        # Team-b's, named with team-b's prefix, with a bare path, or listed, from team-a: never.
        tries: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", f"{ARTIFACTS}/{theirs}", {}),
            ("GET", f"{ARTIFACTS}/{bare_theirs}", {}),
            ("GET", ARTIFACTS, {"params": {"path": theirs.removesuffix("/secret.txt")}}),
            ("GET", f"/ajax-api/2.0/mlflow-artifacts/artifacts/{theirs}", {}),
            ("PUT", f"{ARTIFACTS}/{theirs}", {"content": b"overwritten"}),
            ("DELETE", f"{ARTIFACTS}/{theirs}", {}),
            ("PUT", f"{ARTIFACTS}/workspaces/team-b/{team_a['shared']}/planted.txt",
             {"content": b"planted"}),
        ]  # fmt: skip
        for method, path, kwargs in tries:
            refused = world.call(caller, method, path, "team-a", **kwargs)
            assert refused.status_code in (400, 403, 404), (caller, method, path, refused.text)
            assert TEAM_B_SECRET not in refused.content
            if caller == "bob":  # judged by the gateway, which looks up in team-a only
                assert refused.headers.get("x-guard-reason") == "permission_denied", path
        # Another experiment's path in team-a needs its own right: bob has none on private.
        private = world.call(caller, "GET", f"{ARTIFACTS}/{team_a['private-artifacts']}/f.txt",
                             "team-a")  # fmt: skip
        assert private.status_code == (200 if caller == "alice" else 403), caller
    # The default workspace (no header) does not reach workspaces/team-b/ either: bob is refused
    # by the gateway, admin (who may do anything) by MLflow.
    for caller in ("bob", "admin"):
        for path in (theirs, f"workspaces/team-b/{b['experiment_id']}"):
            refused = world.call(caller, "GET", f"{ARTIFACTS}/{path}")
            assert refused.status_code in (400, 403), (caller, path, refused.text)
            assert TEAM_B_SECRET not in refused.content
    # Team-b's bytes are where admin put them, unchanged, and nothing was planted.
    stored = world.artifacts / theirs
    assert stored.read_bytes() == TEAM_B_SECRET
    assert sorted(p.name for p in (world.artifacts / "workspaces" / "team-b").rglob("*.txt")) == [
        "secret.txt"
    ]


# -- the workspaces themselves ----------------------------------------------------------------


def test_only_administrators_create_rename_or_delete_workspaces(world: World) -> None:
    for prefix in WORKSPACE_PATHS:
        for caller in ("alice", "bob"):
            for method, path, body in [
                ("POST", prefix, {"name": "team-z"}),
                ("POST", prefix, {"name": "team-a"}),
                ("PATCH", f"{prefix}/team-a", {"description": "taken over"}),
                ("PATCH", f"{prefix}/team-b", {"description": "taken over"}),
                ("DELETE", f"{prefix}/team-a", None),
                ("DELETE", f"{prefix}/team-b", None),
            ]:
                for workspace in (None, "team-a"):
                    refused = world.call(caller, method, path, workspace, json=body)
                    assert refused.status_code == 403, (caller, method, path, refused.text)
                    assert refused.headers["x-guard-reason"] in (
                        "permission_denied", "workspace_forbidden"
                    ), (caller, method, path)  # fmt: skip
    names = {w["name"]: w.get("description") for w in _ok(
        world.direct("GET", WORKSPACE_PATHS[0], "default"))["workspaces"]}  # fmt: skip
    assert {"default", "team-a", "team-b"} <= set(names) and names["team-a"] == "team a"
    assert "team-z" not in names
    # The MLflow client says the same.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_TOKEN", world.secrets["alice"])
        client = MlflowClient(tracking_uri=world.gateway.url)
        with pytest.raises(MlflowException, match="PERMISSION_DENIED"):
            client.create_workspace("team-z")
        with pytest.raises(MlflowException, match="PERMISSION_DENIED"):
            client.delete_workspace("team-b")
        assert [w.name for w in client.list_workspaces()] == ["team-a"]


def test_a_caller_lists_and_reads_only_its_own_workspaces(world: World) -> None:
    for prefix in WORKSPACE_PATHS:
        everything = sorted(w["name"] for w in _ok(world.direct("GET", prefix, "default"))[
            "workspaces"])  # fmt: skip
        assert {"default", "team-a", "team-b"} <= set(everything)
        for caller, mine in [("alice", ["team-a"]), ("bob", ["team-a", "team-b"]),
                             ("admin", everything)]:  # fmt: skip
            listed = _ok(world.call(caller, "GET", prefix))
            assert sorted(w["name"] for w in listed["workspaces"]) == mine, (prefix, caller)
        assert _ok(world.call("alice", "GET", f"{prefix}/team-a"))["workspace"]["name"] == "team-a"
        other = world.call("alice", "GET", f"{prefix}/team-b")
        nowhere = world.call("alice", "GET", f"{prefix}/team-nowhere")
        assert _refusal(other) == (403, "workspace_forbidden", "PERMISSION_DENIED")
        assert _shape(other, "team-b") == _shape(nowhere, "team-nowhere")
        assert "team b" not in other.text
        # The header does not open another workspace's record.
        assert world.call("alice", "GET", f"{prefix}/team-b", "team-a").status_code == 403


# -- the header --------------------------------------------------------------------------------


def _experiment_in(world: World, name: str) -> list[str]:
    """The workspaces in which MLflow itself holds an experiment called ``name``."""
    found = []
    for workspace in ("default", "team-a", "team-b"):
        params = {"experiment_name": name}
        if world.direct(
            "GET", f"{API}/experiments/get-by-name", workspace, params=params
        ).is_success:
            found.append(workspace)
    return found


def test_the_header_is_read_as_mlflow_reads_it_and_forwarded_canonical(world: World) -> None:
    create = f"{API}/experiments/create"
    # Repeated, in one spelling or two: refused before anything else.
    for extra in (
        [("X-MLflow-Workspace", "team-a"), ("X-MLflow-Workspace", "team-a")],
        [("X-MLflow-Workspace", "team-a"), ("x-mlflow-workspace", "team-b")],
        [("X-MLflow-Workspace", "team-a"), ("X_MLflow_Workspace", "team-b")],
    ):
        name = f"twice-{uuid.uuid4().hex[:6]}"
        refused = world.call("admin", "POST", create, headers=extra, json={"name": name})
        assert _refusal(refused) == (400, "ambiguous_parameter", "INVALID_PARAMETER_VALUE")
        assert _experiment_in(world, name) == []
    # The underscore spelling alone selects nothing: the experiment lands in default.
    name = f"underscore-{uuid.uuid4().hex[:6]}"
    _ok(world.call("admin", "POST", create, headers=[("X_MLflow_Workspace", "team-b")],
                   json={"name": name}))  # fmt: skip
    assert _experiment_in(world, name) == ["default"]
    # Alice, with it and nothing else, is in default, of which she is no member.
    refused = world.call("alice", "POST", create, headers=[("X_MLflow_Workspace", "team-a")],
                         json={"name": f"underscore-{uuid.uuid4().hex[:6]}"})  # fmt: skip
    assert refused.headers["x-guard-reason"] == "workspace_forbidden"
    # Names MLflow would refuse are refused, for administrators too (nothing reaches MLflow).
    for value in ("Team-A", "TEAM-A", "a", "api", "ajax-api", "workspaces", "static-files",
                  "../x", "team-b/..", "team_a", "-team", "team-", "x" * 64, "team a",
                  "team-a,team-b", "team-a;team-b", "tëam"):  # fmt: skip
        name = f"invalid-{uuid.uuid4().hex[:6]}"
        sent = [(b"Authorization", f"Bearer {world.secrets['admin']}".encode()),
                (b"X-MLflow-Workspace", value.encode("latin-1"))]  # fmt: skip
        refused = httpx.post(world.gateway.url + create, json={"name": name}, headers=sent)
        assert _refusal(refused) == (400, "workspace_invalid", "INVALID_PARAMETER_VALUE"), value
        assert _experiment_in(world, name) == [], value
    # 63 characters is a name: MLflow is asked, and knows no such workspace.
    unknown = world.call("admin", "GET", f"{API}/experiments/search", "x" * 63)
    assert unknown.status_code == 404 and "x-guard-reason" not in unknown.headers, unknown.text
    # Blanks around a valid name are dropped (as MLflow drops them); an empty value is default;
    # the header's name is any case. (Sent raw: httpx refuses blanks around a value.)
    for header_name, header_value, lands in [
        (b"X-MLflow-Workspace", b"  team-b  ", "team-b"),
        (b"X-MLflow-Workspace", b"\tteam-a\t", "team-a"),
        (b"x-mlflow-workspace", b"team-a", "team-a"),
        (b"X-MLFLOW-WORKSPACE", b"team-b", "team-b"),
        (b"X-MLflow-Workspace", b"", "default"),
        (b"X-MLflow-Workspace", b"   ", "default"),
        (b"X-MLflow-Workspace", b"default", "default"),
    ]:
        name = f"spelled-{uuid.uuid4().hex[:6]}"
        status, _ = _raw(world, "admin", create, [(header_name, header_value)], {"name": name})
        assert status == 200 and _experiment_in(world, name) == [lands], header_value
    # A member with blanks is in team-a; a non-member's blanks or case do not help.
    search = f"{API}/experiments/search"
    page = {"max_results": 1}
    assert _raw(world, "alice", search, [(b"X-MLflow-Workspace", b" team-a ")], page)[0] == 200
    for spelled in (b" team-b ", b"team-b\t", b"TEAM-B", b"\tTeam-b"):
        status, reason = _raw(world, "alice", search, [(b"X-MLflow-Workspace", spelled)], page)
        assert (status, reason) in ((403, "workspace_forbidden"), (400, "workspace_invalid"))


def _raw(
    world: World, caller: str, path: str, headers: list[tuple[bytes, bytes]], body: Any
) -> tuple[int, str | None]:
    """POST with header bytes exactly as given: the status and X-Guard-Reason."""
    payload = json.dumps(body).encode()
    lines = [
        f"POST {path} HTTP/1.1".encode(),
        f"Host: 127.0.0.1:{world.gateway.port}".encode(),
        f"Authorization: Bearer {world.secrets[caller]}".encode(),
        b"Content-Type: application/json",
        f"Content-Length: {len(payload)}".encode(),
        b"Connection: close",
        *(name + b":" + value for name, value in headers),
    ]
    with socket.create_connection(("127.0.0.1", world.gateway.port), timeout=30) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + payload)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    found = re.search(r"^x-guard-reason: *(\S+)", head, re.IGNORECASE | re.MULTILINE)
    return int(head.split(" ", 2)[1]), found.group(1) if found else None


# -- what the gateway writes down: creators' grants and the audit trail -----------------------


def test_creators_manage_the_qualified_resource_and_the_audit_names_it(
    world: World, team_a: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", world.secrets["alice"])
    mlflow.set_workspace("team-a")
    client = MlflowClient(tracking_uri=world.gateway.url, registry_uri=world.gateway.url)
    name, model = f"owned/{uuid.uuid4().hex[:6]}:v1", f"owned-model-{uuid.uuid4().hex[:6]}"
    experiment_id = client.create_experiment(name)
    client.create_registered_model(model)
    assert ["p", "token:alice", "manager", f"team-a/experiment:{name}", "allow"] in (
        world.policy_on(f"team-a/experiment:{name}")
    )
    assert ["p", "token:alice", "manager", f"team-a/model:{model}", "allow"] in (
        world.policy_on(f"team-a/model:{model}")
    )
    every = _ok(world.call("admin", "GET", "/guard/api/policy"))["rules"]
    assert not [r for r in every if r[0] == "p" and r[3].startswith(("experiment:", "model:"))]
    # The same name in team-b is not alice's to manage.
    explained = _ok(world.call("alice", "GET", "/guard/api/policy/explain", params={
        "action": "manage", "resource": f"team-b/experiment:{name}"}))  # fmt: skip
    assert explained["allowed"] is False

    # The audit trail names what was decided on, with its workspace: for a caller judged
    # resource by resource (bob) and for one who may do anything in the workspace (alice).
    cases = [
        ("alice", "GET", f"{API}/experiments/get", {"experiment_id": experiment_id},
         f"team-a/experiment:{name}"),
        ("alice", "GET", f"{API}/registered-models/get", {"name": model}, f"team-a/model:{model}"),
        ("alice", "GET", f"{ARTIFACTS}/{team_a['shared-artifacts']}/f.txt", {},
         "team-a/experiment:shared"),
        ("bob", "GET", f"{API}/experiments/get", {"experiment_id": team_a["shared"]},
         "team-a/experiment:shared"),
        ("bob", "GET", f"{API}/experiments/get", {"experiment_id": team_a["private"]},
         "team-a/experiment:private"),
        ("bob", "GET", f"{ARTIFACTS}/{team_a['shared-artifacts']}/f.txt", {},
         "team-a/experiment:shared"),
    ]  # fmt: skip
    for caller, method, path, params, resource in cases:
        response = world.call(caller, method, path, "team-a", params=params)
        record = world.audited(response.headers["x-request-id"])
        assert record["resource"] == resource, (caller, path, record)
    created = world.call("alice", "POST", f"{API}/experiments/create", "team-a",
                         json={"name": f"audited-{uuid.uuid4().hex[:6]}"})  # fmt: skip
    record = world.audited(created.headers["x-request-id"])
    assert record["resource"].startswith("team-a/experiment:audited-"), record
    # A refused workspace is named in the record (the caller's answer says no more than that).
    for path in (f"{API}/experiments/search", f"{WORKSPACE_PATHS[0]}/team-b"):
        refused = world.call("alice", "GET", path, "team-b")
        record = world.audited(refused.headers["x-request-id"])
        assert (record["reason"], record["resource"]) == ("workspace_forbidden", "workspace:team-b")


# -- the gateway's setting against MLflow's ---------------------------------------------------


def _misconfigured(gateway: Gateway, token: str) -> list[str]:
    """Every MLflow request refused 503 upstream_misconfigured: the messages."""
    messages = []
    for method, path in [("GET", f"{API}/experiments/get?experiment_id=0"),
                         ("POST", f"{API}/experiments/search"), ("GET", "/version"),
                         ("GET", "/api/3.0/mlflow/workspaces")]:  # fmt: skip
        refused = httpx.request(method, gateway.url + path, json={} if method == "POST" else None,
                                headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        assert _refusal(refused) == (503, "upstream_misconfigured", "TEMPORARILY_UNAVAILABLE")
        messages.append(refused.json()["message"])
    return messages


def test_workspaces_on_in_front_of_an_mlflow_without_them_is_refused(
    external_mlflow: Mlflow, tmp_path: Path
) -> None:
    assert _ok(httpx.get(external_mlflow.url + "/api/3.0/mlflow/server-info")).get(
        "workspaces_enabled") is not True  # fmt: skip
    gateway = start_workspace_gateway(tmp_path / "gw", external_mlflow.url, None, "/guard/health")
    try:
        not_ready = httpx.get(gateway.url + "/guard/ready")
        assert not_ready.status_code == 503 and "upstream.workspaces is on" in not_ready.text
        for message in _misconfigured(gateway, gateway.token):
            assert "--enable-workspaces" in message and "upstream.workspaces is on" in message
        assert (
            "upstream.workspaces is on but MLflow runs without workspaces"
            in gateway.log.read_text()
        )
    finally:
        gateway.stop()


def test_workspaces_off_in_front_of_them_is_refused_and_unqualified_grants_stop_the_start(
    world: World, tmp_path: Path
) -> None:
    """The reverse mismatch; then the same gateway's policy, holding a grant written for a
    gateway without workspaces, stops it from starting with workspaces on and says how to fix
    it — and check-config says the same beforehand."""
    data = tmp_path / "gw"
    gateway = start_gateway(data, "--upstream-url", world.mlflow.url, ready_path="/guard/health")
    try:
        assert httpx.get(gateway.url + "/guard/ready").status_code == 503
        for message in _misconfigured(gateway, gateway.token):
            assert "upstream.workspaces is off" in message and "turn it on" in message
        # Without workspaces a qualified grant is the mistake, an unqualified one is fine.
        auth = {"Authorization": f"Bearer {gateway.token}"}
        for row, status in [(["p", "group:x", "viewer", "team-a/experiment:foo"], 400),
                            (["p", "group:x", "viewer", "experiment:foo"], 200)]:  # fmt: skip
            changed = httpx.post(gateway.url + "/guard/api/policy/changes", headers=auth,
                                 json={"add": [row]})  # fmt: skip
            assert changed.status_code == status, changed.text
    finally:
        gateway.stop()
    checked = gateway.cli("check-config")
    assert checked.returncode == 0, checked.stderr
    on = Gateway(gateway.url, gateway.port, gateway.token, data, gateway.proc, gateway.log,
                 {**gateway.env, WORKSPACES_SETTING: "true"})  # fmt: skip
    checked = on.cli("check-config")
    assert checked.returncode != 0
    assert "group:x, viewer, experiment:foo" in checked.stderr
    assert "mlflow-guard policy qualify --workspace default" in checked.stderr
    with pytest.raises(RuntimeError, match="process exited") as refused:
        start_workspace_gateway(data, world.mlflow.url, token=gateway.token)
    said = str(refused.value)
    assert "group:x, viewer, experiment:foo" in said
    assert "mlflow-guard policy qualify --workspace default" in said
