"""MLflow 3.18 closed bypasses in its own basic-auth; the same ideas tried on the gateway.

- Experiment ids in another spelling (``01``, ``+1``, `` 1``, ``0_1``, Unicode digits): 3.17.2's
  basic-auth compared the raw string, so a deny on ``1`` let ``01`` through. The gateway reads an
  id as MLflow's SQL store does (``int()``), or refuses it, and asks MLflow about run ids in the
  caller's own spelling.
- Registry names compared in their stored spelling: on a database that ignores case, trailing
  spaces or Unicode width (MySQL collations), ``model-a`` is the model stored as ``Model-A``. The
  gateway looks every name up in MLflow first and judges the stored name.

A fake MLflow reads ids and names the way those stores do and records what reaches it. Two
callers: ``granted`` holds manager on experiment 1 and the two stored models only; ``denied``
holds manager on everything except a deny on exactly those. Whatever the spelling, prefix, place
(query or body) and method, a request reaches MLflow only if MLflow will act on something the
caller may use, and every spelling MLflow reads as experiment 1 / a stored model is judged as it.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from tests.servers import ServerThread, read_request_body, send_response
from tests.unit.authz.test_route_authorization import parse, start_gateway

GRANTED = "mlg_" + "g" * 43
DENIED = "mlg_" + "d" * 43
EXPERIMENTS = {1: "exp-1", 2: "exp-2"}
STORED_MODELS = ("Model-A", "Mod\u00e8le-B")  # the second precomposed (NFC), as typed
RUNS = {"0123456789abcdef0123456789abcdef": 1, "fedcba9876543210fedcba9876543210": 2}
PREFIXES = ["/api", "/ajax-api"]


def mlflow_experiment(value: Any) -> int | None:
    """The experiment MLflow's SQL store acts on for an id (``int(experiment_id)``), None if it
    cannot read it."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    try:
        return int(value)
    except ValueError:
        return None


def collated(name: str) -> str:
    """How a case-, width- and pad-insensitive collation compares names."""
    return unicodedata.normalize("NFKC", name).casefold().rstrip(" ")


def mlflow_model(name: Any) -> str | None:
    """The stored model MLflow finds for ``name``, None if none."""
    if not isinstance(name, str):
        return None
    return next((s for s in STORED_MODELS if collated(s) == collated(name)), None)


def mlflow_run(run_id: Any) -> str | None:
    """The stored run MLflow finds for ``run_id`` (case-insensitive, trailing spaces ignored)."""
    if not isinstance(run_id, str):
        return None
    key = run_id.rstrip(" ").lower()
    return key if key in RUNS else None


class CollatingMlflow:
    """Answers the gateway's lookups as described above and records each forwarded request as
    (method, path, query, JSON body)."""

    def __init__(self) -> None:
        self.forwarded: list[tuple[str, str, dict[str, list[str]], Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_request_body(receive)
        path = scope["path"]
        query = parse_qs(scope["query_string"].decode(), keep_blank_values=True)
        if path == "/version":
            await send_response(send, 200, b"3.17.2")
            return
        if any(k == b"x-forwarded-for" for k, _ in scope["headers"]):  # a caller's request
            self.forwarded.append((scope["method"], path, query, json.loads(body or b"null")))
            await send_response(send, 200, b"{}")
            return
        status, payload = self.lookup(path, query)
        await send_response(send, status, json.dumps(payload).encode())

    def lookup(self, path: str, query: dict[str, list[str]]) -> tuple[int, object]:
        value = query.get(next(iter(query), ""), [""])[0]
        if path == "/api/2.0/mlflow/experiments/get":
            experiment = mlflow_experiment(value)
            if experiment is None:
                return 400, {"error_code": "INVALID_PARAMETER_VALUE"}
            if experiment in EXPERIMENTS:
                return 200, {"experiment": {"name": EXPERIMENTS[experiment]}}
        elif path == "/api/2.0/mlflow/experiments/get-by-name":
            found = [(i, n) for i, n in EXPERIMENTS.items() if collated(n) == collated(value)]
            if found:
                return 200, {"experiment": {"experiment_id": str(found[0][0]), "name": found[0][1]}}
        elif path == "/api/2.0/mlflow/registered-models/get":
            if (stored := mlflow_model(value)) is not None:
                return 200, {"registered_model": {"name": stored}}
        elif path == "/api/2.0/mlflow/runs/get" and (run := mlflow_run(value)) is not None:
            return 200, {"run": {"info": {"run_id": run, "experiment_id": str(RUNS[run])}}}
        return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST"}


def add_callers(gateway: Any) -> None:
    from guard.admin.governance import Governance

    g = Governance(gateway.tokens, gateway.policies.store)
    g.tokens.create("granted", "admin", 3600, GRANTED)
    g.tokens.create("denied", "admin", 3600, DENIED)
    rules = [
        "p, token:granted, manager, experiment:exp-1",
        "p, token:denied, manager, experiment:*",
        "p, token:denied, manager, experiment:exp-1, deny",
        "p, token:denied, manager, model:*",
    ]
    for stored in STORED_MODELS:
        rules += [f"p, token:granted, manager, model:{stored}",
                  f"p, token:denied, manager, model:{stored}, deny"]  # fmt: skip
    g.change("test", add=[parse(rule) for rule in rules])


@pytest.fixture(scope="module")
def fake() -> CollatingMlflow:
    return CollatingMlflow()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fake: CollatingMlflow) -> Iterator[str]:
    with ServerThread(fake, lifespan="off") as upstream:
        yield from start_gateway(tmp_path_factory.mktemp("bypass318"), upstream.url, add_callers)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def call(
    client: httpx.Client, fake: CollatingMlflow, token: str, method: str, url: str, **kw: Any
) -> tuple[httpx.Response, Any]:
    """Send; the forwarded request (its JSON body, or its query on a GET), or None."""
    before = len(fake.forwarded)
    response = client.request(method, url, headers={"Authorization": f"Bearer {token}"}, **kw)
    if len(fake.forwarded) == before:
        assert response.status_code in (400, 403, 404), (response.status_code, response.text)
        return response, None
    assert response.status_code == 200, response.text
    _, _, query, body = fake.forwarded[-1]
    return response, query if method == "GET" else body


# (a) Experiment ids -----------------------------------------------------------------------------

# Strings MLflow reads as 1, strings it reads as another number, strings it cannot read.
AS_ONE = ["1", "01", "001", "+1", " 1", "1 ", "\t1", "+01", "0_1", "\uff11", "\u0661", "\u0967"]
OTHER = ["2", "02", "+2", "1_0", "11", "0", "-1"]
UNREADABLE = ["1.0", "0x1", "1e0", "one", "\u00b9", "1,", "1;2", "1-", "+-1", "I"]
SPELLINGS = AS_ONE + OTHER + UNREADABLE


def judge_experiment(token: str, sent: Any, response: httpx.Response, forwarded: Any) -> None:
    reads = mlflow_experiment(sent)
    usable = 1 if token == GRANTED else 2
    if forwarded is not None and not isinstance(sent, str):
        # MLflow's protobuf parser refuses anything but a string here (400, acting on nothing);
        # the gateway judged it as the experiment it names, if any.
        assert reads in (usable, None), (sent, reads)
    elif forwarded is not None:  # what MLflow acts on is what the caller may use
        assert reads == usable, (sent, reads)
    elif isinstance(sent, str) and reads == usable:
        # A spelling of an experiment the caller may use is not refused for its spelling.
        pytest.fail(f"{sent!r} (experiment {reads}) was refused: {response.text}")
    if reads == 1 and token == DENIED:
        assert response.headers["x-guard-reason"] == "permission_denied"


@pytest.mark.parametrize("token", [GRANTED, DENIED], ids=["granted", "denied"])
@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("spelling", SPELLINGS, ids=ascii)
def test_experiment_id_spellings_in_the_query(
    gateway: str, client: httpx.Client, fake: CollatingMlflow, token: str, prefix: str,
    spelling: str,
) -> None:  # fmt: skip
    url = f"{gateway}{prefix}/2.0/mlflow/experiments/get"
    response, forwarded = call(client, fake, token, "GET", url, params={"experiment_id": spelling})
    judge_experiment(token, spelling, response, forwarded)
    if forwarded is not None:  # forwarded byte for byte: MLflow reads what the gateway read
        assert forwarded["experiment_id"] == [spelling]


@pytest.mark.parametrize("token", [GRANTED, DENIED], ids=["granted", "denied"])
@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("key", ["experiment_id", "experimentId"])
@pytest.mark.parametrize("spelling", [*SPELLINGS, 1, 2, 1.0, True, None, [1], {"id": 1}], ids=ascii)
def test_experiment_id_spellings_in_the_body(
    gateway: str, client: httpx.Client, fake: CollatingMlflow, token: str, prefix: str, key: str,
    spelling: Any,
) -> None:  # fmt: skip
    url = f"{gateway}{prefix}/2.0/mlflow/experiments/set-experiment-tag"
    body = {key: spelling, "key": "k", "value": "v"}
    response, forwarded = call(client, fake, token, "POST", url, json=body)
    judge_experiment(token, spelling, response, forwarded)
    if forwarded is not None:
        assert forwarded == body


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    "query",
    [
        "experiment_id=+1",  # a raw '+' is a space to MLflow: " 1"
        "experiment_id=%2B1",
        "experiment_id=%201",
        "experiment_id=%EF%BC%91",  # fullwidth 1
        "experiment_id=2&experiment_id=01",  # MLflow reads the first; the gateway must not guess
        "experiment_id=01&experiment_id=2",
        "experiment_id=2&experimentId=1",
    ],
)
def test_denied_experiment_in_raw_queries(
    gateway: str, client: httpx.Client, fake: CollatingMlflow, prefix: str, query: str
) -> None:
    url = f"{gateway}{prefix}/2.0/mlflow/experiments/get?{query}"
    _, forwarded = call(client, fake, DENIED, "GET", url)
    assert forwarded is None or all(
        mlflow_experiment(v) != 1 for values in forwarded.values() for v in values
    ), (query, forwarded)


@pytest.mark.parametrize("token", [GRANTED, DENIED], ids=["granted", "denied"])
@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("folder", ["1", "01", "+1", "%201", "%EF%BC%91", "%C2%B9", "%D9%A1"])
def test_experiment_folder_of_a_proxied_artifact(
    gateway: str, client: httpx.Client, fake: CollatingMlflow, token: str, prefix: str,
    folder: str,
) -> None:  # fmt: skip
    """MLflow stores experiment 1's artifacts under ``1/``: no other spelling is its folder, and
    none may be mistaken for it (nor crash the gateway)."""
    run = next(iter(RUNS))
    url = f"{gateway}{prefix}/2.0/mlflow-artifacts/artifacts/{folder}/{run}/artifacts/x.txt"
    response, forwarded = call(client, fake, token, "GET", url)
    if folder == "1":
        assert (forwarded is not None) is (token == GRANTED), response.text
    else:
        assert forwarded is None
        assert response.status_code in (400, 403), response.text


# Run ids: the gateway asks MLflow about the run in the caller's own spelling, so the run it
# judges is the run MLflow acts on.
RUN_1 = next(r for r, e in RUNS.items() if e == 1)
RUN_SPELLINGS = [RUN_1, RUN_1.upper(), RUN_1 + " ", RUN_1.swapcase()[:16] + RUN_1[16:], "0" + RUN_1]


@pytest.mark.parametrize("token", [GRANTED, DENIED], ids=["granted", "denied"])
@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("place", ["query", "body"])
@pytest.mark.parametrize("spelling", RUN_SPELLINGS, ids=ascii)
def test_run_id_spellings(
    gateway: str, client: httpx.Client, fake: CollatingMlflow, token: str, prefix: str,
    place: str, spelling: str,
) -> None:  # fmt: skip
    if place == "query":
        url = f"{gateway}{prefix}/2.0/mlflow/runs/get"
        response, forwarded = call(client, fake, token, "GET", url, params={"run_id": spelling})
    else:
        url = f"{gateway}{prefix}/2.0/mlflow/runs/set-tag"
        body = {"run_id": spelling, "key": "k", "value": "v"}
        response, forwarded = call(client, fake, token, "POST", url, json=body)
    run = mlflow_run(spelling)
    acts_on = RUNS[run] if run is not None else None
    if forwarded is not None:
        assert acts_on == 1 and token == GRANTED, (spelling, response.text)
    else:
        assert not (acts_on == 1 and token == GRANTED), response.text
    if acts_on == 1 and token == DENIED:
        assert response.headers["x-guard-reason"] == "permission_denied"


# (b) Registry names in their stored spelling ----------------------------------------------------

# What a collating database finds under each stored name (case, trailing spaces, width, NFD).
MODEL_VARIANTS = [
    "Model-A", "model-a", "MODEL-A", "Model-A ", "Model-A  ", "\uff2dodel-A",
    "\uff2d\uff2f\uff24EL-A",
    "Mod\u00e8le-B", "mod\u00e8le-b", "MOD\u00c8LE-B", "Mode\u0300le-B", "Mod\u00e8le-B ",
    # Names MLflow does not resolve to either (a different model, or none).
    "Model_A", "Model-A2", " Model-A", "Model-A\t", "Modele-B", "Model-*", "*",
]  # fmt: skip
MODEL_ROUTES = [
    ("GET", "/2.0/mlflow/registered-models/get", "query"),
    ("GET", "/2.0/mlflow/registered-models/get-latest-versions", "query"),
    ("POST", "/2.0/mlflow/registered-models/set-tag", "body"),
    ("PATCH", "/2.0/mlflow/registered-models/update", "body"),
    ("POST", "/2.0/mlflow/model-versions/set-tag", "body"),
]


@pytest.mark.parametrize("token", [GRANTED, DENIED], ids=["granted", "denied"])
@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(("method", "path", "place"), MODEL_ROUTES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", MODEL_VARIANTS, ids=ascii)
def test_registry_name_spellings_are_judged_as_the_stored_name(
    gateway: str, client: httpx.Client, fake: CollatingMlflow, token: str, prefix: str,
    method: str, path: str, place: str, name: str,
) -> None:  # fmt: skip
    url = gateway + prefix + path
    fields = {"name": name, "key": "k", "value": "v", "version": "1", "description": "d"}
    if place == "query":
        response, forwarded = call(client, fake, token, method, url, params={"name": name})
    else:
        response, forwarded = call(client, fake, token, method, url, json=fields)
    stored = mlflow_model(name)
    if forwarded is not None:  # MLflow acts on a stored model the caller may use, or on none
        assert (stored is not None) is (token == GRANTED), (name, stored, response.text)
    if stored is not None:
        assert (forwarded is not None) is (token == GRANTED), (name, response.text)
        if token == DENIED:
            assert response.headers["x-guard-reason"] == "permission_denied"


# Experiment names are stored names too (unique, and as case-blind as registry names on MySQL).
EXPERIMENT_VARIANTS = ["exp-1", "EXP-1", "Exp-1 ", "\uff45xp-1", "exp\uff0d1", "exp_1", " exp-1"]


@pytest.mark.parametrize("token", [GRANTED, DENIED], ids=["granted", "denied"])
@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("name", EXPERIMENT_VARIANTS, ids=ascii)
def test_experiment_name_spellings_are_judged_as_the_stored_name(
    gateway: str, client: httpx.Client, fake: CollatingMlflow, token: str, prefix: str, name: str
) -> None:
    url = f"{gateway}{prefix}/2.0/mlflow/experiments/get-by-name"
    response, forwarded = call(client, fake, token, "GET", url, params={"experiment_name": name})
    stored = collated(name) == collated("exp-1")
    if stored:
        assert (forwarded is not None) is (token == GRANTED), (name, response.text)
    elif forwarded is not None:  # MLflow finds no experiment by that name
        assert token == DENIED, (name, response.text)
