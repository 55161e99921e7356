"""The gateway's own database: engine, schema and migrations.

Tables are prefixed ``guard_`` and Alembic keeps its version in ``guard_alembic_version``, so
the gateway can share a database (for example MLflow's PostgreSQL) without touching its tables.
"""

from __future__ import annotations

import datetime as dt
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Dialect, Engine

logger = logging.getLogger("guard.db")

VERSION_TABLE = "guard_alembic_version"


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """Timestamps stored as naive UTC and read back as aware UTC, on SQLite and PostgreSQL."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)  # noqa: S101 - the column type guarantees it
        return value.replace(tzinfo=dt.UTC)


metadata = sa.MetaData()

tokens = sa.Table(
    "guard_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("role", sa.String(64), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Column("last_used_at", UTCDateTime, nullable=True),
    # A personal token acts as this person (``user:alice``); NULL for a service token.
    sa.Column("owner", sa.String(256), nullable=True),
    # A name is unique among live tokens; a revoked token's name may be reused.
    sa.Index(
        "guard_tokens_live_name",
        "name",
        unique=True,
        sqlite_where=sa.text("revoked_at IS NULL"),
        postgresql_where=sa.text("revoked_at IS NULL"),
    ),
)


casbin_rules = sa.Table(
    "guard_casbin_rule",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ptype", sa.String(8), nullable=False),
    *(sa.Column(f"v{i}", sa.String(512), nullable=True) for i in range(6)),
)

# One row (id 1): bumped in the same transaction as every policy change; replicas poll it.
policy_state = sa.Table(
    "guard_policy_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
)

# One row (id 1): moved in the same transaction as every revocation (a token revoked, a session
# ended, a person blocked); replicas poll it and stop trusting every credential they cached.
# Apart from the policy version, so a revocation neither rebuilds the policy index nor shows in
# the policy version audit records carry.
revocation_state = sa.Table(
    "guard_revocation",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("counter", sa.BigInteger, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# The audit trail (guard.audit): one row per record; ``record`` is the canonical JSON the chain's
# MAC covers, the other columns copy what auditors filter on.
audit_records = sa.Table(
    "guard_audit",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("writer", sa.String(128), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("time", UTCDateTime, nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("principal", sa.String(256), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("resource", sa.String(512), nullable=False),
    sa.Column("decision", sa.String(8), nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("record", sa.Text, nullable=False),
    sa.UniqueConstraint("writer", "seq", name="guard_audit_writer_seq"),
    sa.Index("guard_audit_time", "time"),
    sa.Index("guard_audit_principal", "principal", "time"),
    sa.Index("guard_audit_resource", "resource", "time"),
    sa.Index("guard_audit_request", "request_id"),
)  # fmt: skip

# Where each writer's stored chain starts after a prune: the last pruned record's seq and MAC,
# signed with the audit key so that moving the start forward is detected too.
audit_anchors = sa.Table(
    "guard_audit_anchor",
    metadata,
    sa.Column("writer", sa.String(128), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("mac", sa.String(64), nullable=False),
    sa.Column("signature", sa.String(64), nullable=False),
)

# Where each writer's stored chain ends: moved forward with every batch the writer stores,
# signed with the audit key. A chain that stops short of it, or is gone, was cut.
audit_heads = sa.Table(
    "guard_audit_head",
    metadata,
    sa.Column("writer", sa.String(128), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("mac", sa.String(64), nullable=False),
    sa.Column("signature", sa.String(64), nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)


# Which identity a user name is bound to (guard.identity.bindings): the first that used it, until
# an administrator links or frees it. ``subject`` is unique, so of two first logins one wins.
identities = sa.Table(
    "guard_identity",
    metadata,
    sa.Column("subject", sa.String(256), primary_key=True),
    sa.Column("source", sa.String(64), nullable=False),
    sa.Column("stable_id", sa.String(512), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("last_seen_at", UTCDateTime, nullable=False),
    # The source-qualified groups of the last login (JSON list), which personal tokens carry.
    sa.Column("groups", sa.Text, nullable=True),
    sa.Index("ix_guard_identity_source_id", "source", "stable_id"),
)

# Browser sessions (guard.identity.sessions), keyed by an HMAC of the random id the cookie holds:
# the table alone never lets anyone present a session. A row is ended by ``revoked_at`` or by
# its expiry times; ``groups`` and ``roles`` are JSON lists as the login asserted them.
sessions = sa.Table(
    "guard_session",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("subject", sa.String(256), nullable=False, index=True),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("identity", sa.String(640), nullable=False),
    sa.Column("groups", sa.Text, nullable=False),
    sa.Column("roles", sa.Text, nullable=False),
    sa.Column("issuer", sa.String(512), nullable=True),
    sa.Column("oidc_sub", sa.String(256), nullable=True),
    sa.Column("oidc_sid", sa.String(256), nullable=True),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("last_seen_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("groups_checked_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Column("revoked_by", sa.String(256), nullable=True),
    # The identity provider's tokens (refresh, access), encrypted; never in the cookie.
    sa.Column("provider_tokens", sa.Text, nullable=True),
)

# OpenID Connect back-channel logout tokens already used (``jti``), so none is accepted twice on
# any replica; rows are kept until the token would have expired.
oidc_logout_jtis = sa.Table(
    "guard_oidc_logout_jti",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),  # HMAC of issuer and jti
    sa.Column("issuer", sa.String(512), nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False, index=True),
)

# People stopped everywhere at once (``mlflow-guard user block``): sessions, directory logins
# and personal tokens check this table.
user_blocks = sa.Table(
    "guard_user_block",
    metadata,
    sa.Column("subject", sa.String(256), primary_key=True),
    sa.Column("blocked_at", UTCDateTime, nullable=False),
    sa.Column("blocked_by", sa.String(256), nullable=False),
    sa.Column("reason", sa.String(512), nullable=False),
)

# Credential failures (a wrong password, not a flood of requests without credentials), counted
# per user name across replicas so the per-user limit holds behind a load balancer.
login_failures = sa.Table(
    "guard_login_failure",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("name_key", sa.String(64), nullable=False),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("failed_at", UTCDateTime, nullable=False),
    sa.Index("ix_guard_login_failure_name_time", "name_key", "failed_at"),
)  # fmt: skip


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def build_engine(uri: str, connections: int | None = None) -> Engine:
    """Create the engine for ``uri``; SQLite gets WAL and a busy timeout for several processes.
    ``connections``: a pool of exactly that many (the pollers' own engine); else 5 kept and up
    to 10 more."""
    url = sa.make_url(uri)
    pool = {"pool_size": 5, "max_overflow": 10} if connections is None else {
        "pool_size": connections, "max_overflow": 0,
    }  # fmt: skip
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        else:
            pool = {}  # (one in-memory database per connection: its own pool class)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False}, **pool)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_pre_ping=True, **pool)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (safe to run from several processes at once)."""
    config = Config()
    config.set_main_option(
        "script_location", str(resources.files("guard.store").joinpath("migrations"))
    )
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def ping(engine: Engine) -> None:
    """Raise if the database cannot answer a trivial query."""
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
