"""A trace's system tags (where its data, spans and archive are read from) are MLflow's.

MLflow 3.17.2 lets a caller who may update a trace set ``mlflow.artifactLocation`` (set-tag, the
v2 end body) and the archive location (v2 start/end bodies, StartTraceV3, OTLP root-span
attributes ``mlflow.traceTag.<key>``), pointing the trace's data at any location the server can
read; 3.18 refuses the set-tag and drops them from the bodies. Through the gateway: set-tag and
delete-tag naming one are refused (``system_tag_not_allowed``), start and end bodies reach MLflow
without them, OTLP exports carrying them are refused. A fake MLflow 3.17.2 records what reaches it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from guard.authz.systemtags import TRACE_SYSTEM_TAGS
from tests.servers import ServerThread
from tests.unit.authz.test_route_authorization import FakeMlflow, parse, start_gateway

TRACER = "mlg_" + "t" * 43  # manager on exp-1 only (not on the server)
EVERY = "mlg_" + "e" * 43  # editor of every experiment: no lookups, so no references read
PREFIXES = ["/api", "/ajax-api"]


class Recording:
    """FakeMlflow (trace tr-1 in experiment 1), keeping each forwarded request's body."""

    def __init__(self) -> None:
        self.fake = FakeMlflow()
        self.bodies: list[tuple[str, str, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []

        async def recording() -> Message:
            message = await receive()
            chunks.append(message.get("body", b""))
            return message

        await self.fake(scope, recording, send)
        if scope["type"] == "http" and any(k == b"x-forwarded-for" for k, _ in scope["headers"]):
            self.bodies.append((scope["method"], scope["path"], b"".join(chunks)))


@pytest.fixture(scope="module")
def upstream() -> Recording:
    return Recording()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: Recording) -> Iterator[str]:
    def setup(gw: Any) -> None:
        from guard.admin.governance import Governance

        g = Governance(gw.tokens, gw.policies.store)
        g.tokens.create("tracer", "admin", 3600, TRACER)
        g.change("test", add=[parse("p, token:tracer, manager, experiment:exp-1")])
        g.tokens.create("every", "admin", 3600, EVERY)
        g.change("test", add=[parse("p, token:every, editor, experiment:*")])

    with ServerThread(upstream, lifespan="off") as server:
        yield from start_gateway(tmp_path_factory.mktemp("trace-tags"), server.url, setup)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def send(
    client: httpx.Client, gateway: str, method: str, path: str, **kwargs: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TRACER}", **kwargs.pop("headers", {})}
    return client.request(method, gateway + path, headers=headers, **kwargs)


SET_TAG = ["/2.0/mlflow/traces/tr-1/tags", "/3.0/mlflow/traces/tr-1/tags"]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("path", SET_TAG)
@pytest.mark.parametrize("key", sorted(TRACE_SYSTEM_TAGS))
def test_setting_a_system_tag_of_a_trace_is_refused(
    client: httpx.Client, gateway: str, upstream: Recording, prefix: str, path: str, key: str
) -> None:
    before = len(upstream.bodies)
    for body in ({"key": key, "value": "file:///etc"}, {"key": key, "value": ""}):
        response = send(client, gateway, "PATCH", prefix + path, json=body)
        assert response.status_code == 403, response.text
        assert response.headers["x-guard-reason"] == "system_tag_not_allowed"
    deleted = send(
        client, gateway, "DELETE", prefix + path, json={"key": key}
    )  # MLflow reads the body
    if key == "mlflow.trace.archivalFailure":  # deleting it clears a failure (3.18 allows it)
        assert deleted.status_code == 200, deleted.text
    else:
        assert deleted.headers.get("x-guard-reason") == "system_tag_not_allowed", deleted.text
    assert len(upstream.bodies) == before + (key == "mlflow.trace.archivalFailure")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_other_trace_tags_are_set_as_before(
    client: httpx.Client, gateway: str, prefix: str
) -> None:
    for path in SET_TAG:
        for key in ("team", "mlflow.user", "MLFLOW.ARTIFACTLOCATION ", "mlflow.artifactLocation2"):
            response = send(
                client, gateway, "PATCH", prefix + path, json={"key": key, "value": "x"}
            )
            assert response.status_code == 200, (key, response.text)


SYSTEM = [{"key": key, "value": "file:///etc"} for key in sorted(TRACE_SYSTEM_TAGS)]
KEPT = [{"key": "team", "value": "a"}]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/2.0/mlflow/traces", {"experiment_id": "1", "tags": SYSTEM + KEPT}),
     ("PATCH", "/2.0/mlflow/traces/tr-1", {"status": "OK", "tags": KEPT + SYSTEM})],
)  # fmt: skip
def test_v2_start_and_end_reach_mlflow_without_system_tags(
    client: httpx.Client, gateway: str, upstream: Recording,
    prefix: str, method: str, path: str, body: dict[str, Any],
) -> None:  # fmt: skip
    response = send(client, gateway, method, prefix + path, json=body)
    assert response.status_code == 200, response.text
    forwarded = json.loads(upstream.bodies[-1][2])
    assert forwarded["tags"] == KEPT
    assert {k: v for k, v in forwarded.items() if k != "tags"} == {
        k: v for k, v in body.items() if k != "tags"
    }


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("info_key", ["trace_info", "traceInfo"])
def test_v3_start_reaches_mlflow_without_system_tags(
    client: httpx.Client, gateway: str, upstream: Recording, prefix: str, info_key: str
) -> None:
    location = {"mlflow_experiment": {"experiment_id": "1"}}
    tags = {"team": "a", **{t["key"]: t["value"] for t in SYSTEM}}
    body = {"trace": {info_key: {"trace_id": "tr-1", "trace_location": location, "tags": tags}}}
    response = send(client, gateway, "POST", prefix + "/3.0/mlflow/traces", json=body)
    assert response.status_code == 200, response.text
    forwarded = json.loads(upstream.bodies[-1][2])
    assert forwarded["trace"][info_key]["tags"] == {"team": "a"}
    assert forwarded["trace"][info_key]["trace_location"] == location


def _otlp(attributes: dict[str, str]) -> bytes:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = bytes(range(16)), bytes(range(8)), "root"
    for key, value in attributes.items():
        span.attributes.append(KeyValue(key=key, value=AnyValue(string_value=value)))
    return bytes(request.SerializeToString())


@pytest.mark.parametrize("key", sorted(TRACE_SYSTEM_TAGS))
def test_otlp_spans_may_not_set_system_tags(
    client: httpx.Client, gateway: str, upstream: Recording, key: str
) -> None:
    headers = {"Content-Type": "application/x-protobuf", "X-Mlflow-Experiment-Id": "1"}
    before = len(upstream.bodies)
    refused = send(client, gateway, "POST", "/v1/traces", headers=headers,
                   content=_otlp({f"mlflow.traceTag.{key}": '"file:///etc"'}))  # fmt: skip
    assert refused.headers.get("x-guard-reason") == "system_tag_not_allowed", refused.text
    assert len(upstream.bodies) == before
    allowed = send(client, gateway, "POST", "/v1/traces", headers=headers,
                   content=_otlp({"mlflow.traceTag.team": '"a"'}))  # fmt: skip
    # (judged on as usual: the fake MLflow cannot say whether that trace exists)
    assert allowed.headers.get("x-guard-reason") != "system_tag_not_allowed", allowed.text


@pytest.mark.parametrize("key", sorted(TRACE_SYSTEM_TAGS))
def test_otlp_system_tags_are_refused_to_an_editor_of_every_experiment(
    client: httpx.Client, gateway: str, upstream: Recording, key: str
) -> None:
    """Allowed on every experiment, the caller skips the lookups (and the references they read):
    the system tags are still checked."""
    headers = {"Content-Type": "application/x-protobuf", "X-Mlflow-Experiment-Id": "1",
               "Authorization": f"Bearer {EVERY}"}  # fmt: skip
    before = len(upstream.bodies)
    refused = send(client, gateway, "POST", "/v1/traces", headers=headers,
                   content=_otlp({f"mlflow.traceTag.{key}": '"file:///etc"'}))  # fmt: skip
    assert refused.headers.get("x-guard-reason") == "system_tag_not_allowed", refused.text
    assert len(upstream.bodies) == before
    allowed = send(client, gateway, "POST", "/v1/traces", headers=headers,
                   content=_otlp({"mlflow.traceTag.team": '"a"'}))  # fmt: skip
    assert allowed.status_code == 200, allowed.text
