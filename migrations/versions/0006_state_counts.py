"""per-campaign counts of deliveries by state, kept by triggers

`campaign status` counted a campaign's deliveries by state: a scan of all of them, seconds for
a million-recipient campaign in a big outbox. Triggers on `deliveries` now keep the counts in
`state_counts` (mailer/counts.py reads and folds them). On PostgreSQL a statement's trigger
appends its net changes to `state_count_changes` (one row per campaign, priority and state it
touched), so that workers never wait on one another's count rows; SQLite has one writer at a
time and updates `state_counts` directly. The counts of the rows already there are filled in.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# the net change of one statement, per campaign, priority and state; {rows} is the transition
# tables' union, each row a (message_id, state, n)
_CHANGES = """
    INSERT INTO state_count_changes (campaign_id, priority, state, n)
    SELECT coalesce(m.campaign_id, 0), m.priority, c.state, sum(c.n)
    FROM ({rows}) c JOIN messages m ON m.id = c.message_id
    GROUP BY 1, 2, 3 HAVING sum(c.n) <> 0;
"""
_NEW = "SELECT message_id, state, count(*) AS n FROM new_rows GROUP BY 1, 2"
_OLD = "SELECT message_id, state, -count(*) AS n FROM old_rows GROUP BY 1, 2"

_PG_FUNCTION = f"""
CREATE FUNCTION count_delivery_states() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        {_CHANGES.format(rows=_NEW)}
    ELSIF TG_OP = 'DELETE' THEN
        {_CHANGES.format(rows=_OLD)}
    ELSE
        {_CHANGES.format(rows=f"{_NEW} UNION ALL {_OLD}")}
    END IF;
    RETURN NULL;
END
$$
"""
_PG_FORGET = """
CREATE FUNCTION forget_delivery_states() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM state_count_changes;
    DELETE FROM state_counts;
    RETURN NULL;
END
$$
"""
_PG_TRIGGERS = (
    "CREATE TRIGGER deliveries_counted_insert AFTER INSERT ON deliveries "
    "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_delivery_states()",
    "CREATE TRIGGER deliveries_counted_update AFTER UPDATE ON deliveries "
    "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION count_delivery_states()",
    "CREATE TRIGGER deliveries_counted_delete AFTER DELETE ON deliveries "
    "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION count_delivery_states()",
    "CREATE TRIGGER deliveries_counted_truncate AFTER TRUNCATE ON deliveries "
    "FOR EACH STATEMENT EXECUTE FUNCTION forget_delivery_states()",
)


def _sqlite_add(row: str, n: int) -> str:
    return (
        "INSERT INTO state_counts (campaign_id, priority, state, n) "
        f"SELECT coalesce(campaign_id, 0), priority, {row}.state, {n} FROM messages "
        f"WHERE id = {row}.message_id "
        f"ON CONFLICT (campaign_id, priority, state) DO UPDATE SET n = n + {n};"
    )


_SQLITE_TRIGGERS = (
    f"CREATE TRIGGER deliveries_counted_insert AFTER INSERT ON deliveries "
    f"BEGIN {_sqlite_add('NEW', 1)} END",
    "CREATE TRIGGER deliveries_counted_update AFTER UPDATE OF state ON deliveries "
    f"WHEN OLD.state <> NEW.state BEGIN {_sqlite_add('OLD', -1)} {_sqlite_add('NEW', 1)} END",
    f"CREATE TRIGGER deliveries_counted_delete AFTER DELETE ON deliveries "
    f"BEGIN {_sqlite_add('OLD', -1)} END",
)

# what is there now (the same statement as counts.recount)
_BACKFILL = (
    "INSERT INTO state_counts (campaign_id, priority, state, n) "
    "SELECT coalesce(m.campaign_id, 0), m.priority, d.state, count(*) "
    "FROM deliveries d JOIN messages m ON m.id = d.message_id GROUP BY 1, 2, 3"
)


def upgrade() -> None:
    op.create_table(
        "state_counts",
        sa.Column("campaign_id", sa.BigInteger(), nullable=False),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", "priority", "state", name="pk_state_counts"),
    )
    op.create_table(
        "state_count_changes",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("campaign_id", sa.BigInteger(), nullable=False),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_state_count_changes"),
    )
    op.create_index("ix_state_count_changes_campaign_id", "state_count_changes", ["campaign_id"])
    if op.get_bind().dialect.name == "postgresql":
        # no delivery may move between the count and the triggers' first change
        op.execute("LOCK TABLE deliveries IN SHARE MODE")
        op.execute(_PG_FUNCTION)
        op.execute(_PG_FORGET)
        for sql in _PG_TRIGGERS:
            op.execute(sql)
    else:
        for sql in _SQLITE_TRIGGERS:
            op.execute(sql)
    op.execute(_BACKFILL)


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    table = " ON deliveries" if postgresql else ""
    for name in ("insert", "update", "delete", "truncate"):
        op.execute(f"DROP TRIGGER IF EXISTS deliveries_counted_{name}{table}")
    if postgresql:
        op.execute("DROP FUNCTION count_delivery_states()")
        op.execute("DROP FUNCTION forget_delivery_states()")
    op.drop_index("ix_state_count_changes_campaign_id", table_name="state_count_changes")
    op.drop_table("state_count_changes")
    op.drop_table("state_counts")
