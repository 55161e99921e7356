"""Body deadlines against the real MLflow: an artifact upload that turns into a trickle is
answered 408 body_timeout and MLflow never stores it whole; a slow but steady one is stored."""

from __future__ import annotations

import select
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Gateway, start_gateway

pytestmark = pytest.mark.integration

START = b"s" * 4096
REST = b"t" * 2000


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    """A gateway with 1 s deadlines, and an experiment/run to upload into."""
    running = start_gateway(
        tmp_path_factory.mktemp("deadline"),
        MLFLOW_GUARD_GATEWAY_BODY_IDLE_TIMEOUT="1s",
        MLFLOW_GUARD_GATEWAY_BODY_TIMEOUT="2s",
        MLFLOW_GUARD_GATEWAY_MIN_UPLOAD_RATE="1KiB",
    )
    try:
        auth = {"Authorization": f"Bearer {running.token}"}
        with httpx.Client(base_url=running.url, headers=auth, timeout=30) as http:
            created = http.post(
                "/api/2.0/mlflow/experiments/create", json={"name": f"slow-{uuid.uuid4().hex[:8]}"}
            )
            experiment_id = created.json()["experiment_id"]
            run = http.post("/api/2.0/mlflow/runs/create", json={"experiment_id": experiment_id})
            yield running, f"{experiment_id}/{run.json()['run']['info']['run_id']}/artifacts"
    finally:
        running.stop()


def put_head(gateway: Gateway, target: str, framing: str) -> bytes:
    return (
        f"PUT {target} HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n"
        f"Authorization: Bearer {gateway.token}\r\n{framing}\r\nConnection: close\r\n\r\n"
    ).encode()


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def download(gateway: Gateway, target: str) -> httpx.Response:
    auth = {"Authorization": f"Bearer {gateway.token}"}
    return httpx.get(gateway.url + target, headers=auth, timeout=30)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
def test_a_trickled_upload_is_refused_and_never_stored_whole(
    slow: tuple[Gateway, str], prefix: str, chunked: bool
) -> None:
    gateway, folder = slow
    target = f"{prefix}/2.0/mlflow-artifacts/artifacts/{folder}/trickled-{uuid.uuid4().hex[:6]}"
    if chunked:
        framing, first = "Transfer-Encoding: chunked", b"1000\r\n" + START + b"\r\n"
        pieces = [b"1\r\n" + bytes([b]) + b"\r\n" for b in REST]
    else:
        framing, first = f"Content-Length: {len(START) + len(REST)}", START
        pieces = [bytes([b]) for b in REST]
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(put_head(gateway, target, framing) + first)
        for piece in pieces:  # 10 bytes a second, until the gateway answers
            if select.select([sock], [], [], 0.1)[0]:
                break
            sock.sendall(piece)
        else:
            raise AssertionError("the whole body was sent without an answer")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"x-guard-reason: body_timeout" in answer
    time.sleep(0.5)  # MLflow handles the abandoned request
    stored = download(gateway, target)
    assert stored.status_code != 200 or len(stored.content) < len(START) + len(REST)


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
def test_a_slow_but_steady_upload_is_stored_whole(
    slow: tuple[Gateway, str], prefix: str, tmp_path: Path
) -> None:
    """1 KiB every 0.2 s for ~2.4 s: longer than every deadline in all, never too slow."""
    gateway, folder = slow
    target = f"{prefix}/2.0/mlflow-artifacts/artifacts/{folder}/steady-{uuid.uuid4().hex[:6]}"
    body = bytes(range(256)) * 48  # 12 KiB
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(put_head(gateway, target, f"Content-Length: {len(body)}"))
        for i in range(0, len(body), 1024):
            time.sleep(0.2)
            sock.sendall(body[i : i + 1024])
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:500]
    stored = download(gateway, target)
    assert stored.status_code == 200 and stored.content == body
