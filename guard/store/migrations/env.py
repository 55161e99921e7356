"""Alembic environment: runs on the connection ``guard.store.db.migrate`` hands over."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from guard.store.db import VERSION_TABLE, metadata

# Any fixed number: serializes concurrent migrations of several replicas on PostgreSQL.
_MIGRATION_LOCK = 0x6D6C6775617264

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    context.run_migrations()
