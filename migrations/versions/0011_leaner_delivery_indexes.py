"""two fewer index entries on every delivery's outcome

A delivery's outcome writes an entry into each index whose predicate its new row meets
(BENCHMARKS.md, "What the new indexes and the counts cost the hot path"). Two of 0004's
indexes go:

- ix_deliveries_message_id_domain: a campaign's per-domain counts read the domain from
  ix_deliveries_message_id_state_updated_at_id_domain instead, the campaign index with the
  domain carried in its entries (INCLUDE, PostgreSQL; SQLite reads it from the table);
- ix_deliveries_purgeable: `mailer purge` walks the primary key up to the cut-off instead
  (mailer/retention.py), which costs the workers nothing.

On a large outbox the new index is built while writes wait (CREATE INDEX): stop the workers
for the upgrade, or build it by hand first with CREATE INDEX CONCURRENTLY (same name and
definition: `IF NOT EXISTS` then skips it).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

SETTLED = "state <> 'sending'"
PURGEABLE = "state IN ('sent', 'bounced', 'failed', 'expired', 'suppressed', 'cancelled')"
CAMPAIGN_COLUMNS = ["message_id", "state", "updated_at", "id"]


def upgrade() -> None:
    op.create_index(
        "ix_deliveries_message_id_state_updated_at_id_domain",
        "deliveries",
        CAMPAIGN_COLUMNS,
        postgresql_include=["domain"],
        postgresql_where=sa.text(SETTLED),
        sqlite_where=sa.text(SETTLED),
        if_not_exists=True,
    )
    op.drop_index("ix_deliveries_message_id_state_updated_at_id", table_name="deliveries")
    op.drop_index("ix_deliveries_message_id_domain", table_name="deliveries")
    op.drop_index("ix_deliveries_purgeable", table_name="deliveries")


def downgrade() -> None:
    op.create_index(
        "ix_deliveries_purgeable",
        "deliveries",
        ["updated_at", "id"],
        postgresql_where=sa.text(PURGEABLE),
        sqlite_where=sa.text(PURGEABLE),
    )
    op.create_index(
        "ix_deliveries_message_id_domain",
        "deliveries",
        ["message_id", "domain"],
        postgresql_where=sa.text(SETTLED),
        sqlite_where=sa.text(SETTLED),
    )
    op.create_index(
        "ix_deliveries_message_id_state_updated_at_id",
        "deliveries",
        CAMPAIGN_COLUMNS,
        postgresql_where=sa.text(SETTLED),
        sqlite_where=sa.text(SETTLED),
    )
    op.drop_index("ix_deliveries_message_id_state_updated_at_id_domain", table_name="deliveries")
