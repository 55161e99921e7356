"""The protocol layer against a real gateway process in front of a real MLflow, with raw
sockets: malformed requests answered in the gateway's shape and stored in guard_audit, slow
heads cut off by the deadline, the per-address cap, and memory that stays flat under a stream of
huge headers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import sqlalchemy as sa

from guard.store.db import audit_records, build_engine
from tests.integration.conftest import Gateway, Mlflow, start_gateway

pytestmark = pytest.mark.integration

API = "/api/2.0/mlflow/experiments/search"
AJAX = "/ajax-api/2.0/mlflow/experiments/search"


@pytest.fixture
def gateway(external_mlflow: Mlflow, tmp_path: Path) -> Iterator[Gateway]:
    running = start_gateway(
        tmp_path / "gw", "--upstream-url", external_mlflow.url,
        MLFLOW_GUARD_GATEWAY_HEADER_TIMEOUT="2s",
        MLFLOW_GUARD_GATEWAY_MAX_CONNECTIONS_PER_CLIENT="60",
        MLFLOW_GUARD_GATEWAY_MAX_HEADER_SIZE="16KiB",
        MLFLOW_GUARD_GATEWAY_FAILED_LOGIN_INTERVAL="3s",
    )  # fmt: skip
    yield running
    running.stop()


def stored(gateway: Gateway) -> list[dict[str, Any]]:
    engine = build_engine(f"sqlite:///{gateway.data_dir / 'guard.db'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(audit_records.c.record)).scalars().all()
    finally:
        engine.dispose()
    return [json.loads(row) for row in rows]


def wait_for(gateway: Gateway, what: Any, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in stored(gateway) if what(r)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def connect(gateway: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.port), timeout=15)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body[: int(headers.get("content-length", "0"))]


def request(method: str, target: str, *lines: str) -> bytes:
    text = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n" + "".join(f"{x}\r\n" for x in lines)
    return text.encode("latin-1") + b"\r\n"


CASES = [
    # (request bytes, status, reason)
    (request("POST", API, "Content-Length: 4", "Transfer-Encoding: chunked") + b"0\r\n\r\n",
     400, "invalid_body_framing"),
    (request("POST", AJAX, "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
     400, "invalid_body_framing"),
    (request("POST", API, "Content-Length: 1", "Content-Length: 1") + b"{", 400,
     "invalid_body_framing"),
    (request("GET", AJAX, "X-A: b", "\tc"), 400, "malformed_request"),
    (request("GET", API, "X-A: \x1b[31m"), 400, "malformed_request"),
    (b"GETX " + API.encode() + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", 400, "malformed_request"),
    (request("GET", AJAX[1:]), 400, "malformed_request"),
    (request("GET", API + "?" + "&".join(["a=1"] * 3000)), 400,
     "too_many_parameters"),
    (request("GET", AJAX + "?filter=" + "a" * 20_000), 414, "uri_too_long"),
    (request("GET", API, *[f"X-{i}: 1" for i in range(150)]), 431, "headers_too_large"),
    (request("GET", AJAX, "Cookie: " + "a" * 17_000), 431, "headers_too_large"),
    (request("GET", API, "Connection: Upgrade", "Upgrade: websocket",
             "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="),
     403, "websocket_not_served"),
]  # fmt: skip


def test_malformed_requests_are_answered_and_stored(gateway: Gateway) -> None:
    ids = {}
    for raw, status, reason in CASES:
        with connect(gateway) as sock:
            sock.sendall(raw)
            got_status, headers, body = answer(read_all(sock))
        assert (got_status, headers.get("x-guard-reason")) == (status, reason), raw[:80]
        payload = json.loads(body)
        assert set(payload) == {"error_code", "message", "reason", "request_id"}
        assert payload["reason"] == reason and payload["request_id"] == headers["x-request-id"]
        ids[headers["x-request-id"]] = (status, reason)
    # Every one is stored (12 refusals: under the flood limit of 30 per address).
    records = wait_for(gateway, lambda r: r.get("request_id") in ids and len(ids) > 0)
    deadline = time.monotonic() + 30
    while len(records) < len(ids) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = [r for r in stored(gateway) if r.get("request_id") in ids]
    assert {r["request_id"]: (r["status"], r["reason"]) for r in records} == ids
    assert all(r["kind"] == "outcome" and r["principal"] == "" for r in records)
    # The gateway still serves MLflow on new and kept-alive connections.
    with httpx.Client(base_url=gateway.url, trust_env=False, timeout=20,
                      headers={"Authorization": f"Bearer {gateway.token}"}) as client:  # fmt: skip
        for path in (API, AJAX):
            assert client.get(path, params={"max_results": 5}).status_code == 200


def test_slow_heads_are_cut_off_and_legitimate_clients_are_served(gateway: Gateway) -> None:
    """40 connections trickling their headers, one byte every 0.5 s: each gets 408 within the
    deadline (2 s here) and is closed; a normal client is served all along."""
    results: list[tuple[int, str, float]] = []
    lock = threading.Lock()

    def trickle() -> None:
        started = time.monotonic()
        with connect(gateway) as sock:
            try:
                sock.sendall(f"GET {API} HTTP/1.1\r\n".encode())
                for byte in b"Host: localhost\r\nUser-Agent: slow\r\n":  # never finished
                    sock.sendall(bytes([byte]))
                    time.sleep(0.5)
            except OSError:
                pass
            status, headers, _ = answer(read_all(sock))
        with lock:
            results.append((status, headers.get("x-guard-reason", ""), time.monotonic() - started))

    threads = [threading.Thread(target=trickle) for _ in range(40)]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=gateway.url, trust_env=False, timeout=20,
                      headers={"Authorization": f"Bearer {gateway.token}"}) as client:  # fmt: skip
        for _ in range(5):
            assert client.get(AJAX, params={"max_results": 1}).status_code == 200
            time.sleep(0.3)
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 40
    assert {(status, reason) for status, reason, _ in results} == {(408, "header_timeout")}
    assert max(seconds for _, _, seconds in results) < 15  # the deadline, not the trickle
    # Up to the flood limit each is recorded; the rest are summarized once the window (3 s
    # here) ends and a later request comes.
    deadline = time.monotonic() + 30
    while not (
        summaries := [r for r in stored(gateway) if r.get("event") == "unauthenticated_refusals"]
    ):
        assert time.monotonic() < deadline, "no flood summary"
        httpx.get(gateway.url + API, timeout=10, trust_env=False)  # a 401: ends the window
        time.sleep(0.5)
    recorded = [r for r in stored(gateway) if r.get("reason") == "header_timeout"]
    assert all(r["path"] == API and r["status"] == 408 for r in recorded)
    assert len(recorded) + sum(s["unrecorded"] for s in summaries) == 40


def test_connections_beyond_the_cap_are_refused_and_recorded(gateway: Gateway) -> None:
    held = [connect(gateway) for _ in range(60)]
    try:
        time.sleep(0.5)
        with connect(gateway) as sock:
            sock.sendall(request("GET", API))
            status, headers, body = answer(read_all(sock))
        assert (status, headers["x-guard-reason"]) == (429, "too_many_connections")
        assert json.loads(body)["reason"] == "too_many_connections"
        request_id = headers["x-request-id"]
        assert wait_for(gateway, lambda r: r.get("request_id") == request_id)
    finally:
        for sock in held:
            sock.close()


def test_memory_stays_flat_under_a_stream_of_huge_headers(gateway: Gateway) -> None:
    """16 clients at a time each stream an endless header line (up to 32 MiB, 5 rounds). The
    gateway cuts each off at its header limit: its RSS does not grow with what is sent."""
    process = psutil.Process(gateway.proc.pid)
    before = process.memory_info().rss
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)

    accepted: list[int] = []
    lock = threading.Lock()

    def stream() -> None:
        sent = 0
        with connect(gateway) as sock:
            sock.settimeout(10)
            try:
                sock.sendall(b"GET " + API.encode() + b" HTTP/1.1\r\nHost: localhost\r\nX-Huge: ")
                while sent < 32 * 1024**2:
                    sock.sendall(b"a" * 65536)
                    sent += 65536
            except OSError:
                pass
        with lock:
            accepted.append(sent)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for _ in range(5):
            threads = [threading.Thread(target=stream) for _ in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
    finally:
        stop.set()
        sampler.join()
    growth = (peak - before) / 1024**2
    most = max(accepted) / 1024**2
    print(f"gateway RSS {before / 1024**2:.1f} MiB, peak +{growth:.1f} MiB over "
          f"{len(accepted)} streams; most one stream sent: {most:.2f} MiB")  # fmt: skip
    assert len(accepted) == 80
    # Cut off long before the end (what got in is the head limit, 1 MiB drained after the
    # answer, and the kernel's socket buffers); without the limit the gateway would hold
    # 16 x 32 MiB at once.
    assert max(accepted) < 16 * 1024**2
    assert growth < 40
    # And it still answers.
    assert httpx.get(gateway.url + "/guard/health", timeout=10, trust_env=False).status_code == 200
