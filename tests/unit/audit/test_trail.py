"""The audit trail through the real gateway (fake MLflow): what is recorded, what never is,
intents before forwarding, verification, and refusal when the spool cannot be written."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.types import Receive, Scope, Send

from guard.admin.governance import Governance
from guard.app import Gateway, build_gateway
from guard.audit.commands import verify_trail
from guard.audit.spool import read_records, segments
from guard.audit.store import AuditStore, Filters
from guard.authz.policy import parse_lines
from guard.config import load_settings
from guard.store.db import audit_records
from tests.servers import ServerThread, read_request_body, send_response

ADMIN = "mlg_" + "b" * 43
ALICE = "mlg_" + "a" * 43
BOGUS = "mlg_" + "x" * 43
KEY = "k" * 40


class FakeMlflow:
    def __init__(self) -> None:
        self.forwarded: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_request_body(receive)
        path = scope["path"]
        if path == "/version":
            await send_response(send, 200, b"3.17.2")
            return
        payload: dict[str, Any] = {}
        if path == "/api/2.0/mlflow/experiments/get":
            payload = {"experiment": {"name": "fraud/train"}}
        elif path == "/api/2.0/mlflow/registered-models/get":
            payload = {"registered_model": {"name": "fraud-detector"}}
        else:
            headers = dict(scope["headers"])
            self.forwarded.append(headers.get(b"x-request-id", b"").decode())
        await send_response(send, 200, json.dumps(payload).encode())


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Gateway, str, FakeMlflow]]:
    fake = FakeMlflow()
    with ServerThread(fake, lifespan="off") as upstream:
        settings = load_settings(
            {"upstream.url": upstream.url, "storage.data_dir": str(tmp_path)}, {}, None
        ).settings
        gateway = build_gateway(
            settings, {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": ADMIN, "MLFLOW_GUARD_SECRET_KEY": KEY}
        )
        with ServerThread(gateway) as server:
            g = Governance(gateway.tokens, gateway.policies.store)
            g.tokens.create("alice", "viewer", 3600, ALICE)
            g.change("test", add=parse_lines(["p, token:alice, promoter, model:fraud-*"]))
            deadline = time.monotonic() + 10
            while gateway.policies.index.version != gateway.policies.store.version():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            yield gateway, server.url, fake


def stored(gateway: Gateway, **filters: Any) -> list[dict[str, Any]]:
    return [r for _, r in AuditStore(gateway.engine).query(Filters(**filters), limit=10_000)]


def wait_stored(gateway: Gateway, request_id: str, kinds: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = stored(gateway, request_id=request_id)
        if len(found) >= kinds:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no audit record for {request_id}")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "User-Agent": "pytest-audit/1"}


def test_a_forwarded_request_has_an_intent_before_and_an_outcome_after(
    running: tuple[Gateway, str, FakeMlflow],
) -> None:
    gateway, url, fake = running
    body = {"name": "fraud-detector", "alias": "champion", "version": "7"}
    response = httpx.post(url + "/api/2.0/mlflow/registered-models/alias", json=body,
                          headers=bearer(ALICE))  # fmt: skip
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    assert fake.forwarded[-1] == request_id
    records = wait_stored(gateway, request_id, kinds=2)
    intent, outcome = sorted(records, key=lambda r: r["seq"])
    assert intent["kind"] == "intent" and outcome["kind"] == "outcome"
    assert intent["seq"] < outcome["seq"]
    for record in (intent, outcome):
        assert record["principal"] == "token:alice" and record["auth_method"] == "token"
        assert record["resource"] == "model:fraud-detector" and record["action"] == "promote"
        assert record["rule"] == "p, token:alice, promoter, model:fraud-*, allow"
        assert record["policy_version"] == gateway.policies.index.version
        assert record["method"] == "POST" and record["user_agent"] == "pytest-audit/1"
        assert record["path"] == "/api/2.0/mlflow/registered-models/alias"
        assert record["client"] == "127.0.0.1"
        # The promotion history can be read from the trail.
        assert record["changes"] == body
    assert outcome["decision"] == "allow" and outcome["status"] == 200
    assert outcome["upstream_status"] == 200
    assert outcome["bytes_in"] == len(response.request.content)
    assert outcome["bytes_out"] == len(response.content)
    assert outcome["latency_ms"] >= outcome["upstream_ms"] > 0


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "reason"),
    [
        ("GET", "/api/2.0/mlflow/experiments/get?experiment_id=1", {}, 401, "unauthenticated"),
        ("GET", "/api/2.0/mlflow/experiments/get?experiment_id=1",
         {"Authorization": f"Bearer {BOGUS}"}, 401, "invalid_credentials"),
        ("GET", "/api/2.0/mlflow/experiments/get?experiment_id=1",
         {"Authorization": f"Bearer {ALICE}"}, 403, "permission_denied"),
        ("GET", "/api/2.0/mlflow/experiments/get?experiment_id=1",
         {"Authorization": f"Bearer {ALICE}", "Host": "evil.example"}, 400, "host_not_allowed"),
        ("GET", "/metrics", {"Authorization": f"Bearer {ALICE}"}, 403, "route_not_classified"),
    ],
)  # fmt: skip
def test_refusals_are_recorded_without_an_intent(
    running: tuple[Gateway, str, FakeMlflow],
    method: str, path: str, headers: dict[str, str], status: int, reason: str,
) -> None:  # fmt: skip
    gateway, url, fake = running
    response = httpx.request(method, url + path, headers=headers)
    assert response.status_code == status
    (record,) = wait_stored(gateway, response.headers["x-request-id"])
    assert record["kind"] == "outcome" and record["reason"] == reason
    assert record["decision"] == ("error" if status == 400 else "deny")
    assert record["status"] == status and record["upstream_status"] == 0
    assert response.headers["x-request-id"] not in fake.forwarded


def test_secrets_never_reach_the_trail(running: tuple[Gateway, str, FakeMlflow]) -> None:
    gateway, url, _ = running
    ids = []
    for _ in range(2):
        response = httpx.get(url + "/api/2.0/mlflow/experiments/get?experiment_id=1",
                             auth=("alice", BOGUS))  # fmt: skip
        ids.append(response.headers["x-request-id"])
    response = httpx.get(
        url + "/api/2.0/mlflow/registered-models/search?page_token=SECRETPAGE&max_results=5",
        headers={**bearer(ADMIN), "Cookie": "session=COOKIEVALUE"},
    )
    ids.append(response.headers["x-request-id"])
    first, second = (wait_stored(gateway, i)[0] for i in ids[:2])
    assert first["credential"]["username"] == "alice"
    assert first["credential"]["secret"].startswith("hmac:")
    assert first["credential"]["secret"] == second["credential"]["secret"]  # same token
    page = wait_stored(gateway, ids[2])[-1]
    assert page["query"]["page_token"].startswith("hmac:") and page["query"]["max_results"] == "5"
    gateway_dir = Path(gateway.settings.storage.data_dir)
    spooled = b"".join(p.read_bytes() for p in segments(gateway_dir / "audit"))
    with gateway.engine.connect() as conn:
        table = "\n".join(conn.execute(sa.select(audit_records.c.record)).scalars())
    for secret in (BOGUS, ADMIN, ALICE, "SECRETPAGE", "COOKIEVALUE"):
        assert secret not in table and secret.encode() not in spooled


def test_probes_are_not_recorded(running: tuple[Gateway, str, FakeMlflow]) -> None:
    gateway, url, _ = running
    ids = [httpx.get(url + p).headers["x-request-id"] for p in ("/guard/health", "/guard/ready")]
    marker = httpx.get(url + "/version", headers=bearer(ADMIN)).headers["x-request-id"]
    wait_stored(gateway, marker, kinds=2)
    assert all(stored(gateway, request_id=i) == [] for i in ids)


def test_policy_changes_through_the_api_are_recorded(
    running: tuple[Gateway, str, FakeMlflow],
) -> None:
    gateway, url, _ = running
    row = ["p", "token:bob", "viewer", "model:fraud-detector", "allow"]
    response = httpx.post(url + "/guard/api/policy/changes", json={"add": [row]},
                          headers=bearer(ADMIN))  # fmt: skip
    assert response.status_code == 200
    records = wait_stored(gateway, response.headers["x-request-id"], kinds=2)
    outcome = next(r for r in records if r["kind"] == "outcome")
    assert outcome["changes"]["added"] == [", ".join(row)]
    assert outcome["principal"] == "token:admin"


def test_the_trail_verifies_and_tampering_is_found(
    running: tuple[Gateway, str, FakeMlflow],
) -> None:
    gateway, url, _ = running
    for _ in range(5):
        last = httpx.get(url + "/version", headers=bearer(ADMIN)).headers["x-request-id"]
    wait_stored(gateway, last, kinds=2)
    spool = gateway.settings.audit_spool_dir
    key = KEY.encode()
    checked, problems = verify_trail(gateway.engine, key, [spool])
    assert problems == [] and checked >= 10
    assert gateway.trail is not None
    writer = gateway.trail.spool.writer
    with gateway.engine.begin() as conn:
        edited = sa.func.replace(audit_records.c.record, '"GET"', '"PUT"')
        conn.execute(audit_records.update().where(audit_records.c.seq == 3).values(record=edited))
    _, problems = verify_trail(gateway.engine, key, [spool])
    assert [(p.writer, p.seq) for p in problems] == [(writer, 3)]


def test_cutting_off_the_newest_records_is_found(
    running: tuple[Gateway, str, FakeMlflow],
) -> None:
    gateway, url, _ = running
    for _ in range(3):
        last = httpx.get(url + "/version", headers=bearer(ADMIN)).headers["x-request-id"]
    wait_stored(gateway, last, kinds=2)
    assert gateway.trail is not None
    spool = gateway.settings.audit_spool_dir
    newest = gateway.trail.spool.head.seq
    # Someone deletes the newest rows from the table and from the spool's files.
    with gateway.engine.begin() as conn:
        conn.execute(audit_records.delete().where(audit_records.c.seq > newest - 2))
    for path in segments(spool):
        kept = [r for r, _ in read_records(path) if r["seq"] <= newest - 2]
        path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in kept))
    _, problems = verify_trail(gateway.engine, KEY.encode(), [spool])
    assert problems and "truncated" in problems[0].what


def test_nothing_is_served_when_the_spool_cannot_be_written(
    running: tuple[Gateway, str, FakeMlflow],
) -> None:
    gateway, url, fake = running
    assert gateway.trail is not None
    spool = gateway.trail.spool
    httpx.get(url + "/version", headers=bearer(ADMIN))
    assert spool._fd is not None
    real = spool._fd  # the test breaks the spool's file on purpose: a read-only stand-in, so
    spool._fd = os.open("/dev/null", os.O_RDONLY)  # every later write and cut-back fails
    os.close(real)
    before = len(fake.forwarded)
    response = httpx.get(url + "/api/2.0/mlflow/experiments/get?experiment_id=1",
                         headers=bearer(ADMIN))  # fmt: skip
    assert response.status_code == 503 and response.headers["x-guard-reason"] == "audit_unavailable"
    assert len(fake.forwarded) == before
    ready = httpx.get(url + "/guard/ready")
    assert ready.status_code == 503 and "audit" in ready.json()["message"]


AUDITOR = "mlg_" + "u" * 43


def set_alias(url: str, alias: str, version: str) -> httpx.Response:
    body = {"name": "fraud-detector", "alias": alias, "version": version}
    return httpx.post(
        url + "/api/2.0/mlflow/registered-models/alias", headers=bearer(ALICE), json=body
    )


def test_auditors_query_the_trail_through_the_api(
    running: tuple[Gateway, str, FakeMlflow],
) -> None:
    gateway, url, _ = running
    g = Governance(gateway.tokens, gateway.policies.store)
    g.tokens.create("aud", "viewer", 3600, AUDITOR)
    g.change("test", add=parse_lines(["p, token:aud, auditor, guard:audit"]))
    ids = []  # (the API looks for a newer policy before it refuses, so no wait is needed)
    for _ in range(5):
        response = set_alias(url, "a", "1")
        ids.append(response.headers["x-request-id"])
    wait_stored(gateway, ids[-1], kinds=2)
    seen, cursor = [], None
    while True:
        params = {"principal": "token:alice", "kind": "outcome", "limit": "2", "order": "oldest",
                  **({"cursor": cursor} if cursor else {})}  # fmt: skip
        page = httpx.get(url + "/guard/api/audit", params=params, headers=bearer(AUDITOR))
        assert page.status_code == 200, page.text
        seen += [r["request_id"] for r in page.json()["records"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == ids  # every one exactly once, in order
    for params, reason in (({"limit": "0"}, "invalid_request_body"),
                           ({"since": "yesterday"}, "invalid_request_body"),
                           ({"limit": "1", "limit ": "2"}, "invalid_request_body")):  # fmt: skip
        response = httpx.get(url + "/guard/api/audit", params=params, headers=bearer(AUDITOR))
        assert response.headers["x-guard-reason"] == reason
    refused = httpx.get(url + "/guard/api/audit", headers=bearer(ALICE))
    assert refused.status_code == 403
    assert httpx.get(url + "/guard/api/audit", headers=bearer(ADMIN)).status_code == 200
    # The query itself is in the trail.
    wait_stored(gateway, page.headers["x-request-id"])
    audited = stored(gateway, principal="token:aud", kind="outcome")
    assert any(r["path"] == "/guard/api/audit" for r in audited)


def test_a_models_promotion_history() -> None:
    from guard.audit.history import replay

    def outcome(t: int, method: str, path: str, **changes: object) -> dict[str, Any]:
        return {"kind": "outcome", "status": 200, "time": f"t{t}", "method": method,
                "path": "/api/2.0/mlflow/" + path, "changes": changes,
                "principal": "token:ci", "rule": "p, token:ci, promoter, model:m, allow",
                "request_id": f"r{t}"}  # fmt: skip

    spans = replay([
        outcome(1, "POST", "registered-models/alias", name="m", alias="champion", version="1"),
        outcome(2, "POST", "model-versions/transition-stage", name="m", version="1",
                stage="Production"),
        outcome(3, "POST", "registered-models/alias", name="m", alias="champion", version="2"),
        outcome(4, "POST", "model-versions/transition-stage", name="m", version="2",
                stage="Production", archive_existing_versions=True),
        {**outcome(5, "POST", "registered-models/alias", name="m", alias="x", version="3"),
         "status": 403},
        outcome(6, "DELETE", "registered-models/alias", name="m", alias="champion"),
    ])  # fmt: skip
    assert [(s.holds, s.version, s.since, s.until) for s in spans] == [
        ("alias champion", "1", "t1", "t3"),
        ("stage Production", "1", "t2", "t4"),
        ("alias champion", "2", "t3", "t6"),
        ("stage Archived", "1", "t4", ""),
        ("stage Production", "2", "t4", ""),
    ]
    assert spans[0].set_by == "token:ci" and spans[0].rule.startswith("p, token:ci")


def test_history_from_the_gateway(running: tuple[Gateway, str, FakeMlflow]) -> None:
    from guard.audit.history import model_history

    gateway, url, _ = running
    for version in ("1", "2"):
        response = set_alias(url, "champion", version)
    wait_stored(gateway, response.headers["x-request-id"], kinds=2)
    spans = model_history(gateway.engine, "fraud-detector", gateway.tokens.key)
    assert [(s.version, bool(s.until)) for s in spans] == [("1", True), ("2", False)]
    assert spans[1].set_by == "token:alice"


def test_metrics(running: tuple[Gateway, str, FakeMlflow]) -> None:
    gateway, url, _ = running
    for _ in range(3):
        last = httpx.get(url + "/version", headers=bearer(ADMIN)).headers["x-request-id"]
    httpx.get(url + "/version")  # a 401
    wait_stored(gateway, last, kinds=2)
    scrape = httpx.get(url + "/guard/metrics", headers={"Host": "10.1.2.3:9"})  # by IP, no login
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = scrape.text
    assert 'mlflow_guard_requests_total{decision="allow",status="200"} 3.0' in text
    assert 'mlflow_guard_requests_total{decision="deny",status="401"} 1.0' in text
    names = [
        "request_seconds_bucket", "upstream_seconds_count", "authorization_seconds_count",
        "audit_write_seconds_count", "audit_spool_depth", "audit_records_spooled_total",
        "audit_records_stored_total", "audit_healthy 1.0",
    ]  # fmt: skip
    for name in names:
        assert "mlflow_guard_" + name in text, name
    assert gateway.trail is not None
    head = gateway.trail.spool.head
    assert f'mlflow_guard_audit_chain_head{{mac="{head.mac}",writer="{head.writer}"}}' in text
    assert stored(gateway, request_id=scrape.headers["x-request-id"]) == []  # not audited


def test_a_flood_of_bad_logins_is_limited_and_summarized(tmp_path: Path) -> None:
    fake = FakeMlflow()
    with ServerThread(fake, lifespan="off") as upstream:
        settings = load_settings(
            {"upstream.url": upstream.url, "storage.data_dir": str(tmp_path),
             "gateway.failed_login_limit": "3", "gateway.failed_login_interval": "1s"}, {}, None,
        ).settings  # fmt: skip
        gateway = build_gateway(
            settings, {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": ADMIN, "MLFLOW_GUARD_SECRET_KEY": KEY}
        )
        with ServerThread(gateway) as server:
            url = server.url + "/version"
            answers = [httpx.get(url, headers=bearer(BOGUS)) for _ in range(8)]
            assert [a.status_code for a in answers] == [401] * 3 + [429] * 5
            assert answers[-1].headers["x-guard-reason"] == "too_many_failures"
            assert 1 <= int(answers[-1].headers["retry-after"]) <= 1
            assert httpx.get(url, headers=bearer(ADMIN)).status_code == 200  # same address
            time.sleep(1.2)  # the window ends; the next request writes its summary
            last = httpx.get(url, headers=bearer(ADMIN)).headers["x-request-id"]
            wait_stored(gateway, last, kinds=2)
            deadline = time.monotonic() + 10
            while not (summaries := [
                e for e in stored(gateway, kind="event") if e["event"] == "unauthenticated_refusals"
            ]):  # fmt: skip
                assert time.monotonic() < deadline
                time.sleep(0.05)
    recorded = [a for a in answers if stored(gateway, request_id=a.headers["x-request-id"])]
    assert len(recorded) == 3  # the first three on their own, the rest only counted
    (summary,) = summaries
    assert summary["event"] == "unauthenticated_refusals" and summary["client"] == "127.0.0.1"
    assert summary["refused"] == 8 and summary["unrecorded"] == 5


def test_a_flood_of_anonymous_page_loads_is_redirected_and_summarized(tmp_path: Path) -> None:
    """A browser navigation without a session is answered 303 to the login page, and counted
    like a refusal for the record: past the limit, only in the flood summary. It is never
    answered 429 (the person must reach the login page) and never blocks the address: people
    behind one address opening the UI must still be able to log in."""
    fake = FakeMlflow()
    with ServerThread(fake, lifespan="off") as upstream:
        settings = load_settings(
            {"upstream.url": upstream.url, "storage.data_dir": str(tmp_path),
             "gateway.failed_login_limit": "3", "gateway.failed_login_interval": "1s"}, {}, None,
        ).settings  # fmt: skip
        gateway = build_gateway(
            settings, {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": ADMIN, "MLFLOW_GUARD_SECRET_KEY": KEY}
        )
        with ServerThread(gateway) as server:
            navigate = {"accept": "text/html", "sec-fetch-mode": "navigate",
                        "sec-fetch-dest": "document", "user-agent": "pytest-audit/1"}  # fmt: skip
            answers = [httpx.get(server.url + "/#/models", headers=navigate) for _ in range(8)]
            assert [a.status_code for a in answers] == [303] * 8
            assert {a.headers["location"] for a in answers} == {"/guard/login?next=%2F"}
            assert {a.headers["x-guard-reason"] for a in answers} == {"unauthenticated"}
            login = httpx.get(server.url + "/guard/login", headers=navigate)
            assert login.status_code == 200  # past the limit, the page is still there
            api = httpx.get(server.url + "/version")  # page loads did not block the address
            assert api.status_code == 401
            time.sleep(1.2)  # the window ends; the next request writes its summary
            last = httpx.get(server.url + "/version", headers=bearer(ADMIN)).headers["x-request-id"]
            wait_stored(gateway, last, kinds=2)
            deadline = time.monotonic() + 10
            while not (summaries := [
                e for e in stored(gateway, kind="event") if e["event"] == "unauthenticated_refusals"
            ]):  # fmt: skip
                assert time.monotonic() < deadline
                time.sleep(0.05)
    recorded = [a for a in answers if stored(gateway, request_id=a.headers["x-request-id"])]
    assert len(recorded) == 3  # the first three on their own, the rest only counted
    for answer in recorded:
        (record,) = stored(gateway, request_id=answer.headers["x-request-id"])
        assert record["status"] == 303 and record["reason"] == "unauthenticated"
    (summary,) = summaries
    assert summary["client"] == "127.0.0.1"
    # 8 redirects and the API call; all but 3 unrecorded (the login page view is recorded: the
    # address was never blocked).
    assert summary["refused"] == 9 and summary["unrecorded"] == 6


def test_refusals_counted_for_the_record_only_never_block() -> None:
    from guard.edge.ratelimit import FailureLimiter

    limiter = FailureLimiter(limit=2, interval=60)
    assert [limiter.refused("a", blocking=False) for _ in range(4)] == [True, True, False, False]
    assert limiter.blocked("a") == 0  # past the record limit, but page loads never block
    assert limiter.refused("a") is False  # a real failure: counted, still unrecorded
    assert limiter.blocked("a") == 0
    limiter.refused("a")
    assert limiter.blocked("a") > 0  # two real failures reach the limit
    (summary,) = limiter.summaries(final=True)
    assert (summary["refused"], summary["unrecorded"]) == (6, 4)


def test_the_limiter_is_bounded() -> None:
    from guard.edge.ratelimit import FailureLimiter

    limiter = FailureLimiter(limit=2, interval=60, max_addresses=100)
    for i in range(1000):
        limiter.refused(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._windows) == 100  # the bound is the point
    assert limiter.blocked("10.0.3.231") == 0.0
    for _ in range(3):
        limiter.refused("192.0.2.1")
    assert limiter.blocked("192.0.2.1") > 0
    (summary,) = [s for s in limiter.summaries(final=True) if s["client"] == "192.0.2.1"]
    assert summary["unrecorded"] == 1


def test_more_secrets_stay_out_of_the_trail() -> None:
    from guard.audit.records import Redactor

    r = Redactor(b"k" * 32)
    for name, value in (("access_key", "AKIA"), ("pwd", "x"), ("private_key", "p"),
                        ("sig", "s"), ("X-Amz-Signature", "s"), ("session_id", "s")):  # fmt: skip
        assert str(r.value(name, value)).startswith("hmac:"), name
    for name in ("metric_key", "key", "design", "name"):
        assert r.value(name, "plain") == "plain", name
    hidden = r.value("source", "s3://AKIA:SECRET@bucket/model")
    assert isinstance(hidden, str) and "SECRET" not in hidden and hidden.endswith("@bucket/model")
    url = r.value("DATABASE_URL", "postgresql://u:TAGSECRET@db/x")
    assert "TAGSECRET" not in str(url)
    assert r.value("source", "runs:/abc/model") == "runs:/abc/model"


def test_a_persons_password_is_never_fingerprinted_a_token_is() -> None:
    import base64

    from guard.audit.records import Redactor

    r = Redactor(b"k" * 32)

    def basic(user: str, password: str) -> list[tuple[bytes, bytes]]:
        raw = base64.b64encode(f"{user}:{password}".encode())
        return [(b"authorization", b"Basic " + raw)]

    person = r.credential(basic("alice", "Winter2026!"))
    assert person == {"scheme": "basic", "username": "alice"}
    token = r.credential(basic("ci", ALICE))
    assert token["secret"] == r.fingerprint(ALICE)
    bearer_ = r.credential([(b"authorization", b"Bearer not-a-token")])
    assert bearer_["secret"] == r.fingerprint("not-a-token")


def test_a_token_given_as_the_user_name_is_not_recorded(
    running: tuple[Gateway, str, FakeMlflow],
) -> None:
    gateway, url, _ = running
    response = httpx.get(url + "/version", auth=(ALICE, ""))  # the token in the wrong field
    (record,) = wait_stored(gateway, response.headers["x-request-id"])
    assert ALICE not in json.dumps(record)
    assert record["credential"]["username"].startswith("hmac:")


def test_a_record_that_cannot_be_encoded_does_not_stop_the_spool(
    running: tuple[Gateway, str, FakeMlflow],
) -> None:
    """A lone surrogate in a searched description reaches the intent record."""
    gateway, url, _ = running
    body = b'{"max_results": 5, "description": "\\ud800"}'
    headers = {**bearer(ADMIN), "content-type": "application/json"}
    first = httpx.post(url + "/api/2.0/mlflow/experiments/search", content=body, headers=headers)
    assert first.status_code == 200
    again = httpx.get(url + "/version", headers=bearer(ADMIN))
    assert again.status_code == 200
    assert gateway.trail is not None and gateway.trail.problem == ""


def test_changes_read_both_spellings(running: tuple[Gateway, str, FakeMlflow]) -> None:
    gateway, url, _ = running
    body = {"name": "fraud-detector", "version": "2", "stage": "Production",
            "archiveExistingVersions": True}  # fmt: skip
    response = httpx.post(url + "/api/2.0/mlflow/model-versions/transition-stage", json=body,
                          headers=bearer(ADMIN))  # fmt: skip
    records = wait_stored(gateway, response.headers["x-request-id"], kinds=2)
    assert all(r["changes"]["archive_existing_versions"] is True for r in records)


def test_refused_policy_changes_cost_no_intent(running: tuple[Gateway, str, FakeMlflow]) -> None:
    """An authenticated caller without rights cannot make the gateway fsync at will."""
    gateway, url, _ = running
    row = ["p", "token:alice", "admin", "*"]
    response = httpx.post(url + "/guard/api/policy/changes", json={"add": [row]},
                          headers=bearer(ALICE))  # fmt: skip
    assert response.status_code == 403
    (record,) = wait_stored(gateway, response.headers["x-request-id"])
    assert record["kind"] == "outcome" and record["decision"] == "deny"


def test_the_bootstrap_token_is_recorded(running: tuple[Gateway, str, FakeMlflow]) -> None:
    gateway, url, _ = running
    last = httpx.get(url + "/version", headers=bearer(ADMIN)).headers["x-request-id"]
    wait_stored(gateway, last, kinds=2)
    events = stored(gateway, kind="event")
    # Other events (the upstream's release, first read) come and go with the tests' order.
    assert [(e["event"], e["principal"], e["token"]) for e in events if "token" in e] == [
        ("token_created", "gateway:bootstrap", "admin")
    ]
    assert all(e.get("principal") for e in events)  # every event names who caused it


# -- gateway-side failures are not failed logins; /guard/ paths behind authentication ----------


def limited_gateway(tmp_path: Path, fake: FakeMlflow, upstream_url: str) -> Gateway:
    settings = load_settings(
        {"upstream.url": upstream_url, "storage.data_dir": str(tmp_path),
         "gateway.failed_login_limit": "3", "gateway.failed_login_interval": "60s",
         "tokens.cache_ttl": "0s"}, {}, None,
    ).settings  # fmt: skip
    return build_gateway(
        settings, {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": ADMIN, "MLFLOW_GUARD_SECRET_KEY": KEY}
    )


def test_a_token_store_outage_is_recorded_request_by_request_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the database is down valid callers get 503 identity_unavailable: each refusal is
    recorded (no summary, no 429 later), one log line each and one traceback in all."""
    fake = FakeMlflow()
    with ServerThread(fake, lifespan="off") as upstream:
        gateway = limited_gateway(tmp_path, fake, upstream.url)
        with ServerThread(gateway) as server:
            url = server.url + "/api/2.0/mlflow/experiments/get?experiment_id=1"

            def down(secret: str) -> None:
                raise sa.exc.OperationalError("SELECT", {}, Exception("connection refused"))

            caplog.set_level("INFO")
            with monkeypatch.context() as patched:
                patched.setattr(gateway.token_provider.store, "lookup", down)
                outage = [
                    httpx.get(url, headers=bearer(ADMIN if n % 2 else ALICE)) for n in range(12)
                ]
            after = httpx.get(url, headers=bearer(ADMIN))  # the database is back
            bad = httpx.get(url, headers=bearer(BOGUS))
            assert {a.headers["x-guard-reason"] for a in outage} == {"identity_unavailable"}
            assert {a.status_code for a in outage} == {503}
            assert after.status_code == 200
            assert (bad.status_code, bad.headers["x-guard-reason"]) == (401, "invalid_credentials")
            wait_stored(gateway, bad.headers["x-request-id"])
            for answer in outage:  # every one recorded on its own, with whose token it was
                (record,) = wait_stored(gateway, answer.headers["x-request-id"])
                assert (record["reason"], record["status"]) == ("identity_unavailable", 503)
                assert record["decision"] == "error"
                assert record["credential"]["secret"].startswith("hmac:")
            events = stored(gateway, kind="event")
            assert not [e for e in events if e.get("event") == "unauthenticated_refusals"]
    lookups = [r for r in caplog.records if r.name == "guard.tokens"]
    failed = [r for r in lookups if r.getMessage().startswith("token lookup failed")]
    assert len(failed) == 12  # one line per request
    assert sum(bool(r.exc_info) for r in caplog.records) == 1  # one traceback per outage
    assert [r.getMessage() for r in lookups if "again" in r.getMessage()] == [
        "token store reachable again"
    ]


PROBES = ("/guard/health", "/guard/ready", "/guard/metrics")
METHODS = ("POST", "PUT", "PATCH", "DELETE")
UNKNOWN = (
    "/guard/health/x", "/guard/health/", "/guard//health", "/guard/HEALTH", "/guard/health%2Fx",
    "/guard/%68ealth/x", "/guard/", "/guard/nope", "/guard/api",
)  # fmt: skip


def test_another_method_on_a_probe_is_authenticated_and_recorded(
    running: tuple[Gateway, str, FakeMlflow],
) -> None:
    gateway, url, _ = running
    for path in PROBES:
        for method in METHODS:
            stranger = httpx.request(method, url + path)
            assert (stranger.status_code, stranger.headers["x-guard-reason"]) == (
                401, "unauthenticated",
            )  # fmt: skip
            caller = httpx.request(method, url + path, headers=bearer(ALICE))
            assert (caller.status_code, caller.headers["x-guard-reason"]) == (
                405, "method_not_allowed",
            )  # fmt: skip
            (refused,) = wait_stored(gateway, stranger.headers["x-request-id"])
            assert (refused["path"], refused["method"], refused["status"]) == (path, method, 401)
            (record,) = wait_stored(gateway, caller.headers["x-request-id"])
            assert (record["principal"], record["reason"], record["status"]) == (
                "token:alice", "method_not_allowed", 405,
            )  # fmt: skip
            assert record["method"] == method and record["decision"] == "error"


def test_unknown_guard_paths_are_behind_authentication(
    running: tuple[Gateway, str, FakeMlflow],
) -> None:
    """One rule: under /guard/, only GET or HEAD on a probe answers without credentials."""
    gateway, url, _ = running
    for path in UNKNOWN:
        for method in ("GET", "HEAD", "POST"):
            stranger = httpx.request(method, url + path)
            assert stranger.status_code == 401, (method, path)
            caller = httpx.request(method, url + path, headers=bearer(ALICE))
            assert caller.status_code == 404 and caller.headers["x-guard-reason"] == "not_found"
            (record,) = wait_stored(gateway, caller.headers["x-request-id"])
            assert (record["principal"], record["reason"]) == ("token:alice", "not_found")
            wait_stored(gateway, stranger.headers["x-request-id"])


def test_probes_answer_without_credentials_and_are_not_recorded(
    running: tuple[Gateway, str, FakeMlflow],
) -> None:
    gateway, url, _ = running
    answers = [httpx.request(m, url + p) for p in PROBES for m in ("GET", "HEAD")]
    assert {a.status_code for a in answers} == {200}
    marker = httpx.get(url + "/version", headers=bearer(ADMIN)).headers["x-request-id"]
    wait_stored(gateway, marker, kinds=2)
    assert all(stored(gateway, request_id=a.headers["x-request-id"]) == [] for a in answers)


def test_refusals_before_authentication_keep_the_credentials_fingerprint(
    running: tuple[Gateway, str, FakeMlflow],
) -> None:
    """A wrong Host is refused before anyone logs in: no lookup to name the caller, but the
    token's fingerprint, the same one its failed logins would show."""
    gateway, url, _ = running
    ids = []
    for path in ("/guard/api/policy", "/guard/nope", "/api/2.0/mlflow/experiments/get"):
        refused = httpx.get(url + path, headers={**bearer(ALICE), "Host": "evil.example"})
        assert refused.headers["x-guard-reason"] == "host_not_allowed"
        ids.append(refused.headers["x-request-id"])
    assert gateway.trail is not None
    expected = gateway.trail.redactor.fingerprint(ALICE)
    for request_id in ids:
        (record,) = wait_stored(gateway, request_id)
        assert record["principal"] == "" and record["credential"]["secret"] == expected


def test_a_refusal_the_summary_stands_for_is_counted_on_disk_before_it_is_answered(
    tmp_path: Path,
) -> None:
    fake = FakeMlflow()
    with ServerThread(fake, lifespan="off") as upstream:
        gateway = limited_gateway(tmp_path, fake, upstream.url)
        with ServerThread(gateway) as server:
            head = tmp_path / "audit" / "head.json"
            for n in range(1, 9):
                answer = httpx.get(server.url + "/version", headers=bearer(BOGUS))
                assert answer.status_code == (401 if n <= 3 else 429)
                # Read the moment the answer is in: a SIGKILL now would lose nothing.
                counted = json.loads(head.read_text()).get("unrecorded", {})
                assert counted == ({"127.0.0.1": n - 3} if n > 3 else {})
    summaries = [e for e in stored(gateway, kind="event")
                 if e["event"] == "unauthenticated_refusals"]  # fmt: skip
    assert [(s["client"], s["unrecorded"]) for s in summaries] == [("127.0.0.1", 5)]
    assert "unrecorded" not in json.loads(head.read_text())


@pytest.mark.parametrize("token", [ADMIN, ALICE])  # alice's search is filtered by the gateway
def test_a_read_whose_fsync_fails_is_answered_503_and_nothing_of_mlflows_answer(
    running: tuple[Gateway, str, FakeMlflow], monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    """A read is forwarded once its intent is written and fsynced while MLflow answers: when
    that fsync fails, MLflow has answered, and the caller gets 503 instead of the answer."""
    gateway, url, fake = running
    assert gateway.trail is not None
    spool = gateway.trail.spool
    opened = httpx.get(url + "/version", headers=bearer(ADMIN))
    wait_stored(gateway, opened.headers["x-request-id"], kinds=2)  # nothing left to fsync
    real, failed = os.fsync, []

    def fail_once(fd: int) -> None:
        if fd == spool._fd and not failed:
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fail_once)
    response = httpx.get(url + "/api/2.0/mlflow/registered-models/search?max_results=5",
                         headers=bearer(token))  # fmt: skip
    assert response.status_code == 503 and response.headers["x-guard-reason"] == "audit_unavailable"
    assert response.json()["reason"] == "audit_unavailable" and failed
    request_id = response.headers["x-request-id"]
    if token == ADMIN:  # forwarded as it came (alice's: pages the gateway asked for itself)
        assert request_id in fake.forwarded  # MLflow answered; none of it left the gateway
    (outcome,) = wait_stored(gateway, request_id)  # the intent was cut back with the failure
    assert (outcome["kind"], outcome["reason"], outcome["status"]) == (
        "outcome", "audit_unavailable", 503,
    )  # fmt: skip
    assert outcome["decision"] == "error"
    assert outcome["upstream_status"] == (200 if token == ADMIN else 0)  # (a filtered search's
    # pages are not the request's own upstream call)
    again = httpx.get(url + "/api/2.0/mlflow/registered-models/search", headers=bearer(token))
    assert again.status_code == 200  # the disk works again: so does the gateway
