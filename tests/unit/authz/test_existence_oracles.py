""" "Exists but forbidden" and "does not exist" look the same from outside, on every row.

Generated from the route table: every row whose id is looked up is sent twice by a caller with
no rights on what it names, once naming things that exist (experiment 1, run r1, model-a...)
and once naming ids nobody has. Both answers must agree in status, reason, headers and message
(once the ids the caller sent are swapped back), name nothing the caller did not send, and stop
costing lookups once cached, so neither the answer nor its latency tells which ids exist. A new
row is covered without anyone remembering to.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from guard.authz.routes import Route
from tests.servers import ServerThread
from tests.unit.authz.test_route_authorization import (
    REFUSED,
    ROUTES,
    VALUES,
    FakeMlflow,
    build_request,
    expected,
    start_gateway,
)

UNKNOWN = "987654"
# The same request naming nothing that exists: every id's "1" becomes 987654.
UNKNOWN_VALUES = {k: v.replace("1", UNKNOWN) for k, v in VALUES.items()}
UNKNOWN_MODEL = "zmodel-a"  # the fake knows every model-*
# Rows judged on a fresh lookup every time (equally for known and unknown ids): a rename or
# delete forgets stored names first; a dataset's experiment links change by design.
UNCACHED = ("/rename", "/registered-models/delete")
# Headers whose values may differ between two answers without telling anything.
VARYING = {"x-request-id", "content-length", "date"}


def looked_up(route: Route) -> bool:
    """Rows whose refusal depends on what MLflow knows about an id in the request."""
    if expected(route) != (None, "permission_denied"):
        return False
    kinds_without_ids = ("server", "webhook", "gateway", "job", "assistant", "workspace",
                         "user_admin")  # fmt: skip
    return route.kind not in kinds_without_ids and route.id_from != "none"


ROWS = [r for r in ROUTES if looked_up(r)]


class CountingMlflow(FakeMlflow):
    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            self.lookups += 1
        await super().__call__(scope, receive, send)


@pytest.fixture(scope="module")
def fake() -> CountingMlflow:
    return CountingMlflow()


MAKER = "mlg_" + "c" * 43
GATEWAYS: list[Any] = []  # the module's gateway, for its audit records


def add_maker(gateway: Any) -> None:
    """token:maker may create anything but read nothing: the caller a taken name would tell
    that it exists. It edits exp-2 and model-b* (to rename them), and may not use blocked-*."""
    from guard.admin.governance import Governance
    from guard.authz.policy import RoleRule, parse_lines

    GATEWAYS.append(gateway)
    g = Governance(gateway.tokens, gateway.policies.store)
    g.tokens.create("maker", "admin", 3600, MAKER)
    g.change("test", add=[RoleRule("creator", "create"), *parse_lines([
        "p, token:maker, creator, experiment:*", "p, token:maker, creator, model:*",
        "p, token:maker, editor, experiment:exp-2", "p, token:maker, editor, model:model-b*",
        "p, token:maker, creator, experiment:blocked-*, deny",
        "p, token:maker, creator, model:blocked-*, deny",
    ])])  # fmt: skip


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fake: CountingMlflow) -> Iterator[str]:
    with ServerThread(fake, lifespan="off") as upstream:
        yield from start_gateway(tmp_path_factory.mktemp("oracles"), upstream.url, add_maker)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def send(
    client: httpx.Client, url: str, request: tuple[str, str, dict[str, Any]]
) -> httpx.Response:
    method, path, kwargs = request
    kwargs = dict(kwargs)
    headers = {"Authorization": f"Bearer {REFUSED}", **kwargs.pop("headers", {})}
    return client.request(method, url + path, headers=headers, **kwargs)


def shape(response: httpx.Response, swap: dict[str, str]) -> tuple[Any, ...]:
    body = response.json()
    message = body["message"]
    for sent, known in swap.items():
        message = message.replace(sent, known)
    headers = sorted((k, v) for k, v in response.headers.items() if k not in VARYING)
    return response.status_code, body["error_code"], body["reason"], message, headers


@pytest.mark.parametrize("route", ROWS, ids=[f"{r.method} {r.path}" for r in ROWS])
def test_unknown_and_forbidden_look_the_same(
    gateway: str, client: httpx.Client, fake: CountingMlflow, route: Route
) -> None:
    known = build_request(route)
    unknown = build_request(route, UNKNOWN_VALUES, UNKNOWN_MODEL, UNKNOWN)
    assert json.dumps(known) != json.dumps(unknown), "the row names no id to vary"
    forbidden, missing = send(client, gateway, known), send(client, gateway, unknown)
    assert forbidden.status_code == 403, forbidden.text
    assert forbidden.headers["x-guard-reason"] == "permission_denied"
    assert shape(missing, {UNKNOWN: "1", UNKNOWN_MODEL: "model-a"}) == shape(forbidden, {}), (
        forbidden.text,
        missing.text,
    )
    # Nothing the caller did not send: no policy resource, so no stored name.
    assert "experiment:" not in forbidden.text and "model:" not in forbidden.text
    # Asked again, both cost the same lookups (none, but for the rows that forget names before
    # judging a rename or delete): latency does not tell them apart either.
    costs = []
    for request in (known, unknown):
        before = fake.lookups
        send(client, gateway, request)
        costs.append(fake.lookups - before)
    assert costs[0] == costs[1], costs
    assert costs[0] == 0 or route.path.endswith(UNCACHED) or route.kind == "dataset", costs


def test_every_kind_of_lookup_is_covered() -> None:
    """The generated rows reach every way of naming something (a guard against a filter that
    quietly drops rows)."""
    sources = {r.id_from.partition(":")[0] for r in ROWS}
    assert {"query", "body", "path", "artifact_path", "graphql", "header"} <= sources
    fields = {r.id_from.partition(":")[2].split("+")[0].removesuffix("[]") for r in ROWS}
    for field in ("experiment_id", "run_id|run_uuid", "model_id", "trace_id", "name",
                  "dataset_id", "issue_id", "schema_id", "queue_id"):  # fmt: skip
        assert field in fields, field


# A create (or a rename) onto a name that is taken answers like a free name the caller may not
# use, unless the caller may read what holds it; a free name they may use is created.
TAKEN = [
    ("POST", "/api/2.0/mlflow/experiments/create", "name", "exp-1", {}),
    ("POST", "/ajax-api/2.0/mlflow/experiments/create", "name", "exp-1", {}),
    ("POST", "/api/2.0/mlflow/registered-models/create", "name", "model-a1", {}),
    ("POST", "/ajax-api/2.0/mlflow/registered-models/create", "name", "MODEL-A1", {}),
    ("POST", "/api/2.0/mlflow/experiments/update", "new_name", "exp-1", {"experiment_id": "2"}),
    ("POST", "/ajax-api/2.0/mlflow/experiments/update", "new_name", "exp-1",
     {"experiment_id": "2"}),
    ("POST", "/api/2.0/mlflow/registered-models/rename", "new_name", "model-a1",
     {"name": "model-b1"}),
    ("POST", "/ajax-api/2.0/mlflow/registered-models/rename", "new_name", "Model-A1",
     {"name": "model-b1"}),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "field", "taken", "rest"), TAKEN)
def test_a_taken_name_looks_like_a_name_the_caller_may_not_use(
    gateway: str,
    client: httpx.Client,
    method: str,
    path: str,
    field: str,
    taken: str,
    rest: dict[str, str],
) -> None:
    headers = {"Authorization": f"Bearer {MAKER}"}

    def create(name: str) -> httpx.Response:
        return client.request(method, gateway + path, json={**rest, field: name}, headers=headers)

    on_taken, on_blocked = create(taken), create("blocked-x")
    assert on_taken.status_code == on_blocked.status_code == 403, on_taken.text
    assert shape(on_taken, {taken: "blocked-x"}) == shape(on_blocked, {})
    assert f"may not create {field} 'blocked-x'" in on_blocked.json()["message"]
    assert taken.lower() not in on_taken.text.replace(repr(taken), "")  # no stored spelling
    free = create("fresh-name")
    assert free.status_code == 200, free.text


def test_an_explicit_deny_is_not_announced(gateway: str, client: httpx.Client) -> None:
    headers = {"Authorization": f"Bearer {MAKER}"}
    response = client.post(gateway + "/api/2.0/mlflow/experiments/create",
                           json={"name": "blocked-1"}, headers=headers)  # fmt: skip
    assert response.headers["x-guard-reason"] == "permission_denied"
    assert "deny" not in response.text.lower()


def test_reading_an_alias_is_a_read(gateway: str, client: httpx.Client) -> None:
    """Resolving ``models:/name@champion`` needs read, not promote; setting one needs promote."""
    from tests.unit.authz.test_route_authorization import ALLOWED

    reader = {"Authorization": f"Bearer {MAKER}"}  # editor on model-b*: reads, no promote
    for prefix in ("/api", "/ajax-api"):
        url = gateway + prefix + "/2.0/mlflow/registered-models/alias"
        got = client.get(url, params={"name": "model-b1", "alias": "champion"}, headers=reader)
        assert got.status_code == 200, got.text
        body = {"name": "model-b1", "alias": "champion", "version": "1"}
        assert client.post(url, json=body, headers=reader).status_code == 403
        allowed = {"Authorization": f"Bearer {ALLOWED}"}
        assert client.get(url, params={"name": "model-b1", "alias": "x"},
                          headers=allowed).status_code == 403  # fmt: skip


def test_the_audit_record_keeps_the_true_reason(gateway: str, client: httpx.Client) -> None:
    from tests.unit.audit.test_trail import wait_stored

    ids = {}
    for name, experiment in (("forbidden", "1"), ("unknown", UNKNOWN)):
        response = client.get(gateway + "/api/2.0/mlflow/experiments/get",
                              params={"experiment_id": experiment},
                              headers={"Authorization": f"Bearer {REFUSED}"})  # fmt: skip
        assert response.headers["x-guard-reason"] == "permission_denied"
        ids[name] = response.headers["x-request-id"]
    (forbidden,) = wait_stored(GATEWAYS[0], ids["forbidden"])
    (unknown,) = wait_stored(GATEWAYS[0], ids["unknown"])
    assert forbidden["reason"] == unknown["reason"] == "permission_denied"
    assert forbidden["true_reason"] == "permission_denied"
    assert forbidden["resource"] == "experiment:exp-1"  # the operator sees what it was
    assert unknown["true_reason"] == "resource_unresolved"
    assert UNKNOWN in unknown["true_detail"]


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
def test_scorer_configurations_in_forbidden_experiments_look_like_none(
    gateway: str, client: httpx.Client, prefix: str
) -> None:
    """MLflow answers nothing for a scorer without an online configuration; one configured in an
    experiment the caller may not read is dropped from the answer, so it looks the same."""
    from tests.unit.authz.test_route_authorization import ALLOWED

    url = gateway + prefix + "/3.0/mlflow/scorers/online-configs"

    def configs(token: str, scorer: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return client.get(url, params={"scorer_ids": scorer}, headers=headers)

    own = configs(ALLOWED, "sc-1")
    assert own.status_code == 200 and own.json()["configs"][0]["scorer_id"] == "sc-1"
    forbidden, unknown = configs(REFUSED, "sc-1"), configs(REFUSED, "sc-987654")
    assert forbidden.status_code == unknown.status_code == 200
    assert forbidden.json() == unknown.json() == {"configs": []}
    assert shape_of_answer(forbidden) == shape_of_answer(unknown)


def shape_of_answer(response: httpx.Response) -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in response.headers.items() if k not in VARYING)
