"""64-bit ids for the tables that grow with every message

messages, deliveries and attempts get a row for every message sent, and their ids and the
columns that refer to them were 32-bit integers on PostgreSQL (SERIAL: a sequence that stops
at 2,147,483,647). At a million deliveries a day that is under six years, and less for attempts
where mail is retried. Suppressions too: an import that skips the addresses already there
(ON CONFLICT DO NOTHING) spends an id on every row it tries. They become BIGINT, and their
sequences go on to 2**63 - 1. SQLite's INTEGER is 64-bit already: nothing changes there.

On PostgreSQL each table is rewritten, with its indexes, while it is locked against reads and
writes, and the foreign keys between them are checked again: measured, a million deliveries
(316 MB with their indexes) took 4.8 s and a million attempts (132 MB) 2.4 s, so a large
outbox takes minutes. The upgrade first waits for every transaction that holds one of the
tables (a worker's, a producer's, an open psql session's). Stop the workers and the
producers for `mailer db upgrade`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import logging

from alembic import op
from sqlalchemy import text

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# the columns, referenced tables before the tables that refer to them; each table's id is
# numbered by a sequence of its own
COLUMNS = {
    "messages": ("id",),
    "deliveries": ("id", "message_id"),
    "attempts": ("id", "delivery_id"),
    "suppressions": ("id", "source_delivery_id"),
}
log = logging.getLogger("mailer.migrations")


def upgrade() -> None:
    _retype("BIGINT")


def downgrade() -> None:
    # refused by PostgreSQL once an id, or a sequence's last value, has passed 2**31 - 1
    _retype("INTEGER")


def _retype(sql_type: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for table, columns in COLUMNS.items():
        rows = bind.execute(
            text("SELECT reltuples::bigint FROM pg_class WHERE oid = CAST(:table AS regclass)"),
            {"table": table},
        ).scalar_one()
        counted = f"about {rows:,} rows" if rows >= 0 else "rows not counted yet"  # ANALYZE's
        log.info(
            "rewriting %s with %s ids (%s); the table is locked until this is done",
            table,
            sql_type,
            counted,
        )
        changes = ", ".join(f"ALTER COLUMN {column} TYPE {sql_type}" for column in columns)
        op.execute(f"ALTER TABLE {table} {changes}")  # one rewrite a table
    for table in COLUMNS:
        sequence = bind.execute(
            text("SELECT pg_get_serial_sequence(:table, 'id')"), {"table": table}
        ).scalar_one()
        op.execute(f"ALTER SEQUENCE {sequence} AS {sql_type}")
