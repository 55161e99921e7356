"""A route table per verified MLflow release: rows with since/until, each release's checked-in
(method, path) list, and the classifier serving exactly the upstream's release's rows."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.types import Message, Receive, Scope, Send

from guard.authz.routes import (
    VERIFIED_MLFLOW_VERSIONS,
    ReleaseTables,
    RouteClassifierMiddleware,
    load_routes,
    release_key,
    routes_for,
)
from guard.upstream.client import UpstreamClient, UpstreamLimits, VersionGate
from tests.servers import ServerThread, read_request_body, send_response
from tests.unit.asgi import Recorder

ROOT = Path(__file__).resolve().parents[3]
LISTS = ROOT / "tests" / "mlflow_routes"
ROUTES = load_routes()


# Pairs a checked-in release serves that the table does not classify YET:
# tests/mlflow_routes/known-unclassified-<release>.txt, "METHOD PATH" lines. They are refused
# (route_not_classified) like any unknown route. Whoever adds their rows deletes the lines (the
# file when empty): this test fails while a listed pair has a row, so the list cannot go stale.
# 3.18.0: the Skill Registry's 66 pairs, until the `skill` rows land.
def known_unclassified(release: str) -> frozenset[tuple[str, str]]:
    path = LISTS / f"known-unclassified-{release}.txt"
    if not path.exists():
        return frozenset()
    lines = path.read_text().splitlines()
    return frozenset((m, p) for m, _, p in (line.partition(" ") for line in lines if line))


SCHEDULE = "/ajax-api/3.0/mlflow/issues/schedule/state"


def release_list(release: str) -> set[tuple[str, str]]:
    lines = (LISTS / f"{release}.txt").read_text().splitlines()
    return {(m, p) for m, _, p in (line.partition(" ") for line in lines if line)}


def checked_in() -> list[str]:
    return sorted((p.stem for p in LISTS.glob("[0-9]*.txt")), key=release_key)


def test_every_verified_release_has_its_list_checked_in() -> None:
    assert set(checked_in()) >= VERIFIED_MLFLOW_VERSIONS


@pytest.mark.parametrize("release", checked_in())
def test_the_table_classifies_exactly_each_checked_in_release(release: str) -> None:
    served = release_list(release)
    rows = [(r.method, r.path) for r in routes_for(ROUTES, release)]
    assert len(rows) == len(set(rows)), "a pair with more than one row for this release"
    known = known_unclassified(release)
    assert sorted(served - set(rows) - known) == [], f"{release} serves these; the table lacks them"
    assert sorted(known & set(rows)) == [], (
        "classified now: delete them from known-unclassified-*.txt"
    )
    assert sorted(known - served) == [], "not served: delete from known-unclassified-*.txt"
    assert sorted(set(rows) - served) == [], (
        f"rows for routes {release} does not serve (since/until)"
    )


def test_the_installed_mlflow_matches_its_checked_in_list() -> None:
    """The live dump of the installed MLflow is the checked-in list of its release (so the list
    stays what tests/dump_mlflow_routes.py says; test_routes.py checks the table against it)."""
    script = ROOT / "tests" / "dump_mlflow_routes.py"
    result = subprocess.run(
        [sys.executable, str(script), "--pairs"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    version = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m; print(m.version('mlflow'))"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    lines = set(result.stdout.splitlines())
    assert lines == {f"{m} {p}" for m, p in release_list(version)}


def test_the_releases_differ_by_what_3_18_added() -> None:
    old, new = release_list("3.17.2"), release_list("3.18.0")
    assert old <= new  # 3.18.0 removed nothing
    added = new - old
    assert ("POST", SCHEDULE) in added
    assert len(added) == 67
    assert {p.split("/")[1] for _, p in added} == {"api", "ajax-api"}


def test_the_schedule_state_row() -> None:
    (row,) = [r for r in ROUTES if r.path == SCHEDULE]
    assert (row.method, row.kind, row.action, row.id_from) == (
        "POST", "experiment", "update", "body:experiment_id",
    )  # fmt: skip
    assert not row.open and not row.refuse
    assert row.since == (3, 18, 0) and row.until is None


@pytest.mark.parametrize(
    ("release", "count_of"),
    [("3.17.2", "3.17.2"), ("3.17.3", "3.17.2"), ("3.18.0", "3.18.0"), ("3.18.1", "3.18.0")],
)
def test_a_patch_release_gets_its_minors_rows(release: str, count_of: str) -> None:
    served = release_list(count_of) - known_unclassified(count_of)
    assert len(routes_for(ROUTES, release)) == len(served)


ROW = '[[route]]\nmethod = "POST"\npath = "/x"\nkind = "experiment"\naction = "{action}"\n{extra}\n'


def table(*rows: tuple[str, str]) -> str:
    return "".join(ROW.format(action=action, extra=extra) for action, extra in rows)


def test_a_field_whose_reading_changed_is_two_rows() -> None:
    routes = load_routes(table(("read", 'until = "3.18.0"'), ("update", 'since = "3.18.0"')))
    assert [r.action for r in routes_for(routes, "3.17.2")] == ["read"]
    assert [r.action for r in routes_for(routes, "3.17.9")] == ["read"]
    assert [r.action for r in routes_for(routes, "3.18.0")] == ["update"]
    assert [r.action for r in routes_for(routes, "3.19.0")] == ["update"]
    assert routes_for(routes, "3.16.0")[0].action == "read"


@pytest.mark.parametrize(
    "rows",
    [
        (("read", ""), ("update", 'since = "3.18.0"')),  # the first row covers 3.18 too
        (("read", 'until = "3.18.1"'), ("update", 'since = "3.18.0"')),
        (("read", 'since = "3.18.0"'), ("update", 'since = "3.18.0"')),
        (("read", 'since = "3.18.0"\nuntil = "3.18.0"'),),  # an empty range
        (("read", 'since = "3.19.0"\nuntil = "3.18.0"'),),
        (("read", 'since = "3.18"'),),  # not a release
        (("read", 'since = "3.18.0rc1"'),),
        (("read", "since = 3.18"),),
        (("read", 'until = "latest"'),),
    ],
)
def test_overlapping_or_malformed_ranges_are_rejected(rows: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(ValueError, match="route table"):
        load_routes(table(*rows))


# The classifier in front of a real socket that answers /version like MLflow.


class VersionServer:
    def __init__(self) -> None:
        self.version = b"3.17.2"
        self.reads = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_request_body(receive)
        if scope["path"] == "/version":
            self.reads += 1
            await send_response(send, 200, self.version)
            return
        await send_response(send, 404, b"")


@pytest.fixture(scope="module")
def mlflow() -> Iterator[tuple[ServerThread, VersionServer]]:
    fake = VersionServer()
    with ServerThread(fake, lifespan="off") as server:
        yield server, fake


LIMITS = UpstreamLimits(1.0, 2.0, 1.0, 4, 4.0)


def classify(
    url: str, version: bytes, fake: VersionServer, requests: list[tuple[str, str]], **gate: object
) -> tuple[list[int | str | None], list[tuple[str | None, str]]]:
    """Send requests through one classifier in one event loop; (reasons or 200, changes)."""
    fake.version = version
    changes: list[tuple[str | None, str]] = []
    results: list[int | str | None] = []

    async def run() -> None:
        client = UpstreamClient(url, LIMITS)
        client.open()
        try:
            version_gate = VersionGate(
                VERIFIED_MLFLOW_VERSIONS, False, on_change=lambda o, n: changes.append((o, n)),
                **gate,  # type: ignore[arg-type]
            )  # fmt: skip
            app = RouteClassifierMiddleware(
                Recorder(), tables=ReleaseTables(ROUTES), gate=version_gate, client=client
            )
            for method, path in requests:
                result = await acall(app, method, path)
                results.append(result)
        finally:
            await client.close()

    asyncio.run(run())
    return results, changes


async def acall(app: RouteClassifierMiddleware, method: str, path: str) -> int | str | None:
    """One request through the classifier, in the running loop (the client's); 200 or reason."""
    scope = {
        "type": "http", "method": method, "path": path, "raw_path": path.encode(),
        "query_string": b"", "headers": [(b"host", b"localhost")],
        "client": ("203.0.113.7", 40000), "server": ("127.0.0.1", 5000), "scheme": "http",
        "http_version": "1.1", "asgi": {"version": "3.0"},
    }  # fmt: skip
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    if start["status"] == 200:
        return 200
    return dict(start["headers"]).get(b"x-guard-reason", b"").decode() or start["status"]


def test_a_route_of_a_newer_release_never_matches_an_older_server(
    mlflow: tuple[ServerThread, VersionServer],
) -> None:
    server, fake = mlflow
    skills = sorted(release_list("3.18.0") - release_list("3.17.2") - {("POST", SCHEDULE)})
    requests = [
        ("POST", SCHEDULE),
        ("POST", SCHEDULE.replace("/ajax-api/", "/api/")),  # no release serves this twin
        ("GET", SCHEDULE),
        ("HEAD", SCHEDULE),
        ("PUT", SCHEDULE),
        ("POST", SCHEDULE + "/"),
        ("POST", "/ajax-api/3.0/mlflow/issues/schedule/state%2F"),
        ("POST", "/api/2.0/mlflow/runs/create"),
    ]
    requests += [(m, p.replace("{name}", "n").replace("{organization}", "o")) for m, p in skills]
    old, changes = classify(server.url, b"3.17.2", fake, requests)
    assert old[:7] == ["route_not_classified"] * 7 and old[7] == 200
    assert set(old[8:]) == {"route_not_classified"}
    assert changes == [(None, "3.17.2")]
    new, _ = classify(server.url, b"3.18.0", fake, requests)
    assert new[0] == 200 and new[7] == 200
    assert new[1:7] == ["route_not_classified"] * 6
    assert new.count(200) >= 2  # the skills rows decide their own answers (their own tests)


@pytest.mark.parametrize(
    ("version", "strict", "expected"),
    [
        (b"3.17.2", False, 200), (b"3.18.0", True, 200),
        (b"3.18.1", False, 200),  # a patch of a verified minor: served, loudly
        (b"3.17.0", False, 200),
        (b"3.18.1", True, "upstream_unverified"),
        (b"3.19.0", False, "upstream_unverified"), (b"4.0.0", False, "upstream_unverified"),
        (b"3.1.80", False, "upstream_unverified"),  # not the minor 3.18
        (b"garbage", False, "upstream_unverified"),
    ],
)  # fmt: skip
def test_which_releases_are_served(
    mlflow: tuple[ServerThread, VersionServer],
    version: bytes,
    strict: bool,
    expected: int | str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, fake = mlflow
    results, _ = classify(
        server.url, version, fake, [("POST", "/api/2.0/mlflow/runs/create")], strict=strict
    )
    assert results == [expected]
    if version == b"3.18.1" and not strict:
        assert any("IS NOT A VERIFIED RELEASE" in r.message for r in caplog.records)


def test_the_table_is_swapped_when_the_release_changes(
    mlflow: tuple[ServerThread, VersionServer],
) -> None:
    """recheck=0 stands for the 60 s timer: every request reads /version again."""
    server, fake = mlflow
    fake.version = b"3.17.2"
    changes: list[tuple[str | None, str]] = []
    results: list[int | str | None] = []

    async def run() -> None:
        client = UpstreamClient(server.url, LIMITS)
        client.open()
        try:
            gate = VersionGate(
                VERIFIED_MLFLOW_VERSIONS, False, recheck=0.0,
                on_change=lambda o, n: changes.append((o, n)),
            )  # fmt: skip
            tables = ReleaseTables(ROUTES)
            app = RouteClassifierMiddleware(Recorder(), tables=tables, gate=gate, client=client)
            for version in (b"3.17.2", b"3.18.0", b"3.18.0", b"3.17.2"):
                fake.version = version
                results.append(await acall(app, "POST", SCHEDULE))
                assert tables.version == version.decode()
        finally:
            await client.close()

    asyncio.run(run())
    assert results == ["route_not_classified", 200, 200, "route_not_classified"]
    assert changes == [(None, "3.17.2"), ("3.17.2", "3.18.0"), ("3.18.0", "3.17.2")]


def test_the_release_is_read_again_after_a_failed_connection(
    mlflow: tuple[ServerThread, VersionServer],
) -> None:
    server, fake = mlflow
    fake.version = b"3.17.2"

    async def run() -> list[str | None]:
        client = UpstreamClient(server.url, LIMITS)
        client.open()
        try:
            gate = VersionGate(VERIFIED_MLFLOW_VERSIONS, False)  # the default 60 s timer
            seen = []
            assert await gate.check(client) is None
            before = fake.reads
            assert await gate.check(client) is None
            assert fake.reads == before  # cached
            fake.version = b"3.18.0"
            client.connection_failures += 1  # what a refused or reset connection counts
            assert await gate.check(client) is None
            seen.append(gate.version)
            assert fake.reads == before + 1
            return seen
        finally:
            await client.close()

    assert asyncio.run(run()) == ["3.18.0"]


def test_a_failed_connection_is_counted() -> None:
    from guard.upstream.client import UpstreamError

    async def run() -> int:
        client = UpstreamClient("http://127.0.0.1:9", LIMITS)  # discard port: refused
        client.open()
        try:
            with pytest.raises(UpstreamError):
                await client.request("GET", "/version", [("host", "x")], None)
            return client.connection_failures
        finally:
            await client.close()

    assert asyncio.run(run()) == 1


def test_unknown_routes_are_refused_without_asking_mlflow(
    mlflow: tuple[ServerThread, VersionServer],
) -> None:
    server, fake = mlflow
    before = fake.reads
    results, changes = classify(
        server.url, b"3.17.2", fake, [("GET", "/metrics"), ("POST", "/signup")]
    )
    assert results == ["route_not_classified"] * 2
    assert changes == [] and fake.reads == before


def test_the_dump_lists_every_pair_once() -> None:
    for release in checked_in():
        lines = (LISTS / f"{release}.txt").read_text().splitlines()
        assert lines == sorted(set(lines)), release
        assert all(line.split(" ", 1)[0].isupper() for line in lines)


def test_fields_dump_sees_protos_native_routes_and_handlers() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "dump_mlflow_routes.py"), "--fields"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    fields = json.loads(result.stdout)
    assert "experiment_id 1 9 single" in fields["proto:mlflow.GetExperiment"]
    assert any(k.startswith("fastapi:POST /v1/traces") for k in fields)
    assert "handler:POST /api/2.0/mlflow/runs/create" in fields
