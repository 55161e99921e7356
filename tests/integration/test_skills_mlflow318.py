"""The Skill Registry through the gateway in front of a real MLflow 3.18.0 server (its own venv,
.venv-mlflow-3.18): create, register, alias and search skills as callers who may touch some of
them only. The main venv's MLflow client (3.17.2) has no skills API, so requests are raw HTTP
as the 3.18 client sends them."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from guard.authz.routes import load_routes
from tests.conftest import free_port
from tests.integration.conftest import Gateway, clean_env, start_gateway, wait_ready

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PYTHON_318 = ROOT / ".venv-mlflow-3.18" / "bin" / "python"
DIGEST = "a" * 64
PREFIXES = ("/api/3.0/mlflow/skills", "/ajax-api/3.0/mlflow/skills")


@dataclass
class World:
    gateway: Gateway
    tokens: dict[str, str]
    mlflow: str = ""  # the server's own URL, to ask it directly

    def call(self, who: str, method: str, path: str, **kwargs: object) -> httpx.Response:
        token = self.gateway.token if who == "admin" else self.tokens[who]
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.request(method, self.gateway.url + path, headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]


def make_token(gateway: Gateway, name: str, role: str, resource: str) -> str:
    created = gateway.cli("token", "create", "--name", name, "--role", role,
                          "--resource", resource, "--quiet")  # fmt: skip
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    assert PYTHON_318.exists(), "make .venv-mlflow-3.18/.installed builds MLflow 3.18's venv"
    home = tmp_path_factory.mktemp("mlflow318")
    port = free_port()
    log = home / "server.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(PYTHON_318), "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
             "--serve-artifacts", "--artifacts-destination", str(home / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, cwd=home, start_new_session=True,
            env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        )  # fmt: skip
    gateway = None
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, log, "/health")
        gateway = start_gateway(
            tmp_path_factory.mktemp("gateway318"), "--upstream-url", f"http://127.0.0.1:{port}"
        )
        tokens = {
            "reader": make_token(gateway, "sk-reader", "viewer", "skill:alpha"),
            "maker": make_token(gateway, "sk-maker", "editor", "skill:team-*"),
            "promoter": make_token(gateway, "sk-promoter", "promoter", "skill:alpha"),
        }
        also = gateway.cli("role", "assign", "--subject", "token:sk-reader", "--role", "viewer",
                           "--resource", "skill:@acme/alpha")  # fmt: skip
        assert also.returncode == 0, also.stderr
        world = World(gateway, tokens, f"http://127.0.0.1:{port}")
        for body in ({"name": "alpha"}, {"name": "beta"}, {"name": "alpha", "organization": "acme"},
                     {"name": "beta", "organization": "acme"}):  # fmt: skip
            created = world.call("admin", "POST", PREFIXES[0], json=body)
            assert created.status_code == 200, created.text
        for name in ("alpha", "beta", "@acme/alpha"):
            registered = world.call("admin", "POST", f"{PREFIXES[0]}/{name}/versions",
                                    json={"source_type": "git", "source": "https://x/y",
                                          "ref": "main", "digest": DIGEST})  # fmt: skip
            assert registered.status_code == 200, registered.text
        yield world
    finally:
        if gateway is not None:
            gateway.stop()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_reader_reads_its_skills_only(world: World, prefix: str) -> None:
    assert world.call("reader", "GET", f"{prefix}/alpha").json()["name"] == "alpha"
    assert world.call("reader", "GET", f"{prefix}/@acme/alpha").status_code == 200
    assert world.call("reader", "GET", f"{prefix}/alpha/versions/1").status_code == 200
    assert (
        world.call("reader", "PATCH", f"{prefix}/alpha", json={"description": "x"}).status_code
        == 403
    )
    answers = []
    for name in ("beta", "nope", "@acme/beta", "@acme/nope"):  # forbidden and nonexistent alike
        response = world.call("reader", "GET", f"{prefix}/{name}")
        body = response.json()
        answers.append((response.status_code, body["reason"],
                        body["message"].replace(name, "NAME")))  # fmt: skip
    assert len(set(answers)) == 1 and answers[0][0] == 403, answers


@pytest.mark.parametrize("prefix", PREFIXES)
def test_search_is_filtered(world: World, prefix: str) -> None:
    found = world.call("reader", "GET", prefix, params={"max_results": 1})
    assert found.status_code == 200, found.text
    page = found.json()
    names = [(s["organization"], s["name"]) for s in page["skills"]]
    while page.get("next_page_token"):
        page = world.call("reader", "GET", prefix,
                          params={"page_token": page["next_page_token"]}).json()  # fmt: skip
        names += [(s["organization"], s["name"]) for s in page["skills"]]
    assert sorted(names) == [("", "alpha"), ("acme", "alpha")]
    everything = world.call("admin", "GET", prefix).json()["skills"]
    assert len(everything) >= 4


def test_aliases_are_the_promoters(world: World) -> None:
    body = {"alias": "prod", "version": 1}
    assert (
        world.call("reader", "POST", f"{PREFIXES[0]}/alpha/aliases", json=body).status_code == 403
    )
    assert (
        world.call("promoter", "POST", f"{PREFIXES[0]}/alpha/aliases", json=body).status_code == 200
    )
    assert (
        world.call("promoter", "POST", f"{PREFIXES[1]}/beta/aliases", json=body).status_code == 403
    )
    resolved = world.call("reader", "GET", f"{PREFIXES[1]}/alpha/aliases/prod")
    assert resolved.status_code == 200 and resolved.json()["version"] == 1
    assert world.call("promoter", "DELETE", f"{PREFIXES[0]}/alpha/aliases/prod").status_code == 200


def test_creators_manage_their_skills(world: World) -> None:
    made = world.call("maker", "POST", PREFIXES[0], json={"name": "team-one"})
    assert made.status_code == 200, made.text
    assert world.call("maker", "POST", PREFIXES[0], json={"name": "other"}).status_code == 403
    registered = world.call("maker", "POST", f"{PREFIXES[1]}/team-two/versions",
                            json={"source_type": "git", "source": "https://x/y", "ref": "main",
                                  "digest": DIGEST})  # fmt: skip
    assert registered.status_code == 200, registered.text  # creates team-two
    exported = world.gateway.cli("policy", "export").stdout
    assert "token:sk-maker, manager, skill:team-one" in exported
    assert "token:sk-maker, manager, skill:team-two" in exported
    assert world.call("maker", "DELETE", f"{PREFIXES[0]}/team-one").status_code == 200


def _upload(world: World, name: str) -> str:
    """Register a version of ``name`` from uploaded content (multipart, a tar.gz with
    SKILL.md) as the administrator; returns where MLflow stored it (skills/[@ORG/]NAME/<token>)."""
    buf = io.BytesIO()
    text = f"---\nname: {name.rsplit('/', 1)[-1]}\ndescription: a test skill\n---\nHello\n".encode()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        info = tarfile.TarInfo("SKILL.md")
        info.size = len(text)
        archive.addfile(info, io.BytesIO(text))
    files = {
        "metadata": (None, "{}"),
        "content": ("content.tar.gz", buf.getvalue(), "application/gzip"),
    }
    made = world.call("admin", "POST", f"{PREFIXES[0]}/{name}/versions", files=files)
    assert made.status_code == 200, made.text
    source: str = made.json()["source"]
    return source.removeprefix("mlflow-artifacts:/")


@pytest.mark.parametrize("prefix", ["/api/2.0/mlflow-artifacts", "/ajax-api/2.0/mlflow-artifacts"])
def test_skill_content_is_read_with_the_skills_grant(world: World, prefix: str) -> None:
    alpha, beta, acme = (
        _upload(world, "alpha"),
        _upload(world, "beta"),
        _upload(world, "@acme/alpha"),
    )
    for folder in (alpha, acme):
        got = world.call("reader", "GET", f"{prefix}/artifacts/{folder}/SKILL.md")
        assert got.status_code == 200 and b"Hello" in got.content, got.text
        listed = world.call("reader", "GET", f"{prefix}/artifacts", params={"path": folder})
        assert listed.status_code == 200, listed.text
    refused = world.call("reader", "GET", f"{prefix}/artifacts/{beta}/SKILL.md")
    missing = world.call("reader", "GET", f"{prefix}/artifacts/skills/nope/{'0' * 32}/SKILL.md")
    assert refused.status_code == missing.status_code == 403
    assert refused.headers["x-guard-reason"] == missing.headers["x-guard-reason"]
    for root in ("skills", "skills/@acme"):
        listing = world.call("reader", "GET", f"{prefix}/artifacts", params={"path": root})
        assert listing.status_code == 403
        assert (
            world.call("admin", "GET", f"{prefix}/artifacts", params={"path": root}).status_code
            == 200
        )


def test_the_table_keeps_mlflows_registration_order() -> None:
    """tests/unit/authz/test_skills.py replays Starlette's first-match on the table's skill rows
    in table order: that order must be the order MLflow 3.18 registers its routes in."""
    script = (
        "from mlflow.server.skill_registry_api import skill_registry_router as r\n"
        "for x in r.routes: print(*sorted(x.methods), x.path)\n"
    )
    dumped = subprocess.run(
        [str(PYTHON_318), "-W", "ignore", "-c", script], capture_output=True, text=True,
        timeout=120, check=True, env=clean_env(),
    ).stdout.splitlines()  # fmt: skip
    registered = [tuple(line.split(" ", 1)) for line in dumped]
    for prefix in PREFIXES:
        rows = [(r.method, r.path.removeprefix(prefix)) for r in load_routes()
                if r.kind == "skill" and (r.path + "/").startswith(prefix + "/")]  # fmt: skip
        assert rows == [(m, p.strip()) for m, p in registered]


@pytest.mark.parametrize("prefix", ["/api/2.0/mlflow-artifacts", "/ajax-api/2.0/mlflow-artifacts"])
def test_skill_content_is_never_written_through_the_proxy(world: World, prefix: str) -> None:
    """MLflow 3.18 refuses every proxied write into skill content, for administrators too; the
    gateway refuses it first (skill_content_immutable), and the content stays as registered."""
    folder = _upload(world, "alpha")
    upper = "Skills" + folder.removeprefix("skills")
    writes = [
        ("PUT", f"{prefix}/artifacts/{folder}/SKILL.md", {"content": b"changed\n"}),
        ("PUT", f"{prefix}/artifacts/{upper}/SKILL.md", {"content": b"changed\n"}),
        ("PUT", f"{prefix}/artifacts/{folder}/new.md", {"content": b"added\n"}),
        ("DELETE", f"{prefix}/artifacts/{folder}/SKILL.md", {}),
        ("DELETE", f"{prefix}/artifacts/{folder}", {}),
        *(("POST", f"{prefix}/mpu/{step}/{folder}",
           {"json": {"path": "SKILL.md", "num_parts": 1, "upload_id": "u", "parts": []}})
          for step in ("create", "complete", "abort")),
    ]  # fmt: skip
    for who in ("admin", "reader"):
        for method, path, kwargs in writes:
            response = world.call(who, method, path, **kwargs)
            assert response.status_code == 403, (who, method, path, response.text)
            assert response.headers["x-guard-reason"] == "skill_content_immutable"
    got = world.call("reader", "GET", f"{prefix}/artifacts/{folder}/SKILL.md")
    assert got.status_code == 200 and b"Hello" in got.content, got.text
    # MLflow itself (asked directly, no credentials needed without basic-auth) refuses the same
    # writes: the gateway's refusal takes nothing from anyone that MLflow would have allowed.
    for method, path, kwargs in writes:
        direct = httpx.request(method, world.mlflow + path, timeout=30, **kwargs)  # type: ignore[arg-type]
        assert direct.status_code == 403 and "immutable" in direct.text, (path, direct.text)
