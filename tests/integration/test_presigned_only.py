"""MLflow 3.18 in presigned-only mode behind the gateway, for real.

A `mlflow server --artifacts-presigned-only` of 3.18.0 whose artifacts destination is S3 served
by moto on a loopback port (the real S3 protocol; MLflow signs URLs with boto3, which its venv
carries). MLflow 3.18's own client (the server's venv) logs and downloads an artifact through
the gateway: it asks the gateway for URLs (``mpu/create``/``complete``, ``presigned/<path>``)
and moves the bytes to and from moto directly. A caller without update on the experiment gets
no upload URL, one without read no download URL, and every issuing request is in the audit
trail with its caller and resource. A logged model's upload URL (``model_id`` alone) needs
update on the model's experiment, and its bytes land under the model's artifact location.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from tests.conftest import free_port
from tests.integration.conftest import Gateway, Mlflow, clean_env, start_gateway, wait_ready
from tests.integration.test_authorization import make_token
from tests.integration.test_mlflow_releases import PYTHONS

pytestmark = [pytest.mark.integration, pytest.mark.mlflow_release]

BUCKET = "mlflow-presigned"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


@dataclass
class World:
    gateway: Gateway
    server: Mlflow
    experiment: str
    run: str
    tokens: dict[str, str]
    s3: str


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    moto.start()
    try:
        url = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=url, **{k.lower(): v for k, v in AWS.items()
                                               if k != "AWS_DEFAULT_REGION"},
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)  # fmt: skip
        yield url
    finally:
        moto.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, s3: str) -> Iterator[World]:
    home = tmp_path_factory.mktemp("presigned-only")
    port, log = free_port(), home / "server.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(PYTHONS["3.18.0"]), "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--serve-artifacts",
             "--artifacts-destination", f"s3://{BUCKET}/artifacts", "--artifacts-presigned-only"],
            stdout=out, stderr=subprocess.STDOUT, cwd=home, start_new_session=True,
            env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_S3_ENDPOINT_URL=s3,
                          **AWS),
        )  # fmt: skip
    server = Mlflow(f"http://127.0.0.1:{port}", proc)
    try:
        wait_ready(server.url, proc, log, "/health")
        info = httpx.get(server.url + "/api/3.0/mlflow/server-info").json()
        assert info.get("artifacts_presigned_only") is True, info
        gateway = start_gateway(home / "gateway", "--upstream-url", server.url)
        try:
            admin = {"Authorization": f"Bearer {gateway.token}"}
            name = f"presigned/team-{uuid.uuid4().hex[:8]}"
            created = httpx.post(gateway.url + "/api/2.0/mlflow/experiments/create",
                                 json={"name": name}, headers=admin)  # fmt: skip
            experiment = created.json()["experiment_id"]
            run = httpx.post(gateway.url + "/api/2.0/mlflow/runs/create",
                             json={"experiment_id": experiment}, headers=admin)  # fmt: skip
            tokens = {
                "writer": make_token(gateway, "writer", "editor", f"experiment:{name}"),
                "reader": make_token(gateway, "reader", "viewer", f"experiment:{name}"),
                "outsider": make_token(gateway, "outsider", "editor", "experiment:elsewhere"),
            }
            run_id = run.json()["run"]["info"]["run_id"]
            yield World(gateway, server, experiment, run_id, tokens, s3)
        finally:
            gateway.stop()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


def mlflow_client(
    world: World, token: str, code: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with MLflow 3.18's client (its own venv) against the gateway."""
    env = clean_env(MLFLOW_TRACKING_URI=world.gateway.url, MLFLOW_TRACKING_TOKEN=token,
                    MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")  # fmt: skip
    for name in AWS:  # the client needs no storage credentials: it holds signed URLs
        env.pop(name, None)
    return subprocess.run([str(PYTHONS["3.18.0"]), "-c", code, *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False)  # fmt: skip


LOG = "import sys, mlflow; mlflow.MlflowClient().log_artifact(sys.argv[1], sys.argv[2])"
DOWNLOAD = ("import sys, mlflow; print(open(mlflow.MlflowClient().download_artifacts("
            "sys.argv[1], 'report.txt', sys.argv[2])).read())")  # fmt: skip


def test_permitted_callers_move_bytes_through_presigned_urls(world: World, tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    report.write_text("presigned bytes")
    logged = mlflow_client(world, world.tokens["writer"], LOG, world.run, str(report))
    assert logged.returncode == 0, logged.stderr[-3000:]
    # The bytes are in the bucket, put there by the client, not by the gateway or MLflow.
    listed = boto3.client("s3", endpoint_url=world.s3,
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1").list_objects_v2(Bucket=BUCKET)  # fmt: skip
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert any(k.endswith(f"{world.run}/artifacts/report.txt") for k in keys), keys
    for who in ("writer", "reader"):
        down = mlflow_client(world, world.tokens[who], DOWNLOAD, world.run, str(tmp_path / who))
        assert down.returncode == 0, down.stderr[-3000:]
        assert down.stdout.strip() == "presigned bytes"
    # MLflow refuses the proxied transfer itself in this mode (the gateway forwards it).
    proxied = httpx.get(
        f"{world.gateway.url}/api/2.0/mlflow-artifacts/artifacts/"
        f"{world.experiment}/{world.run}/artifacts/report.txt",
        headers={"Authorization": f"Bearer {world.tokens['writer']}"},
    )
    assert proxied.status_code == 403 and proxied.json().get("artifacts_presigned_only"), (
        proxied.text
    )


def issuing(world: World) -> list[tuple[str, str, str, dict[str, object] | None]]:
    """(right, method, path, JSON body) of each URL-issuing request for the run's report.txt."""
    where = f"{world.experiment}/{world.run}/artifacts/report.txt"
    return [
        ("read", "GET", f"/api/2.0/mlflow-artifacts/presigned/{where}", None),
        ("read", "GET", f"/ajax-api/2.0/mlflow-artifacts/presigned/{where}", None),
        ("read", "POST", "/api/2.0/mlflow/artifacts/presigned-download-url",
         {"run_id": world.run, "path": "report.txt"}),
        ("update", "POST", f"/api/2.0/mlflow-artifacts/mpu/create/{where}",
         {"path": "report.txt", "num_parts": 1}),
        ("update", "POST", f"/ajax-api/2.0/mlflow-artifacts/mpu/create/{where}",
         {"path": "report.txt", "num_parts": 1}),
        ("update", "POST", "/api/2.0/mlflow/artifacts/presigned-upload-url",
         {"run_id": world.run, "path": "report.txt"}),
    ]  # fmt: skip


def test_callers_without_the_right_get_no_url_and_every_issuance_is_audited(
    world: World,
) -> None:
    sent: list[tuple[str, str, str]] = []
    for right, method, path, body in issuing(world):
        for who in ("reader", "outsider"):
            refused = who == "outsider" or right == "update"
            auth = {"Authorization": f"Bearer {world.tokens[who]}"}
            response = httpx.request(method, world.gateway.url + path, json=body, headers=auth)
            if refused:
                assert response.status_code == 403, (who, path, response.text)
                assert response.headers["x-guard-reason"] == "permission_denied"
                assert "http://127.0.0.1" not in response.text  # no URL
            else:
                assert response.status_code != 403, (who, path, response.text)
            sent.append((who, path, "deny" if refused else "allow"))
    deadline = time.monotonic() + 15
    while True:
        found = world.gateway.cli("audit", "export", "--format", "jsonl")
        assert found.returncode == 0, found.stderr
        records = [json.loads(line) for line in found.stdout.splitlines() if line.strip()]
        outcomes = {
            (r.get("principal"), r.get("path"), r.get("decision")): r.get("resource")
            for r in records if r.get("kind") == "outcome"
        }  # fmt: skip
        missing = [s for s in sent if (f"token:{s[0]}", s[1], s[2]) not in outcomes]
        if not missing:
            break
        assert time.monotonic() < deadline, missing
        time.sleep(0.5)
    for who, path, decision in sent:
        resource = outcomes[(f"token:{who}", path, decision)]
        assert resource and resource.startswith("experiment:presigned/team-"), (who, path, resource)


def test_a_logged_models_upload_url_needs_update_on_its_experiment(world: World) -> None:
    """``presigned-upload-url`` with only ``model_id`` (MLflow's server-info
    ``presigned_upload_model_id_supported``): the gateway judges the logged model's experiment,
    update as for the proxied upload it replaces; the writer's URL takes bytes straight to S3,
    and a body naming a run and a model is refused before MLflow."""
    admin = {"Authorization": f"Bearer {world.gateway.token}"}
    tag = uuid.uuid4().hex[:8]
    name = f"presigned/direct-{tag}"
    # Presigned uploads need a direct object-store location (MLflow refuses mlflow-artifacts:).
    created = httpx.post(
        world.gateway.url + "/api/2.0/mlflow/experiments/create",
        headers=admin,
        json={"name": name, "artifact_location": f"s3://{BUCKET}/direct-{tag}"},
    )
    assert created.status_code == 200, created.text
    experiment = created.json()["experiment_id"]
    model = httpx.post(world.gateway.url + "/api/2.0/mlflow/logged-models", headers=admin,
                       json={"experiment_id": experiment, "name": "weights"})  # fmt: skip
    assert model.status_code == 200, model.text
    model_id = model.json()["model"]["info"]["model_id"]
    tokens = {
        "writer": make_token(world.gateway, f"lm-writer-{tag}", "editor", f"experiment:{name}"),
        "reader": make_token(world.gateway, f"lm-reader-{tag}", "viewer", f"experiment:{name}"),
        "outsider": world.tokens["writer"],  # an editor of another experiment
    }

    def ask(who: str, body: dict[str, object], prefix: str) -> httpx.Response:
        auth = {"Authorization": f"Bearer {tokens[who]}"}
        url = f"{world.gateway.url}{prefix}/2.0/mlflow/artifacts/presigned-upload-url"
        return httpx.post(url, json=body, headers=auth)

    for prefix in ("/api", "/ajax-api"):
        for who in ("reader", "outsider"):
            refused = ask(who, {"model_id": model_id, "path": "w.bin"}, prefix)
            assert refused.status_code == 403, (prefix, who, refused.text)
            assert refused.headers["x-guard-reason"] == "permission_denied"
            assert "presigned_url" not in refused.text
        both = ask("writer", {"model_id": model_id, "run_id": world.run, "path": "w.bin"}, prefix)
        assert both.status_code == 400, both.text
        assert both.headers["x-guard-reason"] == "ambiguous_parameter"
        issued = ask("writer", {"modelId": model_id, "path": f"w{prefix[1:]}.bin"}, prefix)
        assert issued.status_code == 200, (prefix, issued.text)
        answer = issued.json()
        assert answer["presigned_url"].startswith(world.s3), answer
        put = httpx.put(answer["presigned_url"], content=b"model bytes",
                        headers=answer.get("headers", {}))  # fmt: skip
        assert put.status_code == 200, put.text
    listed = boto3.client("s3", endpoint_url=world.s3,
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1").list_objects_v2(Bucket=BUCKET)  # fmt: skip
    keys = [o["Key"] for o in listed.get("Contents", [])]
    for spelled in ("wapi.bin", "wajax-api.bin"):
        assert any(k.startswith(f"direct-{tag}/") and k.endswith(f"{model_id}/artifacts/{spelled}")
                   for k in keys), keys  # fmt: skip
