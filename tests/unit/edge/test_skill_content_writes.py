"""Skill content is never written through the artifact proxy: the gateway refuses it first.

MLflow 3.18 refuses every proxied write into its skill content tree (PUT, DELETE, ``mpu/*``,
Flask and native, ``/api`` and ``/ajax-api``), for administrators too, with 403 "Skill upload
content is immutable"; content is written only by registering a skill version. The gateway
refuses the same writes with ``skill_content_immutable`` before authorization, so none reaches
MLflow, whoever asks and however the path is spelled. Reads stay authorized on the skill.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.admin.governance import Governance
from guard.authz.routes import Route, load_routes, routes_for
from guard.edge.artifactpaths import URL_PARAM, in_skill_content, writes_content
from tests.integration.test_mlflow_releases import PYTHONS
from tests.servers import ServerThread
from tests.unit.authz.test_route_authorization import parse, start_gateway
from tests.unit.authz.test_skills import CALLERS, GRANTS, FakeMlflow318

TOKEN = "0123456789abcdef0123456789abcdef"
# Every row (3.18.0) whose URL names a proxied artifact path.
_PARAM = re.compile(rf"<path:{URL_PARAM}>|\{{{URL_PARAM}:path\}}")
ARTIFACT_ROWS = [r for r in routes_for(load_routes(), "3.18.0") if _PARAM.search(r.path)]
WRITE_ROWS = [r for r in ARTIFACT_ROWS if writes_content(r.method, r.path)]

# (path, in MLflow's skill content tree?) -- MLflow's is_skill_upload_namespace is the oracle.
NAMESPACE = [
    (f"skills/foo/{TOKEN}/SKILL.md", True), (f"skills/@acme/foo/{TOKEN}/a/b.py", True),
    ("skills/foo", True), ("skills", True), ("skills/", True), ("skills/@acme", True),
    ("Skills/foo/x", True), ("SKILLS/foo/x", True), ("sKiLlS", True),
    ("workspaces/team/skills/foo/x", True), ("WORKSPACES/team/Skills/foo/x", True),
    ("workspaces/skills/skills/x", True), ("workspaces/team/skills", True),
    ("workspaces/skills", False), ("workspaces", False), ("workspaces/team", False),
    ("1/skills/x", False), ("1/r1/artifacts/skills/x", False), ("skillsx/foo", False),
    ("skill/foo", False), ("workspaces/team/1/skills/x", False), ("0/models/m-1/x", False),
]  # fmt: skip


@pytest.mark.parametrize(("path", "inside"), NAMESPACE)
def test_the_skill_tree_is_read_as_mlflow_reads_it(path: str, inside: bool) -> None:
    assert in_skill_content(path) is inside


def test_mlflow_318_agrees_on_the_skill_tree() -> None:
    """The same table against MLflow 3.18's own is_skill_upload_namespace (its venv)."""
    code = (
        "import json, sys\n"
        "from mlflow.store.tracking.skill_registry.artifact_paths import "
        "is_skill_upload_namespace as f\n"
        "print(json.dumps([f(p) for p in json.loads(sys.argv[1])]))"
    )
    paths = [path for path, _ in NAMESPACE]
    result = subprocess.run(
        [str(PYTHONS["3.18.0"]), "-c", code, json.dumps(paths)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert json.loads(result.stdout) == [inside for _, inside in NAMESPACE]


def test_the_write_rows_are_put_delete_and_multipart() -> None:
    writes = {(r.method, re.sub(r"/(ajax-)?api/", "/", r.path)) for r in WRITE_ROWS}
    assert writes == {
        ("PUT", "/2.0/mlflow-artifacts/artifacts/<path:artifact_path>"),
        ("PUT", "/2.0/mlflow-artifacts/artifacts/{artifact_path:path}"),
        ("DELETE", "/2.0/mlflow-artifacts/artifacts/<path:artifact_path>"),
        *(("POST", f"/2.0/mlflow-artifacts/mpu/{step}/<path:artifact_path>")
          for step in ("create", "complete", "abort")),
    }  # fmt: skip
    assert len(WRITE_ROWS) == 12  # each on /api and /ajax-api
    reads = {(r.method, r.path.split("/2.0/", 1)[1]) for r in ARTIFACT_ROWS} - {
        (r.method, r.path.split("/2.0/", 1)[1]) for r in WRITE_ROWS
    }
    assert {method for method, _ in reads} == {"GET"}


class RecordingMlflow(FakeMlflow318):
    """FakeMlflow318 that also records what the gateway forwards for a caller."""

    def __init__(self) -> None:
        super().__init__()
        self.forwarded: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(k == b"x-forwarded-for" for k, _ in scope["headers"]):
            self.forwarded.append((scope["method"], scope["path"]))
        await super().__call__(scope, receive, send)


@pytest.fixture(scope="module")
def upstream() -> RecordingMlflow:
    return RecordingMlflow()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: RecordingMlflow) -> Iterator[str]:
    def setup(gw: Any) -> None:
        g = Governance(gw.tokens, gw.policies.store)
        rows = [parse("g2, maker, create")]
        for name, secret in CALLERS.items():
            g.tokens.create(f"skill-{name}", "admin", 3600, secret)
            rows += [parse(f"p, token:skill-{name}, {r}, {res}") for r, res in GRANTS[name]]
        g.change("test", add=rows)

    with ServerThread(upstream, lifespan="off") as server:
        yield from start_gateway(tmp_path_factory.mktemp("skill-writes"), server.url, setup)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def url_of(route: Route, artifact_path: str) -> str:
    return _PARAM.sub(artifact_path, route.path)


def write(
    client: httpx.Client, gateway: str, route: Route, path: str, caller: str
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {CALLERS[caller]}"}
    kwargs: dict[str, Any] = {}
    if route.method == "PUT":
        kwargs["content"] = b"# changed\n"
    elif route.method == "POST":  # mpu: the file name and its parts
        kwargs["json"] = {"path": "SKILL.md", "num_parts": 1, "upload_id": "u", "parts": []}
    return client.request(route.method, gateway + url_of(route, path), headers=headers, **kwargs)


# Spellings of a path inside the tree, as sent on the wire (httpx keeps %-escapes as given).
INSIDE = [
    f"skills/foo/{TOKEN}/SKILL.md", f"skills/@acme/foo/{TOKEN}/SKILL.md", "skills/foo",
    f"Skills/foo/{TOKEN}/SKILL.md", f"SKILLS/foo/{TOKEN}/x", "skills/@acme", "skills",
    f"workspaces/team/skills/foo/{TOKEN}/SKILL.md", f"WORKSPACES/t/Skills/bar/{TOKEN}/x",
    f"%73kills/foo/{TOKEN}/SKILL.md",  # decoded once by the server: skills/...
    f"skills%2Ffoo%2F{TOKEN}%2FSKILL.md",  # likewise
]  # fmt: skip
# Spellings MLflow would decode again: refused as not canonical, before anything else.
NOT_CANONICAL = [f"%2573kills/foo/{TOKEN}/x", f"skills%252Ffoo/{TOKEN}/x"]


@pytest.mark.parametrize("route", WRITE_ROWS, ids=[f"{r.method} {r.path}" for r in WRITE_ROWS])
def test_every_write_into_skill_content_is_refused_for_everyone(
    client: httpx.Client, gateway: str, upstream: RecordingMlflow, route: Route
) -> None:
    before = len(upstream.forwarded)
    for caller in ("admin", "editor", "nobody"):
        for path in INSIDE:
            response = write(client, gateway, route, path, caller)
            assert response.status_code == 403, (caller, path, response.text)
            assert response.headers["x-guard-reason"] == "skill_content_immutable"
            assert response.json()["error_code"] == "PERMISSION_DENIED"
        for path in NOT_CANONICAL:
            response = write(client, gateway, route, path, caller)
            assert response.headers["x-guard-reason"] == "artifact_path_invalid", path
    assert upstream.forwarded[before:] == []


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
def test_skill_content_stays_readable_on_the_skill(
    client: httpx.Client, gateway: str, upstream: RecordingMlflow, prefix: str
) -> None:
    """Reads are not writes: a GET or HEAD of skill content is still judged on the skill."""
    url = f"{gateway}{prefix}/2.0/mlflow-artifacts/artifacts/skills/foo/{TOKEN}/SKILL.md"
    for method, caller, status in (
        ("GET", "reader", 200), ("HEAD", "reader", 200), ("GET", "nobody", 403),
    ):  # fmt: skip
        response = client.request(
            method, url, headers={"Authorization": f"Bearer {CALLERS[caller]}"}
        )
        assert response.status_code == status, (method, caller)
        assert response.headers.get("x-guard-reason") != "skill_content_immutable"
