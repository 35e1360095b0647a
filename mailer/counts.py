"""How many deliveries each campaign has in each state, read in a few rows at any outbox size.

Triggers on `deliveries` keep the counts (migration 0006): every insert, state change and delete
is counted, whoever makes it. On PostgreSQL a statement's changes are appended to
`state_count_changes` and folded into `state_counts` by the dispatcher (`fold`); a read adds
the two, so it is exact at any moment. Campaign 0 is mail outside any campaign.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select, text, union_all
from sqlalchemy.orm import Session

from mailer import bulk
from mailer.models import StateCount, StateCountChange

# changes folded in one statement: a pass after a long stop folds in steps, each short
FOLD_BATCH = 50_000
FOLD_PER_PASS = 20


def campaign(session: Session, campaign_id: int) -> dict[str, int]:
    """{state: deliveries} of one campaign (0: outside any campaign), states with none left out."""
    return {state: n for (_, state), n in _counts(session, campaign_id).items()}


def totals(session: Session) -> dict[tuple[str, str], int]:
    """{(priority, state): deliveries} over the whole outbox."""
    return _counts(session, None)


def _counts(session: Session, campaign_id: int | None) -> dict[tuple[str, str], int]:
    parts = []
    for table in (StateCount, StateCountChange):
        part = select(table.priority, table.state, table.n)
        if campaign_id is not None:
            part = part.where(table.campaign_id == campaign_id)
        parts.append(part)
    rows = union_all(*parts).subquery()
    summed = (
        select(rows.c.priority, rows.c.state, func.sum(rows.c.n))
        .group_by(rows.c.priority, rows.c.state)
        .having(func.sum(rows.c.n) != 0)
    )
    return {(priority, state): int(n) for priority, state, n in session.execute(summed)}


def fold(session: Session) -> int:
    """Fold the pending changes into the counts; returns how many were folded. A change whose
    statement has not committed yet is not seen, and is folded by a later pass."""
    if not bulk.postgresql(session):
        return 0  # SQLite's triggers update the counts themselves
    folded = 0
    for _ in range(FOLD_PER_PASS):
        n = session.execute(_FOLD).scalar_one()
        session.commit()
        folded += n
        if n < FOLD_BATCH:
            break
    return folded


# the oldest changes, deleted and added to their counts in one statement: a read in between
# sees them either as changes or as counts, never both or neither
_FOLD = text(
    f"""
    WITH folded AS (
        DELETE FROM state_count_changes
        WHERE id IN (SELECT id FROM state_count_changes ORDER BY id LIMIT {FOLD_BATCH})
        RETURNING campaign_id, priority, state, n
    ), added AS (
        INSERT INTO state_counts (campaign_id, priority, state, n)
        SELECT campaign_id, priority, state, sum(n) FROM folded GROUP BY 1, 2, 3
        ON CONFLICT (campaign_id, priority, state) DO UPDATE SET n = state_counts.n + excluded.n
    )
    SELECT count(*) FROM folded
    """
)


def recount(session: Session) -> int:
    """Count again from the deliveries (after a bulk load with triggers off, say); returns the
    number of count rows. Writes to `deliveries` wait until it commits."""
    if bulk.postgresql(session):
        session.execute(text("LOCK TABLE deliveries IN SHARE MODE"))
    session.execute(delete(StateCountChange))
    session.execute(delete(StateCount))
    result: Any = session.execute(
        text(
            "INSERT INTO state_counts (campaign_id, priority, state, n) "
            "SELECT coalesce(m.campaign_id, 0), m.priority, d.state, count(*) "
            "FROM deliveries d JOIN messages m ON m.id = d.message_id GROUP BY 1, 2, 3"
        )
    )
    return max(int(result.rowcount), 0)
