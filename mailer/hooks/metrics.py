"""A hook that counts for Prometheus what a worker does: outcomes by relay and recipient domain
group, attempts by reply class, enqueue-to-sent latency, chunk duration, open SMTP sessions.

MAILER_HOOKS=mailer.hooks.metrics:Metrics, and PROMETHEUS_MULTIPROC_DIR set (the same for
`mailer metrics`) so that every process of a prefork worker writes its values there: the
worker empties the directory when it starts, and a pool process marks itself dead as it
exits (`mailer metrics` marks those that were killed). The queue's gauges are read from the
database at scrape time (mailer.metrics_outbox), not here.

A delivery's `outcome` is its reply's class (mailer.replies.ReplyClass), as the attempts table
records it: which state that leads to is outcomes.py's decision, and the states are counted in
the database (mailer_outbox_deliveries, mailer_queue_depth).
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections import Counter as Tally
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery.signals import worker_init, worker_process_shutdown
from prometheus_client import Counter, Gauge, Histogram

from mailer import metrics_files
from mailer.hooks import Chunk, Hooks
from mailer.metrics_domains import group
from mailer.replies import ReplyClass
from mailer.transport import smtp

if TYPE_CHECKING:
    from mailer.delivery import ChunkReport
    from mailer.models import DeliveryState
    from mailer.outcomes import Claimed, Verdict

log = logging.getLogger(__name__)
_KEY = "metrics"
_DELIVERED = ReplyClass.DELIVERED
# from a message for a near relay to a campaign waiting hours for its turn or a retry
LATENCY_BUCKETS = (
    *(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
    *(1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0, float("inf")),
)
CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 150.0, 300.0)

DELIVERIES = Counter(
    "mailer_deliveries",
    "Deliveries tried, by outcome (the reply's class), relay and recipient domain group",
    ["outcome", "relay", "domain_group"],
)
ATTEMPTS = Counter("mailer_attempts", "Attempts recorded, by reply class", ["reply_class"])
RELEASED = Counter(
    "mailer_deliveries_released",
    "Deliveries a chunk handed back untried, by the state they went back to and why",
    ["state", "reason", "relay"],
)
LATENCY = Histogram(
    "mailer_enqueue_to_sent_seconds",
    "From a delivery's enqueue to the relay's acceptance of it",
    ["relay"],
    buckets=LATENCY_BUCKETS,
)
CHUNK_DURATION = Histogram(
    "mailer_chunk_duration_seconds",
    "A chunk's time in a worker, from its claim to its last outcome recorded",
    ["relay"],
    buckets=CHUNK_BUCKETS,
)
SESSIONS = Gauge(
    "mailer_smtp_sessions_open",
    "SMTP sessions connected to the relay, summed over live worker processes",
    multiprocess_mode="livesum",
)
WORKER_METRICS = (DELIVERIES, ATTEMPTS, RELEASED, LATENCY, CHUNK_DURATION, SESSIONS)


class Metrics(Hooks):
    """Counts each batch of outcomes as it is recorded, and each chunk when it is done. A
    failure to count (the directory unwritable, say) is logged, never raised: mail goes out
    whether or not it is counted."""

    def chunk_claimed(self, chunk: Chunk, deliveries: Sequence[Claimed]) -> None:
        chunk.notes[_KEY] = {d.id: d.created_at for d in deliveries}

    def verdicts_recorded(self, chunk: Chunk, verdicts: Sequence[Verdict]) -> None:
        try:
            _count(chunk, verdicts)
        except Exception:
            _failed("outcomes")

    def deliveries_released(
        self,
        chunk: Chunk,
        deliveries: Sequence[Claimed],
        state: DeliveryState,
        due: datetime,
        why: str,
    ) -> None:
        try:
            RELEASED.labels(state.value, why, chunk.relay).inc(len(deliveries))
        except Exception:
            _failed("deliveries handed back")

    def chunk_done(self, chunk: Chunk, report: ChunkReport) -> None:
        try:
            CHUNK_DURATION.labels(chunk.relay).observe(time.monotonic() - chunk.started)
            SESSIONS.set(smtp.open_sessions())
        except Exception:
            _failed("a chunk")


def _count(chunk: Chunk, verdicts: Sequence[Verdict]) -> None:
    by_label = Tally((v.klass, group(v.recipient)) for v in verdicts)
    by_class: Tally[ReplyClass] = Tally()
    for (klass, domain_group), n in by_label.items():
        DELIVERIES.labels(klass.value, chunk.relay, domain_group).inc(n)
        by_class[klass] += n
    for klass, n in by_class.items():
        ATTEMPTS.labels(klass.value).inc(n)
    if by_class[_DELIVERED]:
        enqueued: dict[int, datetime] = chunk.notes.get(_KEY, {})
        observe_many(
            LATENCY.labels(chunk.relay),
            (
                (v.finished - enqueued[v.delivery_id]).total_seconds()
                for v in verdicts
                if v.klass is _DELIVERED and v.delivery_id in enqueued
            ),
        )


_failures = 0


def _failed(what: str) -> None:
    """Log a failure to count: the first of the process with its traceback, the rest briefly."""
    global _failures
    _failures += 1
    if _failures == 1:
        log.warning(
            "metrics: could not count %s (counting goes on failing quietly)", what, exc_info=True
        )
    else:
        log.debug("metrics: could not count %s", what, exc_info=True)


def observe_many(histogram: Any, values: Iterable[float]) -> None:
    """Observe `values` in one histogram child, as `observe` would one by one, but with one
    write a bucket they fall in instead of two writes a value (each a lock and a file write
    in multiprocess mode). A bucket holds the values above the bound before it: the
    exposition makes them cumulative."""
    seen = list(values)
    if not seen:
        return
    bounds: list[float] = histogram._upper_bounds
    for index, n in Tally(bisect.bisect_left(bounds, value) for value in seen).items():
        histogram._buckets[index].inc(n)
    histogram._sum.inc(sum(seen))


def _worker_starts(**_: Any) -> None:
    path = metrics_files.directory()
    if path is None:
        log.warning(
            "mailer.hooks.metrics is registered but %s is not set: each worker process keeps "
            "its metrics to itself, and `mailer metrics` cannot read them",
            metrics_files.VARIABLE,
        )
    else:
        metrics_files.clean(path)


def _worker_process_ends(**_: Any) -> None:
    path = metrics_files.directory()
    if path is not None:
        metrics_files.mark_dead(os.getpid(), path)


# Celery's signals: the worker's main process as it starts (before its pool), and each pool
# process as it exits
worker_init.connect(_worker_starts, weak=False)
worker_process_shutdown.connect(_worker_process_ends, weak=False)
