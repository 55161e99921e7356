"""The real MLflow Python client, unchanged, through the gateway."""

from __future__ import annotations

import datetime as dt
import statistics
import time
import uuid
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from guard.identity.tokens import TokenStore
from guard.keys import load_secret_key
from guard.store.db import build_engine
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration


def use_bearer(monkeypatch: pytest.MonkeyPatch, token: str) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)


def use_basic(monkeypatch: pytest.MonkeyPatch, name: str, token: str) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", token)


@pytest.fixture(autouse=True)
def no_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    # Refusals must surface at once, not after the client's backoff.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for name in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("scheme", ["bearer", "basic"])
def test_tracking_and_registry_workflow(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scheme: str
) -> None:
    if scheme == "bearer":
        use_bearer(monkeypatch, gateway.token)
    else:
        use_basic(monkeypatch, "admin", gateway.token)
    client = MlflowClient(tracking_uri=gateway.url, registry_uri=gateway.url)
    tag = uuid.uuid4().hex[:8]

    experiment_id = client.create_experiment(f"fraud-{scheme}-{tag}")
    assert client.get_experiment_by_name(f"fraud-{scheme}-{tag}").experiment_id == experiment_id
    client.set_experiment_tag(experiment_id, "team", "risk")
    run = client.create_run(experiment_id, tags={"stage": "train"})
    run_id = run.info.run_id
    client.log_param(run_id, "lr", "0.01")
    client.log_metric(run_id, "auc", 0.91, step=1)
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric("loss", 0.3, now, 1), Metric("loss", 0.2, now, 2)],
        params=[Param("depth", "6")],
        tags=[RunTag("owner", "ci")],
    )
    client.set_tag(run_id, "reviewed", "yes")
    client.delete_tag(run_id, "reviewed")

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"\x00\x01" * 5000)
    (tmp_path / "report.txt").write_text("ok")
    client.log_artifact(run_id, str(tmp_path / "report.txt"))
    client.log_artifacts(run_id, str(tmp_path / "model"), artifact_path="model")
    listed = {f.path for f in client.list_artifacts(run_id)}
    assert listed == {"report.txt", "model"}
    out = Path(client.download_artifacts(run_id, "model", str(tmp_path / "down")))
    assert (out / "weights.bin").read_bytes() == b"\x00\x01" * 5000

    fetched = client.get_run(run_id)
    assert fetched.data.params == {"lr": "0.01", "depth": "6"}
    assert fetched.data.metrics["loss"] == 0.2
    assert fetched.data.tags["owner"] == "ci" and "reviewed" not in fetched.data.tags
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [0.3, 0.2]
    found = client.search_runs([experiment_id], filter_string="params.lr = '0.01'")
    assert [r.info.run_id for r in found] == [run_id]
    client.set_terminated(run_id)

    name = f"fraud-detector-{scheme}-{tag}"
    client.create_registered_model(name, description="d")
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id)
    client.set_registered_model_alias(name, "champion", version.version)
    assert client.get_model_version_by_alias(name, "champion").version == version.version
    client.set_model_version_tag(name, version.version, "validated", "true")
    client.update_model_version(name, version.version, description="ok")
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == [
        version.version
    ]
    client.delete_registered_model_alias(name, "champion")
    assert client.get_registered_model(name).aliases == {}
    client.delete_run(run_id)
    client.delete_experiment(experiment_id)


def test_no_credentials_is_unauthenticated(gateway: Gateway) -> None:
    client = MlflowClient(tracking_uri=gateway.url)
    with pytest.raises(MlflowException) as info:
        client.search_experiments()
    assert info.value.error_code == "UNAUTHENTICATED"


def test_wrong_basic_user_is_refused(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    use_basic(monkeypatch, "someone", gateway.token)
    with pytest.raises(MlflowException) as info:
        MlflowClient(tracking_uri=gateway.url).search_experiments()
    assert info.value.error_code == "UNAUTHENTICATED"


def test_cli_token_works_until_revoked(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ci-{uuid.uuid4().hex[:6]}"
    created = gateway.cli("token", "create", "--name", name, "--role", "admin", "--quiet")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    use_bearer(monkeypatch, secret)
    client = MlflowClient(tracking_uri=gateway.url)
    client.search_experiments()
    listed = gateway.cli("token", "list")
    assert name in listed.stdout and secret not in listed.stdout

    assert gateway.cli("token", "revoke", name).returncode == 0
    deadline = time.monotonic() + 10  # tokens.cache_ttl is 0.5 s in these tests
    refused: MlflowException | None = None
    while refused is None and time.monotonic() < deadline:
        try:
            client.search_experiments()
        except MlflowException as exc:
            refused = exc
        time.sleep(0.2)
    assert refused is not None, "a revoked token was still accepted after 10 s"
    assert refused.error_code == "UNAUTHENTICATED"
    assert "revoked" in refused.message


def test_expired_token_is_refused(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = build_engine(f"sqlite:///{gateway.data_dir / 'guard.db'}")
    key = load_secret_key(gateway.data_dir / "secret.key", {}, create=False)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    _, secret = TokenStore(engine, key, clock=lambda: past).create("old", "admin", 86400)
    engine.dispose()
    use_bearer(monkeypatch, secret)
    with pytest.raises(MlflowException) as info:
        MlflowClient(tracking_uri=gateway.url).search_experiments()
    assert info.value.error_code == "UNAUTHENTICATED"
    assert "expired" in info.value.message


def test_a_browser_is_sent_to_the_login_page_and_basic_still_reaches_the_ui(
    gateway: Gateway,
) -> None:
    page = httpx.get(gateway.url + "/", headers={"Accept": "text/html"})
    assert page.status_code == 303
    assert page.headers["location"] == "/guard/login?next=%2F"
    assert "www-authenticate" not in page.headers
    login = httpx.get(gateway.url + page.headers["location"], headers={"Accept": "text/html"})
    assert login.status_code == 200 and login.headers["content-type"].startswith("text/html")
    api = httpx.get(gateway.url + "/api/2.0/mlflow/experiments/search?max_results=1")
    assert api.status_code == 401
    assert api.headers.get_list("www-authenticate")[0].startswith('Basic realm="mlflow-guard"')
    page = httpx.get(gateway.url + "/", auth=("admin", gateway.token))
    assert page.status_code == 200
    assert "<title>MLflow</title>" in page.text
    assert page.headers["x-frame-options"] == "SAMEORIGIN"
    script = page.text.split('src="', 1)[1].split('"', 1)[0]
    asset = httpx.get(f"{gateway.url}/{script}", auth=("admin", gateway.token))
    assert asset.status_code == 200 and len(asset.content) > 10000
    ajax = httpx.get(
        gateway.url + "/ajax-api/2.0/mlflow/experiments/search?max_results=1",
        auth=("admin", gateway.token),
    )
    assert ajax.status_code == 200 and "experiments" in ajax.json()


def test_unclassified_routes_are_refused_live(gateway: Gateway) -> None:
    auth = ("admin", gateway.token)
    for method, path in [
        ("POST", "/ajax-api/3.0/mlflow/assistant/message"),
        ("GET", "/ajax-api/3.0/jobs/x"),
        ("POST", "/api/2.0/mlflow/webhooks"),
        ("POST", "/ajax-api/3.0/mlflow/demo/delete"),
        ("GET", "/metrics"),
        ("GET", "/gateway/mlflow/v1/models"),
    ]:
        response = httpx.request(method, gateway.url + path, auth=auth, json={})
        assert response.headers.get("x-guard-reason") == "route_not_classified", (
            path,
            response.text,
        )
        assert response.status_code == 403


def test_keep_alive_requests_do_not_wait_for_delayed_acks(gateway: Gateway) -> None:
    # With TCP_NODELAY off on either hop, every keep-alive request after the first waits ~40 ms.
    auth = ("admin", gateway.token)
    with httpx.Client(auth=auth) as client:
        for path in ("/guard/health", "/health", "/version"):
            timings = []
            for _ in range(40):
                started = time.perf_counter()
                assert client.get(gateway.url + path).status_code == 200
                timings.append(time.perf_counter() - started)
            steady = sorted(timings[5:])
            # Forwarded requests include MLflow (~15 ms here) and the audit intent's fsync; a
            # delayed ACK would add ~40 ms to each.
            assert statistics.median(steady) < 0.035, (path, steady)
            assert steady[int(len(steady) * 0.8)] < 0.045, (path, steady)
