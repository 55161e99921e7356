"""OTLP span exports through the real gateway: protobuf and JSON, gzip and deflate, bombs and
garbage, and the trace every span lands in (a fake MLflow knows two traces, one per experiment)."""

from __future__ import annotations

import base64
import gzip
import json
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from starlette.types import Receive, Scope, Send

from guard.app import build_gateway
from guard.authz import otlp
from guard.config import load_settings
from guard.edge.requestdata import RequestDataError
from tests.servers import ServerThread, read_request_body, send_response

EDITOR = "mlg_" + "e" * 43
OWN, FOREIGN, NEW = bytes([0x11] * 16), bytes([0x22] * 16), bytes([0x33] * 16)
UNSERVED = bytes([0x44] * 16)
TRACES = {"tr-" + OWN.hex(): "1", "tr-" + FOREIGN.hex(): "2"}
LIMIT = 64 * 1024  # gateway.max_body_size in these tests


class FakeMlflow:
    def __init__(self) -> None:
        self.forwarded: list[tuple[str, bytes, dict[str, str]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_request_body(receive)
        path = scope["path"]
        if path == "/version":
            await send_response(send, 200, b"3.17.2")
        elif path == "/api/2.0/mlflow/experiments/get":
            experiment = scope["query_string"].decode().rpartition("=")[2]
            answer = {"experiment": {"experiment_id": experiment, "name": f"exp-{experiment}"}}
            await send_response(send, 200, json.dumps(answer).encode())
        elif path.startswith("/api/3.0/mlflow/traces/"):
            trace = path.rsplit("/", 1)[1]
            if trace == "tr-" + UNSERVED.hex():  # a 404 that is not MLflow's "no such trace"
                await send_response(send, 404, b"<h1>Not Found</h1>")
                return
            if trace not in TRACES:
                await send_response(send, 404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}')
                return
            location = {"mlflow_experiment": {"experiment_id": TRACES[trace]}}
            answer = {"trace": {"trace_info": {"trace_location": location}}}
            await send_response(send, 200, json.dumps(answer).encode())
        else:
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            self.forwarded.append((path, body, headers))
            await send_response(send, 200, b"", [(b"content-type", b"application/x-protobuf")])


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeMlflow]]:
    from guard.admin.governance import Governance
    from guard.authz.policy import parse_lines

    data: Path = tmp_path_factory.mktemp("otlp")
    fake = FakeMlflow()
    with ServerThread(fake, lifespan="off") as upstream:
        settings = load_settings(
            {
                "upstream.url": upstream.url,
                "storage.data_dir": str(data),
                "gateway.max_body_size": LIMIT,
            },
            {},
            None,
        ).settings
        env = {
            "MLFLOW_GUARD_BOOTSTRAP_TOKEN": "mlg_" + "b" * 43,
            "MLFLOW_GUARD_SECRET_KEY": "k" * 40,
        }
        app = build_gateway(settings, env)
        with ServerThread(app) as server:
            g = Governance(app.tokens, app.policies.store)  # type: ignore[attr-defined]
            g.tokens.create("editor", "editor", 3600, EDITOR)
            g.change("test", add=parse_lines(["p, token:editor, editor, experiment:exp-1"]))
            deadline = time.monotonic() + 10
            while app.policies.index.version != app.policies.store.version():  # type: ignore[attr-defined]
                assert time.monotonic() < deadline, "the policy change was not picked up"
                time.sleep(0.05)
            yield server.url, fake


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def export(*trace_ids: bytes, padding: int = 0) -> bytes:
    """An ExportTraceServiceRequest with one span per trace id (``padding`` bytes of name)."""
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    for i, trace_id in enumerate(trace_ids):
        spans.add(trace_id=trace_id, span_id=(i + 1).to_bytes(8, "big"), name="s" + "x" * padding)
    data: bytes = request.SerializeToString()
    return data


def as_json(*trace_ids: bytes) -> bytes:
    spans = [{"traceId": t.hex(), "spanId": "01" * 8, "name": "s"} for t in trace_ids]
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}).encode()


def post(
    client: httpx.Client, url: str, body: bytes, headers: list[tuple[str, str]] | None = None
) -> httpx.Response:
    base = [("authorization", f"Bearer {EDITOR}"), ("x-mlflow-experiment-id", "1")]
    if headers is None:
        headers = [("content-type", "application/x-protobuf")]
    return client.post(url + "/v1/traces", content=body, headers=base + headers)


PROTOBUF = ("content-type", "application/x-protobuf")


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("encode", "encoding"),
    [
        (lambda b: b, None),
        (gzip.compress, "gzip"),
        (gzip.compress, "GZIP"),
        (zlib.compress, "deflate"),
        (raw_deflate, "deflate"),
    ],
)
@pytest.mark.parametrize("media", ["application/x-protobuf", "application/json; charset=utf-8"])
def test_spans_of_own_and_new_traces_pass_and_foreign_ones_do_not(
    gateway: tuple[str, FakeMlflow], client: httpx.Client, encode: Any, encoding: str | None,
    media: str,
) -> None:  # fmt: skip
    url, fake = gateway
    headers = [("content-type", media)] + ([("content-encoding", encoding)] if encoding else [])
    build = as_json if media.startswith("application/json") else export
    body = encode(build(OWN, NEW))
    response = post(client, url, body, headers)
    assert response.status_code == 200, response.text
    assert fake.forwarded[-1][:2] == ("/v1/traces", body)  # the original bytes
    response = post(client, url, encode(build(OWN, FOREIGN, NEW)), headers)
    assert response.status_code == 403
    assert response.headers["x-guard-reason"] == "permission_denied"
    assert "tr-" + FOREIGN.hex() in response.json()["message"]
    assert "exp-2" not in response.text


def test_a_trace_mlflow_does_not_answer_for_is_not_new(
    gateway: tuple[str, FakeMlflow], client: httpx.Client
) -> None:
    url, _ = gateway
    response = post(client, url, export(UNSERVED))
    assert response.headers.get("x-guard-reason") == "permission_denied"


def test_every_gzip_member_is_read(gateway: tuple[str, FakeMlflow], client: httpx.Client) -> None:
    url, _ = gateway
    body = gzip.compress(export(OWN)) + b"\0\0" + gzip.compress(export(FOREIGN))
    response = post(client, url, body, [PROTOBUF, ("content-encoding", "gzip")])
    assert response.headers.get("x-guard-reason") == "permission_denied"


def test_snake_case_json_with_base64_ids_is_read(
    gateway: tuple[str, FakeMlflow], client: httpx.Client
) -> None:
    url, _ = gateway
    span = {"trace_id": base64.b64encode(FOREIGN).decode(), "span_id": "AQEBAQEBAQE=", "name": "s"}
    body = json.dumps({"resource_spans": [{"scope_spans": [{"spans": [span]}]}]}).encode()
    response = post(client, url, body, [("content-type", "application/json")])
    assert response.headers.get("x-guard-reason") == "permission_denied"


@pytest.mark.parametrize(
    ("body", "headers", "reason", "status"),
    [
        # A compression bomb: small on the wire, past gateway.max_body_size once inflated.
        (gzip.compress(export(OWN, padding=4 * LIMIT)), [PROTOBUF, ("content-encoding", "gzip")],
         "body_too_large", 413),
        (zlib.compress(b"\0" * 50 * LIMIT), [PROTOBUF, ("content-encoding", "deflate")],
         "body_too_large", 413),
        (gzip.compress(export(OWN)) * (2 * LIMIT // len(gzip.compress(export(OWN)))),
         [PROTOBUF, ("content-encoding", "gzip")], "body_too_large", 413),
        (b"\xff\xff\xff", [PROTOBUF], "otlp_unreadable", 400),
        (b"\n\x05abc", [PROTOBUF], "otlp_unreadable", 400),
        (export(OWN), [PROTOBUF, ("content-encoding", "gzip")], "otlp_unreadable", 400),
        (gzip.compress(export(OWN))[:-9], [PROTOBUF, ("content-encoding", "gzip")],
         "otlp_unreadable", 400),
        (gzip.compress(export(OWN)) + b"junk", [PROTOBUF, ("content-encoding", "gzip")],
         "otlp_unreadable", 400),
        (export(OWN), [PROTOBUF, ("content-encoding", "br")], "otlp_unreadable", 400),
        (export(OWN), [("content-type", "text/plain")], "otlp_unreadable", 400),
        (export(OWN), [], "otlp_unreadable", 400),
        (export(OWN), [PROTOBUF, ("content-type", "application/json")], "ambiguous_parameter",
         400),
        (gzip.compress(export(FOREIGN)), [PROTOBUF, ("content-encoding", "gzip"),
                                          ("content-encoding", "identity")],
         "ambiguous_parameter", 400),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
         [("content-type", "application/json")], "otlp_unreadable", 400),
        (b"[1]", [("content-type", "application/json")], "otlp_unreadable", 400),
        (b"{", [("content-type", "application/json")], "otlp_unreadable", 400),
    ],
)  # fmt: skip
def test_what_cannot_be_read_is_refused(
    gateway: tuple[str, FakeMlflow],
    client: httpx.Client,
    body: bytes,
    headers: list[tuple[str, str]],
    reason: str,
    status: int,
) -> None:
    url, fake = gateway
    before = len(fake.forwarded)
    response = post(client, url, body, headers)
    assert (response.status_code, response.headers.get("x-guard-reason")) == (status, reason)
    assert len(fake.forwarded) == before


def test_a_thousand_traces_are_checked_and_no_more(
    gateway: tuple[str, FakeMlflow], client: httpx.Client
) -> None:
    url, _ = gateway
    many = [i.to_bytes(16, "big") for i in range(1, 1002)]
    response = post(client, url, export(*many))
    assert response.headers.get("x-guard-reason") == "too_many_ids"


def test_an_empty_export_names_no_trace(
    gateway: tuple[str, FakeMlflow], client: httpx.Client
) -> None:
    url, _ = gateway
    assert post(client, url, b"").headers.get("x-guard-reason") is None


def test_without_opentelemetry_proto_protobuf_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "opentelemetry.proto.collector.trace.v1.trace_service_pb2"
    monkeypatch.setitem(sys.modules, name, None)  # the import now fails
    with pytest.raises(RequestDataError) as info:
        otlp.trace_ids(export(OWN), {"content-type": ["application/x-protobuf"]}, LIMIT)
    assert info.value.refusal.reason == "otlp_unsupported"
    assert info.value.refusal.status == 415


def test_trace_ids_are_mlflows() -> None:
    from mlflow.entities.span import Span
    from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

    for trace_id in (OWN, bytes(15) + b"\x01", bytes([0xFF] * 16)):
        ids = otlp.trace_ids(export(trace_id), {"content-type": ["application/x-protobuf"]}, LIMIT)
        span = ProtoSpan(trace_id=trace_id, span_id=b"\x01" * 8, name="s")
        assert ids == [Span.from_otel_proto(span).trace_id]
