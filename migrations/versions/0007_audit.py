"""the audit log of operator actions, and each delivery's last reply class

audit_log: one row per action an operator carried out (retry, cancel, suppress, unsuppress,
pause, resume, relay resume, suppression import and export), from the CLI or the web: who
(name and role), when, the action, what it was aimed at (the filter as JSON) and how many rows
it changed. Read newest first, by its primary key.

deliveries.last_class: the class `replies.classify` gave the last reply (attempts.outcome holds
it per attempt), written with the outcome in the same UPDATE, so that a campaign's deliveries
can be filtered and counted by class without reading their attempts. No index: a filter by
class always narrows by campaign, message or recipient first. Rows written before this
revision have none (NULL) until their next outcome.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column(
            "target",
            sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql"),
            nullable=False,
        ),
        sa.Column("count", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    # a nullable column without a default: no table rewrite on PostgreSQL
    op.add_column("deliveries", sa.Column("last_class", sa.String(24), nullable=True))


def downgrade() -> None:
    # a plain DROP COLUMN (SQLite 3.35+): a batch would rebuild deliveries without the
    # expression indexes it cannot reflect
    op.drop_column("deliveries", "last_class")
    op.drop_table("audit_log")
