"""The audit trail and the anchors prunes leave.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

import guard.store.db

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "guard_audit",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("writer", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("time", guard.store.db.UTCDateTime, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("principal", sa.String(256), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("resource", sa.String(512), nullable=False),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("record", sa.Text, nullable=False),
        sa.UniqueConstraint("writer", "seq", name="guard_audit_writer_seq"),
    )  # fmt: skip
    op.create_index("guard_audit_time", "guard_audit", ["time"])
    op.create_index("guard_audit_principal", "guard_audit", ["principal", "time"])
    op.create_index("guard_audit_resource", "guard_audit", ["resource", "time"])
    op.create_index("guard_audit_request", "guard_audit", ["request_id"])
    op.create_table(
        "guard_audit_anchor",
        sa.Column("writer", sa.String(128), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("guard_audit_anchor")
    op.drop_table("guard_audit")
