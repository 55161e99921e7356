"""Each writer's anchored head: where its chain ends, signed, so a chain cut short (or deleted
whole) is found without that writer's spool.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

import guard.store.db

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "guard_audit_head",
        sa.Column("writer", sa.String(128), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(64), nullable=False),
        sa.Column("updated_at", guard.store.db.UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("guard_audit_head")
