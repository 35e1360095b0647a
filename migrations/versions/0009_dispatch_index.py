"""the dispatcher's indexes: wake-ups owed, and wake-ups given

ix_deliveries_due held every queued and deferred delivery, and a pass walked it from the
earliest due, reading past every delivery already published and not yet claimed (a long
campaign's whole backlog) before it found one that needed a wake-up. Two partial indexes
split those rows by whether a wake-up is owed, which the row itself says (published_at
against next_attempt_at), so that no write path has to keep a flag:

- ix_deliveries_wakeup (next_attempt_at): never published since it became due; a pass
  reads exactly the rows it publishes, earliest first, and stops at the first not yet due.
  Publishing a row (published_at = now >= next_attempt_at) takes it out.
- ix_deliveries_published (published_at): published and not yet claimed; the "queue ran
  empty, wake-ups lost" pass reads the oldest, those published before its cut-off, first.

Together they hold the rows ix_deliveries_due held, which nothing else reads: it goes.

On a large outbox the indexes are built while writes wait (CREATE INDEX): stop the
dispatcher and workers for the upgrade, or build them first with CREATE INDEX CONCURRENTLY
(same names and definitions).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

WAITING = "state IN ('queued', 'deferred')"
OWED = f"{WAITING} AND (published_at IS NULL OR published_at < next_attempt_at)"
GIVEN = f"{WAITING} AND published_at >= next_attempt_at"


def upgrade() -> None:
    # IF NOT EXISTS: an operator may have built them beforehand, CONCURRENTLY
    op.create_index(
        "ix_deliveries_wakeup",
        "deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text(OWED),
        sqlite_where=sa.text(OWED),
        if_not_exists=True,
    )
    op.create_index(
        "ix_deliveries_published",
        "deliveries",
        ["published_at"],
        postgresql_where=sa.text(GIVEN),
        sqlite_where=sa.text(GIVEN),
        if_not_exists=True,
    )
    op.drop_index("ix_deliveries_due", table_name="deliveries")


def downgrade() -> None:
    op.create_index(
        "ix_deliveries_due",
        "deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text(WAITING),
        sqlite_where=sa.text(WAITING),
    )
    op.drop_index("ix_deliveries_published", table_name="deliveries")
    op.drop_index("ix_deliveries_wakeup", table_name="deliveries")
