"""Every route that can promote, under /api and /ajax-api, through the real gateway.

An editor (``manager`` on ``model:m*``) may do everything to its models except promote; a
promoter holds ``promoter`` as well. Each promoting request is refused to the first, naming
``promote``, and forwarded for the second. The last test checks the table: a promoting route
missing here fails it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.admin.governance import Governance
from guard.app import build_gateway
from guard.authz.policy import parse_lines
from guard.authz.routes import load_routes
from guard.config import load_settings
from tests.servers import ServerThread, read_request_body, send_response

EDITOR = "mlg_" + "e" * 43
PROMOTER = "mlg_" + "p" * 43
VALIDATION = {"key": "validation_status", "value": "passed"}
# (method, path after /2.0/mlflow/, body): each needs promote on model "m".
CASES = [
    ("POST", "model-versions/transition-stage",
     {"name": "m", "version": "2", "stage": "Production", "archive_existing_versions": True}),
    ("POST", "registered-models/alias", {"name": "m", "alias": "champion", "version": "2"}),
    ("DELETE", "registered-models/alias", {"name": "m", "alias": "champion"}),
    ("POST", "model-versions/set-tag", {"name": "m", "version": "2", **VALIDATION}),
    ("DELETE", "model-versions/delete-tag",
     {"name": "m", "version": "2", "key": "validation_status"}),
    ("POST", "registered-models/set-tag", {"name": "m", **VALIDATION}),
    ("DELETE", "registered-models/delete-tag", {"name": "m", "key": "validation_status"}),
    ("POST", "model-versions/create", {"name": "m", "source": "models:/m/1", "tags": [VALIDATION]}),
    ("POST", "registered-models/create", {"name": "m-new", "tags": [VALIDATION]}),
    ("DELETE", "model-versions/delete", {"name": "m", "version": "1"}),  # holds an alias
]  # fmt: skip
# The same routes doing something that is not a promotion: update (or create/delete) suffices.
ORDINARY = [
    ("POST", "model-versions/set-tag", {"name": "m", "version": "2", "key": "owner", "value": "x"}),
    ("POST", "registered-models/set-tag", {"name": "m", "key": "team", "value": "risk"}),
    ("POST", "model-versions/create", {"name": "m", "source": "models:/m/1"}),
    ("DELETE", "model-versions/delete", {"name": "m", "version": "2"}),  # no alias
]  # fmt: skip


class FakeMlflow:
    """Version 1 of model "m" holds the alias "champion"; version 2 holds none."""

    def __init__(self) -> None:
        self.forwarded: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_request_body(receive)
        path, query = scope["path"], scope["query_string"].decode()
        if path == "/version":
            await send_response(send, 200, b"3.17.2")
            return
        payload: dict[str, object] = {}
        if path == "/api/2.0/mlflow/model-versions/get":
            aliases = ["champion"] if "version=1" in query else []
            payload = {"model_version": {"name": "m", "aliases": aliases}}
        elif path == "/api/2.0/mlflow/registered-models/get":
            payload = {"registered_model": {"name": "m"}} if "name=m&" in query + "&" else {}
        else:
            self.forwarded.append((scope["method"], path))
        status = 404 if path.endswith("/get") and not payload else 200
        await send_response(send, status, json.dumps(payload).encode())


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeMlflow]]:
    data = tmp_path_factory.mktemp("promotion")
    fake = FakeMlflow()
    with ServerThread(fake, lifespan="off") as upstream:
        settings = load_settings(
            {"upstream.url": upstream.url, "storage.data_dir": str(data)}, {}, None
        ).settings
        env = {
            "MLFLOW_GUARD_BOOTSTRAP_TOKEN": "mlg_" + "b" * 43,
            "MLFLOW_GUARD_SECRET_KEY": "k" * 40,
        }
        gateway = build_gateway(settings, env)
        with ServerThread(gateway) as server:
            g = Governance(gateway.tokens, gateway.policies.store)
            g.tokens.create("editor", "viewer", 3600, EDITOR)
            g.tokens.create("promoter", "viewer", 3600, PROMOTER)
            g.change("test", add=parse_lines([
                "p, token:editor, manager, model:m*",
                "p, token:promoter, manager, model:m*",
                "p, token:promoter, promoter, model:m*",
            ]))  # fmt: skip
            deadline = time.monotonic() + 10
            while gateway.policies.index.version != gateway.policies.store.version():
                assert time.monotonic() < deadline, "the policy change was not picked up"
                time.sleep(0.05)
            yield server.url, fake


def send(url: str, token: str, method: str, path: str, body: object) -> httpx.Response:
    return httpx.request(
        method, url + path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


@pytest.mark.parametrize("prefix", ["/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/"])
@pytest.mark.parametrize(("method", "route", "body"), CASES, ids=[f"{m} {r}" for m, r, _ in CASES])
def test_promoting_needs_promote(
    running: tuple[str, FakeMlflow], prefix: str, method: str, route: str, body: object
) -> None:
    url, fake = running
    refused = send(url, EDITOR, method, prefix + route, body)
    assert refused.status_code == 403, refused.text
    assert refused.headers["x-guard-reason"] == "permission_denied"
    assert "token:editor may not promote name 'm" in refused.json()["message"]
    assert (method, prefix + route) not in fake.forwarded
    allowed = send(url, PROMOTER, method, prefix + route, body)
    assert allowed.status_code == 200, allowed.text
    assert fake.forwarded[-1] == (method, prefix + route)


@pytest.mark.parametrize("prefix", ["/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/"])
@pytest.mark.parametrize(
    ("method", "route", "body"), ORDINARY, ids=[f"{m} {r}" for m, r, _ in ORDINARY]
)
def test_ordinary_registry_writes_do_not(
    running: tuple[str, FakeMlflow], prefix: str, method: str, route: str, body: object
) -> None:
    url, fake = running
    response = send(url, EDITOR, method, prefix + route, body)
    assert response.status_code == 200, response.text
    assert fake.forwarded[-1] == (method, prefix + route)


def test_every_promoting_route_is_covered() -> None:
    """Rows whose action is promote, and rows that write aliases or tags of the registry."""
    covered = {
        (m, p + r) for m, r, _ in CASES for p in ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/")
    }
    promoting = {
        (route.method, route.path)
        for route in load_routes()
        if route.kind in ("registered_model", "model_version") and not route.refuse
        and (route.action == "promote" or (route.method != "GET" and route.path.endswith(
            ("/alias", "-tag", "/model-versions/create", "/registered-models/create",
             "/model-versions/delete"))))
    }  # fmt: skip
    assert promoting - covered == set()
