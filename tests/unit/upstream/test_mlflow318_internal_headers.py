"""MLflow 3.18's internal credentials and switches never reach it from a caller.

MLflow 3.18.0's server trusts these request headers (read in its source, ``mlflow/server``):

- ``X-MLflow-Assistant-Delegation`` (new in 3.18): ``v1:<user>:<expiry_ms>:<sig>``, minted by the
  Assistant for its tool subprocesses; basic-auth accepts it on every route, ahead of the
  configured authentication, as that user (``mlflow/server/auth/__init__.py``,
  ``mlflow/server/assistant/delegation.py``).
- ``X-MLflow-Authorization``: Basic credentials on ``/gateway/*``, where a per-boot internal
  token as the password authenticates the named user without a password check.
- ``X-MLflow-Gateway-Caller``: who called the AI gateway (recorded on its traces).
- ``X-MLflow-Guardrail-Bypass``: ``1`` skips the AI gateway's sanitizing guardrails.

(``X-MLflow-Workspace`` is a selector the gateway forwards only once it has checked it; its tests
are the workspace ones.) Every spelling, on ``/api`` and ``/ajax-api``, with every method and on
the streaming artifact routes, against a fake MLflow that records what reaches it: none of them
arrives, and a repeated one is refused before anything reads it.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.types import Receive, Scope, Send

from guard.app import build_gateway
from guard.config import load_settings
from guard.upstream.proxy import upstream_request_headers
from tests.servers import ServerThread
from tests.unit.authz.test_route_authorization import ALLOWED, FakeMlflow, start_gateway
from tests.unit.upstream.test_proxy_headers import COMPUTED, ENV, TOKEN, Recorder

INTERNAL = [
    "X-MLflow-Assistant-Delegation",
    "X-MLflow-Authorization",
    "X-MLflow-Gateway-Caller",
    "X-MLflow-Guardrail-Bypass",
]
CREDENTIAL = "v1:admin:99999999999999:c2lnbmF0dXJlLW9mLXRoZS1zZXJ2ZXJzLWtleQ"
VALUES = {
    "X-MLflow-Assistant-Delegation": CREDENTIAL,
    "X-MLflow-Authorization": "Basic YWRtaW46cGFzc3dvcmQ=",
    "X-MLflow-Gateway-Caller": "judge",
    "X-MLflow-Guardrail-Bypass": "1",
}


def spellings(name: str) -> list[list[tuple[str, str]]]:
    """The header as one or more (name, value) lines, in every spelling worth trying."""
    value = VALUES[name]
    return [
        [(name, value)],
        [(name.lower(), value)],
        [(name.upper(), value)],
        [(name.replace("-", "_"), value)],  # WSGI would read it as the dashed name
        [(name.swapcase(), value)],
        [(name, value), (name, value)],  # repeated
        [(name, "x"), (name.lower(), value)],  # repeated in another case
        [(name, value), (name.replace("-", "_"), value)],
        [(name, value), ("Connection", name)],  # named in Connection as well
    ]


SPELLINGS = [(name, i) for name in INTERNAL for i in range(len(spellings(name)))]
METRIC = b'{"run_id": "r1", "key": "m", "value": 1, "timestamp": 1}'
REQUESTS = [
    ("GET", "{p}/2.0/mlflow/runs/get?run_id=r1", b""),
    ("HEAD", "{p}/2.0/mlflow/runs/get?run_id=r1", b""),
    ("POST", "{p}/2.0/mlflow/runs/log-metric", METRIC),
    ("PATCH", "{p}/2.0/mlflow/registered-models/update", b'{"name": "m", "description": "d"}'),
    ("DELETE", "{p}/2.0/mlflow/registered-models/delete-tag", b'{"name": "m", "key": "k"}'),
    ("PUT", "{p}/2.0/mlflow-artifacts/artifacts/1/r1/artifacts/x.txt", b"artifact bytes"),
    ("GET", "{p}/2.0/mlflow-artifacts/artifacts/1/r1/artifacts/x.txt", b""),
    ("GET", "{p}/3.0/mlflow/traces/tr-1", b""),
]


@pytest.mark.parametrize(("name", "index"), SPELLINGS)
def test_internal_headers_are_never_in_the_upstream_request(name: str, index: int) -> None:
    lines = [(k.encode(), v.encode()) for k, v in spellings(name)[index]]
    assert upstream_request_headers(lines, []) == []


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    data: Path = tmp_path_factory.mktemp("internal-headers")
    with ServerThread(recorder, lifespan="off") as upstream:
        loaded = load_settings(
            {"upstream.url": upstream.url, "storage.data_dir": str(data)}, {}, None
        )
        assert loaded.problems == []
        with ServerThread(build_gateway(loaded.settings, ENV)) as gateway:
            yield gateway.url, recorder


def send(url: str, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> int:
    """Send exactly these header lines (duplicates, case and underscores kept) and the body."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        lines = [("Host", "localhost"), ("Authorization", f"Bearer {TOKEN}"), *headers]
        if body:
            content_type = "text/plain" if method == "PUT" else "application/json"
            lines += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        for key, value in lines:
            connection.putheader(key, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
@pytest.mark.parametrize(("method", "target", "body"), REQUESTS, ids=lambda v: str(v)[:40])
@pytest.mark.parametrize(("name", "index"), SPELLINGS)
def test_internal_headers_never_reach_mlflow(
    stack: tuple[str, Recorder],
    prefix: str,
    method: str,
    target: str,
    body: bytes,
    name: str,
    index: int,
) -> None:
    url, recorder = stack
    lines = spellings(name)[index]
    before = len(recorder.seen)
    status = send(url, method, target.format(p=prefix), lines, body)
    if len({k.lower().replace("_", "-") for k, _ in lines if k != "Connection"}) < len(
        [k for k, _ in lines if k != "Connection"]
    ):
        assert status == 400  # a repeated X-MLflow-* header: refused, nothing forwarded
        assert len(recorder.seen) == before
        return
    assert status == 200, (method, target, lines)
    assert len(recorder.seen) == before + 1
    seen = recorder.seen[-1]
    names = {n.replace("_", "-") for n, _ in seen}
    assert not names & {n.lower() for n in INTERNAL}
    assert names <= COMPUTED | {"content-length", "content-type", "accept-encoding"}, names
    assert not any(v == VALUES[name] or CREDENTIAL in v for _, v in seen)


# A caller who is no admin makes the gateway ask MLflow things of its own (lookups, filtered
# search pages); none of those carries a caller's header either.


class EverythingRecorder(FakeMlflow):
    """The route tests' fake MLflow, remembering the headers of every request it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.all: list[list[tuple[bytes, bytes]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.all.append(list(scope["headers"]))
        await super().__call__(scope, receive, send)


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, EverythingRecorder]]:
    fake = EverythingRecorder()
    with ServerThread(fake, lifespan="off") as upstream:
        for url in start_gateway(tmp_path_factory.mktemp("internal-lookups"), upstream.url):
            yield url, fake


CALLER_REQUESTS = [
    ("GET", "{p}/2.0/mlflow/runs/get?run_id=r1", b""),
    ("GET", "{p}/2.0/mlflow/experiments/get?experiment_id=1", b""),
    ("GET", "{p}/2.0/mlflow/registered-models/get?name=model-a", b""),
    ("GET", "{p}/2.0/mlflow/experiments/search?max_results=10", b""),
    ("POST", "{p}/2.0/mlflow/experiments/search", b'{"max_results": 10}'),
    ("POST", "{p}/2.0/mlflow/runs/log-metric", METRIC),
    ("GET", "{p}/3.0/mlflow/traces/tr-1", b""),
]


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
@pytest.mark.parametrize(("method", "target", "body"), CALLER_REQUESTS, ids=lambda v: str(v)[:40])
def test_no_request_the_gateway_makes_for_a_caller_carries_internal_headers(
    watched: tuple[str, EverythingRecorder], prefix: str, method: str, target: str, body: bytes
) -> None:
    url, fake = watched
    before = len(fake.all)
    lines = [(name.swapcase(), VALUES[name]) for name in INTERNAL]
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest(method, target.format(p=prefix), skip_accept_encoding=True)
        for key, value in [("Authorization", f"Bearer {ALLOWED}"), *lines]:
            connection.putheader(key, value)
        if body:
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body or None)
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 200, (method, target)
    made = fake.all[before:]
    assert made  # at least the forwarded request
    internal = {n.lower().encode() for n in INTERNAL}
    for headers in made:
        assert not {k.lower().replace(b"_", b"-") for k, _ in headers} & internal
        assert not any(v.decode("latin-1") in VALUES.values() for _, v in headers)
