"""Every verified MLflow release, for real: a `mlflow server` of 3.17.2 (the main venv's) and of
3.18.0 (``.venv-mlflow-3.18``, built by ``make test``), each fronted by the gateway started
without ``--allow-unverified-mlflow`` and driven with the MLflow client.

A test here that is skipped fails the run (tests/conftest.py, marker ``mlflow_release``): a
release that was not started was not tested. A missing 3.18 venv is an error, never a skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from guard.authz.routes import VERIFIED_MLFLOW_VERSIONS
from tests.conftest import free_port
from tests.integration.conftest import Gateway, Mlflow, clean_env, start_gateway, wait_ready

ROOT = Path(__file__).resolve().parents[2]
# The interpreter of each verified release's server. 3.18.0 has its own venv until the package
# index carries mlflow-tracing 3.18.0 (Makefile: NEXT_VENV).
PYTHONS = {"3.17.2": Path(sys.executable), "3.18.0": ROOT / ".venv-mlflow-3.18" / "bin" / "python"}
SCHEDULE = "/ajax-api/3.0/mlflow/issues/schedule/state"

pytestmark = [pytest.mark.integration, pytest.mark.mlflow_release]


def test_every_verified_release_has_a_server_here() -> None:
    assert set(PYTHONS) == VERIFIED_MLFLOW_VERSIONS


def start_mlflow(
    release: str, home: Path, port: int | None = None, flags: tuple[str, ...] = ()
) -> tuple[Mlflow, Path]:
    """A `mlflow server` of ``release`` on SQLite with served artifacts; ``flags`` are added to
    its command line (``--enable-workspaces``)."""
    python = PYTHONS[release]
    if not python.exists():
        raise RuntimeError(f"no MLflow {release} venv at {python.parent.parent}: run `make test`")
    home.mkdir(parents=True, exist_ok=True)
    port, log = port or free_port(), home / "server.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(python), "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
             "--serve-artifacts", "--artifacts-destination", str(home / "artifacts"), *flags],
            stdout=out, stderr=subprocess.STDOUT, cwd=home, start_new_session=True,
            env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log, "/health")
    except RuntimeError:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
        raise
    return Mlflow(url, proc), log


@pytest.fixture(scope="module", params=sorted(PYTHONS))
def release(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Mlflow, Gateway]]:
    name: str = request.param
    home = tmp_path_factory.mktemp(f"mlflow-{name}")
    server, _ = start_mlflow(name, home)
    try:
        gateway = start_gateway(home / "gateway", "--upstream-url", server.url)
        try:
            yield name, server, gateway
        finally:
            gateway.stop()
    finally:
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=15)


@pytest.fixture(autouse=True)
def bearer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


def test_the_gateway_serves_the_release_it_finds(release: tuple[str, Mlflow, Gateway]) -> None:
    name, server, gateway = release
    auth = {"Authorization": f"Bearer {gateway.token}"}
    assert httpx.get(server.url + "/version").text.strip() == name
    assert httpx.get(gateway.url + "/version", headers=auth).text.strip() == name
    assert "--allow-unverified-mlflow" not in " ".join(gateway.proc.args)  # type: ignore[arg-type]
    log = gateway.log.read_text()
    assert f"upstream MLflow release: (unknown) -> {name}" in log
    assert "IS NOT A VERIFIED RELEASE" not in log
    # The change of release (from none) is in the audit trail.
    events: list[dict[str, object]] = []
    deadline = time.monotonic() + 15
    while not events and time.monotonic() < deadline:
        found = gateway.cli("audit", "export", "--kind", "event", "--format", "jsonl")
        assert found.returncode == 0, found.stderr
        records = [json.loads(line) for line in found.stdout.splitlines() if line.strip()]
        events = [r for r in records if r.get("event") == "upstream_version_changed"]
        if not events:
            time.sleep(0.5)
    assert events, "no upstream_version_changed event in the audit trail"
    assert {(e["from"], e["to"], e["verified"]) for e in events} == {(None, name, True)}


def test_mlflow_client_smoke(
    release: tuple[str, Mlflow, Gateway], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    name, server, gateway = release
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", gateway.token)
    client = MlflowClient(tracking_uri=gateway.url, registry_uri=gateway.url)
    tag = uuid.uuid4().hex[:8]
    experiment_id = client.create_experiment(f"smoke-{name}-{tag}")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "lr", "0.01")
    client.log_metric(run_id, "auc", 0.91, step=1)
    (tmp_path / "report.txt").write_text(name)
    client.log_artifact(run_id, str(tmp_path / "report.txt"))
    assert [f.path for f in client.list_artifacts(run_id)] == ["report.txt"]
    out = Path(client.download_artifacts(run_id, "report.txt", str(tmp_path / "down")))
    assert out.read_text() == name
    fetched = client.get_run(run_id)
    assert fetched.data.params == {"lr": "0.01"} and fetched.data.metrics == {"auc": 0.91}
    model = f"smoke-model-{tag}"
    client.create_registered_model(model)
    version = client.create_model_version(model, f"runs:/{run_id}/model", run_id)
    client.set_registered_model_alias(model, "champion", version.version)
    assert client.get_model_version_by_alias(model, "champion").version == version.version
    # What the gateway forwarded is really in this release's server.
    direct = httpx.get(
        f"{server.url}/api/2.0/mlflow/experiments/get", params={"experiment_id": experiment_id}
    )
    assert direct.json()["experiment"]["name"] == f"smoke-{name}-{tag}"
    client.delete_experiment(experiment_id)


def test_a_route_only_3_18_serves(release: tuple[str, Mlflow, Gateway]) -> None:
    """POST issues/schedule/state exists from 3.18.0 on: forwarded to 3.18.0 (its answer for an
    experiment without a schedule), refused as unknown in front of 3.17.2, and only by POST on
    /ajax-api in both."""
    name, _, gateway = release
    auth = {"Authorization": f"Bearer {gateway.token}"}
    experiment_id = httpx.post(
        gateway.url + "/api/2.0/mlflow/experiments/create",
        json={"name": f"schedule-{uuid.uuid4().hex[:8]}"}, headers=auth,
    ).json()["experiment_id"]  # fmt: skip
    response = httpx.post(
        gateway.url + SCHEDULE, json={"experiment_id": experiment_id}, headers=auth
    )
    if name == "3.17.2":
        assert response.status_code == 403
        assert response.headers["x-guard-reason"] == "route_not_classified"
    else:
        assert response.status_code == 200, response.text
        assert json.loads(response.text) == {"next_fire_time_ms": None}
    for method, path in [
        ("POST", SCHEDULE.replace("/ajax-api/", "/api/")),
        ("GET", SCHEDULE),
        ("PUT", SCHEDULE),
    ]:
        refused = httpx.request(method, gateway.url + path, headers=auth)
        assert refused.headers["x-guard-reason"] == "route_not_classified", (method, path)


def stop_mlflow(server: Mlflow) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=15)


def test_an_upgrade_behind_the_gateway_swaps_the_table(tmp_path: Path) -> None:
    """MLflow 3.17.2 is replaced by 3.18.0 on the same address while the gateway runs: the failed
    connection in between makes the gateway read /version again, and from then on it serves
    3.18.0's routes (an audit event says so). Back to 3.17.2, the 3.18 route is refused again."""
    port = free_port()
    server, _ = start_mlflow("3.17.2", tmp_path / "a", port)
    gateway: Gateway | None = None
    try:
        gateway = start_gateway(tmp_path / "gw", "--upstream-url", server.url)
        auth = {"Authorization": f"Bearer {gateway.token}"}

        def schedule() -> httpx.Response:
            return httpx.post(gateway.url + SCHEDULE, json={"experiment_id": "0"}, headers=auth)

        assert schedule().headers["x-guard-reason"] == "route_not_classified"
        for release in ("3.18.0", "3.17.2"):
            stop_mlflow(server)
            down = httpx.get(gateway.url + "/api/2.0/mlflow/experiments/get?experiment_id=0",
                             headers=auth)  # fmt: skip
            assert down.headers["x-guard-reason"] == "upstream_unreachable"
            server, _ = start_mlflow(release, tmp_path / release, port)
            assert httpx.get(gateway.url + "/version", headers=auth).text.strip() == release
            answer = schedule()
            if release == "3.18.0":
                assert answer.status_code == 200, answer.text
            else:
                assert answer.headers["x-guard-reason"] == "route_not_classified"
        log = gateway.log.read_text()
        assert "upstream MLflow release: 3.17.2 -> 3.18.0" in log
        assert "upstream MLflow release: 3.18.0 -> 3.17.2" in log
    finally:
        if gateway is not None:
            gateway.stop()
        stop_mlflow(server)
