"""References inside writes, against the real MLflow: an editor of one experiment cannot link,
copy from or write onto what lives in another, and OTLP span exports work through the gateway."""

from __future__ import annotations

import gzip
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.integration.conftest import Gateway, start_gateway
from tests.integration.test_authorization import make_token

pytestmark = pytest.mark.integration


@dataclass
class World:
    gateway: Gateway
    alice: str  # editor on experiment:team-a/* and model:team-a-*
    mine: str  # experiment ids
    theirs: str
    my_run: str
    their_run: str
    my_model: str  # logged model ids
    their_model: str
    their_trace: str


def otlp(trace_id: bytes, name: str = "root") -> bytes:
    """An OTLP export of one finished root span, gzipped as exporters send it."""
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    now = time.time_ns()
    span.trace_id, span.span_id, span.name = trace_id, os.urandom(8), name
    span.start_time_unix_nano, span.end_time_unix_nano = now - 1_000_000, now
    return gzip.compress(request.SerializeToString())


def export(world: World, token: str, experiment_id: str, trace_id: bytes) -> httpx.Response:
    return httpx.post(
        world.gateway.url + "/v1/traces",
        content=otlp(trace_id),
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "gzip",
            "X-Mlflow-Experiment-Id": experiment_id,
        },
        timeout=30,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    gateway = start_gateway(tmp_path_factory.mktemp("references"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_TOKEN", gateway.token)
        admin = MlflowClient(tracking_uri=gateway.url, registry_uri=gateway.url)
        mine, theirs = admin.create_experiment("team-a/x"), admin.create_experiment("team-b/x")
        my_run, their_run = (admin.create_run(e).info.run_id for e in (mine, theirs))
        my_model = admin.create_logged_model(mine).model_id
        their_model = admin.create_logged_model(theirs).model_id
        admin.create_registered_model("team-a-model")
    trace_id = os.urandom(16)
    alice = make_token(gateway, "alice", "editor", "experiment:team-a/*")
    assigned = gateway.cli("role", "assign", "--subject", "token:alice", "--role", "editor",
                           "--resource", "model:team-a-*")  # fmt: skip
    assert assigned.returncode == 0, assigned.stderr
    world = World(gateway, alice, mine, theirs, my_run, their_run, my_model, their_model,
                  "tr-" + trace_id.hex())  # fmt: skip
    assert export(world, gateway.token, theirs, trace_id).status_code == 200
    yield world
    gateway.stop()


@pytest.fixture
def alice(monkeypatch: pytest.MonkeyPatch, world: World) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", world.alice)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world.gateway.url)  # never a local ./mlflow.db
    return MlflowClient(tracking_uri=world.gateway.url, registry_uri=world.gateway.url)


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch, world: World) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", world.gateway.token)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world.gateway.url)
    return MlflowClient(tracking_uri=world.gateway.url, registry_uri=world.gateway.url)


def refused(call, sent: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MlflowException) as info:
        call()
    assert info.value.error_code == "PERMISSION_DENIED", info.value.message
    assert sent in info.value.message and "team-b" not in info.value.message


def test_a_logged_model_of_another_experiment_cannot_be_claimed(
    world: World, alice: MlflowClient
) -> None:
    alice.log_outputs(world.my_run, [LoggedModelOutput(world.my_model, step=0)])
    refused(
        lambda: alice.log_outputs(world.my_run, [LoggedModelOutput(world.their_model, step=0)]),
        world.their_model,
    )
    refused(
        lambda: alice.log_metric(world.my_run, "auc", 0.5, model_id=world.their_model),
        world.their_model,
    )


def test_a_trace_of_another_experiment_cannot_be_linked(world: World, alice: MlflowClient) -> None:
    own = os.urandom(16)
    assert export(world, world.alice, world.mine, own).status_code == 200
    alice.link_traces_to_run(["tr-" + own.hex()], world.my_run)
    refused(lambda: alice.link_traces_to_run([world.their_trace], world.my_run), world.their_trace)


def test_a_model_version_cannot_come_from_a_run_of_another_experiment(
    world: World, alice: MlflowClient
) -> None:
    source = f"runs:/{world.my_run}/model"
    assert alice.create_model_version("team-a-model", source, world.my_run).version == "1"
    refused(
        lambda: alice.create_model_version("team-a-model", source, world.their_run),
        world.their_run,
    )
    refused(
        lambda: alice.create_model_version(
            "team-a-model", f"models:/{world.my_model}", model_id=world.their_model
        ),
        world.their_model,
    )


def test_a_run_cannot_be_nested_under_another_experiments_run(
    world: World, alice: MlflowClient
) -> None:
    refused(
        lambda: alice.create_run(world.mine, tags={"mlflow.parentRunId": world.their_run}),
        world.their_run,
    )
    child = alice.create_run(world.mine, tags={"mlflow.parentRunId": world.my_run})
    assert child.data.tags["mlflow.parentRunId"] == world.my_run


def test_otlp_spans_are_stored_and_foreign_traces_refused(
    world: World, alice: MlflowClient, admin: MlflowClient
) -> None:
    trace_id = os.urandom(16)
    response = export(world, world.alice, world.mine, trace_id)
    assert response.status_code == 200, response.text
    stored = admin.get_trace("tr-" + trace_id.hex())
    assert stored.info.experiment_id == world.mine
    assert [span.name for span in stored.data.spans] == ["root"]
    # Spans onto the other experiment's trace would be appended to it there.
    response = export(world, world.alice, world.mine, bytes.fromhex(world.their_trace[3:]))
    assert response.status_code == 403
    assert response.headers["x-guard-reason"] == "permission_denied"
    assert len(admin.get_trace(world.their_trace).data.spans) == 1


def test_start_trace_cannot_move_another_experiments_trace(
    world: World, admin: MlflowClient
) -> None:
    location = {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": world.mine}}
    info = {"trace_id": world.their_trace, "trace_location": location,
            "request_time": "2026-01-01T00:00:00Z", "state": "OK"}  # fmt: skip
    response = httpx.post(
        world.gateway.url + "/api/3.0/mlflow/traces",
        json={"trace": {"trace_info": info}},
        headers={"Authorization": f"Bearer {world.alice}"},
        timeout=30,
    )
    assert response.status_code == 403, response.text
    assert world.their_trace in response.json()["message"]
    assert admin.get_trace(world.their_trace).info.experiment_id == world.theirs
    new = "tr-" + os.urandom(16).hex()
    response = httpx.post(
        world.gateway.url + "/api/3.0/mlflow/traces",
        json={"trace": {"trace_info": {**info, "trace_id": new}}},
        headers={"Authorization": f"Bearer {world.alice}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    stored = httpx.get(
        f"{world.gateway.url}/api/3.0/mlflow/traces/{new}",
        headers={"Authorization": f"Bearer {world.gateway.token}"},
        timeout=30,
    ).json()["trace"]["trace_info"]  # no spans: the client would look for them as artifacts
    assert stored["trace_location"]["mlflow_experiment"]["experiment_id"] == world.mine


def test_mlflows_own_tracing_works_through_the_gateway(
    world: World, alice: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fluent API inside a run: spans over OTLP, then StartTraceV3 for the same new trace,
    naming the run (mlflow.sourceRun); both pass the reference checks."""
    import warnings

    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", world.gateway.url)
    mlflow.set_tracking_uri(world.gateway.url)
    try:
        with mlflow.start_run(experiment_id=world.mine) as run:

            @mlflow.trace
            def predict(x):  # type: ignore[no-untyped-def]
                return x + 1

            # MLflow's tracer start-up warns (OpenTelemetry SDK deprecations); as errors, which
            # pytest makes them here, MLflow would drop the trace silently.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert predict(1) == 2
        mlflow.flush_trace_async_logging()
        trace_id = mlflow.get_last_active_trace_id()
    finally:
        mlflow.set_tracking_uri(None)
    assert trace_id is not None
    stored = httpx.get(
        f"{world.gateway.url}/api/3.0/mlflow/traces/{trace_id}",
        headers={"Authorization": f"Bearer {world.gateway.token}"},
        timeout=30,
    ).json()["trace"]["trace_info"]
    assert stored["trace_location"]["mlflow_experiment"]["experiment_id"] == world.mine
    assert stored["trace_metadata"]["mlflow.sourceRun"] == run.info.run_id
    # Alice reads her own trace by id (the gateway looks traces up where MLflow 3.17 answers);
    # another experiment's trace and one nobody has look the same to her.
    mine = httpx.get(
        f"{world.gateway.url}/api/3.0/mlflow/traces/{trace_id}",
        headers={"Authorization": f"Bearer {world.alice}"},
        timeout=30,
    )
    assert mine.status_code == 200, mine.text
    location = {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": world.mine}}
    found = httpx.post(
        f"{world.gateway.url}/api/3.0/mlflow/traces/search",
        json={"locations": [location]},
        headers={"Authorization": f"Bearer {world.alice}"},
        timeout=30,
    )
    assert found.status_code == 200, found.text
    assert trace_id in [t["trace_id"] for t in found.json()["traces"]]
    refusals = []
    for other in (world.their_trace, "tr-" + "0" * 32):
        response = httpx.get(
            f"{world.gateway.url}/ajax-api/3.0/mlflow/traces/{other}",
            headers={"Authorization": f"Bearer {world.alice}"},
            timeout=30,
        )
        assert response.status_code == 403, response.text
        refusals.append(response.json()["message"].replace(other, "X"))
    assert refusals[0] == refusals[1]
