"""Every row of the route table, exercised through the real gateway with two callers.

One caller holds every role on exactly one experiment, one registered model and the server; the
other holds the same on different ones. For each row a request is built from the row itself
(its path parameters, where its id comes from) naming the first caller's resources, and sent by
both. A fake MLflow answers the gateway's lookups (experiment names, run -> experiment, ...).
No row goes untested: each lands in exactly one of the expectations below.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.app import build_gateway
from guard.routes import Route, load_routes
from guard.settings import load_settings
from tests.servers import ServerThread, read_request_body, send_response

ALLOWED = "mlg_" + "a" * 43
REFUSED = "mlg_" + "r" * 43
VALUES = {
    "experiment_id": "1", "experiment_ids": "1", "run_id": "r1", "run_uuid": "r1",
    "run_ids": "r1", "model_id": "m-1", "trace_id": "tr-1", "request_id": "tr-1",
    "trace_ids": "tr-1", "request_ids": "tr-1", "experiment_name": "exp-1",
    "artifact_path": "1/r1/artifacts/x.txt", "path": "1/r1/artifacts",
}  # fmt: skip
RESOLVABLE_FIELDS = set(VALUES) | {"name"}
# What a few routes need beside their id before the gateway can judge them.
EXTRA_FIELDS = {
    "/model-versions/delete": {"version": "1"},
    "/registered-models/rename": {"new_name": "model-a2"},
}


class FakeMlflow:
    """Knows experiment 1 ("exp-1") and 2 ("exp-2"); run r1, logged model m-1 and trace tr-1
    live in experiment 1. Anything else it answers with 200 and an empty object."""

    def __init__(self) -> None:
        self.forwarded: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_request_body(receive)
        path, query = scope["path"], scope["query_string"].decode()
        status, payload = 200, {}
        if path == "/version":
            await send_response(send, 200, b"3.17.2")
            return
        if path == "/api/2.0/mlflow/experiments/get":
            experiment = re.search(r"experiment_id=(\d+)", query)
            known = experiment and experiment.group(1) in ("1", "2")
            if known and experiment:
                payload = {"experiment": {"name": f"exp-{experiment.group(1)}"}}
            else:
                status = 404
        elif path == "/api/2.0/mlflow/runs/get":
            payload = {"run": {"info": {"experiment_id": "1"}}}
        elif path == "/api/2.0/mlflow/logged-models/m-1":
            payload = {"model": {"info": {"experiment_id": "1"}}}
        elif path == "/api/3.0/mlflow/traces/tr-1/info":
            payload = {"trace": {"trace_info": {"trace_location": {
                "mlflow_experiment": {"experiment_id": "1"}}}}}  # fmt: skip
        else:
            self.forwarded.append((scope["method"], path))
        await send_response(send, status, json.dumps(payload).encode())


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("routes")
    with ServerThread(FakeMlflow(), lifespan="off") as upstream:
        settings = load_settings(
            {"upstream.url": upstream.url, "storage.data_dir": str(data)}, {}, None
        ).settings
        env = {
            "MLFLOW_GUARD_BOOTSTRAP_TOKEN": "mlg_" + "b" * 43,
            "MLFLOW_GUARD_SECRET_KEY": "k" * 40,
        }
        gateway = build_gateway(settings, env)
        with ServerThread(gateway) as server:
            governance_setup(gateway, data)
            deadline = time.monotonic() + 10  # let the running gateway pick the policy up
            while gateway.policies.index.version != gateway.policies.store.version():
                assert time.monotonic() < deadline, "the policy change was not picked up"
                time.sleep(0.05)
            yield server.url


def governance_setup(gateway: object, data: Path) -> None:
    from guard.governance import Governance

    g = Governance(gateway.tokens, gateway.policies.store)  # type: ignore[attr-defined]
    for name, secret, experiment, model in (
        ("allowed", ALLOWED, "exp-1", "model-a*"),
        ("refused", REFUSED, "exp-2", "model-b*"),
    ):
        g.tokens.create(name, "admin", 3600, secret)
        g.change(
            "test",
            add=[
                *(parse(f"p, token:{name}, {role}, experiment:{experiment}")
                  for role in ("manager", "promoter")),
                *(parse(f"p, token:{name}, {role}, model:{model}")
                  for role in ("manager", "promoter")),
                parse(f"p, token:{name}, manager, server:mlflow") if name == "allowed"
                else parse("p, token:refused, viewer, guard:audit"),
            ],
        )  # fmt: skip


def parse(text: str):  # type: ignore[no-untyped-def]
    from guard.authz.policy import parse_lines

    return parse_lines([text])[0]


def fill_path(route: Route) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(2) or match.group(3)
        return VALUES.get(name, "model-a" if name == "name" else "x")

    return re.sub(r"<(?:(path):)?(\w+)>|\{(\w+)(?::path)?\}", value, route.path)


def build_request(route: Route) -> tuple[str, str, dict[str, object]]:
    """(method, url path, httpx kwargs) naming the allowed caller's resources."""
    method = route.method
    source, _, spec = route.id_from.partition(":")
    is_list = spec.endswith("[]")
    fields = spec.removesuffix("[]").split("|")
    field = fields[0]
    kwargs: dict[str, object] = {}
    is_model = route.kind in ("registered_model", "model_version")
    value: object = VALUES.get(field, "model-a" if is_model else "exp-1")
    if is_list:
        value = [value]
    if source == "query":
        kwargs["params"] = {field: value}
    elif source == "body":
        extra = next((v for k, v in EXTRA_FIELDS.items() if route.path.endswith(k)), {})
        kwargs["json"] = {field: value, **extra}
    elif source == "header":
        kwargs["headers"] = {field: str(value)}
    return method, fill_path(route), kwargs


def resolvable(route: Route) -> bool:
    source, _, spec = route.id_from.partition(":")
    if route.kind == "server" or route.kind in ("webhook", "gateway", "job", "assistant",
                                                "workspace", "user_admin"):  # fmt: skip
        return True
    if source == "artifact_path":
        return True
    if source not in ("query", "body", "path", "header") or "+" in spec or "." in spec:
        return False
    field = spec.removesuffix("[]").split("|")[0]
    if field == "name":
        return route.kind in ("registered_model", "model_version", "experiment")
    return field in RESOLVABLE_FIELDS


ROUTES = [r for r in load_routes()]


def expected(route: Route) -> tuple[str | None, str | None]:
    """The x-guard-reason for (allowed caller, refused caller); None means forwarded."""
    if route.refuse:
        return "route_not_classified", "route_not_classified"
    if route.open and route.kind == "server":
        return None, None
    if route.open:  # searches: answered, filtered to what each caller may read
        return None, None
    if not resolvable(route):
        return "resource_unresolved", "resource_unresolved"
    return None, "permission_denied"


@pytest.mark.parametrize("route", ROUTES, ids=[f"{r.method} {r.path}" for r in ROUTES])
def test_route(gateway: str, client: httpx.Client, route: Route) -> None:
    method, path, kwargs = build_request(route)
    want_allowed, want_refused = expected(route)
    extra: dict[str, str] = kwargs.pop("headers", {})  # type: ignore[assignment]
    for token, want in ((ALLOWED, want_allowed), (REFUSED, want_refused)):
        headers = {"Authorization": f"Bearer {token}", **extra}
        response = client.request(method, gateway + path, headers=headers, **kwargs)  # type: ignore[arg-type]
        got = response.headers.get("x-guard-reason")
        assert got == want, (token[:6], method, path, kwargs, response.status_code, response.text)
        if want is not None:
            assert response.status_code in (400, 403), response.status_code
