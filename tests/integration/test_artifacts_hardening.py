"""Artifacts through the real gateway and the real MLflow: what the MLflow client logs still lists
and downloads; a path that leads out of an artifact root is refused by the gateway before MLflow
sees it; HTML and SVG artifacts come back sandboxed on every route that serves artifact bytes."""

from __future__ import annotations

import http.client
import json
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import mlflow
import pytest
from mlflow import MlflowClient

from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration

HTML = b"<!doctype html><script>document.title = 'pwned'</script><p>report</p>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script><circle r="4"/></svg>'
PLAIN = {"a b.txt": b"space", "100%.txt": b"percent", "dir/x.txt": b"nested", "\u00e9.txt": b"e"}


@dataclass
class World:
    gateway: Gateway
    client: MlflowClient
    experiment_id: str
    run_id: str
    model_name: str
    model_id: str
    trace_id: str


@pytest.fixture(scope="module")
def world(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_TOKEN", gateway.token)
    patch.setenv("MLFLOW_TRACKING_URI", gateway.url)  # nothing falls back to ./mlflow.db
    patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    patch.setenv("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        patch.delenv(name, raising=False)
    files = tmp_path_factory.mktemp("artifacts")
    (files / "site").mkdir()
    (files / "site" / "page.html").write_bytes(HTML)
    (files / "site" / "image.svg").write_bytes(SVG)
    (files / "plain" / "dir").mkdir(parents=True)
    for name, data in PLAIN.items():
        (files / "plain" / name).write_bytes(data)
    client = MlflowClient(tracking_uri=gateway.url, registry_uri=gateway.url)
    tag = uuid.uuid4().hex[:8]
    experiment_id = client.create_experiment(f"artifacts-{tag}")
    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    client.log_artifacts(run_id, str(files / "site"))
    client.log_artifacts(run_id, str(files / "site"), artifact_path="site")
    client.log_artifacts(run_id, str(files / "plain"), artifact_path="plain")
    model_name = f"site-{tag}"
    client.create_registered_model(model_name)
    client.create_model_version(model_name, f"{run.info.artifact_uri}/site", run_id)
    model = client.create_logged_model(experiment_id, name="site")
    client.log_model_artifacts(model.model_id, str(files / "site"))
    # Traces are exported to the global tracking URI, not to a client's.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(gateway.url)
    try:
        with warnings.catch_warnings():
            # MLflow's tracing warns about its own type hints; the suite makes warnings errors.
            warnings.simplefilter("ignore")
            span = client.start_trace("hardening", experiment_id=experiment_id)
            client.end_trace(span.trace_id)
            mlflow.flush_trace_async_logging()
            trace_id = span.trace_id
    finally:
        mlflow.set_tracking_uri(previous)
    assert trace_id.startswith("tr-"), trace_id
    yield World(gateway, client, experiment_id, run_id, model_name, model.model_id, trace_id)
    patch.undo()


def request(
    world: World,
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, list[str]], bytes]:
    """Send the target byte for byte: no client-side normalization of dot segments."""
    connection = http.client.HTTPConnection("127.0.0.1", world.gateway.port, timeout=30)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        connection.putheader("Authorization", f"Bearer {world.gateway.token}")
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if method in ("PUT", "POST", "DELETE"):
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body or None)
        response = connection.getresponse()
        data = response.read()
        answer: dict[str, list[str]] = {}
        for name, value in response.getheaders():
            answer.setdefault(name.lower(), []).append(value)
        return response.status, answer, data
    finally:
        connection.close()


def test_what_the_client_logs_still_lists_and_downloads(world: World, tmp_path: Path) -> None:
    client = world.client
    listed = {f.path for f in client.list_artifacts(world.run_id)}
    assert listed == {"page.html", "image.svg", "site", "plain"}
    assert {f.path for f in client.list_artifacts(world.run_id, "plain/")} >= {
        "plain/a b.txt", "plain/100%.txt", "plain/dir", "plain/\u00e9.txt",
    }  # fmt: skip
    out = Path(client.download_artifacts(world.run_id, "plain", str(tmp_path)))
    for name, data in PLAIN.items():
        assert (out / name).read_bytes() == data
    assert {f.path for f in client.list_logged_model_artifacts(world.model_id)} == {
        "page.html", "image.svg",
    }  # fmt: skip


def artifact_routes(world: World, name: str) -> list[str]:
    """Every route that answers with an artifact's bytes, naming ``name``."""
    root = f"{world.experiment_id}/{world.run_id}/artifacts"
    return [
        f"/get-artifact?run_uuid={world.run_id}&path={quote(name)}",
        f"/get-artifact?run_id={world.run_id}&path=site/{quote(name)}",
        f"/model-versions/get-artifact?name={world.model_name}&version=1&path={quote(name)}",
        f"/ajax-api/2.0/mlflow/logged-models/{world.model_id}/artifacts/files"
        f"?artifact_file_path={quote(name)}",
        f"/api/2.0/mlflow-artifacts/artifacts/{root}/{quote(name)}",
        f"/ajax-api/2.0/mlflow-artifacts/artifacts/{root}/site/{quote(name)}",
    ]


@pytest.mark.parametrize(
    ("name", "data", "content_type"),
    [("page.html", HTML, "text/html"), ("image.svg", SVG, "image/svg+xml")],
)
def test_html_and_svg_artifacts_are_sandboxed_on_every_route(
    world: World, name: str, data: bytes, content_type: str
) -> None:
    for target in artifact_routes(world, name):
        status, headers, body = request(world, "GET", target)
        assert status == 200, (target, body[:300])
        assert body == data, target
        assert headers["content-type"][0].startswith(content_type), target
        assert headers["content-security-policy"] == ["frame-ancestors 'self'; sandbox"], target
        assert headers["x-content-type-options"] == ["nosniff"], target
        # What MLflow sends on every artifact route, passed on: a download, never inline.
        assert headers["content-disposition"] == [f"attachment; filename={name}"], target
        head_status, head_headers, _ = request(world, "HEAD", target)
        if head_status == 200:  # where HEAD is served at all, it is sandboxed the same
            assert head_headers["content-security-policy"] == headers["content-security-policy"]


def test_ranges_and_conditional_downloads_reach_mlflow(world: World) -> None:
    # Range and the conditional headers are on the allowlist for resumable, cached downloads.
    for target in artifact_routes(world, "page.html"):
        status, headers, body = request(world, "GET", target, headers={"Range": "bytes=0-8"})
        assert (status, body) == (206, HTML[:9]), target
        assert headers["content-security-policy"] == ["frame-ancestors 'self'; sandbox"]
        if "/mlflow-artifacts/" in target:
            continue  # MLflow's native FileResponse sends an ETag but answers no condition
        _, full, _ = request(world, "GET", target)
        status, _, body = request(world, "GET", target, headers={"If-None-Match": full["etag"][0]})
        assert (status, body) == (304, b""), target


def test_the_trace_artifact_is_sandboxed(world: World) -> None:
    for version in ("2.0", "3.0"):
        target = f"/ajax-api/{version}/mlflow/get-trace-artifact?request_id={world.trace_id}"
        status, headers, body = request(world, "GET", target)
        assert status == 200, body[:300]
        assert "spans" in json.loads(body)
        assert headers["content-security-policy"] == ["frame-ancestors 'self'; sandbox"]
        assert headers["content-disposition"] == ["attachment; filename=traces.json"]


def test_api_answers_are_not_sandboxed(world: World) -> None:
    status, headers, _ = request(
        world, "GET", f"/api/2.0/mlflow/artifacts/list?run_id={world.run_id}"
    )
    assert status == 200
    assert headers["content-security-policy"] == ["frame-ancestors 'self'"]


def traversals(world: World) -> list[tuple[str, str]]:
    """(method, target) pairs that try to leave an artifact root, on both prefixes."""
    root = f"{world.experiment_id}/{world.run_id}/artifacts"
    outs = ["..%2F..%2F..%2Fmlflow.db", "%252e%252e%2F%252e%252e%2Fmlflow.db", "%2Fetc%2Fpasswd",
            "file%3A%2F%2F%2Fetc%2Fpasswd", "file%3Aetc%2Fpasswd", "page.html%23x", "a%5Cb",
            "a%00b", "%2531%2Fx", "site%2F.%2Fpage.html"]  # fmt: skip
    found = []
    for out in outs:
        found += [
            ("GET", f"/get-artifact?run_uuid={world.run_id}&path={out}"),
            ("GET", f"/model-versions/get-artifact?name={world.model_name}&version=1&path={out}"),
            ("GET", f"/ajax-api/2.0/mlflow/logged-models/{world.model_id}/artifacts/files"
                    f"?artifact_file_path={out}"),
            ("GET", f"/ajax-api/3.0/mlflow/get-trace-artifact?request_id={world.trace_id}"
                    f"&path={out}"),
            ("POST", f"/ajax-api/2.0/mlflow/upload-artifact?run_uuid={world.run_id}&path={out}"),
        ]  # fmt: skip
        for prefix in ("/api", "/ajax-api"):
            found += [
                ("GET", f"{prefix}/2.0/mlflow/artifacts/list?run_id={world.run_id}&path={out}"),
                ("GET", f"{prefix}/2.0/mlflow-artifacts/artifacts?path={out}"),
                ("GET", f"{prefix}/2.0/mlflow/logged-models/{world.model_id}/artifacts/"
                        f"directories?artifact_directory_path={out}"),
            ]  # fmt: skip
    for out in ("%252e%252e/%252e%252e/mlflow.db", "%25%32%65%25%32%65/x", "%2531/x", "a%2523b",
                "a;"):  # fmt: skip
        for prefix in ("/api", "/ajax-api"):
            for method in ("GET", "PUT", "DELETE"):
                found.append((method, f"{prefix}/2.0/mlflow-artifacts/artifacts/{root}/{out}"))
            for step in ("create", "complete", "abort"):
                found.append(("POST", f"{prefix}/2.0/mlflow-artifacts/mpu/{step}/{root}/{out}"))
    return found


def test_ways_out_of_an_artifact_root_are_refused_by_the_gateway(world: World) -> None:
    targets = traversals(world)
    assert len(targets) > 150
    for method, target in targets:
        status, headers, body = request(world, method, target, b"x" if method == "PUT" else b"")
        assert status == 400, (method, target, status, body[:300])
        # Refused by the gateway (not by MLflow's own check): the gateway's reason header.
        assert headers["x-guard-reason"][0] in {"artifact_path_invalid", "path_not_canonical"}, (
            method,
            target,
        )
    # Nothing was written or removed on the way: the run's artifacts are as the client left them.
    assert {f.path for f in world.client.list_artifacts(world.run_id)} == {
        "page.html", "image.svg", "site", "plain",
    }  # fmt: skip
