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

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

SETTLED = "state <> 'sending'"
PURGEABLE = "state IN ('sent', 'bounced', 'failed', 'expired', 'suppressed', 'cancelled')"
CAMPAIGN = "ix_deliveries_message_id_state_updated_at_id_domain"
CAMPAIGN_COLUMNS = ["message_id", "state", "updated_at", "id"]
# what 0004 made and this drops: name, columns, predicate
DROPPED = (
    ("ix_deliveries_message_id_state_updated_at_id", CAMPAIGN_COLUMNS, SETTLED),
    ("ix_deliveries_message_id_domain", ["message_id", "domain"], SETTLED),
    ("ix_deliveries_purgeable", ["updated_at", "id"], PURGEABLE),
)


def upgrade() -> None:
    _partial(CAMPAIGN, CAMPAIGN_COLUMNS, SETTLED, postgresql_include=["domain"], if_not_exists=True)
    for name, _, _ in DROPPED:
        op.drop_index(name, table_name="deliveries")


def downgrade() -> None:
    for name, columns, where in DROPPED:
        _partial(name, columns, where)
    op.drop_index(CAMPAIGN, table_name="deliveries")


def _partial(name: str, columns: list[str], where: str, **options: Any) -> None:
    op.create_index(
        name,
        "deliveries",
        columns,
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
        **options,
    )
