"""Shared fixtures: a throwaway PostgreSQL cluster, fresh databases, a throwaway slapd, a
throwaway OpenID Connect provider, free ports.

A PostgreSQL, LDAP, OIDC, browser or MLflow-release test that is skipped fails the run:
silently not testing a real component is not a pass.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from tests.idp import OidcProvider
    from tests.slapd import Slapd


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and ("postgresql" in item.keywords or "[postgresql" in item.nodeid):
        report.outcome = "failed"
        report.longrepr = (
            f"PostgreSQL test was skipped, which counts as a failure: {report.longrepr}"
        )
    elif report.skipped and "ldap" in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"LDAP test was skipped, which counts as a failure: {report.longrepr}"
    elif report.skipped and (
        "oidc" in item.keywords or "oidc_provider" in getattr(item, "fixturenames", ())
    ):
        report.outcome = "failed"
        report.longrepr = f"OIDC test was skipped, which counts as a failure: {report.longrepr}"
    elif report.skipped and "mlflow_release" in item.keywords:
        report.outcome = "failed"
        report.longrepr = (
            f"A test of a real MLflow release was skipped, which counts as a failure: "
            f"{report.longrepr}"
        )
    elif report.skipped and "browser" in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"Browser test was skipped, which counts as a failure: {report.longrepr}"


class PostgresCluster:
    """initdb + pg_ctl on a free loopback port, in a temporary directory; trust auth. Fast and
    not crash-safe (fsync off) unless ``durable``: then commits are on disk as in production."""

    def __init__(self, durable: bool = False) -> None:
        initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not initdbs:
            raise RuntimeError("PostgreSQL is not installed (make test installs it)")
        self.bin = Path(initdbs[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="guard-pg-"))
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0  # initdb refuses to run as root
        self.user = "postgres"
        self.options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 " + (
            "-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
            if durable
            else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", f"{self.dir}/data", "-A", "trust", "-U", self.user,
                  "-E", "UTF8", "--no-sync")  # fmt: skip
        self._run("pg_ctl", "-D", f"{self.dir}/data", "-l", f"{self.dir}/pg.log", "-w",
                  "-t", "30", "-o", self.options, "start")  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._run("pg_ctl", "-D", f"{self.dir}/data", "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def uri(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slapd() -> Iterator[Slapd]:
    """The seeded throwaway directory (tests/slapd.py), started once per session."""
    from tests.slapd import Slapd

    server = Slapd(free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[OidcProvider]:
    """The throwaway OpenID Connect provider (tests/idp.py, ``node tests/idp/server.mjs``),
    started once per session; issuer ``http://localhost:PORT``. Tests register their own
    clients; ``reset()`` undoes key and failure changes."""
    from tests.idp import OidcProvider

    server = OidcProvider(free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def database_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: SQLite in tmp_path, or a new database in the PG cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'guard.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.create_database()


@pytest.fixture
def engine(database_uri: str) -> Iterator[Engine]:
    """An engine on ``database_uri``, migrated to the newest schema. (A test module that needs
    another, such as one SQLite file it also hands to a gateway, defines its own.)"""
    from guard.store.db import build_engine, migrate

    engine = build_engine(database_uri)
    migrate(engine)
    yield engine
    engine.dispose()
