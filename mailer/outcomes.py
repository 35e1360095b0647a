"""Every delivery state transition, in one place, written in bulk.

queued/deferred --claim--> sending --record--> sent | deferred | bounced | failed | unknown
                                              | expired | queued (relay unusable, nothing spent)
The claim is a compare-and-set UPDATE; `record` is fenced by the lease the claim handed out, so
a worker whose lease ran out (and whose deliveries were handed to another) changes nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Select, and_, bindparam, delete, func, or_, select, update
from sqlalchemy.orm import Session

from mailer import backoff, bulk, db, suppressions
from mailer.config import Settings
from mailer.errors import NotFound
from mailer.models import (
    Attempt,
    Campaign,
    Delivery,
    DeliveryState,
    Message,
    Relay,
    Suppression,
)
from mailer.replies import Phase, ReplyClass, SMTPReply

log = logging.getLogger(__name__)
S = DeliveryState


class Verdict(NamedTuple):
    """One delivery's result in one attempt, classified (a tuple: one is made for every
    message, and a frozen dataclass cost 1 us more to make)."""

    delivery_id: int
    recipient: str
    reply: SMTPReply
    phase: Phase
    klass: ReplyClass
    relay: str
    tls: bool
    started: datetime
    finished: datetime


class Claimed(NamedTuple):
    """A delivery as the claim returned it: all a worker needs to send and record it."""

    id: int
    message_id: int
    recipient: str
    context: dict[str, Any] | None
    attempts: int
    created_at: datetime


# --- claim -------------------------------------------------------------------------------------


def claimable(now: Any) -> Any:
    return or_(
        and_(Delivery.state.in_([S.QUEUED, S.DEFERRED]), Delivery.next_attempt_at <= now),
        and_(Delivery.state == S.SENDING, Delivery.lease_until < now),
    )


def claim(session: Session, ids: Sequence[int], now: datetime, lease: datetime) -> list[Claimed]:
    """Take the due deliveries among `ids` for this worker until `lease` (which then fences
    `record`); an empty list when another worker holds or finished them all. Deliveries of a
    paused campaign are not taken."""
    params = {"ids": list(ids), "now": now, "lease": lease}
    rows = session.connection().execute(_claim(bulk.postgresql(session)), params).all()
    return sorted((Claimed(*row) for row in rows), key=lambda c: c.id)


@functools.cache
def _claim(postgresql: bool) -> Any:
    # built once per dialect: building it cost more than the database's work on every chunk
    now = bindparam("now", type_=Delivery.next_attempt_at.type)
    # the messages of paused campaigns, found once per statement (not once per row)
    paused = (
        select(Message.id)
        .join(Campaign, Message.campaign_id == Campaign.id)
        .where(Campaign.paused.is_(True))
    )
    return (
        update(Delivery)
        # found by id, then checked: `IS TRUE` keeps the state condition out of the state
        # index, whose entries (dead ones too, until vacuum) grow with every claim
        .where(
            bulk.among(Delivery.id, "ids", postgresql),
            claimable(now).is_(True),
            Delivery.message_id.not_in(paused),
        )
        .values(state=S.SENDING.value, lease_until=bindparam("lease"), updated_at=now)
        .returning(
            Delivery.id,
            Delivery.message_id,
            Delivery.recipient,
            Delivery.context,
            Delivery.attempts,
            Delivery.created_at,
        )
    )


def postpone(session: Session, ids: Sequence[int], until: datetime, now: datetime) -> None:
    """The relay cannot be used now: these wait (unclaimed, nothing spent) until `until`, and
    the dispatcher wakes them when it is due and the relay is usable again."""
    session.execute(
        update(Delivery)
        .where(
            bulk.among(Delivery.id, "ids", bulk.postgresql(session)),
            Delivery.state.in_([S.QUEUED, S.DEFERRED]),
            Delivery.next_attempt_at < until,  # never bring a planned retry forward
        )
        .values(next_attempt_at=until, updated_at=now),
        {"ids": list(ids)},
    )


# --- record ------------------------------------------------------------------------------------


def record(
    session: Session,
    verdicts: Sequence[Verdict],
    claimed: dict[int, Claimed],
    lease: datetime,
    settings: Settings,
    now: datetime,
) -> int:
    """Write attempt rows and the new states; returns how many deliveries changed (a lower
    number means a lease had run out and another worker owns those deliveries now)."""
    if not verdicts:
        return 0
    bulk.insert_rows(session, Attempt, [_attempt_row(v) for v in verdicts])
    rows = [_state_row(v, claimed[v.delivery_id], settings, now) for v in verdicts]
    changed = bulk.update_rows(
        session,
        Delivery,
        "id",
        rows,
        fence={"state": S.SENDING.value, "lease_until": lease},
        constant={"lease_until": None, "updated_at": now},
    )
    bounced = [v for v in verdicts if v.klass is ReplyClass.HARD_BOUNCE]
    if bounced:
        suppressions.add(
            session, ((v.recipient, f"hard bounce: {v.reply}", v.delivery_id) for v in bounced), now
        )
    _relay_health(session, verdicts, settings, now)
    if changed < len(rows):
        log.warning(
            "%d of %d outcomes not recorded: their lease had expired and another worker "
            "took them over",
            len(rows) - changed,
            len(rows),
        )
    return changed


# The enums' members go into rows as they are: each is a str (StrEnum), whose `.value` costs
# two Python calls (1 us a row for the four of them)
def _attempt_row(v: Verdict) -> dict[str, Any]:
    return {
        "delivery_id": v.delivery_id,
        "started_at": v.started,
        "finished_at": v.finished,
        "phase": v.phase,
        "code": v.reply.code,
        "enhanced": v.reply.enhanced,
        "reply": v.reply.text,
        "outcome": v.klass,
        "relay": v.relay,
        "tls": v.tls,
    }


def _state_row(v: Verdict, c: Claimed, settings: Settings, now: datetime) -> dict[str, Any]:
    state, attempts, when = _next_state(v, c, settings, now)
    return {
        "id": c.id,
        "state": state,
        "attempts": attempts,
        "next_attempt_at": when,
        "last_phase": v.phase,
        "last_code": v.reply.code,
        "last_enhanced": v.reply.enhanced,
        "last_reply": v.reply.text,
    }


def _next_state(
    v: Verdict, c: Claimed, settings: Settings, now: datetime
) -> tuple[DeliveryState, int, datetime]:
    k = v.klass
    if k is ReplyClass.DELIVERED:
        return S.SENT, c.attempts + 1, now
    if k is ReplyClass.HARD_BOUNCE:
        return S.BOUNCED, c.attempts + 1, now
    if k in (ReplyClass.MESSAGE_FAILURE, ReplyClass.PROTOCOL):
        return S.FAILED, c.attempts + 1, now
    if k is ReplyClass.AMBIGUOUS and settings.ambiguous == "hold":
        return S.UNKNOWN, c.attempts + 1, now
    if k is ReplyClass.CONFIGURATION:
        return S.QUEUED, c.attempts, now  # the relay is paused; nothing is spent
    if k.relay_wide:
        # throttled or unreachable: wait for the relay, keep the recipient's attempt budget
        rest = now + timedelta(seconds=settings.relay_backoff)
        deadline = c.created_at + timedelta(seconds=settings.retry.max_age)
        return (
            (S.EXPIRED, c.attempts, now)
            if now >= deadline
            else (S.DEFERRED, c.attempts, min(rest, deadline))
        )
    # transient; ambiguous under the retry policy; or "too many recipients" for a transaction
    # of one (delivery.py splits bigger ones at once), which only a later try can mend
    failures = c.attempts + 1
    when = backoff.next_attempt(
        settings.retry,
        failures=failures,
        enqueued_at=c.created_at,
        now=now,
        hint=backoff.server_hint(v.reply.text),
    )
    return (S.EXPIRED, failures, now) if when is None else (S.DEFERRED, failures, when)


def _relay_health(
    session: Session, verdicts: Sequence[Verdict], settings: Settings, now: datetime
) -> None:
    for v in verdicts:
        if v.klass is ReplyClass.CONFIGURATION:
            pause_relay(session, v.relay, f"{v.phase.value}: {v.reply}", now)
            return
    for v in verdicts:
        if v.klass in (ReplyClass.THROTTLED, ReplyClass.CONNECTION):
            rest_relay(session, v.relay, now + timedelta(seconds=settings.relay_backoff), now)
            return


# --- other transitions -------------------------------------------------------------------------


def release(
    session: Session,
    ids: Iterable[int],
    lease: datetime,
    *,
    state: DeliveryState,
    not_before: datetime,
    now: datetime,
) -> None:
    """Hand claimed deliveries back untried (the relay failed part-way through a chunk)."""
    session.execute(
        update(Delivery)
        .where(
            bulk.among(Delivery.id, "ids", bulk.postgresql(session)),
            Delivery.state == S.SENDING,
            Delivery.lease_until == lease,
        )
        .values(state=state, lease_until=None, next_attempt_at=not_before, updated_at=now),
        {"ids": list(ids)},
    )


def finish_unsent(
    session: Session, reasons: dict[int, tuple[DeliveryState, str]], lease: datetime, now: datetime
) -> None:
    """Close claimed deliveries that were never offered to a server (suppressed, expired)."""
    for state in {s for s, _ in reasons.values()}:
        rows = [
            {"b_id": i, "b_lease": lease, "reply": why}
            for i, (s, why) in reasons.items()
            if s is state
        ]
        session.connection().execute(
            update(Delivery)
            .where(
                Delivery.id == bindparam("b_id"),
                Delivery.state == S.SENDING,
                Delivery.lease_until == bindparam("b_lease"),
            )
            .values(
                state=state,
                lease_until=None,
                last_reply=bindparam("reply"),
                last_phase=Phase.LOCAL.value,
                updated_at=now,
            ),
            rows,
        )


def requeue(session: Session, ids: Select[Any], now: datetime, *, include_suppressed: bool) -> int:
    """Operator retry: the selected deliveries that are not in flight go back to queued with a
    fresh budget of attempts and of age (`created_at` restarts: it is when the delivery was last
    queued; the message keeps the original time; attempt rows stay as history); the dispatcher
    publishes them on its next pass. Suppressed addresses are left alone unless
    `include_suppressed`, which also takes them off the suppression list."""
    chosen = list(session.scalars(_retryable(ids, include_suppressed)))
    if include_suppressed and chosen:
        recipients = select(func.lower(Delivery.recipient)).where(Delivery.id.in_(chosen))
        session.execute(delete(Suppression).where(Suppression.address.in_(recipients)))
    for part in bulk.chunks(chosen, 5000):
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(part), Delivery.state.in_(_RETRYABLE))
            .values(
                state=S.QUEUED,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                published_at=None,
                lease_until=None,
                updated_at=now,
            )
        )
    return len(chosen)


def retry_candidates(session: Session, ids: Select[Any], *, include_suppressed: bool) -> int:
    """How many deliveries `requeue` would take (for --dry-run)."""
    selected = _retryable(ids, include_suppressed).subquery()
    return session.scalar(select(func.count()).select_from(selected)) or 0


def _retryable(ids: Select[Any], include_suppressed: bool) -> Select[Any]:
    selected = ids.where(Delivery.state.in_(_RETRYABLE))
    if include_suppressed:
        return selected
    listed = select(Suppression.address)
    return selected.where(
        Delivery.state != S.SUPPRESSED, func.lower(Delivery.recipient).not_in(listed)
    )


def cancel(session: Session, ids: Select[Any], now: datetime) -> int:
    """Cancel what has not gone out: queued or deferred. In-flight deliveries (sending)
    finish as they will; `unknown` ones may have been delivered and stay as they are."""
    result: Any = session.execute(
        update(Delivery)
        .where(Delivery.id.in_(ids), Delivery.state.in_(_CANCELLABLE))
        .values(state=S.CANCELLED, last_reply="cancelled by an operator", updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return max(int(result.rowcount), 0)


_RETRYABLE = (S.FAILED, S.EXPIRED, S.UNKNOWN, S.BOUNCED, S.CANCELLED, S.SUPPRESSED, S.DEFERRED)
_CANCELLABLE = (S.QUEUED, S.DEFERRED)


def pause_campaign(session: Session, campaign_id: int, paused: bool, now: datetime) -> None:
    """Pause: no more of its deliveries are claimed (in-flight ones finish). Resume: the
    dispatcher wakes every waiting delivery on its next pass."""
    found = session.get(Campaign, campaign_id)
    if found is None:
        raise NotFound(f"no campaign {campaign_id}")
    found.paused = paused
    if not paused:
        waiting = select(Message.id).where(Message.campaign_id == campaign_id)
        session.execute(
            update(Delivery)
            .where(Delivery.message_id.in_(waiting), Delivery.state.in_([S.QUEUED, S.DEFERRED]))
            .values(published_at=None, updated_at=now)
        )


def pause_relay(session: Session, name: str, reason: str, now: datetime) -> None:
    _upsert_relay(session, name, {"paused_reason": reason, "updated_at": now})
    log.error(
        "relay %s paused: %s -- fix the configuration, then `mailer relay resume`", name, reason
    )


def rest_relay(session: Session, name: str, until: datetime, now: datetime) -> None:
    _upsert_relay(session, name, {"backoff_until": until, "updated_at": now})
    log.warning("relay %s throttled or unreachable: resting until %s", name, until.isoformat())


def resume_relay(session: Session, name: str, now: datetime) -> None:
    _upsert_relay(session, name, {"paused_reason": None, "backoff_until": None, "updated_at": now})


def _upsert_relay(session: Session, name: str, values: dict[str, Any]) -> None:
    stmt = db.dialect_insert(session)(Relay).values(name=name, **values)
    session.execute(stmt.on_conflict_do_update(index_elements=["name"], set_=values))


@dataclass(frozen=True)
class RelayBlock:
    """Why the relay cannot be used now, and until when (paused: until an operator resumes
    it; the work is due again at once, and the dispatcher holds back meanwhile)."""

    until: datetime
    why: str


_relay_health_of = select(Relay.paused_reason, Relay.backoff_until).where(
    Relay.name == bindparam("name")
)


def relay_block(session: Session, name: str, now: datetime) -> RelayBlock | None:
    """None when the relay is usable."""
    state = session.connection().execute(_relay_health_of, {"name": name}).first()
    if state is None:
        return None
    if state.paused_reason:
        return RelayBlock(now, f"paused: {state.paused_reason}")
    if state.backoff_until is not None and state.backoff_until > now:
        return RelayBlock(state.backoff_until, f"resting until {state.backoff_until.isoformat()}")
    return None
