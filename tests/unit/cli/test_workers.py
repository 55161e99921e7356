"""``serve --workers N``'s parts that need no process of their own: the shared socket keeps
TCP_NODELAY, each worker's spool and role, and what a start with fewer workers does with the
spools of the workers it no longer runs (stores them, and verify still checks them)."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from guard.app import WorkerRole, build_gateway
from guard.audit.chain import derive_key
from guard.audit.commands import verify_trail
from guard.audit.spool import Spool
from guard.audit.store import AuditStore, Filters
from guard.audit.trail import ship_leftover_spools, worker_spool_dir, worker_spool_dirs
from guard.cli.workers import bind_socket
from guard.config import load_settings
from guard.settings import Settings

SECRET = b"s" * 40
ENVIRON = {"MLFLOW_GUARD_SECRET_KEY": SECRET.decode()}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    flags = {"storage.data_dir": str(tmp_path), "upstream.url": "http://127.0.0.1:9"}
    return load_settings(flags, {}, None).settings


async def _nodelay_of_accepted(sock: socket.socket) -> int:
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted = transport.get_extra_info("socket")
            seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
    async with server:
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 5)
        finally:
            writer.close()


def test_connections_accepted_on_the_shared_socket_have_tcp_nodelay() -> None:
    # Without it every keep-alive request waits ~40 ms for a delayed ACK (uvicorn #3149).
    assert asyncio.run(_nodelay_of_accepted(bind_socket("127.0.0.1", 0))) != 0


def test_a_socket_made_without_the_protocol_number_would_lose_it() -> None:
    # The trap bind_socket avoids: asyncio sets TCP_NODELAY only for proto IPPROTO_TCP.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    assert asyncio.run(_nodelay_of_accepted(sock)) == 0


def test_worker_zero_continues_the_single_process_spool(settings: Settings) -> None:
    assert worker_spool_dir(settings, 0) == settings.audit_spool_dir
    assert worker_spool_dir(settings, 3) == settings.audit_spool_dir / "worker-3"
    for name in ("worker-1", "worker-12", "worker-x", "other"):
        (settings.audit_spool_dir / name).mkdir(parents=True)
    (settings.audit_spool_dir / "worker-2").touch()  # a file, not a spool
    assert worker_spool_dirs(settings) == {
        1: settings.audit_spool_dir / "worker-1",
        12: settings.audit_spool_dir / "worker-12",
    }


def test_a_worker_forwards_to_the_parents_mlflow_with_its_own_chain(
    tmp_path: Path,
) -> None:
    flags = {"storage.data_dir": str(tmp_path), "gateway.failed_login_limit": "30"}
    settings = load_settings(flags, {}, None).settings
    assert settings.embedded
    role = WorkerRole(index=1, count=2, upstream_url="http://127.0.0.1:5999")
    gateway = build_gateway(settings, ENVIRON, worker=role)
    try:
        assert gateway.supervisor is None  # the parent supervises the one embedded MLflow
        assert gateway.upstream.base_url == "http://127.0.0.1:5999"
        assert gateway.trail is not None
        assert gateway.trail.spool.directory == settings.audit_spool_dir / "worker-1"
        assert gateway.trail.limiter is not None
        assert gateway.trail.limiter.limit == 30
        assert gateway.trail.limiter.shared is None  # no file given: counts alone
    finally:
        gateway.engine.dispose()
    single = build_gateway(settings, ENVIRON)
    try:
        assert single.supervisor is not None
        assert single.trail is not None and single.trail.limiter is not None
        assert single.trail.limiter.limit == 30
        assert single.trail.spool.directory == settings.audit_spool_dir
    finally:
        single.engine.dispose()


def _spool(directory: Path, count: int) -> str:
    spool = Spool(directory, derive_key(SECRET, "audit-chain"), segment_size=1 << 20)
    spool.open()
    try:
        for n in range(count):
            body = {"kind": "event", "event": "test", "n": n,
                    "time": dt.datetime.now(dt.UTC).isoformat()}  # fmt: skip
            asyncio.run(spool.append(body))
    finally:
        spool.close()
    return spool.writer


def test_a_start_with_fewer_workers_stores_the_others_spools(
    settings: Settings, engine: Engine
) -> None:
    kept = _spool(worker_spool_dir(settings, 1), 3)
    left = _spool(worker_spool_dir(settings, 2), 4)
    # Two workers now: worker 1 ships its own spool itself; worker 2's is left over.
    assert ship_leftover_spools(settings, engine, SECRET, workers=2) == 4
    writers = {r["writer"] for _, r in AuditStore(engine).query(Filters(), limit=100)}
    assert writers == {left}
    assert ship_leftover_spools(settings, engine, SECRET, workers=1) == 3
    writers = {r["writer"] for _, r in AuditStore(engine).query(Filters(), limit=100)}
    assert writers == {left, kept}
    assert ship_leftover_spools(settings, engine, SECRET, workers=1) == 0  # exactly once
    spools = [settings.audit_spool_dir, *worker_spool_dirs(settings).values()]
    checked, problems = verify_trail(engine, SECRET, spools)
    assert (checked, problems) == (7, [])
