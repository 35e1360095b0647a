"""Re-publishes what is due: deferred retries, queued rows the broker lost, expired leases.

The broker is only a wake-up; this pass makes the database's view come true. It also expires
deliveries past their message's expires_at and folds the state counts' changes. Running two
dispatchers is safe (the claim is compare-and-set); on PostgreSQL an advisory lock keeps one
active so that the other does not publish the same wake-ups twice.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, or_, select, text, union_all, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from mailer import bulk, clock, counts, db, outcomes, publish, relay_health
from mailer.config import Settings
from mailer.config import settings as current_settings
from mailer.errors import DatabaseUnavailable
from mailer.models import Campaign, Delivery, DeliveryState, Message, Priority

log = logging.getLogger(__name__)
S = DeliveryState
# wake-ups a statement (its UPDATE stays well under a second on a big outbox), and at most
# PER_PASS a pass: each batch's scan starts again at the earliest due
BATCH = 5000
PER_PASS = 20000
_LOCK_KEY = 0x6D61696D


@dataclass
class PassReport:
    published: int = 0
    expired: int = 0
    relay_blocked: str | None = None


def run_once(settings: Settings | None = None, *, backlog: int | None = -1) -> PassReport:
    """One pass. `backlog` is the broker's queue length (asked when left at -1)."""
    s = settings or current_settings()
    now = clock.now()
    report = PassReport()
    with db.session_scope() as session:
        counts.fold(session)
    with db.session_scope() as session:
        # a message that expired longer ago than the retry policy's age was closed by then
        since = now - timedelta(seconds=s.retry.max_age)
        report.expired = outcomes.expire(session, now, since=since)
        block = relay_health.block(session, s.smtp.name, now)
        if block is not None:
            report.relay_blocked = f"relay {s.smtp.name} {block.why}"
            return report
    if backlog == -1:
        backlog = publish.backlog()
    for _ in range(PER_PASS // BATCH):
        with db.session_scope() as session:
            found = due(session, s, now, queue_empty=backlog == 0)
            mark_published(session, [i for i, _ in found], now)
        for priority in Priority:  # transactional first
            ids = [i for i, p in found if p == priority]
            if ids:
                report.published += publish.publish(ids, priority, s.chunk_size)
        if len(found) < BATCH:
            break
    return report


def mark_published(session: Session, ids: list[int], now: datetime) -> None:
    """Note that these deliveries' wake-ups are about to go to the broker."""
    if ids:
        session.execute(
            update(Delivery)
            .where(bulk.among(Delivery.id, "ids", bulk.postgresql(session)))
            .values(published_at=now),
            {"ids": ids},
        )


def due(
    session: Session, s: Settings, now: datetime, *, queue_empty: bool
) -> list[tuple[int, Priority]]:
    """Up to BATCH deliveries to publish now, with their message's priority, transactional
    first: due and never published since they became due; whose lease ran out; and when
    `queue_empty`, published more than MAILER_REPUBLISH_AFTER ago into a queue that has
    since run empty, so that their wake-ups were lost (a broker restart, a flushed queue).
    Each kind is read from the partial index that holds exactly it, earliest first, both
    priorities in one scan (the priority is the message's, in no index of deliveries), so
    that a pass reads about what it publishes however many are due and already published."""
    stale = now - timedelta(seconds=s.republish_after)
    waiting = Delivery.state.in_([S.QUEUED, S.DEFERRED])
    # each condition as the partial index's predicate says it (models.WAKEUP_*_WHERE), which
    # the planner must see in the query to use that index
    owed = and_(
        waiting,
        or_(Delivery.published_at.is_(None), Delivery.published_at < Delivery.next_attempt_at),
        Delivery.next_attempt_at <= now,
    )
    branches = [_earliest(owed, Delivery.next_attempt_at)]  # ix_deliveries_wakeup
    lost = [Delivery.published_at < stale] if queue_empty else []
    abandoned = and_(  # ix_deliveries_leased
        Delivery.state == S.SENDING,
        Delivery.lease_until < now,
        or_(Delivery.published_at.is_(None), Delivery.published_at < Delivery.lease_until, *lost),
    )
    branches.append(_earliest(abandoned, Delivery.lease_until))
    if queue_empty:
        given = and_(  # ix_deliveries_published
            waiting,
            Delivery.published_at >= Delivery.next_attempt_at,
            Delivery.published_at < stale,
        )
        branches.append(_earliest(given, Delivery.published_at))
    # each branch its own subquery: SQLite takes no LIMIT inside a UNION's members
    found = union_all(*(select(b.c.id, b.c.priority) for b in branches)).subquery()
    later = case((found.c.priority == Priority.TRANSACTIONAL, 0), else_=1)
    query = select(found.c.id, found.c.priority).order_by(later, found.c.id).limit(BATCH)
    return [(i, Priority(p)) for i, p in session.execute(query)]


def _earliest(condition: Any, when: Any) -> Any:
    # read in the order of the partial index that holds them, so that the scan stops at
    # BATCH: ordered by id, the planner walked the primary key, the whole outbox's history
    paused = exists().where(Campaign.id == Message.campaign_id, Campaign.paused.is_(True))
    return (
        select(Delivery.id, Message.priority)
        .join(Message, Delivery.message_id == Message.id)
        .where(condition, ~paused)
        .order_by(when)
        .limit(BATCH)
        .subquery()
    )


def run(settings: Settings | None = None, stop: threading.Event | None = None) -> None:
    """Pass after pass, every MAILER_DISPATCH_INTERVAL seconds, until `stop` is set. Only the
    leader passes; the others stand by, and take over if the leader goes."""
    s = settings or current_settings()
    stop = stop or threading.Event()
    leader = _Leader()
    try:
        while not stop.is_set():
            if leader.holds():
                _pass(s, stop)
            stop.wait(s.dispatch_interval)
    finally:
        leader.release()


def _pass(s: Settings, stop: threading.Event) -> None:
    try:
        report = run_once(s)
    except (OperationalError, InterfaceError, DatabaseUnavailable) as exc:
        if stop.is_set():  # its statement was cancelled to stop
            log.info("pass interrupted (%s); stopping", _first_line(exc))
            return
        log.warning("database unavailable (%s); trying again next pass", _first_line(exc))
    except Exception:
        log.exception("dispatcher pass failed; trying again next pass")
    else:
        if report.published or report.expired:
            log.info("published %d, expired %d", report.published, report.expired)
        if report.relay_blocked:
            log.warning("%s; not publishing", report.relay_blocked)


class _Leader:
    """On PostgreSQL, the session-level advisory lock that makes one dispatcher the active
    one. Checked before every pass: a lock whose connection broke is gone, and then this
    dispatcher (or another) takes it again. SQLite needs none: it is one host's file."""

    def __init__(self) -> None:
        self.connection: Any = None
        self.announced = False

    def holds(self) -> bool:
        if db.engine().dialect.name != "postgresql":
            return True
        try:
            if self.connection is not None:
                self.connection.execute(text("SELECT 1"))
                self.connection.commit()
                return True
            self.connection = db.engine().connect()
            got = self.connection.execute(
                text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK_KEY}
            ).scalar()
            self.connection.commit()
        except (OperationalError, InterfaceError) as exc:
            log.warning("database unavailable (%s); not dispatching", _first_line(exc))
            self.release()
            return False
        if got:
            log.info("dispatcher active")
            self.announced = False
            return True
        if not self.announced:
            log.info("another dispatcher is active; standing by")
            self.announced = True
        self.release()
        return False

    def release(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.close()
            except (OperationalError, InterfaceError):
                connection.invalidate()


def _first_line(exc: BaseException) -> str:
    text_ = str(getattr(exc, "orig", None) or exc).strip()
    return text_.splitlines()[0] if text_ else type(exc).__name__
