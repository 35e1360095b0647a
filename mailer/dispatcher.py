"""Re-publishes what is due: deferred retries, queued rows the broker lost, expired leases.

The broker is only a wake-up; this pass makes the database's view come true. It also expires
deliveries past their message's expires_at. Running two
dispatchers is safe (the claim is compare-and-set); on PostgreSQL an advisory lock keeps one
active so that the other does not publish the same wake-ups twice.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, or_, select, text, update
from sqlalchemy.orm import Session

from mailer import clock, db, outcomes, publish
from mailer.config import Settings
from mailer.config import settings as current_settings
from mailer.models import Campaign, Delivery, DeliveryState, Message, Priority

log = logging.getLogger(__name__)
S = DeliveryState
BATCH = 20000
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
        report.expired = _expire(session, now)
        blocked = _relay_blocked(session, s.smtp.name, now)
        if blocked:
            report.relay_blocked = blocked
            return report
    if backlog == -1:
        backlog = publish.backlog()
    for priority in Priority:
        with db.session_scope() as session:
            ids = _due(session, s, now, priority, queue_empty=backlog == 0)
            if ids:
                session.execute(
                    update(Delivery).where(Delivery.id.in_(ids)).values(published_at=now)
                )
        if ids:
            report.published += publish.publish(ids, priority, s.chunk_size)
    return report


def _relay_blocked(session: Session, relay: str, now: datetime) -> str | None:
    state = outcomes.relay_state(session, relay)
    if state is None:
        return None
    if state.paused_reason:
        return f"relay {relay} paused: {state.paused_reason}"
    if state.backoff_until and state.backoff_until > now:
        return f"relay {relay} resting until {state.backoff_until.isoformat()}"
    return None


def _due(
    session: Session, s: Settings, now: datetime, priority: Priority, *, queue_empty: bool
) -> list[int]:
    stale = now - timedelta(seconds=s.republish_after)

    def needs_wakeup(wake_at: Any) -> Any:
        # never published since it became due; or published long ago into a queue that has
        # since run empty, so that wake-up was lost (a broker restart, a flushed queue)
        lost = [Delivery.published_at < stale] if queue_empty else []
        return or_(Delivery.published_at.is_(None), Delivery.published_at < wake_at, *lost)

    ready = and_(
        Delivery.state.in_([S.QUEUED, S.DEFERRED]),
        Delivery.next_attempt_at <= now,
        needs_wakeup(Delivery.next_attempt_at),
    )
    abandoned = and_(
        Delivery.state == S.SENDING, Delivery.lease_until < now, needs_wakeup(Delivery.lease_until)
    )
    paused = exists().where(Campaign.id == Message.campaign_id, Campaign.paused.is_(True))
    query = (
        select(Delivery.id)
        .join(Message, Delivery.message_id == Message.id)
        .where(or_(ready, abandoned), Message.priority == priority, ~paused)
        .order_by(Delivery.id)
        .limit(BATCH)
    )
    return list(session.scalars(query))


def _expire(session: Session, now: datetime) -> int:
    """Close what can no longer go out: past its message's expires_at. (Age against the retry
    policy is judged when a try fails, so that the last try happens at the maximum age.)"""
    message_expired = select(Message.id).where(Message.expires_at <= now)
    result: Any = session.execute(
        update(Delivery)
        .where(
            Delivery.state.in_([S.QUEUED, S.DEFERRED, S.UNKNOWN]),
            Delivery.message_id.in_(message_expired),
        )
        .values(
            state=S.EXPIRED, last_reply="the message expired before it was sent", updated_at=now
        )
    )
    return max(result.rowcount, 0)


def run(settings: Settings | None = None, stop: threading.Event | None = None) -> None:
    """Pass after pass, every MAILER_DISPATCH_INTERVAL seconds, until `stop` is set."""
    s = settings or current_settings()
    stop = stop or threading.Event()
    with _leadership(stop) as leading:
        if not leading:
            return
        log.info("dispatcher active: a pass every %.1f s", s.dispatch_interval)
        while not stop.is_set():
            try:
                report = run_once(s)
            except Exception:
                log.exception("dispatcher pass failed; trying again next interval")
            else:
                if report.published or report.expired:
                    log.info("published %d, expired %d", report.published, report.expired)
                if report.relay_blocked:
                    log.warning("%s; not publishing", report.relay_blocked)
            stop.wait(s.dispatch_interval)


class _leadership:
    """On PostgreSQL, wait for the advisory lock that makes this the one active dispatcher."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.connection: Any = None

    def __enter__(self) -> bool:
        eng = db.engine()
        if eng.dialect.name != "postgresql":
            return True
        self.connection = eng.connect()
        announced = False
        while not self.stop.is_set():
            got = self.connection.execute(
                text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK_KEY}
            ).scalar()
            self.connection.commit()
            if got:
                return True
            if not announced:
                log.info("another dispatcher is active; standing by")
                announced = True
            self.stop.wait(5)
        return False

    def __exit__(self, *_: object) -> None:
        if self.connection is not None:
            self.connection.close()
