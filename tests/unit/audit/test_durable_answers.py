"""Reads overlap their intent's fsync with MLflow's answer, and no answer leaves before it.

The real ``DurableAnswerMiddleware`` and ``IntentMiddleware`` around a stand-in for the proxy
(it notes when it is reached and answers like MLflow), with the spool's fsync held by the test
(``GatedFsync``): what may happen while the fsync has not finished, and what after. Which
requests count as reads is checked against the route table itself.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from guard.audit.spool import read_records, segments
from guard.audit.trail import (
    READ_POSTS,
    AuditTrail,
    DurableAnswerMiddleware,
    IntentMiddleware,
    is_read,
)
from guard.authz.routes import Route, load_routes
from guard.edge.context import RequestContext
from guard.errors import Refusal, send_refusal
from guard.store.db import build_engine
from tests.unit.audit.test_spool import GatedFsync

ROUTES = load_routes()
SECRET = b'{"run": "what MLflow answered"}'


def route(method: str, path: str) -> Route:
    return next(r for r in ROUTES if (r.method, r.path) == (method, path) and not r.until)


def request(method: str, path: str, action: str = "") -> Scope:
    context = RequestContext(request_id=f"req-{method}-{len(path)}", peer="127.0.0.1",
                             client="127.0.0.1", scheme="http", host="127.0.0.1")  # fmt: skip
    context.action = action
    return {
        "type": "http", "method": "HEAD" if method == "HEAD" else method, "path": path,
        "query_string": b"", "headers": [], "guard": context,
        "guard.route": route("GET" if method == "HEAD" else method, path),
    }  # fmt: skip


def make_trail(tmp_path: Path, sync_writes: str = "before-forward") -> AuditTrail:
    trail = AuditTrail(
        spool_dir=tmp_path / "audit", secret_key=b"k" * 40,
        engine=build_engine(f"sqlite:///{tmp_path / 'guard.db'}"), segment_size=1 << 20,
        batch_size=100, shutdown_grace=0, sync_writes=sync_writes,
    )  # fmt: skip
    trail.spool.open()  # the shipper is not started: these tests read the spool itself
    return trail


@pytest.fixture
def trail(tmp_path: Path) -> Iterator[AuditTrail]:
    trail = make_trail(tmp_path)
    yield trail
    trail.spool.close()


class Mlflow:
    """The proxy's stand-in: notes when a request reaches it, answers in ``chunks``."""

    def __init__(self, chunks: int = 1) -> None:
        self.reached = asyncio.Event()
        self.chunks = chunks
        self.started = False  # its http.response.start went through

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.reached.set()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        self.started = True
        for i in range(self.chunks):
            more = i < self.chunks - 1
            await send({"type": "http.response.body", "body": SECRET, "more_body": more})


class Client:
    """What left the gateway."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def send(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def spooled_intents(trail: AuditTrail) -> list[dict[str, Any]]:
    records = [r for p in segments(trail.spool.directory) for r, _ in read_records(p)]
    return [r for r in records if r["kind"] == "intent"]


def open_segment(trail: AuditTrail, monkeypatch: pytest.MonkeyPatch) -> GatedFsync:
    """Write one record first (the segment is opened, its directory fsynced), then hold the
    segment's fsyncs."""
    asyncio.run(trail.spool.append({"kind": "event", "event": "opened"}))
    return GatedFsync(monkeypatch, trail.spool)


async def until(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within 5 s")


READS = [
    ("GET", "/api/2.0/mlflow/runs/get", 1),
    ("HEAD", "/api/2.0/mlflow/runs/get", 1),
    ("POST", "/api/2.0/mlflow/runs/search", 1),
    ("POST", "/ajax-api/3.0/mlflow/traces/search", 1),
    ("POST", "/graphql", 1),
    ("POST", "/api/2.0/mlflow/artifacts/presigned-download-url", 1),
    ("GET", "/api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>", 4),  # streamed
]


@pytest.mark.parametrize(("method", "path", "chunks"), READS)
def test_a_read_is_forwarded_at_once_and_its_answer_waits_for_the_fsync(
    trail: AuditTrail, method: str, path: str, chunks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync = open_segment(trail, monkeypatch)
    mlflow, client = Mlflow(chunks), Client()
    app = DurableAnswerMiddleware(IntentMiddleware(mlflow, trail=trail), trail=trail)
    scope = request(method, path)

    async def scenario() -> None:
        answering = asyncio.ensure_future(app(scope, receive, client.send))
        await until(mlflow.reached.is_set)
        # MLflow has the request, its intent is written (in the kernel) ...
        assert [r["request_id"] for r in spooled_intents(trail)] == [scope["guard"].request_id]
        await until(fsync.entered.is_set)
        await asyncio.sleep(0.05)  # ... and until the fsync is done, nothing leaves
        assert client.messages == [] and not mlflow.started and not answering.done()
        fsync.release()
        await answering

    try:
        asyncio.run(scenario())
    finally:
        fsync.release()
    assert client.messages[0] == {"type": "http.response.start", "status": 200, "headers": []}
    assert client.body == SECRET * chunks and not client.messages[-1].get("more_body")
    assert fsync.calls == 1


def test_a_failed_fsync_answers_503_and_nothing_of_mlflows_answer(
    trail: AuditTrail, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync = open_segment(trail, monkeypatch)
    fsync.fail = True
    mlflow, client = Mlflow(chunks=3), Client()
    app = DurableAnswerMiddleware(IntentMiddleware(mlflow, trail=trail), trail=trail)
    scope = request("GET", "/api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>")

    async def scenario() -> None:
        answering = asyncio.ensure_future(app(scope, receive, client.send))
        await until(mlflow.reached.is_set)
        fsync.release()
        await answering

    asyncio.run(scenario())
    start, *rest = client.messages
    assert start["status"] == 503
    assert (b"x-guard-reason", b"audit_unavailable") in start["headers"]
    assert SECRET not in client.body and len(rest) == 1  # the refusal's body, nothing else
    assert json.loads(client.body)["reason"] == "audit_unavailable"
    assert scope["guard"].refusal == Refusal("audit_unavailable")
    assert spooled_intents(trail) == []  # cut back; the outcome will say what happened


@pytest.mark.parametrize("fails", [False, True], ids=["fsynced", "failed"])
def test_fsynced_on_the_loop_the_answer_waits_for_that_fsync_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    """The gateway's usual path: MLflow answers in the very turn the read was forwarded, before
    the loop's commit ran; the answer leaves after it, or a 503 instead if it failed."""
    monkeypatch.setattr("guard.audit.spool.FLUSH_INTERVAL", 60.0)  # (no timed thread commit)
    trail = make_trail(tmp_path)
    try:
        asyncio.run(trail.spool.append({"kind": "event", "event": "opened"}))
        segment, real, fsyncs = trail.spool._fd, os.fsync, []

        def fsync(fd: int) -> None:
            if fd == segment:
                fsyncs.append(threading.get_ident())
                if fails:
                    raise OSError(errno.EIO, "Input/output error")
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        mlflow, client = Mlflow(chunks=2), Client()
        app = DurableAnswerMiddleware(IntentMiddleware(mlflow, trail=trail), trail=trail)
        asyncio.run(app(request("GET", "/api/2.0/mlflow/runs/get"), receive, client.send))
    finally:
        trail.spool.close()
    assert mlflow.started and fsyncs == [threading.get_ident()]  # one commit, on the loop
    if fails:
        assert client.messages[0]["status"] == 503 and SECRET not in client.body
    else:
        assert client.messages[0]["status"] == 200 and client.body == SECRET * 2


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/2.0/mlflow/runs/log-metric"),
        ("POST", "/v1/traces"),  # OTLP: traces are written
        ("POST", "/api/2.0/mlflow/artifacts/presigned-upload-url"),
        ("PUT", "/api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>"),
    ],
)
def test_a_write_is_forwarded_only_once_its_intent_is_fsynced(
    trail: AuditTrail, method: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync = open_segment(trail, monkeypatch)
    mlflow, client = Mlflow(), Client()
    app = DurableAnswerMiddleware(IntentMiddleware(mlflow, trail=trail), trail=trail)

    async def scenario() -> None:
        answering = asyncio.ensure_future(app(request(method, path), receive, client.send))
        await until(fsync.entered.is_set)
        await asyncio.sleep(0.05)
        assert not mlflow.reached.is_set()  # the fsync is not done: MLflow has not seen it
        fsync.release()
        await answering

    try:
        asyncio.run(scenario())
    finally:
        fsync.release()
    assert mlflow.reached.is_set() and client.messages[0]["status"] == 200


def test_with_sync_writes_before_response_a_write_is_held_like_a_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trail = make_trail(tmp_path, sync_writes="before-response")
    fsync = open_segment(trail, monkeypatch)
    mlflow, client = Mlflow(), Client()
    app = DurableAnswerMiddleware(IntentMiddleware(mlflow, trail=trail), trail=trail)

    async def scenario() -> None:
        scope = request("POST", "/api/2.0/mlflow/runs/log-metric")
        answering = asyncio.ensure_future(app(scope, receive, client.send))
        await until(mlflow.reached.is_set)  # forwarded while its fsync is held
        await until(fsync.entered.is_set)
        await asyncio.sleep(0.05)
        assert client.messages == [] and not answering.done()
        fsync.release()
        await answering

    try:
        asyncio.run(scenario())
    finally:
        fsync.release()
        trail.spool.close()
    assert client.messages[0]["status"] == 200 and client.body == SECRET


def test_without_the_holding_layer_a_read_waits_for_its_fsync(
    trail: AuditTrail, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller of ``intent`` outside DurableAnswerMiddleware (the policy API, personal tokens)
    is never given a record that is only written: nothing there would hold the answer."""
    fsync = open_segment(trail, monkeypatch)
    mlflow, client = Mlflow(), Client()
    app = IntentMiddleware(mlflow, trail=trail)

    async def scenario() -> None:
        scope = request("GET", "/api/2.0/mlflow/runs/get")
        answering = asyncio.ensure_future(app(scope, receive, client.send))
        await until(fsync.entered.is_set)
        await asyncio.sleep(0.05)
        assert not mlflow.reached.is_set()
        fsync.release()
        await answering

    try:
        asyncio.run(scenario())
    finally:
        fsync.release()
    assert client.messages[0]["status"] == 200


def test_a_refusal_passes_unheld_and_writes_no_intent(
    trail: AuditTrail, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal is answered by the gateway itself, before any intent: an fsync in progress
    (another request's) does not hold it, and it is recorded by its outcome alone."""
    fsync = open_segment(trail, monkeypatch)
    client = Client()

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        await send_refusal(scope, send, Refusal("permission_denied"))

    app = DurableAnswerMiddleware(refuse, trail=trail)

    async def scenario() -> None:
        other = await trail.spool.write({"kind": "intent", "request_id": "other"})
        await until(fsync.entered.is_set)  # another read's fsync is in progress
        await app(request("GET", "/api/2.0/mlflow/runs/get"), receive, client.send)
        assert client.messages[0]["status"] == 403 and not other.done()
        fsync.release()
        await trail.spool.durable(other)

    try:
        asyncio.run(scenario())
    finally:
        fsync.release()
    assert [r["request_id"] for r in spooled_intents(trail)] == ["other"]


# -- what counts as a read ----------------------------------------------------------------


def test_the_post_reads_are_exactly_the_tables_forwarded_post_read_rows() -> None:
    """A POST row marked read in a new release fails here until it is checked (does it change
    anything in MLflow?) and listed in READ_POSTS; until then its intent is fsynced first."""
    rows = {r.path for r in ROUTES if r.method == "POST" and r.action == "read" and not r.refuse}
    assert rows == READ_POSTS


@pytest.mark.parametrize(
    ("method", "path", "action", "read"),
    [
        ("GET", "/api/2.0/mlflow/runs/get", "", True),
        ("GET", "/ajax-api/2.0/mlflow/runs/get", "read", True),
        ("GET", "/graphql", "", True),
        ("POST", "/graphql", "", True),
        ("POST", "/api/2.0/mlflow/experiments/search", "read", True),
        ("GET", "/api/2.0/mlflow-artifacts/presigned/<path:artifact_path>", "", True),
        ("GET", "/model-versions/get-artifact", "", True),
        ("POST", "/api/2.0/mlflow/artifacts/presigned-download-url", "", True),
        # Writes, whatever their method.
        ("POST", "/api/2.0/mlflow/runs/log-metric", "", False),
        ("POST", "/api/2.0/mlflow/artifacts/presigned-upload-url", "", False),
        ("POST", "/v1/traces", "", False),
        ("PUT", "/api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>", "", False),
        ("DELETE", "/api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>", "", False),
        ("POST", "/ajax-api/3.0/mlflow/ui-telemetry", "", False),
        # A read row whose action authorization raised is not a read any more.
        ("GET", "/api/2.0/mlflow/runs/get", "update", False),
        # Never forwarded: a refused row is no read to overlap.
        ("POST", "/api/3.0/mlflow/prompt-optimization/jobs/search", "", False),
    ],
)  # fmt: skip
def test_what_counts_as_a_read(method: str, path: str, action: str, read: bool) -> None:
    assert is_read(request(method, path, action)) is read


def test_no_route_no_read() -> None:
    scope = request("GET", "/api/2.0/mlflow/runs/get")
    del scope["guard.route"]
    assert not is_read(scope)


def test_every_row_the_table_calls_a_write_is_no_read() -> None:
    for row in ROUTES:
        scope = request(row.method, row.path)
        scope["guard.route"] = row
        if row.action != "read" or row.refuse or row.method not in ("GET", "POST"):
            assert not is_read(scope), (row.method, row.path)
