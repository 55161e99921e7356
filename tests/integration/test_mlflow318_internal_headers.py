"""A real MLflow 3.18.0 with basic-auth honours ``X-MLflow-Assistant-Delegation``; through the
gateway it never arrives.

The server (from the 3.18 venv, ``make test`` builds it) runs basic-auth with
``default_permission = READ`` and an authorization function that treats a request without Basic
credentials as the user ``nobody`` (tests/integration/mlflow318_auth.py), and with a known
delegation signing key. Sent straight to MLflow, a delegation credential for ``admin`` lets
``nobody``'s request set a tag on the default experiment (the control: this MLflow honours the
header). Sent through the gateway in any spelling, on /api and /ajax-api, the same request
reaches MLflow as ``nobody`` and is refused, and the tag is not set.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.integration.conftest import Gateway, clean_env, start_gateway, wait_ready

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PYTHON_318 = ROOT / ".venv-mlflow-3.18" / "bin" / "python"
KEY = "k" * 64
ADMIN = ("admin", "admin-password-" + "x" * 12)
HEADER = "X-MLflow-Assistant-Delegation"


def delegation(username: str, key: str = KEY, ttl: float = 300) -> str:
    """``v1:<user>:<expiry_ms>:<sig>`` as mlflow/server/assistant/delegation.py mints it."""
    expiry_ms = int((time.time() + ttl) * 1000)
    message = f"v1\n{username}\n{expiry_ms}".encode()
    sig = base64.urlsafe_b64encode(hmac.new(key.encode(), message, hashlib.sha256).digest())
    return f"v1:{username}:{expiry_ms}:{sig.decode()}"


@pytest.fixture(scope="module")
def mlflow318(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not PYTHON_318.exists():
        pytest.fail(f"{PYTHON_318} is missing: run `make test` (it builds the 3.18 venv)")
    # basic-auth imports Flask-WTF (MLflow's "auth" extra), which the 3.18 venv must carry.
    check = subprocess.run([str(PYTHON_318), "-c", "import flask_wtf"], check=False)
    if check.returncode != 0:
        pytest.fail(f"{PYTHON_318} lacks flask-wtf (mlflow[auth]); add it to the 3.18 venv's deps")
    home = tmp_path_factory.mktemp("mlflow318-auth")
    ini = home / "auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{home}/auth.db\nadmin_username = {ADMIN[0]}\n"
        f"admin_password = {ADMIN[1]}\n"
        "authorization_function = tests.integration.mlflow318_auth:authenticate\n"
    )
    port = free_port()
    log = home / "server.log"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = clean_env(
        GUARD_TEST_SIGNING_KEY=KEY, MLFLOW_AUTH_CONFIG_PATH=str(ini), PYTHONPATH=path,
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_FLASK_SERVER_SECRET_KEY="f" * 32,
    )  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(PYTHON_318), "-m", "tests.integration.mlflow318_auth", "server",
             "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
             "--serve-artifacts", "--artifacts-destination", str(home / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log, "/health")
        created = httpx.post(
            f"{url}/api/2.0/mlflow/users/create", auth=ADMIN, timeout=30,
            json={"username": "nobody", "password": "nobody-password-123"},
        )  # fmt: skip
        assert created.status_code == 200, created.text
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


@pytest.fixture(scope="module")
def gateway318(tmp_path_factory: pytest.TempPathFactory, mlflow318: str) -> Iterator[Gateway]:
    running = start_gateway(tmp_path_factory.mktemp("gw318"), "--upstream-url", mlflow318)
    yield running
    running.stop()


def tags(mlflow318: str) -> dict[str, str]:
    response = httpx.get(
        f"{mlflow318}/api/2.0/mlflow/experiments/get", params={"experiment_id": "0"}, auth=ADMIN,
        timeout=30,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    return {t["key"]: t["value"] for t in response.json()["experiment"].get("tags", [])}


def set_tag(url: str, prefix: str, key: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{url}{prefix}/2.0/mlflow/experiments/set-experiment-tag", headers=headers, timeout=30,
        json={"experiment_id": "0", "key": key, "value": "v"},
    )  # fmt: skip


def test_mlflow_318_honours_the_header_sent_straight_to_it(mlflow318: str) -> None:
    assert set_tag(mlflow318, "/api", "direct-none", {}).status_code == 403
    forged = {HEADER: delegation("admin", key="x" * 64)}
    assert set_tag(mlflow318, "/api", "direct-forged", forged).status_code == 403
    response = set_tag(mlflow318, "/api", "direct-admin", {HEADER: delegation("admin")})
    assert response.status_code == 200, response.text
    assert "direct-admin" in tags(mlflow318)


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
@pytest.mark.parametrize(
    "spelling", [HEADER, HEADER.lower(), HEADER.upper(), "X_MLflow_Assistant_Delegation"]
)
def test_the_header_never_reaches_mlflow_through_the_gateway(
    mlflow318: str, gateway318: Gateway, prefix: str, spelling: str
) -> None:
    key = f"via-gateway-{prefix.strip('/')}-{spelling}"
    headers = {"Authorization": f"Bearer {gateway318.token}", spelling: delegation("admin")}
    response = set_tag(gateway318.url, prefix, key, headers)
    # MLflow's own refusal of nobody (the gateway let its admin through, adding no reason).
    assert response.status_code == 403, response.text
    assert "x-guard-reason" not in response.headers
    assert key not in tags(mlflow318)
    # The same request without the header, and a read, show the path works: nobody may read.
    del headers[spelling]
    assert set_tag(gateway318.url, prefix, key, headers).status_code == 403
    read = httpx.get(
        f"{gateway318.url}{prefix}/2.0/mlflow/experiments/get", params={"experiment_id": "0"},
        headers={**headers, spelling: delegation("admin")}, timeout=30,
    )  # fmt: skip
    assert read.status_code == 200, read.text
