"""What every replica follows (revocations, blocks, the policy) is read through the pollers'
own engine: requests holding every connection of the main pool (a slow database under load)
must not keep a revocation, a block or a policy change from being seen."""

from __future__ import annotations

import asyncio
from pathlib import Path

from guard.app import build_gateway
from guard.authz.policy import Grant
from guard.authz.store import PolicyStore
from guard.config import load_settings
from guard.identity.revocations import bump
from guard.identity.sessions import UserBlocks
from guard.store.db import build_engine, migrate
from guard.store.polling import wait_for_poll_threads

ADMIN = "mlg_" + "b" * 43
KEY = "k" * 40


def test_the_pollers_read_while_requests_hold_every_main_connection(tmp_path: Path) -> None:
    settings = load_settings(
        {"upstream.url": "http://127.0.0.1:9", "storage.data_dir": str(tmp_path)}, {}, None
    ).settings
    gateway = build_gateway(
        settings, {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": ADMIN, "MLFLOW_GUARD_SECRET_KEY": KEY}
    )
    assert gateway.revocations is not None and gateway.blocked is not None
    migrate(gateway.engine)
    other = build_engine(settings.database_uri)  # another replica, or the CLI
    held = [gateway.engine.connect() for _ in range(15)]  # the main pool: 5 kept, 10 more
    try:
        with other.begin() as conn:
            bump(conn)
        UserBlocks(other).block("user:alice", "admin")
        policy = PolicyStore(other)
        policy.seed_defaults("test", [Grant("token:admin", "admin", "*")])
        policy.change("test", add=[Grant("user:bob", "viewer", "*")])

        async def follow() -> None:
            await gateway.revocations.refresh()  # type: ignore[union-attr]
            await gateway.blocked.refresh()  # type: ignore[union-attr]
            await gateway.policies.refresh()

        # (bounded: before, each read waited 30 s for a connection of the main pool)
        asyncio.run(asyncio.wait_for(follow(), 10))
        assert gateway.revocations.counter >= 1
        assert "user:alice" in gateway.blocked
        assert gateway.policies.decide("user:bob", "experiment:1", "read").allowed
    finally:
        for conn in held:
            conn.close()
        assert wait_for_poll_threads(10)
        other.dispose()
        gateway.engine.dispose()
        if gateway.poll_engine is not None:
            gateway.poll_engine.dispose()
