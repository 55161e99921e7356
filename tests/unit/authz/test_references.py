"""Every reference field of guard/authz/references.py, via the real gateway before a fake MLflow.

The editor may do everything on experiment 1 and on models ``model-a*``, nothing on experiment 2
or ``model-b*``. Each case names, in a write the editor may make, one thing of their own (the
request is forwarded) and one foreign or unknown thing (it is refused, with the same answer for
both), on every prefix the route has, in both protobuf JSON spellings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.app import build_gateway
from guard.authz.references import REFERENCES, route_key
from guard.authz.routes import RouteTable, load_routes
from guard.config import load_settings
from guard.edge.requestdata import _camel
from tests.servers import ServerThread, read_request_body, send_response

EDITOR = "mlg_" + "e" * 43
EXPERIMENTS_ONLY = "mlg_" + "x" * 43  # editor on every experiment, nothing on models
MODELS_ONLY = "mlg_" + "m" * 43  # manager on every model, nothing on experiments
# Things and the experiment they live in; unknown ids get MLflow's 404.
RUNS = {"r1": "1", "r2": "2"}
LOGGED_MODELS = {"m-1": "1", "m-2": "2"}
TRACES = {"tr-1": "1", "tr-2": "2"}


class FakeMlflow:
    """Answers the gateway's lookups about the things above; 200 ``{}`` to anything else, which
    it records as forwarded."""

    def __init__(self) -> None:
        self.forwarded: list[tuple[str, str, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_request_body(receive)
        path, query = scope["path"], parse_qs(scope["query_string"].decode())
        found: object = None
        if path == "/version":
            await send_response(send, 200, b"3.17.2")
            return
        if path == "/api/2.0/mlflow/experiments/get":
            experiment = query.get("experiment_id", [""])[0]
            if experiment in ("1", "2"):
                found = {"experiment": {"experiment_id": experiment, "name": f"exp-{experiment}"}}
        elif path == "/api/2.0/mlflow/experiments/get-by-name":
            name = query.get("experiment_name", [""])[0]
            if name in ("exp-1", "exp-2"):
                found = {"experiment": {"experiment_id": name[-1], "name": name}}
        elif path == "/api/2.0/mlflow/registered-models/get":
            name = query.get("name", [""])[0]
            if name.lower().startswith("model-"):
                found = {"registered_model": {"name": name.lower()}}
        elif path == "/api/2.0/mlflow/runs/get":
            run = query.get("run_id", [""])[0]
            if run in RUNS:
                found = {"run": {"info": {"experiment_id": RUNS[run]}}}
        elif path.startswith("/api/2.0/mlflow/logged-models/") and scope["method"] == "GET":
            model = path.rsplit("/", 1)[1]
            if model in LOGGED_MODELS:
                found = {"model": {"info": {"experiment_id": LOGGED_MODELS[model]}}}
        elif path.startswith("/api/3.0/mlflow/traces/tr-") and scope["method"] == "GET":
            # GetTraceInfoV3; the row's trace id is looked up at .../info (guard/authz/resolve.py)
            trace = path.removesuffix("/info").rsplit("/", 1)[1]
            if trace in TRACES:
                location = {"mlflow_experiment": {"experiment_id": TRACES[trace]}}
                found = {"trace": {"trace_info": {"trace_location": location}}}
        else:
            self.forwarded.append((scope["method"], path, body))
            await send_response(send, 200, b"{}")
            return
        if found is None:
            await send_response(send, 404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}')
        else:
            await send_response(send, 200, json.dumps(found).encode())


def grants(name: str) -> list[str]:
    return {
        "editor": [
            "p, token:editor, manager, experiment:exp-1",
            "p, token:editor, promoter, model:model-a*",
            "p, token:editor, manager, model:model-a*",
        ],
        "experiments": ["p, token:experiments, editor, experiment:*"],
        "models": ["p, token:models, manager, model:*", "p, token:models, promoter, model:*"],
    }[name]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeMlflow]]:
    from guard.admin.governance import Governance
    from guard.authz.policy import parse_lines

    data: Path = tmp_path_factory.mktemp("references")
    fake = FakeMlflow()
    with ServerThread(fake, lifespan="off") as upstream:
        settings = load_settings(
            {"upstream.url": upstream.url, "storage.data_dir": str(data)}, {}, None
        ).settings
        env = {
            "MLFLOW_GUARD_BOOTSTRAP_TOKEN": "mlg_" + "b" * 43,
            "MLFLOW_GUARD_SECRET_KEY": "k" * 40,
        }
        app = build_gateway(settings, env)
        with ServerThread(app) as server:
            g = Governance(app.tokens, app.policies.store)  # type: ignore[attr-defined]
            for name, secret in (
                ("editor", EDITOR),
                ("experiments", EXPERIMENTS_ONLY),
                ("models", MODELS_ONLY),
            ):
                g.tokens.create(name, "editor", 3600, secret)
                g.change("test", add=parse_lines(grants(name)))
            deadline = time.monotonic() + 10
            while app.policies.index.version != app.policies.store.version():  # type: ignore[attr-defined]
                assert time.monotonic() < deadline, "the policy change was not picked up"
                time.sleep(0.05)
            yield server.url, fake


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def prompts(name: str) -> str:
    return json.dumps([{"name": name, "version": "1"}])


def tag(key: str, value: str) -> list[dict[str, str]]:
    return [{"key": key, "value": value}]


def location(experiment_id: str) -> dict[str, Any]:
    return {"mlflow_experiment": {"experiment_id": experiment_id}}


def trace_v3(trace_id: str, **info: Any) -> dict[str, Any]:
    return {
        "trace": {"trace_info": {"trace_id": trace_id, "trace_location": location("1"), **info}}
    }


# (method, path after the prefix, body naming X) with X replaced by own / foreign / unknown ids.
# Each case: (method, path, make(value) -> body, own value, foreign value, unknown value or None).
CASES: list[tuple[str, str, Any, str, str, str | None]] = [
    ("POST", "/2.0/mlflow/runs/outputs",
     lambda v: {"run_id": "r1", "models": [{"model_id": v, "step": 0}]}, "m-1", "m-2", "m-9"),
    ("POST", "/2.0/mlflow/runs/log-inputs",
     lambda v: {"run_id": "r1", "models": [{"model_id": v}]}, "m-1", "m-2", "m-9"),
    ("POST", "/2.0/mlflow/runs/log-metric",
     lambda v: {"run_id": "r1", "key": "k", "value": 1, "timestamp": 1, "model_id": v},
     "m-1", "m-2", "m-9"),
    ("POST", "/2.0/mlflow/runs/log-batch",
     lambda v: {"run_id": "r1", "metrics": [{"key": "k", "value": 1, "timestamp": 1,
                                              "step": 0, "model_id": v}]}, "m-1", "m-2", "m-9"),
    ("POST", "/2.0/mlflow/runs/log-batch",
     lambda v: {"run_id": "r1", "tags": tag("mlflow.parentRunId", v)}, "r1", "r2", "r9"),
    ("POST", "/2.0/mlflow/runs/log-batch",
     lambda v: {"run_id": "r1", "tags": tag("mlflow.linkedPrompts", prompts(v))},
     "model-a1", "model-b1", None),
    ("POST", "/2.0/mlflow/runs/create",
     lambda v: {"experiment_id": "1", "tags": tag("mlflow.parentRunId", v)}, "r1", "r2", "r9"),
    ("POST", "/2.0/mlflow/runs/create-promptlab-run",
     lambda v: {"experiment_id": "1", "tags": tag("mlflow.parentRunId", v)}, "r1", "r2", "r9"),
    ("POST", "/2.0/mlflow/runs/set-tag",
     lambda v: {"run_id": "r1", "key": "mlflow.parentRunId", "value": v}, "r1", "r2", "r9"),
    ("POST", "/2.0/mlflow/runs/set-tag",  # MySQL compares tag keys ignoring case
     lambda v: {"run_id": "r1", "key": "MLFLOW.parentrunid ", "value": v}, "r1", "r2", "r9"),
    ("POST", "/2.0/mlflow/runs/set-tag",
     lambda v: {"run_id": "r1", "key": "mlflow.linkedPrompts", "value": prompts(v)},
     "model-a1", "model-b1", None),
    ("POST", "/2.0/mlflow/logged-models",
     lambda v: {"experiment_id": "1", "source_run_id": v}, "r1", "r2", "r9"),
    ("POST", "/2.0/mlflow/logged-models",
     lambda v: {"experiment_id": "1", "tags": tag("mlflow.linkedPrompts", prompts(v))},
     "model-a1", "model-b1", None),
    ("PATCH", "/2.0/mlflow/logged-models/m-1/tags",
     lambda v: {"tags": tag("mlflow.linkedPrompts", prompts(v))}, "model-a1", "model-b1", None),
    ("POST", "/2.0/mlflow/model-versions/create",
     lambda v: {"name": "model-a1", "source": "runs:/r1/model", "run_id": v}, "r1", "r2", "r9"),
    ("POST", "/2.0/mlflow/model-versions/create",
     lambda v: {"name": "model-a1", "source": "models:/m-1", "model_id": v}, "m-1", "m-2", "m-9"),
    ("POST", "/2.0/mlflow/model-versions/create",
     lambda v: {"name": "model-a1", "source": "runs:/r1/model",
                "tags": tag("mlflow.prompt.associatedRunIds", f"r1,{v}")}, "r1", "r2", "r9"),
    ("POST", "/2.0/mlflow/model-versions/set-tag",
     lambda v: {"name": "model-a1", "version": "1", "key": "mlflow.prompt.associatedRunIds",
                "value": f"{v}, r1"}, "r1", "r2", "r9"),
    ("POST", "/2.0/mlflow/registered-models/create",
     lambda v: {"name": "model-a7", "tags": tag("_mlflow_experiment_ids", f",{v},")},
     "1", "2", "9"),
    ("POST", "/2.0/mlflow/registered-models/set-tag",
     lambda v: {"name": "model-a1", "key": "_mlflow_experiment_ids", "value": f",1,{v},"},
     "1", "2", "9"),
    ("POST", "/2.0/mlflow/traces/link-to-run",
     lambda v: {"run_id": "r1", "trace_ids": ["tr-1", v]}, "tr-1", "tr-2", "tr-9"),
    ("POST", "/2.0/mlflow/traces/link-prompts",
     lambda v: {"trace_id": "tr-1", "prompt_versions": [{"name": v, "version": "1"}]},
     "model-a1", "model-b1", None),
    ("POST", "/2.0/mlflow/traces",
     lambda v: {"experiment_id": "1", "request_metadata": tag("mlflow.sourceRun", v)},
     "r1", "r2", "r9"),
    ("POST", "/2.0/mlflow/traces",
     lambda v: {"experiment_id": "1", "request_metadata": tag("mlflow.modelId", v)},
     "m-1", "m-2", "m-9"),
    ("POST", "/2.0/mlflow/traces",
     lambda v: {"experiment_id": "1", "tags": tag("mlflow.linkedPrompts", prompts(v))},
     "model-a1", "model-b1", None),
    ("PATCH", "/2.0/mlflow/traces/tr-1",
     lambda v: {"request_metadata": tag("mlflow.sourceRun", v)}, "r1", "r2", "r9"),
    ("PATCH", "/2.0/mlflow/traces/tr-1/tags",
     lambda v: {"key": "mlflow.linkedPrompts", "value": prompts(v)}, "model-a1", "model-b1", None),
    ("PATCH", "/3.0/mlflow/traces/tr-1/tags",
     lambda v: {"key": "mlflow.linkedPrompts", "value": prompts(v)}, "model-a1", "model-b1", None),
    # An unknown trace id is a new trace: it is created, not refused.
    ("POST", "/3.0/mlflow/traces", trace_v3, "tr-1", "tr-2", None),
    ("POST", "/3.0/mlflow/traces",
     lambda v: trace_v3("tr-new", trace_metadata={"mlflow.sourceRun": v}), "r1", "r2", "r9"),
    ("POST", "/3.0/mlflow/traces",
     lambda v: trace_v3("tr-new", trace_metadata={"mlflow.modelId": v}), "m-1", "m-2", "m-9"),
    ("POST", "/3.0/mlflow/traces",
     lambda v: trace_v3("tr-new", tags={"mlflow.linkedPrompts": prompts(v)}),
     "model-a1", "model-b1", None),
    ("POST", "/3.0/mlflow/issues",
     lambda v: {"experiment_id": "1", "name": "n", "description": "d", "source_run_id": v},
     "r1", "r2", "r9"),
]  # fmt: skip
ROUTES = {route_key(r): r for r in load_routes()}
TABLE = RouteTable(load_routes())


def camel(value: Any) -> Any:
    """The body in lowerCamelCase: every field name, not map keys (none here have '_')."""
    if isinstance(value, dict):
        return {_camel(k): camel(v) for k, v in value.items()}
    if isinstance(value, list):
        return [camel(v) for v in value]
    return value


def variants() -> Iterator[Any]:
    for method, path, make, own, foreign, unknown in CASES:
        for prefix in ("/api", "/ajax-api"):
            found = TABLE.match(method, prefix + path)
            if found is None:  # this route has no twin under this prefix
                continue
            assert route_key(found[0]) in REFERENCES, (method, path)
            for spelling in ("snake", "camel"):
                yield pytest.param(
                    method, prefix + path, make, own, foreign, unknown, spelling,
                    id=f"{method} {prefix}{path} {spelling} {make(own)!s:.60}",
                )  # fmt: skip


def send(
    client: httpx.Client, url: str, token: str, method: str, body: dict[str, Any]
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    return client.request(method, url, headers=headers, content=json.dumps(body))


@pytest.mark.parametrize(
    ("method", "path", "make", "own", "foreign", "unknown", "spelling"), list(variants())
)
def test_reference(
    gateway: tuple[str, FakeMlflow],
    client: httpx.Client,
    method: str,
    path: str,
    make: Any,
    own: str,
    foreign: str,
    unknown: str | None,
    spelling: str,
) -> None:
    url, fake = gateway
    spell = camel if spelling == "camel" else (lambda body: body)
    response = send(client, url + path, EDITOR, method, spell(make(own)))
    assert response.headers.get("x-guard-reason") is None, response.text
    assert response.status_code == 200
    assert fake.forwarded[-1][:2] == (method, path)
    answers = []
    for value in (foreign, unknown) if unknown is not None else (foreign,):
        response = send(client, url + path, EDITOR, method, spell(make(value)))
        assert response.status_code == 403, response.text
        assert response.headers["x-guard-reason"] == "permission_denied"
        message = response.json()["message"]
        assert value in message and "exp-2" not in message  # only what was sent
        answers.append(message.replace(value, "ID"))
    assert len(set(answers)) == 1  # foreign and unknown: the same answer


def test_every_table_entry_is_a_route_and_has_a_case() -> None:
    """A new reference in the table is a route the gateway serves, and this file tries it."""
    assert set(REFERENCES) <= set(ROUTES)
    tried = set()
    for method, path, *_ in CASES:
        for prefix in ("/api", "/ajax-api"):
            if (found := TABLE.match(method, prefix + path)) is not None:
                tried.add(route_key(found[0]))
    assert set(REFERENCES) - tried == {("POST", "/v1/traces")}  # tests/unit/authz/test_otlp.py


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/api/2.0/mlflow/runs/set-tag",
         {"run_id": "r1", "key": "mlflow.linkedPrompts", "value": "not json"},
         "invalid_request_body"),
        ("/api/2.0/mlflow/runs/set-tag",
         {"run_id": "r1", "key": "mlflow.linkedPrompts", "value": '[{"version": "1"}]'},
         "invalid_request_body"),
        ("/api/2.0/mlflow/runs/outputs",
         {"run_id": "r1", "models": [{"model_id": "m-1", "modelId": "m-2"}]},
         "ambiguous_parameter"),
        ("/api/2.0/mlflow/runs/outputs", {"run_id": "r1", "models": {"model_id": "m-2"}},
         "invalid_request_body"),
        ("/api/2.0/mlflow/runs/outputs", {"run_id": "r1", "models": [{"model_id": 2}]},
         "invalid_request_body"),
        ("/api/2.0/mlflow/runs/log-batch",
         {"run_id": "r1", "tags": [{"key": "mlflow.parentRunId", "value": "r1"},
                                   {"key": "mlflow.parentRunId", "value": "r2"}]},
         "permission_denied"),
        ("/api/3.0/mlflow/traces",
         {"trace": {"trace_info": {"trace_id": "tr-new", "trace_location": location("1"),
                                   "trace_metadata": ["mlflow.sourceRun"]}}},
         "invalid_request_body"),
        # Each distinct id may cost a lookup: a thousand are checked, more are refused.
        ("/api/2.0/mlflow/traces/link-to-run",
         {"run_id": "r1", "trace_ids": [f"tr-{i}" for i in range(1001)]}, "too_many_ids"),
        ("/api/2.0/mlflow/runs/log-batch",
         {"run_id": "r1", "metrics": [{"key": f"k{i}", "value": 1, "timestamp": 1, "step": 0,
                                       "model_id": "m-1"} for i in range(1000)]}, None),
        # A parent run given as a JSON string holding JSON (legacy clients) is read the same.
        ("/api/2.0/mlflow/runs/set-tag",
         json.dumps(json.dumps({"run_id": "r1", "key": "mlflow.parentRunId", "value": "r2"})),
         "permission_denied"),
    ],
)  # fmt: skip
def test_what_tries_to_get_around_the_references(
    gateway: tuple[str, FakeMlflow], client: httpx.Client, path: str, body: Any, reason: str | None
) -> None:
    url, _ = gateway
    method = "POST"
    content = body if isinstance(body, str) else json.dumps(body)
    response = client.request(
        method, url + path, content=content,
        headers={"Authorization": f"Bearer {EDITOR}", "Content-Type": "application/json"},
    )  # fmt: skip
    assert response.headers.get("x-guard-reason") == reason, response.text


@pytest.mark.parametrize(
    ("token", "method", "path", "body", "reason"),
    [
        # Allowed everything on experiments: the prompt a run links is a model all the same.
        (EXPERIMENTS_ONLY, "POST", "/api/2.0/mlflow/runs/set-tag",
         {"run_id": "r2", "key": "mlflow.linkedPrompts", "value": prompts("model-b1")},
         "permission_denied"),
        (EXPERIMENTS_ONLY, "POST", "/api/2.0/mlflow/runs/outputs",
         {"run_id": "r1", "models": [{"model_id": "m-2"}]}, None),
        # Allowed everything on models: the experiments a prompt is listed in are not models.
        (MODELS_ONLY, "POST", "/api/2.0/mlflow/registered-models/set-tag",
         {"name": "model-b1", "key": "_mlflow_experiment_ids", "value": ",2,"},
         "permission_denied"),
        (MODELS_ONLY, "POST", "/ajax-api/2.0/mlflow/registered-models/set-tag",
         {"name": "model-b1", "key": "note", "value": ",2,"}, None),
        (MODELS_ONLY, "POST", "/api/2.0/mlflow/model-versions/create",
         {"name": "model-b1", "source": "models:/model-b1/1", "run_id": "r2"},
         "permission_denied"),
    ],
)  # fmt: skip
def test_callers_allowed_a_whole_kind_are_still_checked_on_other_kinds(
    gateway: tuple[str, FakeMlflow],
    client: httpx.Client,
    token: str,
    method: str,
    path: str,
    body: dict[str, Any],
    reason: str | None,
) -> None:
    url, _ = gateway
    response = send(client, url + path, token, method, body)
    assert response.headers.get("x-guard-reason") == reason, response.text


def test_the_route_table_notes_name_the_references() -> None:
    """Whoever reads a row of route_table.toml learns that its references are checked."""
    import tomllib
    from importlib import resources

    rows = tomllib.loads(resources.files("guard.authz").joinpath("route_table.toml").read_text())
    for row in rows["route"]:
        key = (row["method"], row["path"].removeprefix("/ajax-api").removeprefix("/api"))
        if key in REFERENCES:
            assert "References (guard/authz/references.py)" in row.get("note", ""), key
