"""Browser sessions, blocked users and credential failures counted per user name.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

import guard.store.db

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    when = guard.store.db.UTCDateTime
    op.create_table(
        "guard_session",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("subject", sa.String(256), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("identity", sa.String(640), nullable=False),
        sa.Column("groups", sa.Text, nullable=False),
        sa.Column("roles", sa.Text, nullable=False),
        sa.Column("issuer", sa.String(512), nullable=True),
        sa.Column("oidc_sub", sa.String(256), nullable=True),
        sa.Column("oidc_sid", sa.String(256), nullable=True),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("created_at", when, nullable=False),
        sa.Column("last_seen_at", when, nullable=False),
        sa.Column("expires_at", when, nullable=False),
        sa.Column("groups_checked_at", when, nullable=False),
        sa.Column("revoked_at", when, nullable=True),
        sa.Column("revoked_by", sa.String(256), nullable=True),
    )
    op.create_index("ix_guard_session_subject", "guard_session", ["subject"])
    op.create_table(
        "guard_user_block",
        sa.Column("subject", sa.String(256), primary_key=True),
        sa.Column("blocked_at", when, nullable=False),
        sa.Column("blocked_by", sa.String(256), nullable=False),
        sa.Column("reason", sa.String(512), nullable=False),
    )
    op.create_table(
        "guard_login_failure",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("name_key", sa.String(64), nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("failed_at", when, nullable=False),
    )
    op.create_index(
        "ix_guard_login_failure_name_time", "guard_login_failure", ["name_key", "failed_at"]
    )


def downgrade() -> None:
    op.drop_table("guard_login_failure")
    op.drop_table("guard_user_block")
    op.drop_table("guard_session")
