"""Personal tokens (owner), the groups of a person's last login, OIDC provider tokens in
sessions, and used back-channel logout token ids.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

import guard.store.db

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("guard_tokens") as batch:
        batch.add_column(sa.Column("owner", sa.String(256), nullable=True))
    with op.batch_alter_table("guard_identity") as batch:
        batch.add_column(sa.Column("groups", sa.Text, nullable=True))
    op.create_index("ix_guard_identity_source_id", "guard_identity", ["source", "stable_id"])
    with op.batch_alter_table("guard_session") as batch:
        batch.add_column(sa.Column("provider_tokens", sa.Text, nullable=True))
    op.create_table(
        "guard_oidc_logout_jti",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("issuer", sa.String(512), nullable=False),
        sa.Column("expires_at", guard.store.db.UTCDateTime, nullable=False),
    )
    op.create_index("ix_guard_oidc_logout_jti_expires_at", "guard_oidc_logout_jti", ["expires_at"])


def downgrade() -> None:
    op.drop_table("guard_oidc_logout_jti")
    with op.batch_alter_table("guard_session") as batch:
        batch.drop_column("provider_tokens")
    op.drop_index("ix_guard_identity_source_id", "guard_identity")
    with op.batch_alter_table("guard_identity") as batch:
        batch.drop_column("groups")
    with op.batch_alter_table("guard_tokens") as batch:
        batch.drop_column("owner")
