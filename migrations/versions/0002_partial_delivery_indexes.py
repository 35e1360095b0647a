"""partial indexes for what the dispatcher looks for

Every claim and every outcome changes a delivery's state, and a row whose indexed columns change
gets a new entry in every index it belongs to. The dispatcher only ever looks for deliveries
that are due (queued or deferred) or whose lease ran out (sending): partial indexes on exactly
those keep the claim and the record out of two indexes (PostgreSQL's CPU per message fell from
92 to 77 us in bench). Lookups by message use the unique (message_id, lower(recipient)) index;
an operator's selection by state alone (`mailer retry --state unknown`) reads the whole table.

On a large outbox the new indexes are built while writes wait (CREATE INDEX): stop the workers
for the upgrade, or build them by hand first with CREATE INDEX CONCURRENTLY (same names).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DUE = "state IN ('queued', 'deferred')"
LEASED = "state = 'sending'"


def upgrade() -> None:
    # IF NOT EXISTS: an operator may have built them beforehand, CONCURRENTLY
    op.create_index(
        "ix_deliveries_due",
        "deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text(DUE),
        sqlite_where=sa.text(DUE),
        if_not_exists=True,
    )
    op.create_index(
        "ix_deliveries_leased",
        "deliveries",
        ["lease_until"],
        postgresql_where=sa.text(LEASED),
        sqlite_where=sa.text(LEASED),
        if_not_exists=True,
    )
    op.drop_index("ix_deliveries_message_id_state", table_name="deliveries")
    op.drop_index("ix_deliveries_state_next_attempt_at", table_name="deliveries")


def downgrade() -> None:
    op.drop_index("ix_deliveries_leased", table_name="deliveries")
    op.drop_index("ix_deliveries_due", table_name="deliveries")
    op.create_index(
        "ix_deliveries_state_next_attempt_at", "deliveries", ["state", "next_attempt_at"]
    )
    op.create_index("ix_deliveries_message_id_state", "deliveries", ["message_id", "state"])
