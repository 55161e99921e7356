"""Artifact paths: every spelling of a way out is refused before MLflow sees it.

The routes come from the route table (every row with an ``artifact_path`` URL parameter) and
from ``PATH_FIELDS`` (rows taking a path in the query string or body), so a new row of either
kind is tested without anyone remembering to.
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from starlette.types import Receive, Scope, Send

from guard.app import build_gateway
from guard.authz.routes import load_routes
from guard.config import load_settings
from guard.edge.artifactpaths import DOWNLOADS, PATH_FIELDS, validate_artifact_path
from tests.servers import ServerThread, read_request_body, send_response

TOKEN = "mlg_" + "p" * 43
ENV = {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": TOKEN, "MLFLOW_GUARD_SECRET_KEY": "s" * 40}
ROUTES = load_routes()

GOOD = [
    "", "x.txt", "model/weights.bin", "dir/", "1/r1/artifacts/model/MLmodel", "100%.txt",
    "a b.txt", "é/ü.txt", "a;b", "a+b", "a,b=c", "2026-12-05T10:00:00.json", "~user", "...", ".x",
]  # fmt: skip
# Each as MLflow's handler would receive it, i.e. after the one decoding of the transport.
BAD = [
    "..", "../secret", "a/../../b", "a/..", "./a", "a/./b", ".", "a//b", "//host/share",
    "/etc/passwd", "/", "%2e%2e/secret", "%2E%2E/secret", "%252e%252e/secret", "..%2fsecret",
    "%2fetc/passwd", "a%2fb", "%31/r1/artifacts/x", "%2531/x", "%25", "a%20b", "a%00b",
    "file:///etc/passwd", "file:etc/passwd", "FILE:/etc/passwd", "s3://bucket/key",
    "http://evil.example/x", "mlflow-artifacts:/1/x", "C:\\windows", "C:/windows", "c:x",
    "a#b", "#", "a?b", "a?", "a;", "a\\b", "..\\secret", "a\x00b", "a\nb", "a\rb", "a\tb",
    "a\x7fb", "a\x1bb", "//[x/y",
]  # fmt: skip


@pytest.mark.parametrize("path", GOOD)
def test_canonical_relative_paths_pass(path: str) -> None:
    assert validate_artifact_path(path) is None


@pytest.mark.parametrize("path", BAD)
def test_ways_out_are_refused(path: str) -> None:
    assert validate_artifact_path(path) is not None


def test_the_lists_name_routes_the_table_has() -> None:
    templates = {route.path for route in ROUTES}
    assert set(PATH_FIELDS) <= templates
    assert templates >= DOWNLOADS


# Through the whole gateway, against a fake MLflow that counts what reaches it.


class Upstream:
    def __init__(self) -> None:
        self.forwarded: list[tuple[str, str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_request_body(receive)
        if scope["path"] == "/version":
            await send_response(send, 200, b"3.17.2")
            return
        if any(k == b"x-forwarded-for" for k, _ in scope["headers"]):  # a caller's request
            query = scope["query_string"].decode()
            self.forwarded.append((scope["path"], query, body.decode("latin-1")))
        await send_response(send, 200, b"{}", [(b"content-type", b"application/json")])


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Upstream]]:
    upstream = Upstream()
    data: Path = tmp_path_factory.mktemp("artifactpaths")
    with ServerThread(upstream, lifespan="off") as mlflow:
        loaded = load_settings(
            {"upstream.url": mlflow.url, "storage.data_dir": str(data)}, {}, None
        )
        assert loaded.problems == []
        with ServerThread(build_gateway(loaded.settings, ENV)) as server:
            yield server.url, upstream


def send(url: str, method: str, target: str, body: bytes = b"") -> tuple[int, str]:
    """Send the target byte for byte (no client-side normalization of dot segments)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", "localhost")
        connection.putheader("Authorization", f"Bearer {TOKEN}")
        if body or method in ("POST", "PUT", "PATCH", "DELETE"):
            connection.putheader("Content-Length", str(len(body)))
        if body:
            connection.putheader("Content-Type", "application/json")
        connection.endheaders(body or None)
        response = connection.getresponse()
        response.read()
        return response.status, response.headers.get("x-guard-reason", "")
    finally:
        connection.close()


def url_param_routes() -> list[tuple[str, str]]:
    """(method, template with {} for the artifact path) of every row with the URL parameter."""
    found = set()
    for route in ROUTES:
        if route.refuse or not re.search(
            r"<path:artifact_path>|\{artifact_path:path\}", route.path
        ):
            continue
        template = re.sub(r"<path:artifact_path>|\{artifact_path:path\}", "{}", route.path)
        found.add((route.method, template))
        if route.method == "GET":
            found.add(("HEAD", template))
    return sorted(found)


# The other parameters each query/body route needs beside its path.
CONTEXT = {
    "/get-artifact": {"run_id": "r1"},
    "/model-versions/get-artifact": {"name": "m", "version": "1"},
    "/ajax-api/2.0/mlflow/get-trace-artifact": {"request_id": "tr-1"},
    "/ajax-api/3.0/mlflow/get-trace-artifact": {"request_id": "tr-1"},
    "/ajax-api/2.0/mlflow/upload-artifact": {"run_uuid": "r1"},
    "artifacts/list": {"run_id": "r1"},
    "presigned-download-url": {"run_id": "r1"},
    "presigned-upload-url": {"run_id": "r1"},
}


def field_routes() -> list[tuple[str, str, str, str]]:
    """(method, concrete path, field, where) for every row taking a path in query or body."""
    found = []
    for route in ROUTES:
        for field, source in PATH_FIELDS.get(route.path, ()):
            path = route.path.replace("<model_id>", "m-1")
            if route.method in ("GET", "DELETE") or source == "query":
                found.append((route.method, path, field, "query"))
                if route.method == "GET":
                    found.append(("HEAD", path, field, "query"))
            else:
                found.append((route.method, path, field, "body"))
    return sorted(found)


def context(path: str) -> dict[str, str]:
    return next((v for k, v in CONTEXT.items() if path == k or path.endswith(k)), {})


def test_every_route_taking_a_path_is_covered() -> None:
    params = url_param_routes()
    fields = field_routes()
    # Both prefixes of the proxied artifact routes: download, upload, delete, mpu, presigned.
    assert params == sorted(
        (method, f"{prefix}/2.0/mlflow-artifacts/{where}/{{}}")
        for prefix in ("/api", "/ajax-api")
        for method, where in (
            ("GET", "artifacts"), ("HEAD", "artifacts"), ("PUT", "artifacts"),
            ("DELETE", "artifacts"), ("POST", "mpu/create"), ("POST", "mpu/complete"),
            ("POST", "mpu/abort"), ("GET", "presigned"), ("HEAD", "presigned"),
        )
    )  # fmt: skip
    assert {f[1] for f in fields} >= {"/get-artifact", "/model-versions/get-artifact",
                                      "/api/2.0/mlflow/artifacts/list",
                                      "/ajax-api/2.0/mlflow/artifacts/list"}  # fmt: skip


# Spellings in the URL path: before the transport's one decoding.
URL_BAD = {
    "%252e%252e/secret": "artifact_path_invalid",
    "a/%252e%252e/%252e%252e/secret": "artifact_path_invalid",
    "%25%32%65%25%32%65/secret": "artifact_path_invalid",
    "a%252Fb": "artifact_path_invalid",
    "%2531/x": "artifact_path_invalid",
    "a%2523b": "artifact_path_invalid",
    "a%23b": "artifact_path_invalid",
    "a%3Fb": "artifact_path_invalid",
    "a%5Cb": "path_not_canonical",
    "..%5Csecret": "path_not_canonical",
    "file:etc/passwd": "artifact_path_invalid",
    "s3:%2F%2Fbucket%2Fkey": "",  # '//' in the path: the route classifier refuses first
    "C:%5Cwindows": "path_not_canonical",
    "C:windows": "artifact_path_invalid",
    "a;": "artifact_path_invalid",
    "../secret": "path_not_canonical",
    "%2e%2e/secret": "path_not_canonical",
    "..%2Fsecret": "path_not_canonical",
    "%2F%2Fetc/passwd": "path_not_canonical",
    "/etc/passwd": "path_not_canonical",
    "file:%2F%2F%2Fetc%2Fpasswd": "path_not_canonical",
    "a%00b": "path_not_canonical",
    "./x": "path_not_canonical",
}


@pytest.mark.parametrize(("method", "template"), url_param_routes())
def test_url_paths_are_refused_before_mlflow(
    gateway: tuple[str, Upstream], method: str, template: str
) -> None:
    url, upstream = gateway
    for raw, reason in URL_BAD.items():
        before = len(upstream.forwarded)
        status, got = send(url, method, template.format(raw))
        assert status == 400, (raw, status, got)
        assert got in ({reason} if reason else {"path_not_canonical", "artifact_path_invalid"}), (
            raw,
            got,
        )
        assert len(upstream.forwarded) == before, raw
    status, _ = send(url, method, template.format("1/r1/artifacts/a%20b%25.txt"))
    assert status == 200
    assert upstream.forwarded[-1][0] == template.format("1/r1/artifacts/a b%.txt")


@pytest.mark.parametrize(("method", "path", "field", "where"), field_routes())
def test_query_and_body_paths_are_refused_before_mlflow(
    gateway: tuple[str, Upstream], method: str, path: str, field: str, where: str
) -> None:
    url, upstream = gateway
    extra = context(path)
    for value in BAD:
        before = len(upstream.forwarded)
        if where == "query":
            query = "&".join(f"{k}={quote(v, safe='')}" for k, v in {**extra, field: value}.items())
            status, reason = send(url, method, f"{path}?{query}")
        else:
            body = json.dumps({**extra, field: value}).encode()
            status, reason = send(url, method, path, body)
        assert (status, reason) == (400, "artifact_path_invalid"), (value, status, reason)
        assert len(upstream.forwarded) == before, value
    for value in GOOD:
        if where == "query":
            query = "&".join(f"{k}={quote(v, safe='')}" for k, v in {**extra, field: value}.items())
            status, reason = send(url, method, f"{path}?{query}")
        else:
            status, reason = send(url, method, path, json.dumps({**extra, field: value}).encode())
        assert status == 200, (value, status, reason)


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
def test_the_message_routes_read_the_path_as_mlflow_does(
    gateway: tuple[str, Upstream], prefix: str
) -> None:
    url, upstream = gateway
    directories = f"{prefix}/2.0/mlflow/logged-models/m-1/artifacts/directories"
    listing = f"{prefix}/2.0/mlflow/artifacts/list"
    # Protobuf JSON takes either spelling of a field; a repeat of either is ambiguous.
    assert send(url, "GET", f"{directories}?artifactDirectoryPath=..%2Fx")[1] == (
        "artifact_path_invalid"
    )
    assert send(url, "GET", f"{directories}?artifact_directory_path=a&artifactDirectoryPath=b")[
        1
    ] == ("ambiguous_parameter")
    assert send(url, "GET", f"{listing}?run_id=r1&path=a&path=..%2Fx")[1] == "ambiguous_parameter"
    # A GET without a query string is read from its body, by MLflow and by the gateway.
    for path, field in ((listing, "path"), (directories, "artifact_directory_path"),
                        (f"{prefix}/2.0/mlflow-artifacts/artifacts", "path")):  # fmt: skip
        before = len(upstream.forwarded)
        status, _ = send(url, "GET", path, json.dumps({field: "../x"}).encode())
        assert status == 400, path
        assert len(upstream.forwarded) == before
    # A percent-encoded parameter name is the same name, to Werkzeug and to the gateway.
    assert send(url, "GET", f"{listing}?run_id=r1&pa%74h=..%2Fx")[1] == "artifact_path_invalid"
    assert send(url, "GET", f"{listing}?run_id=r1&path=a&pat%68=b")[1] == "ambiguous_parameter"
    # '+' is a space in a query string, for MLflow too.
    assert send(url, "GET", f"{listing}?run_id=r1&path=a+b")[0] == 200
    assert upstream.forwarded[-1][1] == "run_id=r1&path=a+b"
    # A path that is not a string is not a path.
    presigned = f"{prefix}/2.0/mlflow/artifacts/presigned-download-url"
    for value in (5, ["../x"], {"a": "b"}, True):
        body = json.dumps({"run_id": "r1", "path": value}).encode()
        assert send(url, "POST", presigned, body)[1] == "artifact_path_invalid", value
    body = json.dumps({"run_id": "r1", "path": "a", "path2": "../x"}).encode()
    assert send(url, "POST", presigned, body)[0] == 200


def test_query_only_handlers_read_only_their_exact_name(gateway: tuple[str, Upstream]) -> None:
    url, _ = gateway
    target = "/get-artifact?run_id=r1&path=x.txt&path=..%2Fx"
    assert send(url, "GET", target)[1] == "ambiguous_parameter"
    files = "/ajax-api/2.0/mlflow/logged-models/m-1/artifacts/files"
    assert send(url, "GET", f"{files}?artifact_file_path=%252e%252e%2Fx")[1] == (
        "artifact_path_invalid"
    )
    # Flask's request.args reads only this spelling; another is MLflow's to ignore.
    assert send(url, "GET", f"{files}?artifact_file_path=x&artifactFilePath=..%2Fx")[0] == 200
