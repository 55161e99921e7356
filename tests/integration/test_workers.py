"""``mlflow-guard serve --workers 2`` with its embedded MLflow: one MLflow and one banner,
requests served by both workers (each its own audit chain), metrics added up across them, no
keep-alive delay, the failure limit shared rather than doubled, SIGTERM leaves no process
behind, and a start with one worker stores what the second left in its spool."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import sqlalchemy as sa

from guard.cli.common import EXIT_STARTUP
from guard.store.db import audit_records, build_engine
from tests.conftest import free_port
from tests.integration.conftest import Gateway, start_gateway
from tests.integration.test_mlflow_client import (
    test_keep_alive_requests_do_not_wait_for_delayed_acks as keep_alive_check,
)

pytestmark = pytest.mark.integration

LIMIT = 10  # gateway.failed_login_limit for these gateways
STOP_TIMEOUT = 30


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    running = start_gateway(
        tmp_path_factory.mktemp("workers"), "--workers", "2",
        MLFLOW_GUARD_GATEWAY_FAILED_LOGIN_LIMIT=str(LIMIT),
    )  # fmt: skip
    yield running
    running.stop()


def worker_processes(gateway: Gateway) -> list[psutil.Process]:
    return [
        p for p in psutil.Process(gateway.proc.pid).children()
        if "multiprocessing.spawn" in " ".join(p.cmdline())
    ]  # fmt: skip


def mlflow_servers(gateway: Gateway) -> list[psutil.Process]:
    return [p for p in gateway.mlflow_processes() if "server" in p.cmdline()]


def writers(gateway: Gateway, path: str) -> dict[str, int]:
    """Audit outcome records of requests to ``path``, by writer (worker)."""
    engine = build_engine(f"sqlite:///{gateway.data_dir / 'guard.db'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(audit_records.c.writer, sa.func.count())
                .where(audit_records.c.kind == "outcome", audit_records.c.record.contains(path))
                .group_by(audit_records.c.writer)
            ).all()
    finally:
        engine.dispose()
    return {str(writer): int(count) for writer, count in rows}


def requests_counted(gateway: Gateway) -> float:
    text = httpx.get(gateway.url + "/guard/metrics").text
    return sum(
        float(v) for v in re.findall(r"^mlflow_guard_requests_total\{.*\} (\S+)$", text, re.M)
    )


def spread(gateway: Gateway, path: str, count: int, auth: tuple[str, str] | None) -> list[int]:
    """``count`` GETs of ``path``, each on a new connection, eight at a time."""

    def one(_: int) -> int:
        return httpx.get(gateway.url + path, auth=auth, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def test_one_mlflow_one_banner_two_workers(workers: Gateway) -> None:
    assert len(worker_processes(workers)) == 2
    assert len(mlflow_servers(workers)) == 1
    assert workers.log.read_text().count("created token 'admin'") == 1


def test_requests_are_served_by_both_workers_and_counted_together(workers: Gateway) -> None:
    auth = ("admin", workers.token)
    path = "/api/2.0/mlflow/experiments/get-by-name"
    before = requests_counted(workers)
    statuses = spread(workers, path + "?experiment_name=Default", 64, auth)
    assert statuses == [200] * 64
    assert requests_counted(workers) - before == 64  # both workers' counts, in one scrape
    deadline = time.monotonic() + 15
    while sum((by_writer := writers(workers, path)).values()) < 64:  # shipped within a second
        assert time.monotonic() < deadline, by_writer
        time.sleep(0.2)
    assert sum(by_writer.values()) == 64
    assert len(by_writer) == 2, by_writer  # two audit chains, one per worker
    heads = re.findall(r"^mlflow_guard_audit_chain_head\{writer=\"([^\"]+)\"\}",
                       httpx.get(workers.url + "/guard/metrics").text, re.M)  # fmt: skip
    assert set(heads) == set(by_writer)


def test_keep_alive_requests_do_not_wait_for_delayed_acks(workers: Gateway) -> None:
    keep_alive_check(workers)


def test_the_failure_limit_is_shared_by_the_workers(workers: Gateway) -> None:
    path = workers.url + "/api/2.0/mlflow/experiments/search"
    with httpx.Client() as one_worker:  # one keep-alive connection: one worker answers it
        first = [one_worker.get(path).status_code for _ in range(LIMIT - 2)]
    assert first == [401] * (LIMIT - 2)  # the whole limit, not a share of it
    statuses = spread(workers, "/api/2.0/mlflow/experiments/search", 3 * LIMIT, None)
    assert set(statuses) <= {401, 429}
    # Counting per worker would let up to LIMIT more through on the other worker. (Two workers
    # may both check the count before either adds to it: one more at most here.)
    assert statuses.count(401) <= 3, statuses
    assert statuses.count(429) >= 3 * LIMIT - 3
    # Valid credentials still work from the same address.
    auth = ("admin", workers.token)
    assert httpx.get(workers.url + "/api/2.0/mlflow/experiments/search?max_results=1",
                     auth=auth).status_code == 200  # fmt: skip


def test_a_worker_that_cannot_start_stops_the_gateway(workers: Gateway) -> None:
    # A second gateway on the same data directory: its workers find the spools locked.
    log = workers.data_dir / "second.log"
    with log.open("wb") as out:
        second = subprocess.Popen(
            [sys.executable, "-m", "guard", "serve", "--data-dir", str(workers.data_dir),
             "--port", str(free_port()), "--workers", "2"],
            stdout=out, stderr=subprocess.STDOUT, env=workers.env, start_new_session=True,
        )  # fmt: skip
    try:
        assert second.wait(timeout=120) == EXIT_STARTUP
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert "is in use by another gateway process" in log.read_text()
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(workers.data_dir) in
                " ".join(p.info["cmdline"] or []) and p.pid not in
                {q.pid for q in psutil.Process(workers.proc.pid).children(recursive=True)}
                and p.pid != workers.proc.pid]  # fmt: skip
    auth = ("admin", workers.token)
    assert httpx.get(workers.url + "/version", auth=auth).status_code == 200


def test_a_worker_that_dies_is_started_again(workers: Gateway) -> None:
    mlflow = {p.pid for p in mlflow_servers(workers)}
    victim = worker_processes(workers)[0]
    victim.kill()
    victim.wait(timeout=STOP_TIMEOUT)
    deadline = time.monotonic() + 60
    while len({p.pid for p in worker_processes(workers)} - {victim.pid}) < 2:
        assert time.monotonic() < deadline, "no worker started in place of the dead one"
        time.sleep(0.2)
    auth = ("admin", workers.token)
    deadline = time.monotonic() + 60
    while spread(workers, "/version", 16, auth) != [200] * 16:  # until the new one serves too
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert {p.pid for p in mlflow_servers(workers)} == mlflow  # MLflow untouched


def test_sigterm_stops_every_process(workers: Gateway) -> None:
    everything = psutil.Process(workers.proc.pid).children(recursive=True)
    assert len(everything) >= 4  # two workers, MLflow and its server process
    workers.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(timeout=STOP_TIMEOUT) == 0
    _, alive = psutil.wait_procs(everything, timeout=STOP_TIMEOUT)
    assert alive == []


def test_a_start_with_one_worker_stores_the_second_workers_spool(tmp_path: Path) -> None:
    data = tmp_path / "gw"
    first = start_gateway(data, "--workers", "2")
    everything = psutil.Process(first.proc.pid).children(recursive=True)
    private = {p.environ().get("PROMETHEUS_MULTIPROC_DIR") for p in worker_processes(first)}
    # The database takes no writes until the crash (reads go on: SQLite's WAL), so the workers'
    # shippers cannot store what they spool: the crash leaves records in worker 1's spool
    # whatever the timing, for the start below to store.
    lock = sqlite3.connect(data / "guard.db", isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        spread(first, "/version", 32, ("admin", first.token))
        for process in [first.proc.pid, *(p.pid for p in everything)]:  # a crash of all of it
            psutil.Process(process).kill()
        first.proc.wait(timeout=STOP_TIMEOUT)
        psutil.wait_procs(everything, timeout=STOP_TIMEOUT)
    finally:
        lock.close()  # (rolls back)
    for directory in private - {None}:  # a killed parent leaves its private directory
        shutil.rmtree(str(directory), ignore_errors=True)
    second = (data / "audit" / "worker-1" / "writer").read_text().strip()
    spooled = sum(
        len(p.read_bytes().splitlines()) for p in (data / "audit" / "worker-1").glob("*.jsonl")
    )
    assert spooled > 0
    again = start_gateway(data, "--workers", "1", token=first.token, port=first.port)
    try:
        engine = build_engine(f"sqlite:///{data / 'guard.db'}")
        try:
            with engine.connect() as conn:
                stored = conn.execute(
                    sa.select(sa.func.max(audit_records.c.seq)).where(
                        audit_records.c.writer == second
                    )
                ).scalar_one()
        finally:
            engine.dispose()
        head = json.loads((data / "audit" / "worker-1" / "head.json").read_text())
        assert head["writer"] == second
        assert stored == head["seq"]  # every record it spooled (and its crash's notes) stored
        left = re.search(
            r"stored (\d+) audit records left in the spool of worker 1", again.log.read_text()
        )
        assert left is not None and int(left.group(1)) > 0  # none were stored before the crash
        verify = again.cli("audit", "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "UNCHECKED" not in verify.stdout
    finally:
        again.stop()
