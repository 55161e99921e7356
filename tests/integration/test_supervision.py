"""The embedded MLflow: lean, restarted when it dies, gone when the gateway stops."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.conftest import Gateway, start_gateway

pytestmark = pytest.mark.integration


@pytest.fixture
def own_gateway(tmp_path: Path) -> Iterator[Gateway]:
    running = start_gateway(
        tmp_path / "gw",
        MLFLOW_TRACKING_URI="http://leak.invalid",  # must not reach the child
        MLFLOW_SERVER_ALLOWED_HOSTS="*",
    )
    yield running
    running.stop()


def test_child_runs_lean_with_a_scrubbed_environment(own_gateway: Gateway) -> None:
    processes = own_gateway.mlflow_processes()
    assert 1 <= len(processes) <= 2  # the mlflow CLI and its single uvicorn worker
    for process in processes:
        env = process.environ()
        assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
        assert "MLFLOW_GUARD_BOOTSTRAP_TOKEN" not in env
        assert "MLFLOW_GUARD_TOKENS_CACHE_TTL" not in env
        # MLflow sets its own tracking URI for its children; ours must not get through.
        assert env.get("MLFLOW_TRACKING_URI") != "http://leak.invalid"
        assert env.get("MLFLOW_SERVER_ALLOWED_HOSTS", "") != "*"
        cmdline = " ".join(process.cmdline())
        assert "--host 127.0.0.1" in cmdline and "--workers 1" in cmdline
    # MLflow answers only to its own loopback Host.
    port = next(
        c.laddr.port
        for p in processes
        for c in p.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    )
    assert httpx.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                     headers={"Host": "evil.com"}).status_code == 403  # fmt: skip


def test_upstream_killed_gives_502_then_recovers(own_gateway: Gateway) -> None:
    auth = ("admin", own_gateway.token)
    url = own_gateway.url + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(url, auth=auth).status_code == 200
    for process in own_gateway.mlflow_processes():
        process.kill()
    statuses = []
    deadline = time.monotonic() + 90
    recovered = False
    while time.monotonic() < deadline:
        response = httpx.get(url, auth=auth, timeout=10)
        statuses.append(response.status_code)
        if response.status_code == 200 and 502 in statuses:
            recovered = True
            break
        if response.status_code != 200:
            assert response.status_code == 502, response.text
            assert response.json()["reason"] == "upstream_unreachable"
        time.sleep(0.2)
    assert 502 in statuses
    assert recovered, statuses[-5:]
    assert "restarting in" in own_gateway.log.read_text()
    assert httpx.get(own_gateway.url + "/guard/ready").status_code == 200


def test_no_child_is_left_5_s_after_sigterm(own_gateway: Gateway) -> None:
    family = psutil.Process(own_gateway.proc.pid).children(recursive=True)
    assert family
    with httpx.Client(auth=("admin", own_gateway.token)) as client:  # an open keep-alive connection
        client.get(own_gateway.url + "/version")
        started = time.monotonic()
        os.kill(own_gateway.proc.pid, signal.SIGTERM)
        own_gateway.proc.wait(timeout=10)
    elapsed = time.monotonic() - started
    time.sleep(max(0.0, 5 - elapsed))
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [p.cmdline() for p in alive]
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete.
    assert own_gateway.proc.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in own_gateway.log.read_text()
