"""Bodies and lists of ids against the real MLflow: a request is read by the gateway exactly as
MLflow reads it, or refused; HEAD is answered as its GET; long lists of ids never reach a lookup.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from mlflow import MlflowClient

from tests.integration.conftest import Gateway, start_gateway
from tests.integration.test_authorization import make_token

pytestmark = pytest.mark.integration

PREFIXES = ("/api", "/ajax-api")
LIMIT = 5  # authz.max_ids_per_request for this gateway


@dataclass
class World:
    gateway: Gateway
    alice: str  # viewer on experiment:team-a/*
    mine: str  # experiment ids
    theirs: str
    my_run: str
    their_run: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    gateway = start_gateway(
        tmp_path_factory.mktemp("bodies"), MLFLOW_GUARD_AUTHZ_MAX_IDS_PER_REQUEST=str(LIMIT)
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_TOKEN", gateway.token)
        admin = MlflowClient(tracking_uri=gateway.url)
        mine, theirs = admin.create_experiment("team-a/x"), admin.create_experiment("team-b/x")
        my_run, their_run = (admin.create_run(e).info.run_id for e in (mine, theirs))
    alice = make_token(gateway, "alice", "viewer", "experiment:team-a/*")
    yield World(gateway, alice, mine, theirs, my_run, their_run)
    gateway.stop()


def send(
    world: World, method: str, path: str, body: bytes | None = None, chunked: bool = False,
    token: str | None = None,
) -> httpx.Response:  # fmt: skip
    headers = {"Authorization": f"Bearer {token or world.alice}"}
    content: bytes | Iterator[bytes] | None = body
    if body is not None:
        headers["Content-Type"] = "application/json"
        content = iter([body]) if chunked else body
    return httpx.request(method, world.gateway.url + path, headers=headers, content=content,
                         timeout=30)  # fmt: skip


def reason(response: httpx.Response) -> tuple[int, str | None]:
    return response.status_code, response.headers.get("x-guard-reason")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_head_naming_another_run_in_its_body_is_refused(
    world: World, prefix: str, chunked: bool
) -> None:
    """The review's example: MLflow answers a HEAD from its body (200 and that run's size)."""
    body = json.dumps({"run_id": world.their_run}).encode()
    path = f"{prefix}/2.0/mlflow/runs/get?run_id={world.my_run}"
    assert reason(send(world, "HEAD", path, body, chunked)) == (400, "body_not_allowed")
    assert reason(send(world, "GET", path, body, chunked)) == (400, "body_not_allowed")
    # The admin too: the request cannot be read one way, whoever sends it.
    token = world.gateway.token
    assert reason(send(world, "HEAD", path, body, chunked, token)) == (400, "body_not_allowed")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_get_with_only_a_body_is_authorized_on_the_body(
    world: World, prefix: str, chunked: bool
) -> None:
    path = f"{prefix}/2.0/mlflow/runs/get"
    mine = send(world, "GET", path, json.dumps({"run_id": world.my_run}).encode(), chunked)
    assert mine.status_code == 200, mine.text
    assert mine.json()["run"]["info"]["run_id"] == world.my_run  # MLflow read the body too
    theirs = send(world, "GET", path, json.dumps({"runId": world.their_run}).encode(), chunked)
    assert reason(theirs) == (403, "permission_denied")
    # A row whose handler reads only its query string takes no body at all.
    get_artifact = send(
        world, "GET", "/get-artifact", json.dumps({"run_id": world.my_run}).encode()
    )
    assert reason(get_artifact) == (400, "body_not_allowed")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_head_is_answered_as_its_get(world: World, prefix: str) -> None:
    path = f"{prefix}/2.0/mlflow/runs/get?run_id={world.my_run}"
    get, head = send(world, "GET", path), send(world, "HEAD", path)
    assert (get.status_code, head.status_code) == (200, 200)
    assert head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"]
    assert head.headers["content-type"] == get.headers["content-type"]
    their = f"{prefix}/2.0/mlflow/runs/get?run_id={world.their_run}"
    assert reason(send(world, "HEAD", their)) == (403, "permission_denied")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_get_to_graphql_with_a_body_is_a_400(world: World, chunked: bool) -> None:
    selection = "{ run { info { runId } } }"
    document = f'{{ mlflowGetRun(input: {{runId: "{world.their_run}"}}) {selection} }}'
    body = json.dumps({"query": document}).encode()
    assert reason(send(world, "GET", "/graphql", body, chunked)) == (400, "body_not_allowed")
    assert reason(send(world, "POST", "/graphql", body, chunked)) == (403, "permission_denied")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_too_many_ids_never_reach_a_lookup(world: World, prefix: str) -> None:
    search = f"{prefix}/2.0/mlflow/runs/search"
    many = json.dumps({"experiment_ids": [str(i) for i in range(10_000)]}).encode()
    assert reason(send(world, "POST", search, many)) == (400, "too_many_ids")
    camel = json.dumps({"experimentIds": [world.mine] * (LIMIT + 1)}).encode()
    assert reason(send(world, "POST", search, camel, chunked=True)) == (400, "too_many_ids")
    query = "&".join(f"run_ids={world.my_run}" for _ in range(LIMIT + 1))
    bulk = f"{prefix}/2.0/mlflow/metrics/get-history-bulk-interval?metric_key=m&{query}"
    assert reason(send(world, "GET", bulk)) == (400, "too_many_ids")
    within = json.dumps({"experiment_ids": [world.mine] * LIMIT}).encode()
    answered = send(world, "POST", search, within)
    assert answered.status_code == 200, answered.text
    assert [r["info"]["run_id"] for r in answered.json()["runs"]] == [world.my_run]
