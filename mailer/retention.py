"""Retention: deletes old deliveries in final states, their attempts, and the messages and
campaigns left without deliveries, in short batches; never the suppression list.

A delivery is purged when its state is one of PURGEABLE (every final state but `unknown`,
which waits for an operator's decision) and its last change is older than the cut-off. The
workers never claim a delivery in those states, so the rows a batch locks are rows no worker
waits for; each batch is one short transaction, found through ix_deliveries_purgeable in the
order of last change and continued from the last row (updated_at, id) of the batch before, so
that no batch reads again what an earlier one deleted. A suppression keeps its address when
the delivery that caused it goes (the foreign key sets the reference to NULL).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, exists, func, literal, select, text, tuple_
from sqlalchemy.orm import Session

from mailer import db
from mailer.models import PURGEABLE, Attempt, Campaign, Delivery, Message

# no batch waits longer than this for a lock (PostgreSQL): a batch that cannot have its rows
# at once fails, and the purge can be run again later
LOCK_TIMEOUT = "5s"


@dataclass
class PurgeReport:
    """What a purge deleted so far, and where it is."""

    batches: int = 0
    deliveries: int = 0
    attempts: int = 0
    messages: int = 0
    campaigns: int = 0
    # the last change of the last delivery purged: how far through the old rows the purge is
    reached: datetime | None = None
    last_id: int | None = None

    def add(self, batch: PurgeReport) -> None:
        self.batches += 1
        self.deliveries += batch.deliveries
        self.attempts += batch.attempts
        self.messages += batch.messages
        self.campaigns += batch.campaigns
        self.reached, self.last_id = batch.reached, batch.last_id


def purgeable(cutoff: datetime) -> ColumnElement[bool]:
    """The deliveries a purge with this cut-off deletes (the predicate of
    ix_deliveries_purgeable, and a time)."""
    return Delivery.state.in_(PURGEABLE) & (Delivery.updated_at < cutoff)


def count(session: Session, cutoff: datetime) -> int:
    """How many deliveries a purge would delete now (for --dry-run)."""
    return session.scalar(select(func.count()).where(purgeable(cutoff))) or 0


def purge(cutoff: datetime, batch: int, url: str | None = None) -> Iterator[PurgeReport]:
    """Delete what `purgeable` selects, `batch` deliveries a transaction; yields the running
    totals after each committed batch. Stopping between two batches (an error, ^C) loses
    nothing: what is committed is gone, and running it again goes on with the rest."""
    total = PurgeReport()
    while True:
        with db.session_scope(url) as session:
            done = purge_batch(session, cutoff, batch, after=_after(total))
        if done is None:
            return
        total.add(done)
        yield total


def _after(total: PurgeReport) -> tuple[datetime, int] | None:
    if total.reached is None or total.last_id is None:
        return None
    return total.reached, total.last_id


def purge_batch(
    session: Session, cutoff: datetime, size: int, after: tuple[datetime, int] | None
) -> PurgeReport | None:
    """One batch, in the caller's transaction: up to `size` deliveries after `after` (their
    last change and id), with their attempts, then the messages and campaigns that have
    nothing left. None when there is nothing more to purge."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    rows = session.execute(_chosen(cutoff, size, after)).all()
    if not rows:
        return None
    ids = [row.id for row in rows]
    done = PurgeReport(reached=rows[-1].updated_at, last_id=rows[-1].id)
    done.attempts = _deleted(session, delete(Attempt).where(Attempt.delivery_id.in_(ids)))
    done.deliveries = _deleted(session, delete(Delivery).where(Delivery.id.in_(ids)))
    campaigns = _delete_empty_messages(session, sorted({row.message_id for row in rows}), cutoff)
    done.messages = len(campaigns)
    emptied = sorted({c for c in campaigns if c is not None})
    done.campaigns = _delete_empty_campaigns(session, emptied, cutoff)
    return done


def _chosen(cutoff: datetime, size: int, after: tuple[datetime, int] | None) -> Any:
    query = select(Delivery.id, Delivery.message_id, Delivery.updated_at).where(purgeable(cutoff))
    if after is not None:
        last_change, last_id = after
        query = query.where(
            tuple_(Delivery.updated_at, Delivery.id)
            > tuple_(literal(last_change, Delivery.updated_at.type), literal(last_id))
        )
    # SKIP LOCKED: a row an operator is retrying right now is left for the next purge
    return (
        query.order_by(Delivery.updated_at, Delivery.id)
        .limit(size)
        .with_for_update(skip_locked=True)
    )


def _delete_empty_messages(
    session: Session, message_ids: list[int], cutoff: datetime
) -> list[int | None]:
    """Delete those of the messages that have no delivery left; returns their campaigns. Only
    messages older than the cut-off: a message being enqueued right now is never taken."""
    statement = (
        delete(Message)
        .where(
            Message.id.in_(message_ids),
            Message.created_at < cutoff,
            ~exists().where(Delivery.message_id == Message.id),
        )
        .returning(Message.campaign_id)
    )
    return list(session.scalars(statement))


def _delete_empty_campaigns(session: Session, campaign_ids: list[int], cutoff: datetime) -> int:
    if not campaign_ids:
        return 0
    statement = delete(Campaign).where(
        Campaign.id.in_(campaign_ids),
        Campaign.created_at < cutoff,
        ~exists().where(Message.campaign_id == Campaign.id),
    )
    return _deleted(session, statement)


def _deleted(session: Session, statement: Any) -> int:
    result: Any = session.execute(statement.execution_options(synchronize_session=False))
    return max(int(result.rowcount), 0)
