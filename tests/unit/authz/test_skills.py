"""Skills (MLflow 3.18's Skill Registry): the routes, the ``skill:`` resources, and the gateway
deciding them in front of a fake MLflow 3.18 (skills foo, bar, @acme/foo, @acme/bar exist)."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.routing import Match
from starlette.routing import Route as StarletteRoute
from starlette.types import Receive, Scope, Send

from guard.admin.governance import Governance
from guard.authz import skills
from guard.authz.identifiers import Unresolved
from guard.authz.policy import PolicyError, PolicySet
from guard.authz.routes import RouteTable, load_routes
from guard.patterns import resource_match
from tests.servers import ServerThread, read_request_body, send_response
from tests.unit.authz.test_route_authorization import parse, start_gateway

PREFIXES = ("/api/3.0/mlflow/skills", "/ajax-api/3.0/mlflow/skills")
SKILL_ROWS = [r for r in load_routes() if r.kind == "skill"]
EXISTING = {"foo": "", "bar": "", "@acme/foo": "acme", "@acme/bar": "acme"}


# ---------------------------------------------------------------------------------------------
# Rows and matching
# ---------------------------------------------------------------------------------------------


def test_66_rows_since_3_18() -> None:
    assert len(SKILL_ROWS) == 66
    assert all(r.path.startswith(PREFIXES) for r in SKILL_ROWS)
    for prefix in PREFIXES:
        rows = [r for r in SKILL_ROWS if r.path.startswith(prefix + "/") or r.path == prefix]
        assert len(rows) == 33
        assert sum("@{organization}" in r.path for r in rows) == 15
    assert all(getattr(r, "since", (3, 18, 0)) == (3, 18, 0) for r in SKILL_ROWS)
    assert [r.path for r in SKILL_ROWS if r.open] == list(PREFIXES)  # the search only


def _starlette(method: str, path: str) -> tuple[str, dict[str, str]] | str | None:
    """What MLflow's Starlette does: the first route registered (the table keeps MLflow's
    order) whose path and method match wins; a {name} starting with '@' then fails MLflow's
    validation (400) before anything is read or written."""
    for row in SKILL_ROWS:
        route = StarletteRoute(row.path, endpoint=lambda: None, methods=[row.method])
        scope = {"type": "http", "method": method, "path": path, "root_path": ""}
        match, child = route.matches(scope)
        if match is Match.FULL:
            params = {k: str(v) for k, v in child["path_params"].items()}
            return "400" if params.get("name", "").startswith("@") else (row.path, params)
    return None


def _probes() -> Iterator[tuple[str, str]]:
    values = ["foo", "@acme", "bulk-register", "versions", "tags", "aliases", "1", "@acme/foo"]
    shapes = {
        "/{x}", "/{x}/{y}", "/{x}/{y}/{z}", "/{x}/versions/{y}", "/{x}/{y}/versions",
        "/{x}/{y}/versions/{z}", "/{x}/tags/{y}/{z}", "/{x}/{y}/aliases/{z}",
        "/{x}/versions/1/tags/{y}/{z}", "/{x}/aliases", "/{x}/{y}/tags",
    }  # fmt: skip
    for prefix in PREFIXES:
        yield "GET", prefix
        for shape in sorted(shapes):
            for x, y, z in itertools.product(values, values[:4], values[:3]):
                path = prefix + shape.format(x=x, y=y, z=z)
                for method in ("GET", "POST", "PATCH", "DELETE", "PUT"):
                    yield method, path


def test_matching_follows_starlettes_order() -> None:
    table = RouteTable(tuple(SKILL_ROWS))
    checked = 0
    for method, path in _probes():
        served = _starlette(method, path)
        found = table.match(method, path)
        got = None if found is None else (found[0].path, found[1])
        if served == "400":  # MLflow refuses the name; the gateway may match nothing or a twin
            continue
        assert got == served, (method, path)
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize(
    ("method", "suffix", "template", "params"),
    [
        ("GET", "/bulk-register", "/{name}", {"name": "bulk-register"}),
        ("POST", "/bulk-register", "/bulk-register", {}),
        ("PATCH", "/bulk-register", "/{name}", {"name": "bulk-register"}),
        ("GET", "/@acme", None, None),  # MLflow: {name} '@acme' is refused (400)
        ("DELETE", "/@acme", None, None),
        ("GET", "/@acme/versions", "/@{organization}/{name}", {"organization": "acme",
                                                               "name": "versions"}),
        ("GET", "/foo/versions", "/{name}/versions", {"name": "foo"}),
        ("DELETE", "/foo/tags/a/b", "/{name}/tags/{key:path}", {"name": "foo", "key": "a/b"}),
        ("DELETE", "/@acme/foo/versions/1/tags/a/b", "/@{organization}/{name}/versions/{version}"
         "/tags/{key:path}", {"organization": "acme", "name": "foo", "version": "1", "key": "a/b"}),
        ("GET", "/foo/versions/latest", "/{name}/versions/{version}",
         {"name": "foo", "version": "latest"}),  # MLflow: 400 (not an integer), no fall-through
        ("PUT", "/foo", None, None),
        ("GET", "/foo/bar/baz", None, None),
    ],
)  # fmt: skip
@pytest.mark.parametrize("prefix", PREFIXES)
def test_ambiguous_paths(
    prefix: str, method: str, suffix: str, template: str | None, params: dict[str, str] | None
) -> None:
    found = RouteTable(load_routes()).match(method, prefix + suffix)
    if template is None:
        assert found is None
    else:
        assert found is not None and found[0].path == prefix + template and found[1] == params


# ---------------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("organization", "name", "resource"),
    [("", "foo", "skill:foo"), ("acme", "foo", "skill:@acme/foo"),
     ("acme.io", "a-1", "skill:@acme.io/a-1")],
)  # fmt: skip
def test_skill_resource(organization: str, name: str, resource: str) -> None:
    assert skills.skill_resource(organization, name) == resource


@pytest.mark.parametrize(
    ("organization", "name"),
    [("", "Foo"), ("", "@acme"), ("", "a/b"), ("", "a*"), ("", "a?"), ("", ""), ("", "-a"),
     ("", "a--b"), ("", "a" * 65), ("@acme", "foo"), ("ac/me", "foo"), ("Acme", "foo"),
     ("acme*", "foo"), ("", 1), (None, "foo"), ("", "foo%2Fbar"), ("", "foo bar")],
)  # fmt: skip
def test_names_mlflow_refuses_are_unresolved(organization: Any, name: Any) -> None:
    with pytest.raises(Unresolved):
        skills.skill_resource(organization, name)


@pytest.mark.parametrize(
    ("path", "resource"),
    [("skills/foo/0123456789abcdef0123456789abcdef/SKILL.md", "skill:foo"),
     ("skills/@acme/foo/0123456789abcdef0123456789abcdef/a/b", "skill:@acme/foo"),
     ("skills/foo", "skill:foo"), ("skills/@acme/foo/", "skill:@acme/foo"),
     ("skills", None), ("skills/", None), ("skills/@acme", None), ("skills/@/foo/x", None),
     ("skills/Foo/x", None), ("skills/@acme/@x/y", None), ("SKILLS/foo/x", None),
     ("1/skills/foo", None)],
)  # fmt: skip
def test_artifact_paths(path: str, resource: str | None) -> None:
    if resource is None:
        with pytest.raises(Unresolved):
            skills.artifact_skill(path)
    else:
        assert skills.artifact_skill(path) == resource


def test_skill_grants_are_valid_policy() -> None:
    policy = PolicySet.from_csv(
        "g2, viewer, read\np, user:a, viewer, skill:foo\np, user:a, viewer, skill:@acme/*\n"
    )
    assert len(policy.grants) == 2
    with pytest.raises(PolicyError, match="unknown resource kind 'skills'"):
        PolicySet.from_csv("g2, viewer, read\np, user:a, viewer, skills:foo\n")


@pytest.mark.parametrize(
    ("resource", "pattern", "matches"),
    [("skill:foo", "skill:*", True), ("skill:@acme/foo", "skill:*", True),
     ("skill:@acme/foo", "skill:@acme/*", True), ("skill:foo", "skill:@acme/*", False),
     ("skill:@acme/foo", "skill:foo", False), ("skill:@acme/foo", "skill:f*", False),
     ("skill:foo", "model:*", False), ("model:foo", "skill:*", False),
     ("skill:foo", "experiment:*", False), ("skill:foo", "*", True),
     ("guard:policy", "skill:*", False)],
)  # fmt: skip
def test_patterns(resource: str, pattern: str, matches: bool) -> None:
    assert resource_match(resource, pattern) is matches


# ---------------------------------------------------------------------------------------------
# Through the gateway, in front of a fake MLflow 3.18
# ---------------------------------------------------------------------------------------------

READER = "mlg_" + "1" * 43  # viewer on skill:foo and skill:@acme/foo
EDITOR = "mlg_" + "2" * 43  # editor on skill:foo and skill:new-*
PROMOTER = "mlg_" + "3" * 43  # promoter on skill:foo
ADMIN = "mlg_" + "4" * 43  # admin on *
NOBODY = "mlg_" + "5" * 43  # nothing on skills
MAKER = "mlg_" + "6" * 43  # create (only) on skill:made-*
CALLERS = {"reader": READER, "editor": EDITOR, "promoter": PROMOTER, "admin": ADMIN,
           "nobody": NOBODY, "maker": MAKER}  # fmt: skip
GRANTS = {
    "reader": [("viewer", "skill:foo"), ("viewer", "skill:@acme/foo")],
    "editor": [("editor", "skill:foo"), ("editor", "skill:new-*")],
    "promoter": [("promoter", "skill:foo")],
    "admin": [("admin", "*")],
    "nobody": [("viewer", "experiment:exp-1")],
    "maker": [("maker", "skill:made-*")],
}
SEARCH = [{"name": "foo"}, {"name": "bar"}, {"name": "foo", "organization": "acme"},
          {"name": "bar", "organization": "acme"}]  # fmt: skip


class FakeMlflow318:
    """Answers /version with 3.18.0 and a skill lookup (GET of a skill's own path) with 200 for
    the skills it holds, 404 otherwise; the search with SEARCH; anything else with 200."""

    def __init__(self) -> None:
        self.skills = set(EXISTING)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_request_body(receive)
        path, method = scope["path"], scope["method"]
        if path == "/version":
            await send_response(send, 200, b"3.18.0")
            return
        status, payload = 200, {}
        rest = re.sub(r"^/(ajax-)?api/3\.0/mlflow/skills/?", "", path)
        if method == "GET" and re.fullmatch(r"(@[^/]+/)?[^/@]+", rest):
            if rest not in self.skills:
                status, payload = 404, {"error_code": "RESOURCE_DOES_NOT_EXIST"}
        elif method == "GET" and (found := re.fullmatch(r"(@[^/]+/)?[^/@]+/versions/(\w+)", rest)):
            payload = {"aliases": ["prod"] if found.group(2) == "2" else []}  # version 2: prod
        elif method == "GET" and rest == "":
            payload = {"skills": SEARCH}
        elif method == "POST" and rest == "":
            self.skills.add(json.loads(body)["name"])
        elif method == "POST" and rest.endswith("/versions"):
            self.skills.add(rest.removesuffix("/versions"))
        await send_response(send, status, json.dumps(payload).encode())


@pytest.fixture(scope="module")
def upstream() -> FakeMlflow318:
    return FakeMlflow318()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: FakeMlflow318) -> Iterator[str]:
    def setup(gw: Any) -> None:
        g = Governance(gw.tokens, gw.policies.store)
        rows = [parse("g2, maker, create")]
        for name, secret in CALLERS.items():
            g.tokens.create(f"skill-{name}", "admin", 3600, secret)
            rows += [parse(f"p, token:skill-{name}, {r}, {res}") for r, res in GRANTS[name]]
        g.change("test", add=rows)

    with ServerThread(upstream, lifespan="off") as server:
        yield from start_gateway(tmp_path_factory.mktemp("skills"), server.url, setup)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


DENIED = (403, "permission_denied")
OK = (200, None)
CASES = [
    # reads: granted skill, ungranted existing skill, nonexistent skill, the other family
    ("GET", "/foo", "reader", None, OK),
    ("GET", "/bar", "reader", None, DENIED),
    ("GET", "/nope", "reader", None, DENIED),
    ("GET", "/@acme/foo", "reader", None, OK),
    ("GET", "/@acme/bar", "reader", None, DENIED),
    ("GET", "/@other/foo", "reader", None, DENIED),
    ("GET", "/foo/versions", "reader", None, OK),
    ("GET", "/foo/versions/1", "reader", None, OK),
    ("GET", "/foo/aliases/prod", "reader", None, OK),
    ("GET", "/@acme/foo/versions/1", "reader", None, OK),
    ("GET", "/bulk-register", "reader", None, DENIED),  # a skill named bulk-register
    ("GET", "/Foo", "reader", None, DENIED),  # a name MLflow refuses
    ("GET", "/foo", "nobody", None, DENIED),
    # writes
    ("PATCH", "/foo", "reader", {"description": "x"}, DENIED),
    ("PATCH", "/foo", "editor", {"description": "x"}, OK),
    ("POST", "/foo/tags", "editor", {"key": "k", "value": "v"}, OK),
    ("DELETE", "/foo/tags/a/b", "editor", None, OK),
    ("DELETE", "/foo/versions/1/tags/k", "editor", None, OK),
    ("DELETE", "/foo/versions/1", "editor", None, OK),
    ("PATCH", "/foo/versions/1", "reader", {"status": "active"}, DENIED),
    ("PATCH", "/foo/versions/1", "editor", {"status": "deleted"}, OK),
    ("PATCH", "/foo/versions/1", "promoter", {"status": "deleted"}, DENIED),
    # deleting a version that holds an alias (2 holds prod) is the promoter's too
    ("DELETE", "/foo/versions/2", "editor", None, DENIED),
    ("PATCH", "/foo/versions/2", "editor", {"status": "deleted"}, DENIED),
    ("PATCH", "/foo/versions/2", "editor", {"status": "deprecated"}, OK),
    ("DELETE", "/foo/versions/2", "admin", None, OK),
    ("DELETE", "/foo", "reader", None, DENIED),
    ("DELETE", "/@acme/foo", "editor", None, DENIED),  # editor holds skill:foo, not @acme/foo
    # aliases are the promoter's (authz.protected_aliases = *)
    ("POST", "/foo/aliases", "editor", {"alias": "prod", "version": 1}, DENIED),
    ("POST", "/foo/aliases", "promoter", {"alias": "prod", "version": 1}, OK),
    ("DELETE", "/foo/aliases/prod", "editor", None, DENIED),
    ("DELETE", "/foo/aliases/prod", "promoter", None, OK),
    ("POST", "/bar/aliases", "promoter", {"alias": "prod", "version": 1}, DENIED),
    # creates and registrations
    ("POST", "", "reader", {"name": "foo2"}, DENIED),
    ("POST", "", "editor", {"name": "bar"}, DENIED),  # bar exists and is not the editor's
    ("POST", "", "editor", {"name": "new-a", "organization": "acme"}, DENIED),
    ("POST", "", "editor", {"name": "New-a"}, DENIED),
    ("POST", "/foo/versions", "editor", {"source": "x"}, OK),  # exists: update
    ("POST", "/bar/versions", "editor", {"source": "x"}, DENIED),
    ("POST", "/nope/versions", "editor", {"source": "x"}, DENIED),
    ("POST", "/bulk-register", "editor", {"skills": [{"name": "foo"}, {"name": "bar"}]}, DENIED),
    ("POST", "/bulk-register", "editor", {"skills": [{"name": "foo"}, {"name": "new-b"}]}, OK),
    ("POST", "/bulk-register", "editor", {"organization": "acme", "skills": [{"name": "foo"}]},
     DENIED),
    # an administrator reaches every skill (and MLflow answers the malformed)
    ("GET", "/bar", "admin", None, OK),
    ("DELETE", "/@acme/bar", "admin", None, OK),
    ("PUT", "/foo", "admin", None, (403, "route_not_classified")),
    ("GET", "/@acme", "admin", None, (403, "route_not_classified")),
]  # fmt: skip


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("method", "suffix", "caller", "body", "want"),
    CASES,
    ids=[f"{m} {s or '/'} {c}" for m, s, c, _, _ in CASES],
)
def test_decisions(
    gateway: str, client: httpx.Client, prefix: str, method: str, suffix: str, caller: str,
    body: dict[str, Any] | None, want: tuple[int, str | None],
) -> None:  # fmt: skip
    response = client.request(
        method, gateway + prefix + suffix, json=body,
        headers={"Authorization": f"Bearer {CALLERS[caller]}"},
    )  # fmt: skip
    status, reason = want
    assert (response.status_code, response.headers.get("x-guard-reason")) == (status, reason), (
        response.text
    )


def _answer(client: httpx.Client, url: str, method: str = "GET", **kw: Any) -> tuple[int, str]:
    response = client.request(method, url, headers={"Authorization": f"Bearer {READER}"}, **kw)
    body = response.json()
    body.pop("request_id", None)
    return response.status_code, json.dumps(body).replace("bar", "NAME").replace("nope", "NAME")


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [("GET", "/S_", None), ("GET", "/S_/versions/1", None), ("PATCH", "/S_", {"description": "x"}),
     ("DELETE", "/S_/aliases/x", None), ("POST", "/S_/versions", {"source": "x"}),
     ("POST", "", {"name": "S_"}), ("POST", "/bulk-register", {"skills": [{"name": "S_"}]})],
)  # fmt: skip
def test_forbidden_and_nonexistent_look_the_same(
    gateway: str, client: httpx.Client, prefix: str, method: str, suffix: str, body: Any
) -> None:
    answers = []
    for name in ("bar", "nope"):
        sent = json.loads(json.dumps(body).replace("S_", name)) if body is not None else None
        answers.append(
            _answer(client, gateway + prefix + suffix.replace("S_", name), method, json=sent)
        )
    assert answers[0] == answers[1]
    assert answers[0][0] == 403


@pytest.mark.parametrize("prefix", PREFIXES)
def test_search_shows_only_readable_skills(gateway: str, client: httpx.Client, prefix: str) -> None:
    response = client.get(
        gateway + prefix, params={"max_results": 10},
        headers={"Authorization": f"Bearer {READER}"},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["skills"] == [{"name": "foo"}, {"name": "foo", "organization": "acme"}]
    admin = client.get(gateway + prefix, headers={"Authorization": f"Bearer {ADMIN}"})
    assert admin.json()["skills"] == SEARCH


def test_creators_manage_what_they_create(gateway: str, client: httpx.Client) -> None:
    headers = {"Authorization": f"Bearer {MAKER}"}
    url = gateway + PREFIXES[0]
    for name in ("made-a", "made-b"):  # may create, not read
        assert client.get(f"{url}/{name}", headers=headers).status_code == 403
    assert client.post(url, json={"name": "made-a"}, headers=headers).status_code == 200
    made = client.post(f"{url}/made-b/versions", json={"source": "x"}, headers=headers)
    assert made.status_code == 200  # absent: registering creates it, which the maker may
    assert client.post(f"{url}/foo/versions", json={}, headers=headers).status_code == 403
    for name in ("made-a", "made-b"):
        deadline = time.monotonic() + 5  # the creator grant lands just after the answer
        while (status := client.get(f"{url}/{name}", headers=headers).status_code) != 200:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert client.delete(f"{url}/{name}", headers=headers).status_code == 200


@pytest.mark.parametrize("prefix", ["/api/2.0/mlflow-artifacts", "/ajax-api/2.0/mlflow-artifacts"])
@pytest.mark.parametrize(
    ("path", "caller", "want"),
    [("skills/foo/0123456789abcdef0123456789abcdef/SKILL.md", "reader", OK),
     ("skills/@acme/foo/0123456789abcdef0123456789abcdef/SKILL.md", "reader", OK),
     ("skills/bar/0123456789abcdef0123456789abcdef/SKILL.md", "reader", DENIED),
     ("skills/nope/0123456789abcdef0123456789abcdef/SKILL.md", "reader", DENIED),
     ("skills/@acme/bar/0123456789abcdef0123456789abcdef/SKILL.md", "reader", DENIED),
     ("skills/foo/0123456789abcdef0123456789abcdef/SKILL.md", "nobody", DENIED),
     ("skills/bar/0123456789abcdef0123456789abcdef/SKILL.md", "admin", OK)],
)  # fmt: skip
def test_skill_artifacts_are_authorized_on_the_skill(
    gateway: str, client: httpx.Client, prefix: str, path: str, caller: str,
    want: tuple[int, str | None],
) -> None:  # fmt: skip
    headers = {"Authorization": f"Bearer {CALLERS[caller]}"}
    response = client.get(f"{gateway}{prefix}/artifacts/{path}", headers=headers)
    assert (response.status_code, response.headers.get("x-guard-reason")) == want
    folder = path.rsplit("/", 1)[0]
    listing = client.get(f"{gateway}{prefix}/artifacts", params={"path": folder}, headers=headers)
    assert (listing.status_code, listing.headers.get("x-guard-reason")) == want


@pytest.mark.parametrize("path", ["skills", "skills/@acme"])
def test_skill_roots_are_for_those_allowed_every_skill(
    gateway: str, client: httpx.Client, path: str
) -> None:
    url = f"{gateway}/api/2.0/mlflow-artifacts/artifacts"
    reader = client.get(url, params={"path": path}, headers={"Authorization": f"Bearer {READER}"})
    assert (reader.status_code, reader.headers.get("x-guard-reason")) == DENIED
    admin = client.get(url, params={"path": path}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert admin.status_code == 200


@pytest.mark.parametrize(
    ("suffix", "named"),
    [("/bar", "skill 'bar'"), ("/@acme/bar/versions/1", "skill '@acme/bar'"),
     ("/Bar", "skill 'Bar'")],
)  # fmt: skip
def test_refusals_name_the_skill_as_sent(
    gateway: str, client: httpx.Client, suffix: str, named: str
) -> None:
    response = client.get(
        gateway + PREFIXES[0] + suffix, headers={"Authorization": f"Bearer {READER}"}
    )
    assert response.status_code == 403
    assert response.json()["message"].endswith(f" token:skill-reader may not read {named}.")


@pytest.mark.parametrize(
    ("content", "content_type"),
    [('{"name": "new-x", "name": "bar"}', "application/json"),
     ('{"name": "new-x", "organization": "", "organization": "acme"}', "application/json"),
     ('{"name": "bar"}', None), ('{"name": "bar"}', "text/plain"),
     ('{"name": ["new-x", "bar"]}', "application/json"),
     ('{"name": "new-x"}\n{"name": "bar"}', "application/json")],
)  # fmt: skip
@pytest.mark.parametrize("prefix", PREFIXES)
def test_creates_read_the_body_as_mlflow_or_refuse(
    gateway: str, client: httpx.Client, prefix: str, content: str, content_type: str | None
) -> None:
    """The editor may create new-* only: a body MLflow could read as another skill is refused."""
    headers = {"Authorization": f"Bearer {EDITOR}"}
    if content_type:
        headers["Content-Type"] = content_type
    response = client.post(gateway + prefix, content=content, headers=headers)
    assert response.status_code in (400, 403), response.text


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(("caller", "status"), [("editor", 200), ("reader", 403), ("admin", 200)])
def test_registering_uploaded_content_multipart(
    gateway: str, client: httpx.Client, prefix: str, caller: str, status: int
) -> None:
    """MLflow's client uploads a skill's content as multipart: no JSON for the gateway to read,
    and none it needs (the skill is in the path)."""
    files = {"metadata": (None, "{}"), "content": ("content.tar.gz", b"\x1f\x8b...", "x/y")}
    response = client.post(
        gateway + prefix + "/foo/versions", files=files,
        headers={"Authorization": f"Bearer {CALLERS[caller]}"},
    )  # fmt: skip
    assert response.status_code == status, response.text
