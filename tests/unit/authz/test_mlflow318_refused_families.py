"""The AI gateway and the assistant stay closed to non-administrators on every verified release.

Their routes (AI-gateway configuration under ``/{api,ajax-api}/3.0/mlflow/gateway/…``, its
invocation under ``/gateway/…`` and the legacy ``gateway-proxy``, the assistant under
``/ajax-api/3.0/mlflow/assistant/…``) hold provider secrets, spend money and run tools with the
server's credentials. Each row of those families in each release's table is either refused
outright or needs ``manage`` on the server; through the gateway in front of a fake MLflow 3.18
none reaches MLflow, for a caller holding every role on experiments, models and skills, nor by a
spelling the table does not list.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.authz.routes import VERIFIED_MLFLOW_VERSIONS, Route, load_routes, routes_for
from tests.servers import ServerThread, read_request_body, send_response
from tests.unit.authz.test_route_authorization import ALLOWED, fill_path, parse, start_gateway

FAMILY = re.compile(r"^(/gateway/|/(api|ajax-api)/3\.0/mlflow/(gateway|assistant)/|"
                    r"/ajax-api/2\.0/mlflow/gateway-proxy$)")  # fmt: skip
BROAD = "mlg_" + "g" * 43  # manager on every experiment, model and skill; nothing on the server


def family(release: str) -> list[Route]:
    return [r for r in routes_for(load_routes(), release) if FAMILY.search(r.path)]


ROWS_318 = family("3.18.0")


@pytest.mark.parametrize("release", sorted(VERIFIED_MLFLOW_VERSIONS))
def test_every_row_of_the_families_is_refused_or_for_server_managers(release: str) -> None:
    rows = family(release)
    assert rows, release
    for row in rows:
        assert row.kind in ("gateway", "assistant", "server"), (row.method, row.path)
        assert not row.open, (row.method, row.path)
        assert row.refuse or (row.kind == "server" and row.action == "manage"), row.path


def test_the_families_are_all_there_in_318() -> None:
    """Every AI-gateway and assistant route MLflow 3.18 serves (its checked-in list) is one of
    the rows above: none is classified under another kind where it could be opened."""
    from tests.verify_mlflow import checked_in

    served = {pair for pair in checked_in()["3.18.0"] if FAMILY.search(pair[1])}
    assert served == {(r.method, r.path) for r in ROWS_318}
    assistant = [r for r in ROWS_318 if r.kind == "assistant"]
    assert len(assistant) == 11
    assert all(r.path.startswith("/ajax-api/3.0/mlflow/assistant/") for r in assistant)


class FakeMlflow318:
    """Reports 3.18.0; records every request forwarded for a caller."""

    def __init__(self) -> None:
        self.forwarded: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_request_body(receive)
        if scope["path"] == "/version":
            await send_response(send, 200, b"3.18.0")
            return
        if any(k == b"x-forwarded-for" for k, _ in scope["headers"]):
            self.forwarded.append((scope["method"], scope["path"]))
        await send_response(send, 200, json.dumps({}).encode())


@pytest.fixture(scope="module")
def upstream() -> FakeMlflow318:
    return FakeMlflow318()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: FakeMlflow318) -> Iterator[str]:
    def setup(gw: object) -> None:
        from guard.admin.governance import Governance

        g = Governance(gw.tokens, gw.policies.store)  # type: ignore[attr-defined]
        g.tokens.create("broad", "admin", 3600, BROAD)
        g.change("test", add=[parse(f"p, token:broad, manager, {kind}:*")
                              for kind in ("experiment", "model", "skill")])  # fmt: skip

    with ServerThread(upstream, lifespan="off") as server:
        yield from start_gateway(tmp_path_factory.mktemp("families"), server.url, setup)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


@pytest.mark.parametrize("row", ROWS_318, ids=[f"{r.method} {r.path}" for r in ROWS_318])
def test_no_row_of_the_families_reaches_mlflow(
    client: httpx.Client, gateway: str, upstream: FakeMlflow318, row: Route
) -> None:
    path = fill_path(row)
    body = None if row.method == "GET" else {"name": "x", "experiment_id": "1"}
    before = len(upstream.forwarded)
    for token in (BROAD, ALLOWED):  # ALLOWED also manages the server
        headers = {"Authorization": f"Bearer {token}"}
        response = client.request(row.method, gateway + path, json=body, headers=headers)
        assert response.status_code == 403, (token[:6], row.path, response.text)
        assert response.headers["x-guard-reason"] == "route_not_classified"
    assert upstream.forwarded[before:] == []


# Spellings the table does not list: matched by no row, or not canonical; never forwarded.
UNLISTED = [
    ("POST", "/gateway/openai/v1/chat/completions/"),
    ("POST", "/Gateway/openai/v1/chat/completions"),
    ("POST", "/gateway/openai/v2/chat/completions"),
    ("POST", "/gateway/openai/v1/%63hat/completions"),
    ("GET", "/api/3.0/mlflow/gateway/secrets/list/"),
    ("GET", "/api/3.0/mlflow/Gateway/secrets/list"),
    ("GET", "/ajax-api/3.0/mlflow/gateway/secrets/../secrets/list"),
    ("GET", "/api/3.0/mlflow/assistant/config"),  # the assistant is served under /ajax-api only
    ("POST", "/ajax-api/3.0/mlflow/assistant/message/"),
    ("POST", "/ajax-api/3.0/mlflow/assistant//message"),
    ("POST", "/ajax-api/3.0/mlflow/Assistant/message"),
    ("GET", "/ajax-api/2.0/mlflow/gateway-proxy/"),
    ("PUT", "/ajax-api/2.0/mlflow/gateway-proxy"),
]


@pytest.mark.parametrize(("method", "path"), UNLISTED)
def test_unlisted_spellings_of_the_families_are_refused(
    client: httpx.Client, gateway: str, upstream: FakeMlflow318, method: str, path: str
) -> None:
    before = len(upstream.forwarded)
    for token in (BROAD, ALLOWED):
        response = client.request(method, gateway + path,
                                  headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        assert response.status_code in (400, 403), (path, response.text)
        assert response.headers["x-guard-reason"] in ("route_not_classified", "path_not_canonical")
    assert upstream.forwarded[before:] == []
