"""The dashboard overview's reads: campaigns a page at a time, the queue, the transactional
stream's latency, the relays.

Each statement is bounded on a 10M-delivery outbox: campaigns by keyset on their primary key,
their counts and the queue's from the trigger-kept counts (counts.py, a few rows each); the
oldest due delivery is the older of the first entries of the dispatcher's two partial indexes
(`ix_deliveries_wakeup`: owed a wake-up, by due time; `ix_deliveries_published`: woken and
not yet claimed, by wake-up time, which is at or after its due time).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from mailer import counts, queries
from mailer.models import (
    WAKEUP_GIVEN_WHERE,
    WAKEUP_OWED_WHERE,
    Campaign,
    Delivery,
    DeliveryState,
    Message,
    Priority,
    Relay,
)

IN_QUEUE = (DeliveryState.QUEUED, DeliveryState.DEFERRED, DeliveryState.SENDING)


@dataclass(frozen=True)
class CampaignRow:
    status: queries.CampaignStatus
    # final deliveries a second over the last minute of samples; None until two samples
    rate: float | None

    @property
    def seconds_left(self) -> float | None:
        left = self.status.total - self.status.done
        if left == 0:
            return 0.0
        return left / self.rate if self.rate else None


@dataclass(frozen=True)
class QueueDepth:
    """Deliveries not final, by priority (transactional, bulk) and state."""

    by_priority: dict[str, dict[str, int]]
    # transactional deliveries that reached a final state, a second (Rates; None at first)
    transactional_rate: float | None = None


@dataclass(frozen=True)
class Latency:
    """Seconds from enqueue (or the send time asked for, if later) to sent, over the latest
    transactional deliveries sent."""

    median: float
    p95: float
    deliveries: int


@dataclass(frozen=True)
class Oldest:
    delivery_id: int
    recipient: str
    campaign_id: int | None
    due_since: datetime


@dataclass(frozen=True)
class RelayRow:
    name: str
    paused_reason: str | None
    backoff_until: datetime | None
    updated_at: datetime

    def health(self, now: datetime) -> str:
        """paused (an operator must resume it), resting (until backoff_until) or healthy."""
        if self.paused_reason:
            return "paused"
        if self.backoff_until is not None and self.backoff_until > now:
            return "resting"
        return "healthy"


class Rates:
    """Progress samples per campaign, kept by the process that serves the page, so that a
    rate costs two reads of counts already shown rather than a scan of recent deliveries."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self._samples: dict[int, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def observe(self, campaign_id: int, done: int, at: float | None = None) -> float | None:
        now = time.monotonic() if at is None else at
        with self._lock:
            samples = self._samples.setdefault(campaign_id, deque())
            samples.append((now, done))
            while len(samples) > 2 and now - samples[1][0] >= self.window:
                samples.popleft()
            first_at, first_done = samples[0]
        return (done - first_done) / (now - first_at) if now > first_at else None


def campaigns(
    session: Session, rates: Rates, before_id: int | None = None, limit: int = 20
) -> tuple[list[CampaignRow], int | None]:
    """The newest campaigns first (keyset on campaigns.id), and the id to page on from."""
    query = select(Campaign.id).order_by(Campaign.id.desc()).limit(limit + 1)
    if before_id is not None:
        query = query.where(Campaign.id < before_id)
    ids = list(session.scalars(query))
    more = ids[limit] if len(ids) > limit else None
    rows = []
    for campaign_id in ids[:limit]:
        status = queries.campaign_status(session, campaign_id)
        rows.append(CampaignRow(status, rates.observe(campaign_id, status.done)))
    return rows, (ids[limit - 1] if more is not None else None)


# the key under which Rates keeps the transactional stream (campaign ids start at 1)
TRANSACTIONAL = 0


def queue_depth(session: Session, rates: Rates) -> QueueDepth:
    """Queued, deferred and sending deliveries by priority (counts.totals), and the rate at
    which transactional mail is finished."""
    found: dict[str, dict[str, int]] = {p.value: {} for p in Priority}
    finished = 0
    for (priority, state), n in counts.totals(session).items():
        if state in IN_QUEUE:
            found.setdefault(priority, {})[state] = n
        elif priority == Priority.TRANSACTIONAL.value:
            finished += n
    return QueueDepth(found, rates.observe(TRANSACTIONAL, finished))


# how many of the newest transactional messages the latency is read from
LATENCY_SAMPLE = 200


def transactional_latency(session: Session, sample: int = LATENCY_SAMPLE) -> Latency | None:
    """Enqueue-to-sent of the sent deliveries among the newest `sample` transactional messages
    (the messages' primary key backwards, each message's deliveries through the
    (message_id, recipient) index): bounded at any outbox size. None when none was sent."""
    newest = (
        select(Message.id, func.coalesce(Message.send_at, Message.created_at).label("asked"))
        .where(Message.priority == Priority.TRANSACTIONAL, Message.campaign_id.is_(None))
        .order_by(Message.id.desc())
        .limit(sample)
        .subquery()
    )
    rows = session.execute(
        select(Delivery.updated_at, newest.c.asked)
        .join(newest, Delivery.message_id == newest.c.id)
        .where(Delivery.state == DeliveryState.SENT)
    ).all()
    seconds = sorted(max((sent - asked).total_seconds(), 0.0) for sent, asked in rows)
    if not seconds:
        return None
    return Latency(
        median=seconds[len(seconds) // 2],
        p95=seconds[min(len(seconds) - 1, int(len(seconds) * 0.95))],
        deliveries=len(seconds),
    )


def oldest_due(session: Session, now: datetime) -> Oldest | None:
    """The waiting delivery due the longest, if any is due: the first of the deliveries owed
    a wake-up (ix_deliveries_wakeup), or the first woken and not yet claimed
    (ix_deliveries_published), whichever has waited longer; two index lookups of a row."""
    found = []
    for where, key in (
        (WAKEUP_OWED_WHERE, Delivery.next_attempt_at),
        (WAKEUP_GIVEN_WHERE, Delivery.published_at),
    ):
        row = session.execute(
            select(Delivery.id, Delivery.recipient, Message.campaign_id, key.label("since"))
            .join(Message, Delivery.message_id == Message.id)
            .where(text(where), key <= now)
            .order_by(key)
            .limit(1)
        ).first()
        if row is not None:
            found.append(Oldest(row.id, row.recipient, row.campaign_id, row.since))
    return min(found, key=lambda o: o.due_since) if found else None


def relays(session: Session) -> list[RelayRow]:
    """Every relay with a health record (one row per relay name: a handful)."""
    rows = session.execute(
        select(Relay.name, Relay.paused_reason, Relay.backoff_until, Relay.updated_at).order_by(
            Relay.name
        )
    )
    return [RelayRow(*row) for row in rows]
