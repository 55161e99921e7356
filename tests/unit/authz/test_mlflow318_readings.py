"""Readings that differ between MLflow 3.17.2 and 3.18.0, or that a 3.18 review showed MLflow
reads otherwise than the table did: each judged on the id MLflow acts on, per release.

* ``PATCH /logged-models/<model_id>`` (finalize): 3.17.2 finalizes the body's required
  ``model_id`` and ignores the path's; 3.18.0 finalizes the path's and ignores the body's.
  Two rows (``until``/``since`` 3.18.0), so a caller may never finalize a model of another
  experiment by naming their own in the ignored place.
* ``issues/search`` and ``scorers/list``: MLflow reads an empty ``experiment_id`` as "no filter"
  and answers for every experiment, so an empty one names nothing here (anywhere else an empty
  experiment id is the default experiment, 0, as ``runs/create`` reads it).

A fake MLflow reports the release and answers the gateway's lookups; the caller may read and
update exp-1 and the Default experiment (0) only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.authz.routes import load_routes, routes_for
from tests.servers import ServerThread, read_request_body, send_response
from tests.unit.authz.test_route_authorization import parse, start_gateway

CALLER = "mlg_" + "f" * 43
PREFIXES = ["/api", "/ajax-api"]
RELEASES = ["3.17.2", "3.18.0"]
EXPERIMENTS = {"0": "Default", "1": "exp-1", "2": "exp-2"}
LOGGED_MODELS = {"m-1": "1", "m-2": "2"}


class FakeMlflow:
    """Experiments 0, 1 and 2, logged models m-1 (in 1) and m-2 (in 2); records every request
    the gateway forwards for a caller as (method, path, query, body)."""

    def __init__(self, release: str) -> None:
        self.release = release
        self.forwarded: list[tuple[str, str, str, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_request_body(receive)
        path, raw = scope["path"], scope["query_string"].decode()
        first = {k: v[0] for k, v in parse_qs(raw).items()}
        if path == "/version":
            await send_response(send, 200, self.release.encode())
            return
        if any(k == b"x-forwarded-for" for k, _ in scope["headers"]):
            self.forwarded.append((scope["method"], path, raw, body))
            await send_response(send, 200, b"{}")
            return
        status, payload = 404, {"error_code": "RESOURCE_DOES_NOT_EXIST"}
        if path == "/api/2.0/mlflow/experiments/get" and first.get("experiment_id") in EXPERIMENTS:
            status, payload = 200, {"experiment": {"name": EXPERIMENTS[first["experiment_id"]]}}
        elif path.startswith("/api/2.0/mlflow/logged-models/"):
            model_id = path.rsplit("/", 1)[1]
            if model_id in LOGGED_MODELS:
                info = {"model_id": model_id, "experiment_id": LOGGED_MODELS[model_id]}
                status, payload = 200, {"model": {"info": info}}
        await send_response(send, status, json.dumps(payload).encode())


def add_caller(gateway: Any) -> None:
    from guard.admin.governance import Governance

    g = Governance(gateway.tokens, gateway.policies.store)
    g.tokens.create("finalizer", "admin", 3600, CALLER)
    rules = ["g2, rw318, read", "g2, rw318, update"]
    rules += [f"p, token:finalizer, rw318, experiment:{name}" for name in ("exp-1", "Default")]
    g.change("test", add=[parse(rule) for rule in rules])


@pytest.fixture(scope="module", params=RELEASES)
def upstream(request: pytest.FixtureRequest) -> FakeMlflow:
    return FakeMlflow(request.param)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: FakeMlflow) -> Iterator[str]:
    with ServerThread(upstream, lifespan="off") as server:
        data = tmp_path_factory.mktemp(f"readings-{upstream.release}")
        yield from start_gateway(data, server.url, add_caller)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def call(client: httpx.Client, gateway: str, method: str, path: str, **kwargs: Any) -> str | None:
    headers = {"Authorization": f"Bearer {CALLER}"}
    response = client.request(method, gateway + path, headers=headers, **kwargs)
    assert response.status_code in (200, 400, 403), response.text
    reason: str | None = response.headers.get("x-guard-reason")
    return reason


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("release", "id_from"), [("3.17.2", "body:model_id"), ("3.18.0", "path:model_id")]
)
def test_finalize_rows_read_the_model_id_mlflow_finalizes(
    prefix: str, release: str, id_from: str
) -> None:
    path = prefix + "/2.0/mlflow/logged-models/<model_id>"
    rows = [r for r in routes_for(load_routes(), release) if (r.method, r.path) == ("PATCH", path)]
    assert [(r.id_from, r.action, r.kind) for r in rows] == [(id_from, "update", "logged_model")]


# (path model, body model) -> allowed? MLflow 3.17.2 finalizes the body's, 3.18.0 the path's.
FINALIZE = [
    ("m-1", "m-1", {"3.17.2": True, "3.18.0": True}),
    ("m-1", "m-2", {"3.17.2": False, "3.18.0": True}),
    ("m-2", "m-1", {"3.17.2": True, "3.18.0": False}),
    ("m-2", "m-2", {"3.17.2": False, "3.18.0": False}),
]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(("in_path", "in_body", "allowed"), FINALIZE)
def test_finalize_is_judged_on_the_model_mlflow_finalizes(
    client: httpx.Client, gateway: str, upstream: FakeMlflow,
    prefix: str, in_path: str, in_body: str, allowed: dict[str, bool],
) -> None:  # fmt: skip
    before = len(upstream.forwarded)
    for body in ({"model_id": in_body, "status": "READY"}, {"modelId": in_body, "status": 2}):
        got = call(client, gateway, "PATCH", f"{prefix}/2.0/mlflow/logged-models/{in_path}",
                   json=body)  # fmt: skip
        assert got == (None if allowed[upstream.release] else "permission_denied"), body
    assert len(upstream.forwarded) == before + 2 * allowed[upstream.release]


def test_finalize_in_317_needs_the_body_model_id(
    client: httpx.Client, gateway: str, upstream: FakeMlflow
) -> None:
    """MLflow 3.17.2 requires it (400 without); the gateway names nothing without it there."""
    got = call(client, gateway, "PATCH", "/api/2.0/mlflow/logged-models/m-1",
               json={"status": "READY"})  # fmt: skip
    assert got == ("invalid_request_body" if upstream.release == "3.17.2" else None)


# (method, path, request kwargs, reason): an empty experiment_id searches every experiment in
# MLflow, so it names none here; "0" is the Default experiment, which the caller may read.
ISSUES, SCORERS = "/3.0/mlflow/issues/search", "/3.0/mlflow/scorers/list"
EMPTY_MEANS_EVERY = [
    ("POST", ISSUES, {"json": {"experiment_id": ""}}, "invalid_request_body"),
    ("POST", ISSUES, {"json": {"experimentId": ""}}, "invalid_request_body"),
    ("POST", ISSUES, {"json": {"experiment_id": None}}, "invalid_request_body"),
    ("POST", ISSUES, {"json": {"experiment_id": "0"}}, None),
    ("POST", ISSUES, {"json": {"experiment_id": "1"}}, None),
    ("POST", ISSUES, {"json": {"experiment_id": "2"}}, "permission_denied"),
    ("GET", SCORERS + "?experiment_id=", {}, "invalid_request_body"),
    ("GET", SCORERS + "?experiment_id=&experiment_ids=2", {}, "invalid_request_body"),
    ("GET", SCORERS + "?experiment_ids=2&experiment_id=", {}, "invalid_request_body"),
    ("GET", SCORERS, {"json": {"experiment_id": ""}}, "invalid_request_body"),
    ("GET", SCORERS + "?experiment_id=0", {}, None),
    ("GET", SCORERS + "?experiment_id=2", {}, "permission_denied"),
]  # fmt: skip


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(("method", "path", "kwargs", "want"), EMPTY_MEANS_EVERY)
def test_an_empty_experiment_id_that_mlflow_reads_as_every_experiment_names_none(
    client: httpx.Client, gateway: str, upstream: FakeMlflow,
    prefix: str, method: str, path: str, kwargs: dict[str, Any], want: str | None,
) -> None:  # fmt: skip
    before = len(upstream.forwarded)
    assert call(client, gateway, method, prefix + path, **kwargs) == want
    assert len(upstream.forwarded) == before + (want is None)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_an_empty_experiment_id_elsewhere_is_still_the_default_experiment(
    client: httpx.Client, gateway: str, prefix: str
) -> None:
    """Other handlers read an empty experiment id as experiment 0 (get, create a run in the
    default experiment): those readings are unchanged."""
    got = call(client, gateway, "GET", prefix + "/2.0/mlflow/experiments/get?experiment_id=")
    assert got is None
