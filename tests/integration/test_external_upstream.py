"""`--upstream-url`: fronting an MLflow the operator already runs, with the gateway's own
database on PostgreSQL."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from tests.conftest import PostgresCluster
from tests.integration.conftest import Gateway, Mlflow, start_gateway

pytestmark = [pytest.mark.integration, pytest.mark.postgresql]


def test_front_an_existing_server_with_postgresql(
    external_mlflow: Mlflow, postgres: PostgresCluster, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    database = postgres.create_database()
    args = ("--upstream-url", external_mlflow.url, "--database-uri", database)
    first = start_gateway(tmp_path / "a", *args)
    try:
        assert first.mlflow_processes() == []  # nothing embedded
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", first.token)
        client = MlflowClient(tracking_uri=first.url)
        experiment_id = client.create_experiment("through-external")
        # The experiment really is in the external server.
        direct = httpx.get(
            f"{external_mlflow.url}/api/2.0/mlflow/experiments/get",
            params={"experiment_id": experiment_id},
        )
        assert direct.json()["experiment"]["name"] == "through-external"
        created = first.cli("token", "create", "--name", "ci", "--role", "admin", "--quiet",
                            "--database-uri", database)  # fmt: skip
        assert created.returncode == 0, created.stderr
    finally:
        first.stop()

    # A second replica on the same database and key sees the same tokens and bootstraps nothing.
    key = (tmp_path / "a" / "secret.key").read_text().strip()
    second = start_gateway(
        tmp_path / "b", *args, token="mlg_" + "n" * 43, MLFLOW_GUARD_SECRET_KEY=key
    )
    try:
        secret = created.stdout.strip()
        ok = httpx.get(second.url + "/api/2.0/mlflow/experiments/search?max_results=1",
                       headers={"Authorization": f"Bearer {secret}"})  # fmt: skip
        assert ok.status_code == 200
        refused = httpx.get(second.url + "/api/2.0/mlflow/experiments/search",
                            headers={"Authorization": f"Bearer {second.token}"})  # fmt: skip
        assert refused.status_code == 401  # the database was not empty: no new bootstrap token
    finally:
        second.stop()


def test_first_start_prints_a_token_once(external_mlflow: Mlflow, tmp_path: Path) -> None:
    data = tmp_path / "gw"
    env_token_free = {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": ""}
    gateway = start_gateway(data, "--upstream-url", external_mlflow.url, **env_token_free)
    try:
        log = gateway.log.read_text()
        printed = re.findall(r"^\s+(mlg_[A-Za-z0-9_-]{43})$", log, re.MULTILINE)
        assert len(printed) == 1
        response = httpx.get(gateway.url + "/version", auth=("admin", printed[0]))
        assert response.status_code == 200
    finally:
        gateway.stop()
    again = start_gateway(data, "--upstream-url", external_mlflow.url, **env_token_free)
    again.stop()
    assert len(re.findall(r"mlg_[A-Za-z0-9_-]{43}", again.log.read_text())) == 1  # still only one
    listed = again.cli("token", "list")
    assert listed.returncode == 0
    assert "admin" in listed.stdout and printed[0] not in listed.stdout


def test_two_replicas_follow_one_policy_within_2_s(
    external_mlflow: Mlflow, postgres: PostgresCluster, tmp_path: Path
) -> None:
    database = postgres.create_database()
    args = ("--upstream-url", external_mlflow.url, "--database-uri", database)
    first = start_gateway(tmp_path / "a", *args)
    key = (tmp_path / "a" / "secret.key").read_text().strip()
    second = start_gateway(tmp_path / "b", *args, token="mlg_" + "s" * 43,
                           MLFLOW_GUARD_SECRET_KEY=key)  # fmt: skip
    try:
        created = first.cli("token", "create", "--name", "late", "--role", "viewer",
                            "--resource", "experiment:nothing-yet", "--quiet",
                            "--database-uri", database)  # fmt: skip
        assert created.returncode == 0, created.stderr
        auth = {"Authorization": f"Bearer {created.stdout.strip()}"}
        url = "/api/2.0/mlflow/experiments/get?experiment_id=0"
        for replica in (first, second):
            response = httpx.get(replica.url + url, headers=auth)
            assert response.headers.get("x-guard-reason") == "permission_denied"
        started = time.monotonic()
        granted = first.cli("role", "assign", "--subject", "token:late", "--role", "viewer",
                            "--resource", "experiment:Default",
                            "--database-uri", database)  # fmt: skip
        assert granted.returncode == 0, granted.stderr
        elapsed = _until_both(first, second, url, auth, 200, started)
        assert elapsed < 3.0, f"took {elapsed:.2f} s (2 s, plus the CLI's own start-up)"

        # The same through the policy API of either replica: revoke through the second,
        # grant again through the first (one admin token: the database bootstrapped once).
        grant = ["p", "token:late", "viewer", "experiment:Default", "allow"]
        for via, document, status in (
            (second, {"remove": [grant]}, 403),
            (first, {"add": [grant]}, 200),
        ):
            started = time.monotonic()
            response = httpx.post(via.url + "/guard/api/policy/changes", json=document,
                                  headers={"Authorization": f"Bearer {first.token}"})  # fmt: skip
            assert response.status_code == 200, response.text
            elapsed = _until_both(first, second, url, auth, status, started)
            assert elapsed < 2.0, f"took {elapsed:.2f} s"
    finally:
        first.stop()
        second.stop()


def _until_both(
    first: Gateway, second: Gateway, url: str, auth: dict[str, str], status: int, started: float
) -> float:
    """Seconds from ``started`` until both replicas answer ``url`` with ``status``."""
    waiting = {first.url, second.url}
    while waiting and time.monotonic() - started < 10:
        for replica_url in list(waiting):
            if httpx.get(replica_url + url, headers=auth).status_code == status:
                waiting.discard(replica_url)
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    assert not waiting, f"replicas still not answering {status} after {elapsed:.1f} s"
    return elapsed
