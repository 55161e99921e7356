"""Directory login with the real MLflow client: ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` checked against the throwaway slapd by a gateway process configured
through the environment, and a grant to a directory group (``group:ldap/risk%20team``) doing
what it says for its members and nothing for others."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.integration.conftest import Gateway, Mlflow, start_gateway
from tests.slapd import PEOPLE, Slapd

pytestmark = [pytest.mark.integration, pytest.mark.ldap]


@pytest.fixture(scope="module")
def ldap_gateway(
    external_mlflow: Mlflow, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gateway = start_gateway(
        tmp_path_factory.mktemp("ldap-gateway"),
        "--upstream-url", external_mlflow.url,
        MLFLOW_GUARD_LDAP_URLS=slapd.url,
        MLFLOW_GUARD_LDAP_BIND_DN=slapd.service_dn,
        MLFLOW_GUARD_LDAP_BIND_PASSWORD=slapd.service_password,
        MLFLOW_GUARD_LDAP_USER_BASE=PEOPLE,
        MLFLOW_GUARD_LDAP_USE_MEMBEROF="true",
    )  # fmt: skip
    try:
        added = gateway.cli(
            "policy", "add", "p, group:ldap/risk%20team, manager, experiment:risk-*"
        )
        assert added.returncode == 0, added.stderr
        yield gateway
    finally:
        gateway.stop()


def as_user(monkeypatch: pytest.MonkeyPatch, name: str, password: str) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def test_a_directory_user_works_with_the_mlflow_client(
    ldap_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(tracking_uri=ldap_gateway.url)
    name = f"risk-{uuid.uuid4().hex[:8]}"
    as_user(monkeypatch, "bob", "bob-password")  # in "Risk Team"
    deadline = time.monotonic() + 10  # the gateway polls for the policy change (1 s)
    while True:
        try:
            experiment_id = client.create_experiment(name)
            break
        except MlflowException as exc:
            if "PERMISSION_DENIED" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "lr", "0.01")
    client.log_metric(run.info.run_id, "auc", 0.9)
    assert client.get_run(run.info.run_id).data.params == {"lr": "0.01"}

    as_user(monkeypatch, "alice", "alice-password")  # a directory user without the grant
    with pytest.raises(MlflowException, match="PERMISSION_DENIED"):
        client.get_experiment(experiment_id)
    with pytest.raises(MlflowException, match="PERMISSION_DENIED"):
        client.create_experiment(f"risk-{uuid.uuid4().hex[:8]}")

    as_user(monkeypatch, "bob", "not-bobs-password")
    with pytest.raises(MlflowException, match="UNAUTHENTICATED"):
        client.get_experiment(experiment_id)


def test_gateway_tokens_still_work_beside_the_directory(
    ldap_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_user(monkeypatch, "admin", ldap_gateway.token)  # an mlg_ token as the Basic password
    client = MlflowClient(tracking_uri=ldap_gateway.url)
    assert client.search_experiments() is not None
