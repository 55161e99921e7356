"""The revocation counter: one row, moved by every token revocation, session end and user block,
which every replica polls to drop the credentials it cached.

Revision ID: 0008
Revises: 0007
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

import guard.store.db

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "guard_revocation",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("counter", sa.BigInteger, nullable=False),
        sa.Column("updated_at", guard.store.db.UTCDateTime, nullable=False),
    )
    assert table is not None  # noqa: S101 - create_table returns the table it made
    op.bulk_insert(table, [{"id": 1, "counter": 0, "updated_at": dt.datetime.now(dt.UTC)}])


def downgrade() -> None:
    op.drop_table("guard_revocation")
