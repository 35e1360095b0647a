"""Retention: deletes old deliveries in final states, their attempts, and the messages and
campaigns left without deliveries, in short batches; never the suppression list.

A delivery is purged when its state is one of PURGEABLE (every final state but `unknown`,
which waits for an operator's decision) and its last change is older than the cut-off. The
workers never claim a delivery in those states, so the rows a batch locks are rows no worker
waits for. The purge walks the primary key in windows of ids, oldest first, and stops at the
horizon: the first delivery of a message made after the cut-off (ids grow with time, and a
delivery's last change is never before its message was made). Each window is one short
transaction whatever it holds, and no index is kept for the purge: the workers pay nothing
for it.
A suppression keeps its address when the delivery that caused it goes (the foreign key sets
the reference to NULL).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, exists, func, select, text
from sqlalchemy.orm import Session

from mailer import db
from mailer.models import PURGEABLE, Attempt, Campaign, Delivery, Message

# no batch waits longer than this for a lock (PostgreSQL): a batch that cannot have its rows
# at once fails, and the purge can be run again later
LOCK_TIMEOUT = "5s"
# ids a batch reads at most, however few of them it may delete
WINDOW_PER_BATCH = 10


@dataclass
class PurgeReport:
    """What a purge deleted so far, and where it is."""

    batches: int = 0
    deliveries: int = 0
    attempts: int = 0
    messages: int = 0
    campaigns: int = 0
    # the last delivery id the purge has looked at, and the id it stops before
    last_id: int | None = None
    horizon: int | None = None

    def add(self, batch: PurgeReport) -> None:
        self.batches += 1
        self.deliveries += batch.deliveries
        self.attempts += batch.attempts
        self.messages += batch.messages
        self.campaigns += batch.campaigns
        self.last_id = batch.last_id


def purgeable(cutoff: datetime) -> ColumnElement[bool]:
    """The deliveries a purge with this cut-off deletes (among those it reads)."""
    return Delivery.state.in_(PURGEABLE) & (Delivery.updated_at < cutoff)


def horizon(session: Session, cutoff: datetime) -> int:
    """The id of the first delivery whose message was made at or after `cutoff` (one past the
    last id when there is none): a binary search on the primary key, a few dozen lookups at
    any size. The message's time, not the delivery's: a retry restarts a delivery's
    created_at, and its id stays where it was."""
    first, last = session.execute(select(func.min(Delivery.id), func.max(Delivery.id))).one()
    if first is None:
        return 0
    low, high = first, last + 1
    while low < high:
        middle = (low + high) // 2
        made = session.scalar(
            select(Message.created_at)
            .join(Delivery, Delivery.message_id == Message.id)
            .where(Delivery.id >= middle)
            .order_by(Delivery.id)
            .limit(1)
        )
        if made is None or made >= cutoff:
            high = middle
        else:
            low = middle + 1
    return low


def count(session: Session, cutoff: datetime, window: int = 20_000) -> int:
    """How many deliveries a purge would delete now (for --dry-run), counted window by window."""
    stop = horizon(session, cutoff)
    total, start = 0, _next_id(session, 0, stop)
    while start is not None:
        total += (
            session.scalar(
                select(func.count()).where(
                    Delivery.id >= start, Delivery.id < min(start + window, stop), purgeable(cutoff)
                )
            )
            or 0
        )
        start = _next_id(session, start + window - 1, stop)
    return total


def purge(cutoff: datetime, batch: int, url: str | None = None) -> Iterator[PurgeReport]:
    """Delete what `purgeable` selects, `batch` deliveries a transaction at most; yields the
    running totals after each committed batch. Stopping between two batches (an error, ^C)
    loses nothing: what is committed is gone, and running it again goes on with the rest."""
    with db.read_scope(url) as session:
        total = PurgeReport(horizon=horizon(session, cutoff), last_id=0)
    while True:
        with db.session_scope(url) as session:
            done = purge_batch(session, cutoff, batch, after=total.last_id, horizon=total.horizon)
        if done is None:
            return
        total.add(done)
        yield total


def purge_batch(
    session: Session, cutoff: datetime, size: int, after: int | None, horizon: int | None = None
) -> PurgeReport | None:
    """One batch, in the caller's transaction: up to `size` purgeable deliveries among the
    `size` x WINDOW_PER_BATCH ids after `after` (below `horizon`), with their attempts, then
    the messages and campaigns that have nothing left. None when no delivery is left to read."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    start = _next_id(session, after or 0, horizon)
    if start is None:
        return None
    end = start + size * WINDOW_PER_BATCH
    if horizon is not None:
        end = min(end, horizon)
    rows = session.execute(_chosen(cutoff, size, start, end)).all()
    # a full batch stops at its last row; otherwise the whole window has been read
    done = PurgeReport(last_id=rows[-1].id if len(rows) == size else end - 1)
    if not rows:
        return done
    ids = [row.id for row in rows]
    done.attempts = _deleted(session, delete(Attempt).where(Attempt.delivery_id.in_(ids)))
    done.deliveries = _deleted(session, delete(Delivery).where(Delivery.id.in_(ids)))
    campaigns = _delete_empty_messages(session, sorted({row.message_id for row in rows}), cutoff)
    done.messages = len(campaigns)
    emptied = sorted({c for c in campaigns if c is not None})
    done.campaigns = _delete_empty_campaigns(session, emptied, cutoff)
    return done


def _next_id(session: Session, after: int, horizon: int | None) -> int | None:
    """The first delivery id after `after` (and below `horizon`): a jump over the ids purged
    already, through the primary key."""
    found = session.scalar(select(func.min(Delivery.id)).where(Delivery.id > after))
    if found is None or (horizon is not None and found >= horizon):
        return None
    return int(found)


def _chosen(cutoff: datetime, size: int, start: int, end: int) -> Any:
    # SKIP LOCKED: a row an operator is retrying right now is left for the next purge
    return (
        select(Delivery.id, Delivery.message_id)
        .where(Delivery.id >= start, Delivery.id < end, purgeable(cutoff))
        .order_by(Delivery.id)
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
