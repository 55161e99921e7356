"""The routes that issue presigned URLs need the right of the proxied transfer they replace.

With MLflow 3.18's ``--artifacts-presigned-only`` the bytes go straight between the client and
the object store; the gateway sees only the request that issues the URL. So a download URL needs
read, an upload URL and the multipart create/complete/abort need update, each on what the URL
names: a run's, a logged model's or a path's experiment, a registered model for a model
version's artifacts (the same right as the plain ``model-versions/get-artifact`` download, which
also serves a ``runs:/`` source's bytes on the model's grant).

Three callers: ``reader`` may read experiment exp-1 and model-a, ``writer`` may also update them,
``other`` holds both roles on exp-2 and model-b only. Each issuing route is sent naming exp-1's
resources, exp-2's (another's) and ones that do not exist, on /api and /ajax-api: the first
reaches MLflow only for a caller with the right; the other two are refused alike (same status,
same body), so a refusal tells nothing about existence.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from tests.servers import ServerThread, read_request_body, send_response
from tests.unit.authz.test_route_authorization import parse, start_gateway

READER = "mlg_" + "p" * 43
WRITER = "mlg_" + "w" * 43
OTHER = "mlg_" + "o" * 43
PREFIXES = ["/api", "/ajax-api"]
RUNS = {"r1": "1", "r2": "2"}
LOGGED_MODELS = {"m-1": "1", "m-2": "2"}
MODELS = ("model-a", "model-b")


class FakeMlflow:
    """Experiments 1 (exp-1) and 2 (exp-2), runs and logged models in them, models model-a and
    model-b; records each forwarded caller request as (method, path, raw query)."""

    def __init__(self) -> None:
        self.forwarded: list[tuple[str, str, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_request_body(receive)
        path, raw = scope["path"], scope["query_string"]
        query = parse_qs(raw.decode())
        if path == "/version":
            await send_response(send, 200, b"3.18.0")
            return
        if any(k == b"x-forwarded-for" for k, _ in scope["headers"]):
            self.forwarded.append((scope["method"], path, raw))
            await send_response(send, 200, b'{"presigned_url": "http://127.0.0.1:9/x"}')
            return
        status, payload = 404, {"error_code": "RESOURCE_DOES_NOT_EXIST"}
        first = {k: v[0] for k, v in query.items()}
        if path == "/api/2.0/mlflow/experiments/get" and first.get("experiment_id") in ("1", "2"):
            status, payload = 200, {"experiment": {"name": f"exp-{first['experiment_id']}"}}
        elif path == "/api/2.0/mlflow/experiments/get-by-name":
            name = first.get("experiment_name", "")
            if name in ("exp-1", "exp-2"):
                status = 200
                payload = {"experiment": {"experiment_id": name[-1], "name": name}}
        elif path == "/api/2.0/mlflow/runs/get" and (run := first.get("run_id", "")) in RUNS:
            status = 200
            payload = {"run": {"info": {"run_id": run, "experiment_id": RUNS[run]}}}
        elif path.startswith("/api/2.0/mlflow/logged-models/"):
            model_id = path.rsplit("/", 1)[1]
            if model_id in LOGGED_MODELS:
                status = 200
                info = {"model_id": model_id, "experiment_id": LOGGED_MODELS[model_id]}
                payload = {"model": {"info": info}}
        elif path == "/api/2.0/mlflow/registered-models/get" and first.get("name") in MODELS:
            status, payload = 200, {"registered_model": {"name": first["name"]}}
        await send_response(send, status, json.dumps(payload).encode())


def add_callers(gateway: Any) -> None:
    from guard.admin.governance import Governance

    g = Governance(gateway.tokens, gateway.policies.store)
    rules = ["g2, preader, read", "g2, pwriter, preader", "g2, pwriter, update"]
    for name, secret, roles, experiment, model in (
        ("reader", READER, ["preader"], "exp-1", "model-a"),
        ("writer", WRITER, ["pwriter"], "exp-1", "model-a"),
        ("other", OTHER, ["pwriter"], "exp-2", "model-b"),
    ):
        g.tokens.create(name, "admin", 3600, secret)
        for role in roles:
            rules += [f"p, token:{name}, {role}, experiment:{experiment}",
                      f"p, token:{name}, {role}, model:{model}"]  # fmt: skip
    g.change("test", add=[parse(rule) for rule in rules])


@pytest.fixture(scope="module")
def fake() -> FakeMlflow:
    return FakeMlflow()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fake: FakeMlflow) -> Iterator[str]:
    with ServerThread(fake, lifespan="off") as upstream:
        yield from start_gateway(tmp_path_factory.mktemp("presigned"), upstream.url, add_callers)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


# The names of exp-1's things, exp-2's, and things that do not exist.
OWN = {"exp": "1", "run": "r1", "lm": "m-1", "model": "model-a"}
ANOTHER = {"exp": "2", "run": "r2", "lm": "m-2", "model": "model-b"}
MISSING = {"exp": "987654", "run": "r987654", "lm": "m-987654", "model": "model-zz"}

# (label, right needed, prefixed?, method, path, query, JSON body) with {names} filled in.
ISSUING: list[tuple[str, str, bool, str, str, str, Any]] = [
    ("download-url", "read", True, "POST", "/2.0/mlflow/artifacts/presigned-download-url", "",
     {"run_id": "{run}", "path": "x.txt"}),
    ("upload-url", "update", True, "POST", "/2.0/mlflow/artifacts/presigned-upload-url", "",
     {"run_id": "{run}", "path": "x.txt"}),
    ("upload-url-logged-model", "update", True, "POST",
     "/2.0/mlflow/artifacts/presigned-upload-url", "", {"model_id": "{lm}", "path": "x.txt"}),
    ("path-download", "read", True, "GET",
     "/2.0/mlflow-artifacts/presigned/{exp}/{run}/artifacts/x.txt", "", None),
    ("path-download-logged-model", "read", True, "GET",
     "/2.0/mlflow-artifacts/presigned/{exp}/models/{lm}/artifacts/x.txt", "", None),
    *((f"mpu-{step}", "update", True, "POST",
       f"/2.0/mlflow-artifacts/mpu/{step}/{{exp}}/{{run}}/artifacts/x.txt", "",
       {"path": "x.txt", "num_parts": 1, "upload_id": "u", "parts": []})
      for step in ("create", "complete", "abort")),
    ("mpu-create-logged-model", "update", True, "POST",
     "/2.0/mlflow-artifacts/mpu/create/{exp}/models/{lm}/artifacts/x.txt", "",
     {"path": "x.txt", "num_parts": 1}),
    ("path-download-trace", "read", True, "GET",
     "/2.0/mlflow-artifacts/presigned/{exp}/traces/tr-{exp}/artifacts/traces.json", "", None),
    ("logged-model-files", "read", False, "GET",
     "/ajax-api/2.0/mlflow/logged-models/{lm}/artifacts/files",
     "artifact_file_path=x.txt&presigned=true", None),
    ("model-version-artifact", "read", False, "GET", "/model-versions/get-artifact",
     "name={model}&version=1&path=x.txt&presigned=true", None),
]  # fmt: skip
CASES = [
    pytest.param(prefix + path if prefixed else path, label, right, method, query, body,
                 id=f"{label}-{prefix}")
    for label, right, prefixed, method, path, query, body in ISSUING
    for prefix in (PREFIXES if prefixed else [""])
]  # fmt: skip


def fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {k: fill(v, names) for k, v in value.items()}
    return value


VARYING = {"x-request-id", "content-length", "date"}


def refusal(response: httpx.Response, swap: dict[str, str]) -> tuple[Any, ...]:
    """A refusal without what differs between any two requests (its request id), with the ids
    the caller sent swapped back (its message repeats them)."""
    body = {k: v for k, v in response.json().items() if k != "request_id"}
    for sent in sorted(swap, key=len, reverse=True):
        body["message"] = body["message"].replace(sent, swap[sent])
    headers = sorted((k, v) for k, v in response.headers.items() if k not in VARYING)
    return response.status_code, body, headers


def send(
    client: httpx.Client, gateway: str, token: str, method: str, path: str, query: str,
    body: Any, names: dict[str, str],
) -> httpx.Response:  # fmt: skip
    url = gateway + fill(path, names) + ("?" + fill(query, names) if query else "")
    kwargs: dict[str, Any] = {} if body is None else {"json": fill(body, names)}
    return client.request(method, url, headers={"Authorization": f"Bearer {token}"}, **kwargs)


@pytest.mark.parametrize(("path", "label", "right", "method", "query", "body"), CASES)
def test_issuing_route_needs_the_right_of_the_transfer(
    client: httpx.Client, gateway: str, fake: FakeMlflow,
    path: str, label: str, right: str, method: str, query: str, body: Any,
) -> None:  # fmt: skip
    for token, allowed in ((READER, right == "read"), (WRITER, True)):
        before = len(fake.forwarded)
        response = send(client, gateway, token, method, path, query, body, OWN)
        if allowed:
            assert response.status_code == 200, (label, response.text)
            assert len(fake.forwarded) == before + 1
            assert fake.forwarded[-1][2] == fill(query, OWN).encode()  # the query as sent
        else:
            assert response.status_code == 403, (label, response.text)
            assert len(fake.forwarded) == before, label
    for token in (READER, WRITER):
        before = len(fake.forwarded)
        forbidden = send(client, gateway, token, method, path, query, body, ANOTHER)
        missing = send(client, gateway, token, method, path, query, body, MISSING)
        assert len(fake.forwarded) == before, label
        assert forbidden.status_code == missing.status_code == 403, (label, forbidden.text)
        swap = {MISSING[k]: ANOTHER[k] for k in MISSING}
        assert refusal(forbidden, {}) == refusal(missing, swap), label
        assert forbidden.headers["x-guard-reason"] == "permission_denied"


# How MLflow 3.18 reads the flag: ``request.args.get("presigned") == "true"`` -- the first value,
# exactly "true". The gateway needs model READ for both forms (the plain form serves the same
# bytes on the same right), so no spelling can move the decision; the query reaches MLflow as
# sent, so MLflow reads the very form the gateway judged.
FLAG_FORMS = ["presigned=true", "presigned=TRUE", "presigned=1", "presigned=true&presigned=false",
              "presigned=false&presigned=true", "presigned=", "presigned", "Presigned=true",
              "presigned=%74rue", "presigned=true%00"]  # fmt: skip


@pytest.mark.parametrize("flag", FLAG_FORMS)
@pytest.mark.parametrize(
    "path",
    ["/model-versions/get-artifact?name={model}&version=1&path=x.txt&",
     "/ajax-api/2.0/mlflow/logged-models/{lm}/artifacts/files?artifact_file_path=x.txt&"],
    ids=["model-version", "logged-model"],
)  # fmt: skip
def test_presigned_flag_spellings_are_judged_alike(
    client: httpx.Client, gateway: str, fake: FakeMlflow, path: str, flag: str
) -> None:
    for token, names, allowed in (
        (READER, OWN, True), (OTHER, OWN, False), (READER, ANOTHER, False),
        (READER, MISSING, False),
    ):  # fmt: skip
        before = len(fake.forwarded)
        url = gateway + path.format(**names) + flag
        response = client.get(url, headers={"Authorization": f"Bearer {token}"})
        if allowed:
            assert response.status_code == 200, response.text
            assert fake.forwarded[-1][2] == (path.format(**names) + flag).split("?", 1)[1].encode()
        else:
            assert response.status_code == 403, response.text
            assert len(fake.forwarded) == before


# A presigned upload URL names a run (run_id) or a logged model (model_id): MLflow takes exactly
# one, as its proto reads it (either spelling), and refuses both or neither with 400.
UPLOAD_URL_BODIES = [
    ({"model_id": "m-1", "path": "x.txt"}, None),
    ({"modelId": "m-1", "path": "x.txt"}, None),
    ({"runId": "r1", "path": "x.txt"}, None),
    ({"modelId": "m-2", "path": "x.txt"}, "permission_denied"),
    ({"model_id": "m-987654", "path": "x.txt"}, "permission_denied"),
    ({"model_id": "m-1", "run_id": "r1", "path": "x.txt"}, "ambiguous_parameter"),
    ({"model_id": "m-2", "run_id": "r1", "path": "x.txt"}, "ambiguous_parameter"),
    ({"model_id": "m-1", "runId": "r2", "path": "x.txt"}, "ambiguous_parameter"),
    ({"model_id": "m-2", "run_id": "", "path": "x.txt"}, "ambiguous_parameter"),
    ({"model_id": "m-1", "modelId": "m-2", "path": "x.txt"}, "ambiguous_parameter"),
    ({"model_id": ["m-1", "m-2"], "path": "x.txt"}, "ambiguous_parameter"),
    ({"path": "x.txt"}, "invalid_request_body"),
]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(("body", "want"), UPLOAD_URL_BODIES)
def test_presigned_upload_url_names_a_run_or_a_logged_model(
    client: httpx.Client, gateway: str, fake: FakeMlflow, prefix: str, body: Any, want: str | None
) -> None:
    """A logged model's upload URL needs update on its experiment, as the proxied upload into
    ``<exp>/models/<id>/artifacts`` does; a body naming both (or one twice) is refused before
    MLflow, so no id goes unjudged."""
    path = prefix + "/2.0/mlflow/artifacts/presigned-upload-url"
    before = len(fake.forwarded)
    response = send(client, gateway, WRITER, "POST", path, "", body, OWN)
    assert response.headers.get("x-guard-reason") == want, response.text
    assert len(fake.forwarded) == before + (want is None)
    if want is None:  # the right is update: a reader of the same experiment gets no URL
        refused = send(client, gateway, READER, "POST", path, "", body, OWN)
        assert refused.headers.get("x-guard-reason") == "permission_denied", refused.text


def test_every_issuing_request_is_audited_with_caller_and_resource(
    client: httpx.Client, gateway: str
) -> None:
    sent = set()
    for label, _, prefixed, method, path, query, body in ISSUING:
        full = ("/ajax-api" if prefixed else "") + path
        assert send(client, gateway, WRITER, method, full, query, body, OWN).status_code == 200
        refused = send(client, gateway, OTHER, method, full, query, body, OWN)
        assert refused.status_code == 403, label
        sent.add((method, fill(full, OWN)))
    admin = {"Authorization": "Bearer mlg_" + "b" * 43}
    deadline = time.monotonic() + 10
    while True:
        records = client.get(gateway + "/guard/api/audit", params={"limit": "1000"},
                             headers=admin).json()["records"]  # fmt: skip
        outcomes = {
            (r["method"], r["path"], r["principal"], r["decision"]): r["resource"]
            for r in records if r.get("kind") == "outcome"
        }  # fmt: skip
        if all((m, p, "token:other", "deny") in outcomes for m, p in sent):
            break
        assert time.monotonic() < deadline, "the issuing requests were not all recorded"
        time.sleep(0.1)
    for method, path in sent:
        resource = outcomes[(method, path, "token:writer", "allow")]
        assert resource in ("experiment:exp-1", "model:model-a"), (path, resource)
        assert outcomes[(method, path, "token:other", "deny")] == resource, path


@pytest.fixture(scope="module")
def skill_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from guard.admin.governance import Governance
    from tests.unit.authz.test_skills import CALLERS, GRANTS, FakeMlflow318

    def setup(gw: Any) -> None:
        g = Governance(gw.tokens, gw.policies.store)
        rows = [parse("g2, maker, create")]
        for name, secret in CALLERS.items():
            g.tokens.create(f"skill-{name}", "admin", 3600, secret)
            rows += [parse(f"p, token:skill-{name}, {r}, {res}") for r, res in GRANTS[name]]
        g.change("test", add=rows)

    with ServerThread(FakeMlflow318(), lifespan="off") as server:
        yield from start_gateway(tmp_path_factory.mktemp("presigned-skills"), server.url, setup)


TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("prefix", PREFIXES)
def test_skill_download_urls_need_read_on_the_skill_and_uploads_are_refused(
    client: httpx.Client, skill_gateway: str, prefix: str
) -> None:
    from tests.unit.authz.test_skills import CALLERS

    def get(caller: str, path: str) -> httpx.Response:
        url = f"{skill_gateway}{prefix}/2.0/mlflow-artifacts/presigned/{path}"
        return client.get(url, headers={"Authorization": f"Bearer {CALLERS[caller]}"})

    for path in (f"skills/foo/{TOKEN}/SKILL.md", f"skills/@acme/foo/{TOKEN}/SKILL.md"):
        assert get("reader", path).status_code == 200, path
        assert get("nobody", path).status_code == 403, path
    forbidden = get("reader", f"skills/bar/{TOKEN}/SKILL.md")
    missing = get("reader", f"skills/nope/{TOKEN}/SKILL.md")
    assert forbidden.status_code == missing.status_code == 403
    assert refusal(forbidden, {}) == refusal(missing, {"nope": "bar"})
    for root in ("skills", "skills/@acme"):  # name no single skill
        assert get("reader", root).status_code == 403, root
    # An upload URL under skills/ needs update on the skill (MLflow 3.18 then refuses every
    # write of skill content, "immutable", for administrators too).
    for step in ("create", "complete", "abort"):
        url = f"{skill_gateway}{prefix}/2.0/mlflow-artifacts/mpu/{step}/skills/foo/{TOKEN}/x"
        for caller in ("reader", "nobody"):
            auth = {"Authorization": f"Bearer {CALLERS[caller]}"}
            response = client.post(url, json={"path": "x", "num_parts": 1}, headers=auth)
            assert response.status_code == 403, (step, caller, response.text)
