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
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Select, and_, bindparam, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session

from mailer import backoff, batches, bulk, relay_health, suppressions
from mailer.config import Settings
from mailer.errors import NotFound
from mailer.models import (
    Attempt,
    Campaign,
    Delivery,
    DeliveryState,
    Message,
    Suppression,
)
from mailer.replies import Phase, ReplyClass, SMTPReply

log = logging.getLogger(__name__)
S = DeliveryState


class Verdict(NamedTuple):
    """One delivery's result in one attempt, classified (a tuple: one is made for every
    message, and a tuple is cheaper to make than a frozen dataclass)."""

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
    relay_health.observe(session, verdicts, settings.relay_backoff, now)
    if changed < len(rows):
        log.warning(
            "%d of %d outcomes not recorded: their lease had expired and another worker "
            "took them over",
            len(rows) - changed,
            len(rows),
        )
    return changed


# The enums' members go into rows as they are: each is a str (StrEnum), and `.value` would
# cost two Python calls a member on every row
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
        "last_class": v.klass,
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


# --- deliveries not sent: closed, or handed back ---------------------------------------------


def unsendable(
    expires_at: datetime | None, suppressed: str | None, now: datetime
) -> tuple[DeliveryState, str] | None:
    """Why a claimed delivery must be closed without being offered to a server (its state and
    reply), or None: its message expired (`expires_at`), or its address is on the suppression
    list (`suppressed`: the list's reason)."""
    if expires_at is not None and now >= expires_at:
        return S.EXPIRED, f"message expired at {expires_at.isoformat()}"
    if suppressed is not None:
        return S.SUPPRESSED, f"suppressed: {suppressed}"
    return None


def untried(
    stops: Sequence[ReplyClass], settings: Settings, now: datetime
) -> tuple[DeliveryState, datetime]:
    """Where deliveries a chunk did not try go back to, and when they are due, given the
    relay-wide failures that stopped it (`stops`; none: its time ran out). Paused
    (configuration, which outranks a resting relay) or time run out: queued, due now, and the
    dispatcher's next pass publishes them; resting: deferred until the relay's rest is over."""
    if not stops or ReplyClass.CONFIGURATION in stops:
        return S.QUEUED, now
    return S.DEFERRED, now + timedelta(seconds=settings.relay_backoff)


def held(until: datetime, now: datetime) -> tuple[DeliveryState, datetime]:
    """Where deliveries a hook said "not now" to go back to (no attempt spent), and when."""
    return S.DEFERRED, max(until, now)


def expire(session: Session, now: datetime, *, since: datetime) -> int:
    """Close what can no longer go out: past its message's expires_at, for the messages that
    expired from `since` on. Older ones were closed by earlier passes, and a claim closes any
    left (unsendable), so the pass reads what expired lately, not the whole history. (Age
    against the retry policy is judged when a try fails, so that the last try happens at the
    maximum age.)"""
    message_expired = select(Message.id).where(
        Message.expires_at <= now, Message.expires_at > since
    )
    result: Any = session.execute(
        update(Delivery)
        .where(
            Delivery.state.in_([S.QUEUED, S.DEFERRED]),
            Delivery.message_id.in_(message_expired),
        )
        .values(
            state=S.EXPIRED, last_reply="the message expired before it was sent", updated_at=now
        )
    )
    return max(int(result.rowcount), 0)


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
    """Hand claimed deliveries back untried (the relay failed part-way through a chunk, its
    time ran out, or a hook said "not now"), in the `state` and at the time that `untried` or
    `held` chose."""
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


def requeue(
    session: Session,
    ids: Select[Any],
    now: datetime,
    *,
    include_suppressed: bool,
    progress: batches.Progress | None = None,
) -> int:
    """Operator retry: the selected deliveries that are not in flight go back to queued with a
    fresh budget of attempts and of age (`created_at` restarts: it is when the delivery was last
    queued; the message keeps the original time; attempt rows stay as history); the dispatcher
    publishes them on its next pass. Suppressed addresses are left alone unless
    `include_suppressed`, which also takes them off the suppression list. Returns how many
    were queued again. Commits a batch at a time (`batches.apply`): stopped part-way, the
    same command run again queues the rest (a delivery queued again is no longer selected)."""
    postgresql = bulk.postgresql(session)
    statements = [_unsuppress(postgresql)] if include_suppressed else []
    statements.append(_requeue(postgresql))
    selected = _retryable(ids, include_suppressed)
    return batches.apply(session, selected, statements, {"now": now}, progress)


@functools.cache
def _unsuppress(postgresql: bool) -> Any:
    # each delivery through its key, each address through the suppressions' unique index
    chosen = select(func.lower(Delivery.recipient)).where(
        bulk.among(Delivery.id, "ids", postgresql)
    )
    return delete(Suppression).where(Suppression.address.in_(chosen))


@functools.cache
def _requeue(postgresql: bool) -> Any:
    now = bindparam("now", type_=Delivery.updated_at.type)
    fresh = {"attempts": 0, "next_attempt_at": now, "created_at": now, "published_at": None}
    return _change(postgresql, _RETRYABLE).values(
        state=S.QUEUED, lease_until=None, updated_at=now, **fresh
    )


def _change(postgresql: bool, states: Sequence[DeliveryState]) -> Any:
    """An UPDATE of the batch's deliveries still in `states` (a worker may have claimed some
    since they were read)."""
    return (
        update(Delivery)
        .where(bulk.among(Delivery.id, "ids", postgresql), Delivery.state.in_(states))
        .execution_options(synchronize_session=False)
    )


def retry_candidates(session: Session, ids: Select[Any], *, include_suppressed: bool) -> int:
    """How many deliveries `requeue` would take (for --dry-run)."""
    selected = _retryable(ids, include_suppressed).subquery()
    return session.scalar(select(func.count()).select_from(selected)) or 0


def _retryable(ids: Select[Any], include_suppressed: bool) -> Select[Any]:
    selected = ids.where(Delivery.state.in_(_RETRYABLE))
    if include_suppressed:
        return selected
    # NOT EXISTS, not NOT IN: a NOT IN over a list bigger than work_mem checks each candidate
    # against the whole list in turn; this looks each one up in the list's unique index
    listed = exists().where(Suppression.address == func.lower(Delivery.recipient))
    return selected.where(Delivery.state != S.SUPPRESSED, ~listed)


def cancel(
    session: Session, ids: Select[Any], now: datetime, progress: batches.Progress | None = None
) -> int:
    """Cancel what has not gone out: queued or deferred. In-flight deliveries (sending)
    finish as they will; `unknown` ones may have been delivered and stay as they are. Returns
    how many were cancelled. Commits a batch at a time (`batches.apply`): stopped part-way,
    the same command run again cancels the rest."""
    selected = ids.where(Delivery.state.in_(_CANCELLABLE))
    statement = _cancel(bulk.postgresql(session))
    return batches.apply(session, selected, [statement], {"now": now}, progress)


@functools.cache
def _cancel(postgresql: bool) -> Any:
    now = bindparam("now", type_=Delivery.updated_at.type)
    return _change(postgresql, _CANCELLABLE).values(
        state=S.CANCELLED, last_reply="cancelled by an operator", updated_at=now
    )


_RETRYABLE = (S.FAILED, S.EXPIRED, S.UNKNOWN, S.BOUNCED, S.CANCELLED, S.SUPPRESSED, S.DEFERRED)
_WAITING = (S.QUEUED, S.DEFERRED)
_CANCELLABLE = _WAITING


# the published_at of a paused campaign's waiting deliveries: published at the end of time, they
# are in neither of the dispatcher's indexes' reach (owed a wake-up; published long ago), so a
# pass does not read a paused campaign's backlog to filter it out each time
PARKED = datetime(9999, 1, 1, tzinfo=UTC)


def pause_campaign(
    session: Session,
    campaign_id: int,
    paused: bool,
    now: datetime,
    progress: batches.Progress | None = None,
) -> None:
    """Pause: no more of its deliveries are claimed (in-flight ones finish), at once; then its
    waiting deliveries are parked (PARKED) a batch at a time. Resume: their wake-ups are
    forgotten (parked, or published while paused and dropped by the workers) a batch at a
    time with the campaign still paused, and the pause is lifted last; the dispatcher wakes
    them on its next pass. Stopped part-way, either is completed by running it again."""
    found = session.get(Campaign, campaign_id)
    if found is None:
        raise NotFound(f"no campaign {campaign_id}")
    waiting = (
        select(Delivery.id)
        .join(Message, Delivery.message_id == Message.id)
        .where(Message.campaign_id == campaign_id, Delivery.state.in_(_WAITING))
    )
    postgresql = bulk.postgresql(session)
    if paused:
        found.paused = True
        session.commit()
        unparked = or_(Delivery.published_at.is_(None), Delivery.published_at != PARKED)
        statement = _park(postgresql)
        batches.apply(session, waiting.where(unparked), [statement], {"parked": PARKED}, progress)
        return
    published = waiting.where(Delivery.published_at.is_not(None))
    batches.apply(session, published, [_unpublish(postgresql)], {"now": now}, progress)
    found.paused = False
    session.commit()


@functools.cache
def _park(postgresql: bool) -> Any:
    return _change(postgresql, _WAITING).values(
        published_at=bindparam("parked", type_=Delivery.published_at.type)
    )


@functools.cache
def _unpublish(postgresql: bool) -> Any:
    now = bindparam("now", type_=Delivery.updated_at.type)
    return _change(postgresql, _WAITING).values(published_at=None, updated_at=now)
