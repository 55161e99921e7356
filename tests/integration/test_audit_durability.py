"""The audit trail against what breaks a gateway: SIGKILL under load, the database restarted
mid-load, a spool that cannot grow. MLflow runs separately (``--upstream-url``), so its state is
read directly and compared with what the gateway recorded."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from guard.store.db import audit_records, build_engine
from tests.conftest import PostgresCluster, free_port
from tests.integration.conftest import Gateway, Mlflow, clean_env, start_gateway, wait_ready
from tests.servers import ServerThread, read_request_body, send_response

pytestmark = pytest.mark.integration

API = "/api/2.0/mlflow"
LOG_METRIC = API + "/runs/log-metric"


@dataclass
class Sent:
    """One load request and what came of it (status 0: the connection failed)."""

    n: int
    key: str
    status: int = 0
    reason: str = ""
    request_id: str = ""
    done_at: float = 0.0


def _client(gateway: Gateway) -> httpx.Client:
    return httpx.Client(
        base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.token}"},
        timeout=20, trust_env=False,
    )  # fmt: skip


def _create_run(gateway: Gateway, name: str) -> str:
    with _client(gateway) as client:
        created = client.post(API + "/experiments/create", json={"name": name})
        assert created.status_code == 200, created.text
        run = client.post(
            API + "/runs/create", json={"experiment_id": created.json()["experiment_id"]}
        )
        assert run.status_code == 200, run.text
        return str(run.json()["run"]["info"]["run_id"])


def _log_metric(client: httpx.Client, run_id: str, sent: Sent) -> None:
    body = {"run_id": run_id, "key": sent.key, "value": float(sent.n), "step": sent.n,
            "timestamp": int(time.time() * 1000)}  # fmt: skip
    response = client.post(LOG_METRIC, json=body)
    sent.status = response.status_code
    sent.reason = response.headers.get("x-guard-reason", "")
    sent.request_id = response.headers.get("x-request-id", "")
    sent.done_at = time.monotonic()


def _stored_metrics(mlflow: Mlflow, run_id: str) -> dict[str, float]:
    """What MLflow itself holds for the run: metric key -> value (every key is logged once)."""
    response = httpx.get(
        f"{mlflow.url}{API}/runs/get", params={"run_id": run_id}, trust_env=False, timeout=20
    )
    assert response.status_code == 200, response.text
    return {m["key"]: m["value"] for m in response.json()["run"]["data"].get("metrics", [])}


def _spooled(spool_dir: Path) -> tuple[list[dict[str, Any]], bool]:
    """Every whole record in the spool's segments, and whether the newest one ends in a torn
    line (allowed there only: a write cut short by the kill)."""
    paths = sorted(spool_dir.glob("*.jsonl"))
    records: list[dict[str, Any]] = []
    torn = False
    for index, path in enumerate(paths):
        *lines, tail = path.read_bytes().split(b"\n")
        records += [json.loads(line) for line in lines]
        if tail:
            assert index == len(paths) - 1, f"{path}: torn line in a segment written before"
            torn = True
    return records, torn


def _intents_by_key(records: list[dict[str, Any]], run_id: str) -> dict[str, dict[str, Any]]:
    intents: dict[str, dict[str, Any]] = {}
    for record in records:
        changes = record.get("changes") or {}
        if (record["kind"], record.get("path"), changes.get("run_id")) == (
            "intent",
            LOG_METRIC,
            run_id,
        ):
            assert changes["key"] not in intents, f"two intents for {changes['key']}"
            intents[changes["key"]] = record
    return intents


def _stored_records(database_uri: str) -> list[dict[str, Any]]:
    engine = build_engine(database_uri)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(audit_records.c.record)).scalars().all()
    except sa.exc.OperationalError:
        return []  # not created yet, or (SQLite) busy for a moment
    finally:
        engine.dispose()
    return [json.loads(row) for row in rows]


def _until(condition: Any, timeout: float, what: str) -> float:
    """Seconds until ``condition()`` holds; fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.25)
    return time.monotonic() - started


def _verify(gateway: Gateway, *args: str) -> str:
    verified = gateway.cli("audit", "verify", *args)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("OK: "), verified.stdout
    return verified.stdout.strip()


# -- 1. SIGKILL under load -----------------------------------------------------------------------

KILL_TOTAL, KILL_AFTER, KILL_THREADS = 300, 120, 4


def test_sigkill_under_load_leaves_an_intent_for_every_stored_metric(
    external_mlflow: Mlflow, tmp_path: Path
) -> None:
    data = tmp_path / "gw"
    first = start_gateway(data, "--upstream-url", external_mlflow.url)
    assert first.mlflow_processes() == []  # the only process is the gateway: kill it alone
    run_id = _create_run(first, f"sigkill-{os.urandom(4).hex()}")
    numbers = itertools.count()
    sent: list[Sent] = []
    deadline = time.monotonic() + 20

    def load() -> None:
        with _client(first) as client:
            while (n := next(numbers)) < KILL_TOTAL and time.monotonic() < deadline:
                request = Sent(n, f"kill-{n:04d}")
                sent.append(request)
                try:
                    _log_metric(client, run_id, request)
                except httpx.TransportError:
                    return  # the gateway is gone

    threads = [threading.Thread(target=load) for _ in range(KILL_THREADS)]
    try:
        for thread in threads:
            thread.start()
        killed_at = _until(lambda: sum(s.status == 200 for s in sent) >= KILL_AFTER, 20, "load")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
    finally:
        first.stop()
        for thread in threads:
            thread.join(timeout=30)
    acknowledged = {s.key for s in sent if s.status == 200}
    assert KILL_AFTER <= len(acknowledged) < KILL_TOTAL, "the kill was not mid-load"
    assert {s.status for s in sent} <= {0, 200}

    spooled, torn = _spooled(data / "audit")
    intents = _intents_by_key(spooled, run_id)
    stored = _stored_metrics(external_mlflow, run_id)
    assert acknowledged <= stored.keys()
    unaudited = sorted(stored.keys() - intents.keys())
    assert not unaudited, f"stored by MLflow without an intent record: {unaudited}"
    for key, value in stored.items():
        assert intents[key]["changes"]["value"] == value
        assert intents[key]["method"] == "POST"
        assert intents[key]["principal"] == "token:admin"
    by_id = {r["request_id"]: r for r in spooled if r["kind"] == "intent"}
    assert all(by_id[s.request_id]["changes"]["key"] == s.key for s in sent if s.status == 200)

    # A restart on the same data directory ships what the killed process spooled.
    second = start_gateway(data, "--upstream-url", external_mlflow.url, token=first.token)
    database = f"sqlite:///{data / 'guard.db'}"
    wanted = {(r["writer"], r["seq"]): r for r in spooled}
    try:

        def shipped() -> bool:
            return wanted.keys() <= {(r["writer"], r["seq"]) for r in _stored_records(database)}

        _until(shipped, 60, "records spooled before the kill reach the database")

        def accounted() -> bool:  # the restart says what became of the requests cut off
            records = _stored_records(database)
            outcomes = {r["request_id"] for r in records if r["kind"] == "outcome"}
            return all(r["request_id"] in outcomes for r in records if r["kind"] == "intent")

        _until(accounted, 30, "every intent has an outcome after the restart")
    finally:
        second.stop()
    stored_records = {(r["writer"], r["seq"]): r for r in _stored_records(database)}
    assert all(stored_records[k] == r for k, r in wanted.items())
    counts = Counter((r["writer"], r["seq"]) for r in _stored_records(database))
    assert max(counts.values()) == 1
    everything = _stored_records(database)
    outcomes = Counter(r["request_id"] for r in everything if r["kind"] == "outcome")
    assert {outcomes[r["request_id"]] for r in everything if r["kind"] == "intent"} == {1}
    unknown = [r for r in everything if r.get("reason") == "outcome_unknown"]
    assert all(r["status"] == 0 and r["principal"] == "token:admin" for r in unknown)
    report = _verify(second)
    in_flight = len(stored.keys() - acknowledged)  # stored, but the kill cut the answer off
    print(f"sigkill: killed after {killed_at:.1f} s of load; {len(sent)} sent, "
          f"{len(acknowledged)} acknowledged, {len(stored)} stored by MLflow ({in_flight} "
          f"unacknowledged), {len(intents)} intents, {len(spooled)} records spooled (torn "
          f"tail: {torn}), {len(unknown)} outcome_unknown after the restart; {report}")  # fmt: skip


# -- 2. the database restarted mid-load ----------------------------------------------------------

PG_TOTAL, PG_THREADS, PG_INTERVAL = 200, 4, 0.025  # a request every 25 ms: 5 s of load
PG_OPTIONS = "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"


class RestartablePostgres(PostgresCluster):
    """A cluster of this test's own, so stopping it cannot break the session's other tests."""

    def halt(self) -> None:
        self._run("pg_ctl", "-D", f"{self.dir}/data", "-m", "fast", "-w", "-t", "30", "stop")

    def resume(self) -> None:
        options = f"-p {self.port} -k {self.dir} {PG_OPTIONS}"
        self._run("pg_ctl", "-D", f"{self.dir}/data", "-l", f"{self.dir}/pg.log", "-w",
                  "-t", "30", "-o", options, "start")  # fmt: skip


@pytest.fixture
def restartable_postgres() -> Iterator[RestartablePostgres]:
    cluster = RestartablePostgres()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.postgresql
def test_database_restart_mid_load_ends_with_one_intent_and_one_outcome_per_request(
    external_mlflow: Mlflow, restartable_postgres: RestartablePostgres, tmp_path: Path
) -> None:
    database = restartable_postgres.create_database()
    gateway = start_gateway(
        tmp_path / "gw", "--upstream-url", external_mlflow.url, "--database-uri", database,
        MLFLOW_GUARD_TOKENS_CACHE_TTL="60s",  # authentication outlives the outage
    )  # fmt: skip
    try:
        run_id = _create_run(gateway, f"pg-restart-{os.urandom(4).hex()}")
        sent = [Sent(n, f"pg-{n:04d}") for n in range(PG_TOTAL)]
        numbers = iter(range(PG_TOTAL))
        lock = threading.Lock()
        started = time.monotonic()

        def load() -> None:
            with _client(gateway) as client:
                while True:
                    with lock:
                        n = next(numbers, None)
                    if n is None or time.monotonic() - started > 30:
                        return
                    time.sleep(max(0.0, started + n * PG_INTERVAL - time.monotonic()))
                    _log_metric(client, run_id, sent[n])

        threads = [threading.Thread(target=load) for _ in range(PG_THREADS)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.2)
            halting = time.monotonic()
            restartable_postgres.halt()
            down = time.monotonic()
            ready_during = httpx.get(gateway.url + "/guard/ready", trust_env=False, timeout=10)
            time.sleep(max(0.0, down + 2.0 - time.monotonic()))
            up = time.monotonic()
            restartable_postgres.resume()
            resumed = time.monotonic()
        finally:
            for thread in threads:
                thread.join(timeout=60)
        loaded = time.monotonic() - started
        assert ready_during.status_code == 503 and "database" in ready_during.text
        assert [s.n for s in sent if s.status != 200] == []
        during = sum(down <= s.done_at <= up for s in sent)
        after = sum(s.done_at > up for s in sent)
        assert during >= 20 and after >= 10, (during, after, loaded)

        ids = {s.request_id for s in sent}
        assert len(ids) == PG_TOTAL

        def caught_up() -> bool:
            return (
                sum(r.get("request_id") in ids for r in _stored_records(database)) >= 2 * PG_TOTAL
            )

        waited = _until(caught_up, 90, "the shipper catches up after the restart")
        time.sleep(1.5)  # nothing more should come: a duplicate would arrive now
        records = [r for r in _stored_records(database) if r.get("request_id") in ids]
        kinds = Counter((r["request_id"], r["kind"]) for r in records)
        assert {kinds[(i, "intent")] for i in ids} == {1}
        assert {kinds[(i, "outcome")] for i in ids} == {1}
        assert len(records) == 2 * PG_TOTAL
        assert all(r["status"] == 200 for r in records if r["kind"] == "outcome")
        seqs = Counter((r["writer"], r["seq"]) for r in _stored_records(database))
        assert max(seqs.values()) == 1
        assert set(_stored_metrics(external_mlflow, run_id)) >= {s.key for s in sent}
    finally:
        gateway.stop()
    log = gateway.log.read_text()
    assert "audit records not stored yet" in log  # the shipper did meet the outage
    assert "audit database reachable again" in log
    report = _verify(gateway, "--database-uri", database)
    print(f"pg restart: {PG_TOTAL} requests in {loaded:.1f} s; database down {up - down:.1f} s "
          f"({resumed - halting:.1f} s from stop to started); {during} served while down, "
          f"{after} after; caught up {waited:.1f} s after the load; {report}")  # fmt: skip


# -- 3. a spool that cannot grow ----------------------------------------------------------------

SPOOL_ROOM = 200 * 1024
FULL_MAX_REQUESTS, FULL_REFUSED_IN_A_ROW = 600, 20


def _start_with_file_limit(data_dir: Path, limit: int, *args: str, **env: str) -> Gateway:
    """``start_gateway``, with RLIMIT_FSIZE (soft) set in the child before it starts; the log
    goes outside the data directory, into a file of its own."""
    port = free_port()
    token = "mlg_" + os.urandom(32).hex()
    environ = clean_env(MLFLOW_GUARD_BOOTSTRAP_TOKEN=token, **env)
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir.parent / f"{data_dir.name}.log"
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "guard", "serve", "--data-dir", str(data_dir),
             "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, env=environ, start_new_session=True,
            preexec_fn=limit_file_size,
        )  # fmt: skip
    gateway = Gateway(f"http://127.0.0.1:{port}", port, token, data_dir, proc, log, environ)
    try:
        wait_ready(gateway.url, proc, log)
    except RuntimeError:
        gateway.stop()
        raise
    return gateway


@pytest.mark.postgresql
def test_a_full_spool_refuses_requests_and_nothing_reaches_mlflow_unaudited(
    external_mlflow: Mlflow, postgres: PostgresCluster, tmp_path: Path
) -> None:
    database = postgres.create_database()
    data = tmp_path / "gw"
    gateway = _start_with_file_limit(
        data, SPOOL_ROOM, "--upstream-url", external_mlflow.url, "--database-uri", database
    )
    try:
        run_id = _create_run(gateway, f"full-spool-{os.urandom(4).hex()}")
        sent: list[Sent] = []
        in_a_row = 0
        deadline = time.monotonic() + 30
        with _client(gateway) as client:
            for n in range(FULL_MAX_REQUESTS):
                if in_a_row >= FULL_REFUSED_IN_A_ROW or time.monotonic() > deadline:
                    break
                sent.append(Sent(n, f"full-{n:04d}"))
                _log_metric(client, run_id, sent[-1])
                in_a_row = in_a_row + 1 if sent[-1].status == 503 else 0
            assert in_a_row >= FULL_REFUSED_IN_A_ROW, Counter(s.status for s in sent)
            assert gateway.proc.poll() is None, "the gateway died at the file size limit"
            assert {(s.status, s.reason) for s in sent} <= {(200, ""), (503, "audit_unavailable")}
            ready = client.get("/guard/ready")
            assert ready.status_code == 503 and "audit" in ready.text, ready.text
            read = client.get(API + "/experiments/search", params={"max_results": 1})
            assert (read.status_code, read.headers.get("x-guard-reason")) == (
                503, "audit_unavailable",
            )  # fmt: skip
            assert read.json()["reason"] == "audit_unavailable"
        served = {s.key for s in sent if s.status == 200}
        refused = {s.key for s in sent if s.status == 503}
        assert served and refused

        stored = _stored_metrics(external_mlflow, run_id)
        assert stored.keys() == served  # nothing refused reached MLflow
        spooled, torn = _spooled(data / "audit")
        assert not torn  # a failed write is cut back off the segment
        assert all(p.stat().st_size <= SPOOL_ROOM for p in (data / "audit").glob("*.jsonl"))
        assert stored.keys() <= _intents_by_key(spooled, run_id).keys()

        # Room again (the soft limit raised): the spool recovers by itself.
        resource.prlimit(gateway.proc.pid, resource.RLIMIT_FSIZE, resource.getrlimit(
            resource.RLIMIT_FSIZE))  # fmt: skip
        with _client(gateway) as client:
            again = Sent(FULL_MAX_REQUESTS, "full-again")
            _log_metric(client, run_id, again)
            assert again.status == 200, again.reason
            assert client.get("/guard/ready").status_code == 200
        assert "audit spool write failed: File too large" in gateway.log.read_text()
    finally:
        gateway.stop()
    report = _verify(gateway, "--database-uri", database)
    print(f"full spool: {len(served)} served, {len(refused)} refused with audit_unavailable; "
          f"{len(spooled)} records spooled; {report}")  # fmt: skip


# -- 4. SIGKILL under reads and writes: an intent for every request MLflow saw --------------------

MIX_TOTAL, MIX_AFTER, MIX_THREADS = 600, 200, 4
READ, SEARCH = API + "/runs/get", API + "/runs/search"


class LoggingUpstream:
    """MLflow's stand-in: answers every request after a short delay (so the kill finds some in
    flight) and logs the X-Request-Id of each one the gateway forwarded (lookups carry none)."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, str]] = {}  # request id -> (method, path)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_request_body(receive)
        if scope["path"] == "/version":
            await send_response(send, 200, b"3.17.2")
            return
        if request_id := dict(scope["headers"]).get(b"x-request-id", b"").decode():
            self.seen[request_id] = (scope["method"], scope["path"])
        await asyncio.sleep(0.002)
        await send_response(send, 200, b"{}")


def _mixed(client: httpx.Client, sent: Sent) -> None:
    """A read (runs/get, a POST search) or a write (log-metric), by ``sent.n``."""
    if sent.n % 3 == 0:
        response = client.get(READ, params={"run_id": "r1"})
    elif sent.n % 3 == 1:
        response = client.post(SEARCH, json={"experiment_ids": ["1"], "max_results": 5})
    else:
        response = client.post(LOG_METRIC, json={"run_id": "r1", "key": sent.key, "value": 1.0,
                                                 "timestamp": 1, "step": sent.n})  # fmt: skip
    sent.status = response.status_code
    sent.request_id = response.headers.get("x-request-id", "")


@pytest.mark.parametrize("sync_writes", ["before-forward", "before-response"])
def test_sigkill_under_reads_and_writes_leaves_an_intent_for_every_request_mlflow_saw(
    tmp_path: Path, sync_writes: str
) -> None:
    """Reads (and, with before-response, writes) are forwarded once their intent is written,
    not fsynced: the kernel holds it, so killing the gateway loses none of them."""
    upstream = LoggingUpstream()
    with ServerThread(upstream, lifespan="off") as fake:
        data = tmp_path / "gw"
        gateway = start_gateway(
            data, "--upstream-url", fake.url, MLFLOW_GUARD_AUDIT_SYNC_WRITES=sync_writes
        )
        numbers = itertools.count()
        sent: list[Sent] = []
        deadline = time.monotonic() + 30

        def load() -> None:
            with _client(gateway) as client:
                while (n := next(numbers)) < MIX_TOTAL and time.monotonic() < deadline:
                    request = Sent(n, f"mix-{n:04d}")
                    sent.append(request)
                    try:
                        _mixed(client, request)
                    except httpx.TransportError:
                        return  # the gateway is gone

        threads = [threading.Thread(target=load) for _ in range(MIX_THREADS)]
        try:
            for thread in threads:
                thread.start()
            _until(lambda: sum(s.status == 200 for s in sent) >= MIX_AFTER, 30, "load")
            gateway.proc.send_signal(signal.SIGKILL)
            gateway.proc.wait(timeout=10)
        finally:
            gateway.stop()
            for thread in threads:
                thread.join(timeout=30)
    acknowledged = {s.request_id for s in sent if s.status == 200}
    assert MIX_AFTER <= len(acknowledged) < MIX_TOTAL, "the kill was not mid-load"
    assert {s.status for s in sent} <= {0, 200}
    spooled, torn = _spooled(data / "audit")
    intents = {r["request_id"]: r for r in spooled if r["kind"] == "intent"}
    seen = dict(upstream.seen)
    unaudited = sorted(set(seen) - intents.keys())
    assert not unaudited, f"MLflow saw these without an intent record: {unaudited}"
    assert acknowledged <= intents.keys()
    for request_id, (method, path) in seen.items():
        assert (intents[request_id]["method"], intents[request_id]["path"]) == (method, path)
    reads = sum(path in (READ, SEARCH) for _, path in seen.values())
    assert reads and len(seen) - reads  # both kinds reached MLflow
    in_flight = len(seen.keys() - acknowledged)
    print(f"sigkill ({sync_writes}): {len(sent)} sent, {len(acknowledged)} answered, "
          f"{len(seen)} seen by the upstream ({reads} reads, {in_flight} unanswered), "
          f"{len(intents)} intents spooled (torn tail: {torn})")  # fmt: skip
