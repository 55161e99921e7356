"""Faults combined, under load: the gateway on a durable PostgreSQL (fsync on, a cluster of this
test's own), in front of a real MLflow; eight clients log metrics while MLflow is restarted,
PostgreSQL is stopped for three seconds, and the gateway is SIGKILLed and started again.

Then: every request MLflow saw has its intent; every intent has exactly one outcome, or an
explicit ``outcome_unknown`` (its request was cut off by the kill); no 5xx but 502/503/504; the
valid clients' refusals while the database was down are each recorded, none hidden in a flood
summary; the log holds one traceback per outage, not one per request; ``audit verify`` passes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from guard.store.db import audit_records, build_engine
from tests.conftest import PostgresCluster, free_port
from tests.integration.conftest import Gateway, clean_env, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.postgresql]

API = "/api/2.0/mlflow"
LOG_METRIC = API + "/runs/log-metric"
CLIENTS = 8
MAX_PER_CLIENT = 3000
# Seconds of load before each fault, counted from the end of the one before (MLflow takes a
# while to start again), and after the last; the clients stop at LOAD_LIMIT whatever happened.
BEFORE_MLFLOW_RESTART, BEFORE_DATABASE_STOP, DATABASE_DOWN_FOR = 3.0, 3.0, 3.0
BEFORE_KILL, AFTER_RESTART, LOAD_LIMIT = 3.0, 3.0, 45.0


class DurablePostgres(PostgresCluster):
    """fsync on, as in production; stopped and started again by the test."""

    def __init__(self) -> None:
        super().__init__(durable=True)

    def halt(self) -> None:
        self._run("pg_ctl", "-D", f"{self.dir}/data", "-m", "fast", "-w", "-t", "30", "stop")

    def resume(self) -> None:
        self._run("pg_ctl", "-D", f"{self.dir}/data", "-l", f"{self.dir}/pg.log", "-w",
                  "-t", "30", "-o", self.options, "start")  # fmt: skip


@pytest.fixture
def durable_postgres() -> Iterator[DurablePostgres]:
    cluster = DurablePostgres()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


class RestartableMlflow:
    """A lean `mlflow server` of this test's own, restarted on the same port and store."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.home / "server.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                 str(self.port), "--workers", "1", "--backend-store-uri",
                 f"sqlite:///{self.home}/mlflow.db", "--serve-artifacts",
                 "--artifacts-destination", str(self.home / "artifacts")],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.home, start_new_session=True,
                env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            )  # fmt: skip
        wait_ready(self.url, self.proc, log, "/health")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)


@pytest.fixture
def mlflow(tmp_path: Path) -> Iterator[RestartableMlflow]:
    home = tmp_path / "mlflow"
    home.mkdir()
    server = RestartableMlflow(home)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def start_gateway_on(port: int, data_dir: Path, token: str, *args: str) -> Gateway:
    """`mlflow-guard serve` on a given port (a restart keeps the clients' address)."""
    env = clean_env(MLFLOW_GUARD_BOOTSTRAP_TOKEN=token, MLFLOW_GUARD_TOKENS_CACHE_TTL="0.5s")
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "gateway.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "guard", "serve", "--data-dir", str(data_dir),
             "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    gateway = Gateway(f"http://127.0.0.1:{port}", port, token, data_dir, proc, log, env)
    try:
        wait_ready(gateway.url, proc, log)
    except RuntimeError:
        gateway.stop()
        raise
    return gateway


@dataclass
class Answer:
    key: str
    status: int = 0  # 0: no answer (the connection failed)
    reason: str = ""
    request_id: str = ""


@dataclass
class Load:
    run_id: str
    url: str
    token: str
    stop: threading.Event = field(default_factory=threading.Event)
    answers: list[Answer] = field(default_factory=list)

    def client(self, number: int) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=15, trust_env=False) as c:
            for n in range(MAX_PER_CLIENT):
                if self.stop.is_set():
                    return
                answer = Answer(f"c{number}-{n:05d}")
                self.answers.append(answer)
                body = {"run_id": self.run_id, "key": answer.key, "value": float(n), "step": n,
                        "timestamp": int(time.time() * 1000)}  # fmt: skip
                try:
                    response = c.post(LOG_METRIC, json=body)
                except httpx.TransportError:
                    time.sleep(0.05)  # the gateway is down: try the next one shortly
                    continue
                answer.status = response.status_code
                answer.reason = response.headers.get("x-guard-reason", "")
                answer.request_id = response.headers.get("x-request-id", "")
                if answer.status >= 500:
                    time.sleep(0.02)  # as clients back off: an outage is not a busy loop


def stored(database: str) -> list[dict[str, Any]]:
    engine = build_engine(database)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(audit_records.c.record)).scalars().all()
    finally:
        engine.dispose()
    return [json.loads(row) for row in rows]


def logged_metrics(mlflow: RestartableMlflow, run_id: str) -> set[str]:
    response = httpx.get(f"{mlflow.url}{API}/runs/get", params={"run_id": run_id},
                         trust_env=False, timeout=30)  # fmt: skip
    assert response.status_code == 200, response.text
    return {m["key"] for m in response.json()["run"]["data"].get("metrics", [])}


def test_faults_under_load_lose_no_record(
    mlflow: RestartableMlflow, durable_postgres: DurablePostgres, tmp_path: Path
) -> None:
    began = time.monotonic()
    database = durable_postgres.create_database()
    data = tmp_path / "gw"
    port = free_port()
    token = "mlg_" + os.urandom(32).hex()
    args = ("--upstream-url", mlflow.url, "--database-uri", database)
    gateway = start_gateway_on(port, data, token, *args)
    restarted: Gateway | None = None
    load: Load | None = None
    threads: list[threading.Thread] = []
    try:
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {token}"},
                          trust_env=False, timeout=30) as admin:  # fmt: skip
            experiment = admin.post(API + "/experiments/create", json={"name": "faults"})
            assert experiment.status_code == 200, experiment.text
            experiment_id = experiment.json()["experiment_id"]
            run = admin.post(API + "/runs/create", json={"experiment_id": experiment_id})
            assert run.status_code == 200, run.text
        load = Load(run.json()["run"]["info"]["run_id"], gateway.url, token)
        threads = [threading.Thread(target=load.client, args=(n,)) for n in range(CLIENTS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()

        time.sleep(BEFORE_MLFLOW_RESTART)
        mlflow_down = time.monotonic()
        mlflow.stop()
        mlflow.start()
        mlflow_up = time.monotonic()
        time.sleep(BEFORE_DATABASE_STOP)
        durable_postgres.halt()
        down = time.monotonic()
        time.sleep(DATABASE_DOWN_FOR)
        durable_postgres.resume()
        up = time.monotonic()
        time.sleep(BEFORE_KILL)
        gateway.proc.send_signal(signal.SIGKILL)
        gateway.proc.wait(timeout=10)
        killed = time.monotonic()
        restarted = start_gateway_on(port, data, token, *args)
        time.sleep(max(0.0, min(AFTER_RESTART, started + LOAD_LIMIT - time.monotonic())))
        loaded = time.monotonic() - started
    finally:
        if load is not None:
            load.stop.set()
        for thread in threads:
            thread.join(timeout=30)
        gateway.stop()
    assert load is not None and restarted is not None
    try:
        # Everything spooled reaches the database (the shipper of the restarted gateway).
        spooled_head = json.loads((data / "audit" / "head.json").read_text())
        deadline = time.monotonic() + 30
        while True:
            records = stored(database)
            newest = max((r["seq"] for r in records if r["writer"] == spooled_head["writer"]),
                         default=0)  # fmt: skip
            if newest >= spooled_head["seq"]:
                break
            assert time.monotonic() < deadline, "the restarted gateway did not ship the spool"
            time.sleep(0.5)
    finally:
        restarted.stop()
    records = stored(database)
    answers = load.answers
    statuses = Counter(a.status for a in answers)

    # No 5xx but the upstream and availability ones.
    assert {s for s in statuses if s >= 500} <= {502, 503, 504}, statuses
    served = {a.key for a in answers if a.status == 200}
    assert len(served) > 200, statuses

    # Every request MLflow saw has its intent.
    intents = [r for r in records if r["kind"] == "intent"]
    by_key = {r["changes"]["key"]: r for r in intents if r.get("path") == LOG_METRIC}
    in_mlflow = logged_metrics(mlflow, load.run_id)
    assert served <= in_mlflow
    unaudited = sorted(in_mlflow - by_key.keys())
    assert not unaudited, f"MLflow holds metrics without an intent record: {unaudited[:10]}"

    # Every intent has exactly one outcome, or an explicit outcome_unknown.
    outcomes = Counter(r["request_id"] for r in records if r["kind"] == "outcome")
    assert {outcomes[r["request_id"]] for r in intents} == {1}
    unknown = [r for r in records if r.get("reason") == "outcome_unknown"]
    assert unknown, "the kill cut no request off: it was not mid-load"
    assert all(r["status"] == 0 and r["intent_seq"] for r in unknown)
    assert not [r for r in records if r.get("event") == "records_lost"]

    # The answered requests are recorded as answered.
    outcome_of = {r["request_id"]: r for r in records if r["kind"] == "outcome"}
    answered = [a for a in answers if a.status]
    missing = [a for a in answered if a.request_id not in outcome_of]
    assert not missing, f"{len(missing)} answered requests have no outcome record"
    # (An answer sent just before the kill whose outcome was not written yet: outcome_unknown.)
    assert all(
        outcome_of[a.request_id]["status"] in (a.status, 0) for a in answered
    )  # fmt: skip

    # Refusals of valid clients while the database was down: each recorded, none summarized.
    outage = [a for a in answers if a.reason == "identity_unavailable"]
    assert len(outage) > 30, Counter(a.reason for a in answers)  # past failed_login_limit
    assert all(outcome_of[a.request_id]["reason"] == "identity_unavailable" for a in outage)
    assert not [r for r in records if r.get("event") == "unauthenticated_refusals"]
    assert not [a for a in answers if a.reason == "too_many_failures"]

    # One traceback per outage, not one per request.
    log = (data / "gateway.log").read_text()
    lines = log.splitlines()
    tracebacks = [lines[i - 1] for i, line in enumerate(lines) if line.startswith("Traceback")]
    assert len(tracebacks) <= 4, tracebacks
    assert log.count("token lookup failed") >= len(outage) // 2

    verified = restarted.cli("audit", "verify", "--database-uri", database)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("OK: "), verified.stdout
    print(
        f"faults: {len(answers)} requests in {loaded:.0f} s by {CLIENTS} clients "
        f"({dict(sorted(statuses.items()))}, reasons "
        f"{dict(Counter(a.reason for a in answers if a.reason))}); MLflow saw {len(in_mlflow)}; "
        f"{len(intents)} intents, {sum(outcomes.values())} outcomes, {len(unknown)} "
        f"outcome_unknown; {len(outage)} refusals while the database was down "
        f"({up - down:.1f} s), each recorded; MLflow down {mlflow_up - mlflow_down:.1f} s; "
        f"killed {killed - started:.1f} s in; {len(lines)} log lines, tracebacks after "
        f"{tracebacks}; {verified.stdout.strip()}; "
        f"{time.monotonic() - began:.0f} s in all"
    )
