"""Service tokens.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

import guard.store.db

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "guard_tokens",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", guard.store.db.UTCDateTime, nullable=False),
        sa.Column("expires_at", guard.store.db.UTCDateTime, nullable=False),
        sa.Column("revoked_at", guard.store.db.UTCDateTime, nullable=True),
        sa.Column("last_used_at", guard.store.db.UTCDateTime, nullable=True),
    )
    op.create_index(
        "guard_tokens_live_name",
        "guard_tokens",
        ["name"],
        unique=True,
        sqlite_where=sa.text("revoked_at IS NULL"),
        postgresql_where=sa.text("revoked_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("guard_tokens_live_name", table_name="guard_tokens")
    op.drop_table("guard_tokens")
