"""The route table: complete for the installed MLflow, matched the way MLflow routes."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from guard.authz.routes import (
    RouteTable,
    load_routes,
    routes_for,
    validate_path,
    validate_query,
)

ROOT = Path(__file__).resolve().parents[3]
ROUTES = load_routes()
TABLE = RouteTable(ROUTES)


@pytest.fixture(scope="module")
def dumped() -> list[dict[str, str]]:
    """Every (method, path) the installed MLflow serves, from its Flask url_map and FastAPI app."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "dump_mlflow_routes.py")],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return list(json.loads(result.stdout))


def test_the_dump_sees_both_apps(dumped: list[dict[str, str]]) -> None:
    paths = {r["path"] for r in dumped}
    assert "/v1/traces" in paths
    assert any(p.startswith("/gateway/") for p in paths)
    assert any(p.startswith("/ajax-api/3.0/jobs/") for p in paths)
    assert {r["source"] for r in dumped} == {"flask", "fastapi"}
    assert len(dumped) > 400


def test_every_installed_route_has_exactly_one_row(dumped: list[dict[str, str]]) -> None:
    """Live, against the installed MLflow; tests/unit/authz/test_route_releases.py checks every
    checked-in release list the same way."""
    installed = routes_for(ROUTES, metadata.version("mlflow"))
    served = {(r["method"], r["path"]) for r in dumped}
    rows = {(r.method, r.path) for r in installed}
    assert sorted(served - rows) == [], "routes MLflow serves that the table does not classify"
    assert sorted(rows - served) == [], "rows for routes the installed MLflow does not serve"
    assert len(rows) == len(installed)


def test_every_open_or_refused_row_is_justified() -> None:
    for route in ROUTES:
        if route.open or route.refuse:
            assert len(route.why) > 15, route.path


def test_open_rows_are_a_short_reviewed_list() -> None:
    open_rows = sorted((r.method, r.path) for r in ROUTES if r.open)
    assert len(open_rows) <= 20, open_rows
    writes = [(r.method, r.path) for r in ROUTES if r.open and r.action != "read"]
    assert writes == [("POST", "/ajax-api/3.0/mlflow/ui-telemetry")]  # queues UI telemetry only


@pytest.mark.parametrize(
    ("method", "path", "kind", "action", "params"),
    [
        ("GET", "/api/2.0/mlflow/experiments/get", "experiment", "read", {}),
        ("HEAD", "/api/2.0/mlflow/experiments/get", "experiment", "read", {}),
        ("POST", "/api/2.0/mlflow/runs/log-metric", "run", "update", {}),
        ("POST", "/api/2.0/mlflow/registered-models/alias", "registered_model", "update", {}),
        ("DELETE", "/api/2.0/mlflow/registered-models/alias", "registered_model", "update", {}),
        ("POST", "/api/2.0/mlflow/model-versions/transition-stage", "model_version", "promote", {}),
        ("POST", "/api/2.0/mlflow/logged-models/search", "logged_model", "read", {}),
        ("GET", "/api/2.0/mlflow/logged-models/m-1", "logged_model", "read", {"model_id": "m-1"}),
        ("PUT", "/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/x/y.bin", "artifact", "update",
         {"artifact_path": "1/abc/artifacts/x/y.bin"}),
        ("GET", "/static-files/static/js/main.js", "server", "read", {"path": "static/js/main.js"}),
        ("POST", "/v1/traces", "trace", "create", {}),
    ],
)  # fmt: skip
def test_match(method: str, path: str, kind: str, action: str, params: dict[str, str]) -> None:
    found = TABLE.match(method, path)
    assert found is not None
    route, got = found
    assert (route.kind, route.action, got) == (kind, action, params)


@pytest.mark.parametrize("path", ["/api/2.0/mlflow/runs/get", "/ajax-api/2.0/mlflow/runs/get"])
def test_head_is_classified_as_the_get_row(path: str) -> None:
    head, get = TABLE.match("HEAD", path), TABLE.match("GET", path)
    assert head is not None and get is not None and head[0] is get[0]
    assert head[0].get_body  # runs/get reads a GET's body when its query string is empty


def test_get_body_marks_only_forwarded_get_rows() -> None:
    marked = [r for r in ROUTES if r.get_body]
    assert marked and all(r.method == "GET" and not r.refuse for r in marked)
    assert not TABLE.match("GET", "/graphql")[0].get_body  # type: ignore[index]
    assert not TABLE.match("GET", "/get-artifact")[0].get_body  # type: ignore[index]


def test_artifact_uploads_stream_and_nothing_else_does() -> None:
    streamed = {(r.method, r.path) for r in ROUTES if r.body == "stream"}
    assert streamed
    for method, path in streamed:
        assert method in ("PUT", "POST")
        assert "mlflow-artifacts/artifacts" in path or path.endswith("/upload-artifact")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/ajax-api/3.0/mlflow/assistant/message"),
        ("POST", "/api/2.0/mlflow/webhooks"),
        ("GET", "/ajax-api/2.0/mlflow/gateway-proxy"),
        ("POST", "/gateway/openai/v1/chat/completions"),
        ("GET", "/ajax-api/3.0/jobs/abc"),
        ("POST", "/ajax-api/3.0/mlflow/demo/delete"),
        ("GET", "/build/x.js"),
    ],
)
def test_refused_rows(method: str, path: str) -> None:
    found = TABLE.match(method, path)
    assert found is not None and found[0].refuse


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/metrics"),
        ("GET", "/favicon.ico"),
        ("GET", "/API/2.0/mlflow/experiments/get"),  # routes are case-sensitive
        ("GET", "/api/2.0/mlflow/experiments/get/"),  # no trailing-slash twin
        ("TRACE", "/api/2.0/mlflow/experiments/get"),
        ("DELETE", "/api/2.0/mlflow/experiments/get"),  # a method the route does not serve
        ("GET", "/api/2.0/mlflow/logged-models/a/b"),  # a segment parameter holds no /
        ("POST", "/signup"),
    ],
)
def test_unclassified(method: str, path: str) -> None:
    assert TABLE.match(method, path) is None


@pytest.mark.parametrize(
    ("path", "canonical"),
    [
        ("/api/2.0/mlflow/runs/get", True),
        ("/", True),
        ("/ajax-api/3.0/jobs/", True),
        ("/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/a%2Fb.txt", True),  # a literal %
        ("/static-files/../ajax-api/3.0/mlflow/assistant/message", False),
        ("/api/2.0/mlflow/./runs/get", False),
        ("/api/2.0/mlflow/runs/get/..", False),
        ("//api/2.0/mlflow/runs/get", False),
        ("/api/2.0//mlflow/runs/get", False),
        ("/api\\2.0/mlflow/runs/get", False),
        ("/api/2.0/mlflow/runs/get\x00", False),
        ("/api/2.0/mlflow/runs/get\r\n", False),
        ("api/2.0/mlflow/runs/get", False),
        ("http://evil.com/api/2.0/mlflow/runs/get", False),
        ("", False),
    ],
)
def test_validate_path(path: str, canonical: bool) -> None:
    assert validate_path(path) is canonical


@pytest.mark.parametrize(
    ("query", "ok"),
    [(b"", True), (b"run_id=abc&a=1&a=2", True), (b"filter=name%20%3D%20%27x%27", True),
     (b"a=\xe9", False), (b"a=b c", False), (b"a=\x00", False), (b"a=\x7f", False)],
)  # fmt: skip
def test_validate_query(query: bytes, ok: bool) -> None:
    assert validate_query(query) is ok


def _canonical_by_hand(path: str) -> bool:
    """validate_path's meaning spelled out (it is one regular expression, for speed)."""
    if not path.startswith("/") or "\\" in path or "//" in path:
        return False
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return False
    return all(segment not in {".", ".."} for segment in path.split("/"))


def test_validate_path_agrees_with_its_meaning_on_random_paths() -> None:
    rng = random.Random(13)
    alphabet = [
        "/",
        "/",
        ".",
        ".",
        "a",
        "-",
        "%",
        "\\",
        "\x00",
        "\x1f",
        "\x7f",
        "\n",
        "é",
        "\u2028",
    ]
    for _ in range(20000):
        path = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9)))
        assert validate_path(path) is _canonical_by_hand(path), repr(path)


def test_validate_query_agrees_with_its_meaning_on_every_byte() -> None:
    for byte in range(256):
        query = b"a=" + bytes([byte]) + b"&b"
        assert validate_query(query) is (0x20 < byte < 0x7F), byte


@pytest.mark.parametrize(
    "text",
    [
        '[[route]]\nmethod = "GET"\npath = "x"\nkind = "server"\naction = "read"',
        '[[route]]\nmethod = "GET"\npath = "/x"\nkind = "runs"\naction = "read"',
        '[[route]]\nmethod = "GET"\npath = "/x"\nkind = "server"\naction = "look"',
        '[[route]]\nmethod = "GET"\npath = "/x"\nkind = "server"\naction = "read"\nopen = true',
        '[[route]]\nmethod = "GET"\npath = "/x"\nkind = "server"\naction = "read"\nextra = 1',
        '[[route]]\nmethod = "GET"\npath = "/x"\nkind = "server"\naction = "read"\n'
        '[[route]]\nmethod = "GET"\npath = "/x"\nkind = "server"\naction = "read"',
        # get_body marks GET rows that are forwarded, with a boolean; a GET has nothing to stream.
        '[[route]]\nmethod = "POST"\npath = "/x"\nkind = "server"\naction = "read"\n'
        "get_body = true",
        '[[route]]\nmethod = "GET"\npath = "/x"\nkind = "server"\naction = "read"\nget_body = 1',
        '[[route]]\nmethod = "GET"\npath = "/x"\nkind = "server"\naction = "read"\nget_body = true'
        '\nrefuse = true\nwhy = "w"',
        '[[route]]\nmethod = "GET"\npath = "/x"\nkind = "server"\naction = "read"\nbody = "stream"',
    ],
)
def test_malformed_tables_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="route table"):
        load_routes(text)
