"""Directory login over TLS through a real gateway process and the real MLflow client: ``ldaps://``
with the right CA works (after failing over from a URL whose host the certificate does not name,
which the gateway's log reports as a TLS failure), and StartTLS against a certificate from an
unknown CA is 503 ``identity_unavailable`` for the client, never a login, with the log naming
the URL."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from mlflow import MlflowClient

from tests.integration.conftest import Gateway, Mlflow, start_gateway
from tests.slapd import PEOPLE, Slapd

pytestmark = [pytest.mark.integration, pytest.mark.ldap]


def tls_gateway(
    mlflow: Mlflow, slapd: Slapd, tmp: pytest.TempPathFactory, name: str, **ldap: str
) -> Gateway:
    return start_gateway(
        tmp.mktemp(name),
        "--upstream-url", mlflow.url,
        MLFLOW_GUARD_LDAP_BIND_DN=slapd.service_dn,
        MLFLOW_GUARD_LDAP_BIND_PASSWORD=slapd.service_password,
        MLFLOW_GUARD_LDAP_USER_BASE=PEOPLE,
        MLFLOW_GUARD_LDAP_USE_MEMBEROF="true",
        **ldap,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ldaps_gateway(
    external_mlflow: Mlflow, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    mismatch = slapd.ldaps_url.replace("127.0.0.1", "localhost")
    gateway = tls_gateway(
        external_mlflow, slapd, tmp_path_factory, "ldaps-gateway",
        MLFLOW_GUARD_LDAP_URLS=f"{mismatch},{slapd.ldaps_url}",
        MLFLOW_GUARD_LDAP_CA_FILE=slapd.ca_file,
    )  # fmt: skip
    try:
        yield gateway
    finally:
        gateway.stop()


def wait_for_log(gateway: Gateway, *needles: str) -> str:
    """The gateway's log once every needle is in one of its lines (bounded: 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        text = gateway.log.read_text(errors="replace")
        if any(all(n in line for n in needles) for line in text.splitlines()):
            return text
        assert time.monotonic() < deadline, f"no log line with {needles}:\n{text[-3000:]}"
        time.sleep(0.1)


def test_the_mlflow_client_logs_in_over_ldaps(
    ldaps_gateway: Gateway, slapd: Slapd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "bob-password")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert MlflowClient(tracking_uri=ldaps_gateway.url).search_experiments() is not None
    me = httpx.get(
        f"{ldaps_gateway.url}/guard/api/me", auth=("bob", "bob-password"), timeout=10
    ).json()
    assert me["subject"] == "user:bob" and "group:ldap/risk%20team" in me["groups"]
    mismatch = slapd.ldaps_url.replace("127.0.0.1", "localhost")
    wait_for_log(ldaps_gateway, "TLS failed", mismatch)


def test_an_unknown_ca_over_start_tls_is_503_through_the_gateway(
    external_mlflow: Mlflow, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> None:
    gateway = tls_gateway(
        external_mlflow, slapd, tmp_path_factory, "wrong-ca-gateway",
        MLFLOW_GUARD_LDAP_URLS=slapd.url, MLFLOW_GUARD_LDAP_START_TLS="true",
        MLFLOW_GUARD_LDAP_CA_FILE=slapd.wrong_ca_file,
    )  # fmt: skip
    try:
        for prefix in ["/api", "/ajax-api"]:
            response = httpx.get(
                f"{gateway.url}{prefix}/2.0/mlflow/experiments/search",
                params={"max_results": 1}, auth=("alice", "alice-password"), timeout=10,
            )  # fmt: skip
            assert response.status_code == 503, response.text
            assert response.headers["x-guard-reason"] == "identity_unavailable"
        headers = {"Authorization": f"Bearer {gateway.token}"}  # tokens keep working
        assert httpx.get(f"{gateway.url}/guard/api/me", headers=headers, timeout=10).is_success
        wait_for_log(gateway, "TLS failed", slapd.url)
    finally:
        gateway.stop()
