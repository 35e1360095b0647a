"""indexes for retention and for the lookups the next features need

The deliveries get four partial indexes. Every index on deliveries is paid on every claim and
every outcome: a claim or an outcome changes the state, which is in the predicates of the
partial indexes, so PostgreSQL cannot update the row in place (HOT) and adds an entry to
every index whose predicate the new row meets. So:

- ix_deliveries_recipient, lower(recipient): a recipient's deliveries across messages and
  campaigns ("did the password reset go out?");
- ix_deliveries_message_id_domain, (message_id, domain): a campaign's deliveries by recipient
  domain (per-domain counts, shaping per provider);
- ix_deliveries_message_id_state_updated_at_id: a campaign's deliveries in a state, ordered by
  their last change, paged by (updated_at, id);

hold no delivery in flight (`state <> 'sending'`), so that a claim adds no entry to them. The
deliveries in flight are few (the workers' chunks) and are found through ix_deliveries_leased:
a lookup that must see them too asks both (`state <> 'sending'` on one side, `state =
'sending'` on the other).

- ix_deliveries_purgeable, (updated_at, id) of the final states `mailer purge` deletes (all but
  `unknown`): it gets an entry only when a delivery reaches one of them.

suppressions.source_delivery_id gets an index (deleting a delivery looks there for the
suppressions that name it) and its foreign key becomes ON DELETE SET NULL: purging a delivery
keeps the suppression it caused, without its source.

On a large outbox the indexes are built while writes wait (CREATE INDEX): stop the workers
for the upgrade, or build them by hand first with CREATE INDEX CONCURRENTLY (same names and
definitions: `IF NOT EXISTS` then skips them).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from __future__ import annotations

import warnings
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SETTLED = "state <> 'sending'"
PURGEABLE = "state IN ('sent', 'bounced', 'failed', 'expired', 'suppressed', 'cancelled')"
SOURCED = "source_delivery_id IS NOT NULL"
FK = "fk_suppressions_source_delivery_id_deliveries"

INDEXES: tuple[tuple[str, str, list[Any], str], ...] = (
    ("ix_deliveries_recipient", "deliveries", [sa.text("lower(recipient)")], SETTLED),
    ("ix_deliveries_message_id_domain", "deliveries", ["message_id", "domain"], SETTLED),
    (
        "ix_deliveries_message_id_state_updated_at_id",
        "deliveries",
        ["message_id", "state", "updated_at", "id"],
        SETTLED,
    ),
    ("ix_deliveries_purgeable", "deliveries", ["updated_at", "id"], PURGEABLE),
    ("ix_suppressions_source_delivery_id", "suppressions", ["source_delivery_id"], SOURCED),
)


def upgrade() -> None:
    for name, table, columns, where in INDEXES:
        op.create_index(
            name,
            table,
            columns,
            postgresql_where=sa.text(where),
            sqlite_where=sa.text(where),
            if_not_exists=True,
        )
    _source_fk(ondelete="SET NULL")


def downgrade() -> None:
    _source_fk(ondelete=None)
    for name, table, _, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)


def _source_fk(ondelete: str | None) -> None:
    # on SQLite, which cannot alter a constraint, the table is copied with the new one; the
    # copy reads the referenced table too, whose expression indexes it need not (cannot) read
    with (
        warnings.catch_warnings(),
        op.batch_alter_table("suppressions") as batch,
    ):
        warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based")
        batch.drop_constraint(FK, type_="foreignkey")
        batch.create_foreign_key(
            FK, "deliveries", ["source_delivery_id"], ["id"], ondelete=ondelete
        )
