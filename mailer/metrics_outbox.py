"""The outbox's gauges, read from the database when Prometheus scrapes: the queue's depth by
priority and state, and how long the oldest waiting delivery has been due.

Both are bounded at any outbox size: the depth reads the per-campaign state counts that
triggers keep (mailer.counts, a few rows a campaign), and the oldest due time is the first
entry of the partial index ix_deliveries_due (one index page).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import datetime

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from mailer import bulk, clock, counts, db
from mailer.models import Delivery, DeliveryState, Priority

log = logging.getLogger(__name__)
S = DeliveryState
# the states of deliveries not yet done: waiting (queued, deferred) or in flight (sending)
WAITING = (S.QUEUED, S.DEFERRED, S.SENDING)
# a scrape is given this long by the database, less than Prometheus's own default timeout
STATEMENT_TIMEOUT_MS = 5000
NAMES = (
    "mailer_queue_depth",
    "mailer_oldest_queued_seconds",
    "mailer_outbox_up",
    "mailer_outbox_scrape_seconds",
)
# written as ix_deliveries_due's own predicate, so that the planner matches the partial index
_DUE_WHERE = text("state IN ('queued', 'deferred')")


class Outbox:
    """What one scrape read."""

    def __init__(self, depth: dict[tuple[str, str], int], oldest_due: datetime | None) -> None:
        self.depth = depth
        self.oldest_due = oldest_due


def read(session: Session, now: datetime) -> Outbox:
    """The queue's depth ({(priority, state): deliveries}, every waiting state of every
    priority, 0 where none) and the earliest due time among waiting deliveries due by `now`."""
    if bulk.postgresql(session):
        session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
    totals = counts.totals(session)
    depth = {
        (p.value, s.value): totals.get((p.value, s.value), 0) for p in Priority for s in WAITING
    }
    oldest = session.execute(
        select(func.min(Delivery.next_attempt_at)).where(
            _DUE_WHERE, Delivery.next_attempt_at <= now
        )
    ).scalar()
    return Outbox(depth, oldest)


class OutboxCollector(Collector):
    """A prometheus_client collector reading the outbox at each scrape; a database that cannot
    be read gives mailer_outbox_up 0 (and a warning in the log), not a failed scrape."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url

    def collect(self) -> Iterator[GaugeMetricFamily]:
        started = time.perf_counter()
        now = clock.now()
        try:
            with db.read_scope(self.url) as session:
                outbox = read(session, now)
        except SQLAlchemyError as exc:
            log.warning("metrics: the outbox could not be read: %s", str(exc).splitlines()[0])
            yield GaugeMetricFamily(NAMES[2], "1 if this scrape read the outbox, else 0", 0)
            return
        depth = GaugeMetricFamily(
            NAMES[0], "Deliveries not yet done, by priority and state", labels=["priority", "state"]
        )
        for (priority, state), n in sorted(outbox.depth.items()):
            depth.add_metric([priority, state], n)
        yield depth
        waited = (now - outbox.oldest_due).total_seconds() if outbox.oldest_due else 0.0
        yield GaugeMetricFamily(
            NAMES[1],
            "How long the longest-waiting queued or deferred delivery has been due (0: none)",
            max(waited, 0.0),
        )
        yield GaugeMetricFamily(NAMES[2], "1 if this scrape read the outbox, else 0", 1)
        yield GaugeMetricFamily(
            NAMES[3], "The time this scrape took to read the outbox", time.perf_counter() - started
        )
