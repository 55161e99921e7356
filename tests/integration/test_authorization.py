"""Non-admin callers through the gateway, with the real MLflow client, and the ways around."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.integration.conftest import Gateway, start_gateway

pytestmark = pytest.mark.integration


@dataclass
class World:
    gateway: Gateway
    tokens: dict[str, str]
    fraud: str  # experiment ids
    other: str
    fraud_run: str
    other_run: str


def make_token(gateway: Gateway, name: str, role: str, resource: str) -> str:
    created = gateway.cli("token", "create", "--name", name, "--role", role,
                          "--resource", resource, "--quiet")  # fmt: skip
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    gateway = start_gateway(tmp_path_factory.mktemp("authz"))
    admin = MlflowClient(tracking_uri=gateway.url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_TOKEN", gateway.token)
        fraud = admin.create_experiment("fraud/train")
        other = admin.create_experiment("other/x")
        fraud_run = admin.create_run(fraud).info.run_id
        other_run = admin.create_run(other).info.run_id
        for name in ("fraud-detector", "other-model"):
            admin.create_registered_model(name)
            admin.create_model_version(name, f"runs:/{fraud_run}/model", fraud_run)
    tokens = {
        "alice": make_token(gateway, "alice", "editor", "experiment:fraud/*"),
        "ci": make_token(gateway, "ci", "promoter", "model:fraud-*"),
        "reader": make_token(gateway, "reader", "viewer", "*"),
        "modeler": make_token(gateway, "modeler", "editor", "model:fraud-*"),
    }
    deny = gateway.cli("role", "assign", "--subject", "token:reader", "--role", "viewer",
                       "--resource", "experiment:other/*", "--deny")  # fmt: skip
    assert deny.returncode == 0, deny.stderr
    reads = gateway.cli("role", "assign", "--subject", "token:modeler", "--role", "viewer",
                        "--resource", "experiment:fraud/*")  # fmt: skip
    assert reads.returncode == 0, reads.stderr
    yield World(gateway, tokens, fraud, other, fraud_run, other_run)
    gateway.stop()


@pytest.fixture
def as_(monkeypatch: pytest.MonkeyPatch, world: World):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

    def client(name: str) -> MlflowClient:
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", world.tokens[name])
        return MlflowClient(tracking_uri=world.gateway.url, registry_uri=world.gateway.url)

    return client


def refused(call, reason: str) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(MlflowException) as info:
        call()
    assert info.value.error_code == "PERMISSION_DENIED", info.value.message
    assert reason in info.value.message or reason in str(info.value)
    return info.value.message


def test_editor_works_inside_its_experiments_only(world: World, as_, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    alice = as_("alice")
    run = alice.create_run(world.fraud).info.run_id
    alice.log_metric(run, "auc", 0.9)
    (tmp_path / "a.txt").write_text("x")
    alice.log_artifact(run, str(tmp_path / "a.txt"))
    assert [f.path for f in alice.list_artifacts(run)] == ["a.txt"]
    assert alice.get_run(run).data.metrics == {"auc": 0.9}
    assert [r.info.run_id for r in alice.search_runs([world.fraud])]
    created = alice.create_experiment("fraud/new")
    assert alice.get_experiment(created).name == "fraud/new"
    # The creator manages what they created, recorded once MLflow confirmed the creation.
    exported = world.gateway.cli("policy", "export").stdout
    assert "p, token:alice, manager, experiment:fraud/new, allow" in exported

    message = refused(lambda: alice.create_run(world.other),
                      f"may not create experiment_id '{world.other}'")  # fmt: skip
    assert "token:alice" in message
    refused(lambda: alice.get_experiment(world.other), f"experiment_id '{world.other}'")
    refused(lambda: alice.log_metric(world.other_run, "auc", 1.0), "may not update run_id")
    refused(lambda: alice.search_runs([world.fraud, world.other]), "may not read experiment_ids")
    refused(lambda: alice.create_experiment("other/new"), "may not create name 'other/new'")
    assert "experiment:other/new" not in world.gateway.cli("policy", "export").stdout
    # Searches are filtered to what the caller may read.
    assert {e.name for e in alice.search_experiments()} == {"fraud/train", "fraud/new"}
    assert [m.name for m in alice.search_registered_models()] == []
    refused(lambda: alice.get_registered_model("fraud-detector"), "name 'fraud-detector'")


def test_promoter_moves_aliases_on_its_models_only(world: World, as_) -> None:  # type: ignore[no-untyped-def]
    ci = as_("ci")
    ci.set_registered_model_alias("fraud-detector", "champion", "1")
    assert ci.get_model_version_by_alias("fraud-detector", "champion").version == "1"
    refused(lambda: ci.set_registered_model_alias("other-model", "champion", "1"), "other-model")
    refused(lambda: ci.delete_registered_model("fraud-detector"), "may not delete")
    refused(lambda: ci.create_run(world.fraud), f"may not create experiment_id '{world.fraud}'")


def test_explicit_deny_wins(world: World, as_) -> None:  # type: ignore[no-untyped-def]
    reader = as_("reader")
    assert reader.get_experiment(world.fraud).name == "fraud/train"
    message = refused(lambda: reader.get_experiment(world.other), "may not read experiment_id")
    # A deny rule is not announced: it would tell that the experiment exists.
    assert "deny" not in message.lower() and "other/x" not in message
    refused(lambda: reader.log_metric(world.fraud_run, "auc", 1.0), "may not update")
    # A deny on some experiments hides them from searches too.
    names = {e.name for e in reader.search_experiments()}
    assert "fraud/train" in names
    assert "other/x" not in names


def raw(
    world: World, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: object
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {world.tokens['alice']}", **(headers or {})}
    return httpx.request(method, world.gateway.url + path, headers=headers, **kwargs)  # type: ignore[arg-type]


def reason(response: httpx.Response) -> str | None:
    return response.headers.get("x-guard-reason")


def test_ways_around_are_refused(world: World) -> None:
    get = "/api/2.0/mlflow/experiments/get"
    # Sanity: the plain request is allowed.
    assert raw(world, "GET", get, params={"experiment_id": world.fraud}).status_code == 200
    # A repeated singular parameter: MLflow acts on the first, which the gateway will not guess.
    both = f"{get}?experiment_id={world.fraud}&experiment_id={world.other}"
    assert reason(raw(world, "GET", both)) == "ambiguous_parameter"
    # Leading zeros, signs and spaces name the same experiment in MLflow's SQL store.
    for spelling in (f"0{world.other}", f"+{world.other}", f" {world.other}"):
        response = raw(world, "GET", get, params={"experiment_id": spelling})
        assert reason(response) == "permission_denied", spelling
    # GET with an empty query string: MLflow reads a JSON body, so does the gateway.
    body = json.dumps({"experiment_id": world.other})
    assert reason(raw(world, "GET", get, content=body)) == "permission_denied"
    assert (
        raw(world, "GET", get, content=json.dumps({"experiment_id": world.fraud})).status_code
        == 200
    )
    # camelCase is the same field to MLflow.
    response = raw(world, "GET", "/api/2.0/mlflow/runs/get", params={"runId": world.other_run})
    assert reason(response) == "permission_denied"
    response = raw(world, "GET", "/api/2.0/mlflow/runs/get",
                   params={"run_id": world.fraud_run, "runId": world.other_run})  # fmt: skip
    assert reason(response) == "ambiguous_parameter"
    # The legacy run_uuid beside run_id, naming another run.
    metric = {"key": "m", "value": 1, "timestamp": 0, "step": 0}
    both_runs = {"run_id": world.fraud_run, "run_uuid": world.other_run, **metric}
    response = raw(world, "POST", "/api/2.0/mlflow/runs/log-metric", json=both_runs)
    assert reason(response) == "ambiguous_parameter"
    # Duplicate JSON keys: Python's json keeps the last, other parsers the first.
    duplicated = (
        f'{{"run_id": "{world.fraud_run}", "run_id": "{world.other_run}", '
        '"key": "m", "value": 1, "timestamp": 0}'
    )
    response = raw(world, "POST", "/api/2.0/mlflow/runs/log-metric", content=duplicated,
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert reason(response) == "invalid_request_body"
    # Not JSON at all.
    response = raw(world, "POST", "/api/2.0/mlflow/runs/log-metric", content=b"\xff{",
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert reason(response) == "invalid_request_body"
    # Proxied artifacts: the path names the experiment.
    url = f"/api/2.0/mlflow-artifacts/artifacts/{world.other}/{world.other_run}/artifacts/x.txt"
    assert reason(raw(world, "PUT", url, content=b"x")) == "permission_denied"
    url = f"/api/2.0/mlflow-artifacts/artifacts/0{world.other}/{world.other_run}/artifacts/x.txt"
    assert reason(raw(world, "PUT", url, content=b"x")) == "permission_denied"
    # A run that does not exist cannot be placed in an experiment.
    response = raw(world, "GET", "/api/2.0/mlflow/runs/get", params={"run_id": "f" * 32})
    assert reason(response) == "permission_denied"
    # Server-wide routes need a grant on server:mlflow.
    response = raw(world, "POST", "/ajax-api/3.0/mlflow/demo/generate", json={})
    assert reason(response) == "permission_denied"


def test_policy_changes_reach_a_running_gateway_within_2_s(world: World) -> None:
    get = "/api/2.0/mlflow/experiments/get"
    assert (
        reason(raw(world, "GET", get, params={"experiment_id": world.other})) == "permission_denied"
    )
    started = time.monotonic()
    granted = world.gateway.cli("role", "assign", "--subject", "token:alice", "--role", "viewer",
                                "--resource", "experiment:other/*")  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    deadline = started + 10
    while time.monotonic() < deadline:
        if raw(world, "GET", get, params={"experiment_id": world.other}).status_code == 200:
            break
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0 + 1.0, f"took {elapsed:.2f} s"  # 2 s, plus the CLI's own start-up
    world.gateway.cli("role", "unassign", "--subject", "token:alice", "--role", "viewer",
                      "--resource", "experiment:other/*")  # fmt: skip


def test_promotion_needs_promote(world: World, as_) -> None:  # type: ignore[no-untyped-def]
    """An editor of fraud-* models may edit them but not promote: protected aliases (all, by
    default), validation tags, deleting a version that holds an alias."""
    modeler = as_("modeler")
    source = f"runs:/{world.fraud_run}/model"
    modeler.create_registered_model("fraud-temp")
    version = modeler.create_model_version("fraud-temp", source, world.fraud_run).version
    modeler.set_model_version_tag("fraud-temp", version, "owner", "risk-team")
    modeler.update_model_version("fraud-temp", version, description="candidate")
    refused(lambda: modeler.set_registered_model_alias("fraud-temp", "champion", version),
            "may not promote name 'fraud-temp'")  # fmt: skip
    refused(lambda: modeler.set_model_version_tag("fraud-temp", version, "validation_status",
                                                  "ok"), "may not promote")  # fmt: skip
    refused(lambda: modeler.create_model_version("fraud-temp", source, world.fraud_run,
                                                 tags={"validation_status": "ok"}),
            "may not promote")  # fmt: skip
    as_("ci").set_registered_model_alias("fraud-temp", "champion", version)  # the promoter may
    modeler = as_("modeler")
    refused(lambda: modeler.delete_model_version("fraud-temp", version), "may not promote")
    second = modeler.create_model_version("fraud-temp", source, world.fraud_run).version
    modeler.delete_model_version("fraud-temp", second)  # no alias: delete is enough
    # Renaming needs create on the new name too.
    refused(lambda: modeler.rename_registered_model("fraud-temp", "other-name"),
            "may not create new_name 'other-name'")  # fmt: skip
    modeler.rename_registered_model("fraud-temp", "fraud-temp2")
    assert modeler.get_registered_model("fraud-temp2").name == "fraud-temp2"


def test_artifact_addresses_must_be_readable(world: World, as_) -> None:  # type: ignore[no-untyped-def]
    """A model version's source and an experiment's artifact location may only point at
    artifacts the caller may read; other addresses are for administrators."""
    modeler = as_("modeler")
    modeler.create_registered_model("fraud-sources")
    refused(
        lambda: modeler.create_model_version(
            "fraud-sources", f"runs:/{world.other_run}/m", world.other_run
        ),
        f"may not read run_id '{world.other_run}'",
    )  # the run is checked, then the source
    refused(lambda: modeler.create_model_version("fraud-sources", "file:///etc"),
            "is not allowed")  # fmt: skip
    refused(lambda: modeler.create_model_version("fraud-sources", "models:/other-model/1"),
            "may not read source 'models:/other-model/1'")  # fmt: skip
    alice = as_("alice")
    refused(lambda: alice.create_experiment("fraud/s3", artifact_location="s3://bucket/x"),
            "is not allowed")  # fmt: skip
    refused(lambda: alice.create_experiment("fraud/peek",
                                            artifact_location=f"mlflow-artifacts:/{world.other}"),
            "may not read artifact_location")  # fmt: skip
    own = alice.create_experiment(
        "fraud/own", artifact_location=f"mlflow-artifacts:/{world.fraud}/sub"
    )
    assert alice.get_experiment(own).name == "fraud/own"


def test_runs_are_attributed_to_the_caller(world: World, as_) -> None:  # type: ignore[no-untyped-def]
    """The client sends the OS account as the run's user; the gateway writes the caller's name,
    and refuses a later write naming someone else (an admin may)."""
    import mlflow

    alice = as_("alice")
    run = alice.create_run(world.fraud, tags={"mlflow.user": "bob"})
    stored = alice.get_run(run.info.run_id)
    assert stored.data.tags["mlflow.user"] == "alice" and stored.info.user_id == "alice"
    alice.set_tag(run.info.run_id, "mlflow.user", "alice")  # naming oneself is fine
    refused(lambda: alice.set_tag(run.info.run_id, "mlflow.user", "bob"),
            "mlflow.user may not be set to 'bob'")  # fmt: skip
    refused(lambda: alice.log_batch(run.info.run_id, tags=[mlflow.entities.RunTag(
        "mlflow.user", "bob")]), "mlflow.user may not be set to 'bob'")  # fmt: skip
    refused(lambda: alice.delete_tag(run.info.run_id, "mlflow.user"), "may not be removed")
    # The fluent API, as a training script uses it.
    mlflow.set_tracking_uri(world.gateway.url)
    with mlflow.start_run(experiment_id=world.fraud) as active:
        mlflow.log_metric("auc", 0.9)
    assert alice.get_run(active.info.run_id).data.tags["mlflow.user"] == "alice"
    mlflow.set_tracking_uri("")
    # An administrator's runs are attributed like anyone's (not to the client's OS account);
    # they may set another user afterwards, for imports.
    admin = as_admin(world)
    admin_run = admin.create_run(world.fraud, tags={"mlflow.user": "root"})
    assert admin_run.data.tags["mlflow.user"] == "admin" and admin_run.info.user_id == "admin"
    admin.set_tag(admin_run.info.run_id, "mlflow.user", "import-bot")
    assert admin.get_run(admin_run.info.run_id).data.tags["mlflow.user"] == "import-bot"


def as_admin(world: World) -> MlflowClient:
    import os

    os.environ["MLFLOW_TRACKING_TOKEN"] = world.gateway.token  # restored by as_'s monkeypatch
    return MlflowClient(tracking_uri=world.gateway.url)


def test_graphql_is_authorized_field_by_field(world: World) -> None:
    """The UI's GraphQL: each run and experiment a document names must be readable."""
    get_run = """query GetRun($id: String) { a: mlflowGetRun(input: {runId: $id}) {
        run { info { runId experimentId } } } }"""
    alice = {"Authorization": f"Bearer {world.tokens['alice']}"}
    admin = {"Authorization": f"Bearer {world.gateway.token}"}
    url = world.gateway.url + "/graphql"
    ok = httpx.post(url, json={"query": get_run, "variables": {"id": world.fraud_run}},
                    headers=alice)  # fmt: skip
    assert ok.status_code == 200, ok.text
    assert ok.json()["data"]["a"]["run"]["info"]["runId"] == world.fraud_run
    # MLflow would read a GET's document from its body too (and only there); the gateway serves
    # GraphQL by POST and refuses a GET with a body.
    got = httpx.request("GET", url, json={"query": get_run, "variables": {"id": world.fraud_run}},
                        headers=alice)  # fmt: skip
    assert got.status_code == 400 and got.headers["x-guard-reason"] == "body_not_allowed"
    for document, why in (
        ({"query": get_run, "variables": {"id": world.other_run}}, "permission_denied"),
        ({"query": '{ mlflowGetExperiment(input: {experimentId: "EXP"}) { experiment { name } } }'
          .replace("EXP", world.other)}, "permission_denied"),
        ({"query": "{ mlflowSearchModelVersions(input: {}) { modelVersions { name } } }"},
         "permission_denied"),
        ({"query": 'query A { test { output } } query B { mlflowGetRun(input: {runId: "RUN"}) '
          "{ run { info { runId } } } }".replace("RUN", world.other_run), "operationName": "B"},
         "permission_denied"),
        ({"query": 'fragment F on Query { mlflowGetRun(input: {runId: "RUN"}) { run { info '
          "{ runId } } } } { ...F }".replace("RUN", world.other_run)}, "permission_denied"),
        ({"query": "mutation { mlflowSearchRuns(input: {}) { runs { info { runId } } } }"},
         "graphql_not_authorizable"),
        ({"query": "{ nope }"}, "graphql_not_authorizable"),
        ({"query": "{"}, "invalid_request_body"),
    ):  # fmt: skip
        response = httpx.post(url, json=document, headers=alice)
        assert response.headers.get("x-guard-reason") == why, (document, response.text)
    batch = httpx.post(url, json=[{"query": get_run}], headers=alice)
    assert batch.headers.get("x-guard-reason") == "invalid_request_body"
    # An administrator reads everything, searches included.
    search = {"query": "{ mlflowSearchModelVersions(input: {}) { modelVersions { name } } }"}
    assert httpx.post(url, json=search, headers=admin).status_code == 200


def test_renaming_an_experiment_cannot_move_it_out_of_its_grants(world: World, as_) -> None:  # type: ignore[no-untyped-def]
    alice = as_("alice")
    own = alice.create_experiment("fraud/rename-me")
    refused(lambda: alice.rename_experiment(own, "other/mine-now"),
            "may not create new_name 'other/mine-now'")  # fmt: skip
    refused(lambda: alice.rename_experiment(world.other, "fraud/taken"),
            f"may not delete experiment_id '{world.other}'")  # fmt: skip
    alice.rename_experiment(own, "fraud/renamed")
    assert alice.get_experiment(own).name == "fraud/renamed"


def test_graphql_answers_hide_model_versions_of_unreadable_models(world: World) -> None:
    """A run's modelVersions (the UI's run page asks for them) list only readable models."""
    document = {
        "query": "query R($id: String) { mlflowGetRun(input: {runId: $id}) { run { info "
        "{ runId } mv: modelVersions { version n: name } } } }",
        "variables": {"id": world.fraud_run},
    }
    url = world.gateway.url + "/graphql"

    def names(token: str) -> list[str]:
        response = httpx.post(url, json=document, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        return sorted(v["n"] for v in response.json()["data"]["mlflowGetRun"]["run"]["mv"])

    everything = names(world.gateway.token)  # other tests add versions from this run too
    assert {"fraud-detector", "other-model"} <= set(everything)
    assert names(world.tokens["modeler"]) == [n for n in everything if n.startswith("fraud-")]
    assert names(world.tokens["alice"]) == []  # reads the run, no model


def test_unknown_and_forbidden_ids_look_the_same(world: World) -> None:
    """Against the real MLflow: walking ids tells alice nothing about what she may not read."""
    unknown_run = "f" * 32

    def shape(response: httpx.Response, sent: str, instead: str) -> tuple[object, ...]:
        body = response.json()
        headers = sorted(
            (k, v) for k, v in response.headers.items()
            if k not in ("x-request-id", "content-length", "date")
        )  # fmt: skip
        message = body["message"].replace(sent, instead)
        return response.status_code, body["error_code"], body["reason"], message, headers

    for prefix in ("/api", "/ajax-api"):
        cases = [
            ("GET", "/2.0/mlflow/experiments/get", "experiment_id", world.other, "987654"),
            ("GET", "/2.0/mlflow/runs/get", "run_id", world.other_run, unknown_run),
            ("GET", "/2.0/mlflow/experiments/get-by-name", "experiment_name", "other/x", "nope/x"),
            ("GET", "/2.0/mlflow/registered-models/get", "name", "other-model", "no-model"),
            ("GET", "/2.0/mlflow/artifacts/list", "run_id", world.other_run, unknown_run),
        ]
        for method, path, field, forbidden, missing in cases:
            a = raw(world, method, prefix + path, params={field: forbidden})
            b = raw(world, method, prefix + path, params={field: missing})
            assert a.status_code == 403, a.text
            assert shape(a, forbidden, "X") == shape(b, missing, "X"), (a.text, b.text)
            assert "other/x" not in a.text.replace(f"'{forbidden}'", "")
        # A body naming another run's id changes nothing either.
        for run in (world.other_run, unknown_run):
            response = raw(
                world,
                "POST",
                prefix + "/2.0/mlflow/runs/log-metric",
                json={"run_id": run, "key": "k", "value": 1, "timestamp": 1, "step": 0},
            )
            assert response.status_code == 403 and reason(response) == "permission_denied"
