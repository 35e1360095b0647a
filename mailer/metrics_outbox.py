"""The outbox's gauges, read from the database when Prometheus scrapes: the queue's depth by
priority and state (and the deliveries in every state), and how long the oldest waiting
delivery has been due.

Both are bounded at any outbox size: the counts are the per-campaign state counts that
triggers keep (mailer.counts, a few rows a campaign), and the oldest due time is the first
entry of each of the dispatcher's partial indexes (a page each): the earliest due of those
owed a wake-up, and the earliest published of those woken and not yet claimed (published
when due or later, so it is due at least that long).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import datetime

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from mailer import bulk, clock, counts, db, overview
from mailer.models import (
    DeliveryState,
    Priority,
)

log = logging.getLogger(__name__)
S = DeliveryState
# the states of deliveries not yet done: waiting (queued, deferred) or in flight (sending)
WAITING = (S.QUEUED, S.DEFERRED, S.SENDING)
# a scrape is given this long by the database, less than Prometheus's own default timeout
STATEMENT_TIMEOUT_MS = 5000
DEPTH = "mailer_queue_depth"
EVERY = "mailer_outbox_deliveries"
OLDEST = "mailer_oldest_queued_seconds"
UP = "mailer_outbox_up"
TOOK = "mailer_outbox_scrape_seconds"
NAMES = (DEPTH, EVERY, OLDEST, UP, TOOK)


class Outbox:
    """What one scrape read."""

    def __init__(self, totals: dict[tuple[str, str], int], oldest_due: datetime | None) -> None:
        self.totals = totals  # {(priority, state): deliveries}, states with none left out
        self.oldest_due = oldest_due

    def depth(self) -> dict[tuple[str, str], int]:
        """Deliveries not yet done, every waiting state of every priority, 0 where none."""
        return {
            (p.value, s.value): self.totals.get((p.value, s.value), 0)
            for p in Priority
            for s in WAITING
        }


def read(session: Session, now: datetime) -> Outbox:
    """The deliveries by priority and state, and the earliest due time among waiting
    deliveries due by `now`."""
    if bulk.postgresql(session):
        session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
    totals = counts.totals(session)
    oldest = overview.oldest_due(session, now)
    return Outbox(totals, oldest.due_since if oldest else None)


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
            yield GaugeMetricFamily(UP, "1 if this scrape read the outbox, else 0", 0)
            return
        depth = GaugeMetricFamily(
            DEPTH, "Deliveries not yet done, by priority and state", labels=["priority", "state"]
        )
        for (priority, state), n in sorted(outbox.depth().items()):
            depth.add_metric([priority, state], n)
        yield depth
        every = GaugeMetricFamily(
            EVERY,
            "Deliveries in the outbox, by priority and state (final ones until purged)",
            labels=["priority", "state"],
        )
        for (priority, state), n in sorted(outbox.totals.items()):
            every.add_metric([priority, state], n)
        yield every
        waited = (now - outbox.oldest_due).total_seconds() if outbox.oldest_due else 0.0
        yield GaugeMetricFamily(
            OLDEST,
            "How long the longest-waiting queued or deferred delivery has been due (0: none)",
            max(waited, 0.0),
        )
        yield GaugeMetricFamily(UP, "1 if this scrape read the outbox, else 0", 1)
        yield GaugeMetricFamily(
            TOOK, "The time this scrape took to read the outbox", time.perf_counter() - started
        )
