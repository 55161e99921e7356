"""Policies: casbin rules and the version replicas poll.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

import guard.store.db

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "guard_casbin_rule",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ptype", sa.String(8), nullable=False),
        *(sa.Column(f"v{i}", sa.String(512), nullable=True) for i in range(6)),
    )
    op.create_table(
        "guard_policy_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("updated_at", guard.store.db.UTCDateTime, nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("guard_policy_state")
    op.drop_table("guard_casbin_rule")
