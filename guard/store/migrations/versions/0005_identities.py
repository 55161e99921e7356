"""User names bound to the identity that first used them (source and the entry's stable id).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

import guard.store.db

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "guard_identity",
        sa.Column("subject", sa.String(256), primary_key=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("stable_id", sa.String(512), nullable=False),
        sa.Column("created_at", guard.store.db.UTCDateTime, nullable=False),
        sa.Column("last_seen_at", guard.store.db.UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("guard_identity")
