"""The dashboard's read side: a filter's deliveries a page at a time and as CSV, a recipient's
whole history with the reason for each verdict, the audit log and the suppression list. Reads
the database, never the broker; every statement is narrowed by an index and paged by a key,
never by OFFSET over a big table (queries.py keeps the CLI's status and report, breakdowns.py
a campaign's breakdown)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailer import filters
from mailer.filters import DeliveryFilter
from mailer.models import (
    Attempt,
    AuditEntry,
    Campaign,
    Delivery,
    DeliveryState,
    Message,
    Suppression,
    Template,
)
from mailer.replies import Phase, SMTPReply, explain

T = TypeVar("T")
S = DeliveryState

# how many suppressions a search reads a page at most (a substring has no index)
SEARCH_WINDOW = 5_000


@dataclass(frozen=True)
class Page(Generic[T]):
    """Rows, and the key to ask for the next page with (None: this was the last)."""

    rows: list[T]
    next_after: Any = None


# --- deliveries --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    message_id: int
    recipient: str
    domain: str
    state: str
    attempts: int
    last_phase: str | None
    last_code: int | None
    last_enhanced: str | None
    last_class: str | None
    last_reply: str | None
    next_attempt_at: datetime | None  # only while it waits (queued, deferred)
    updated_at: datetime


_ROW = (
    Delivery.id,
    Delivery.message_id,
    Delivery.recipient,
    Delivery.domain,
    Delivery.state,
    Delivery.attempts,
    Delivery.last_phase,
    Delivery.last_code,
    Delivery.last_enhanced,
    Delivery.last_class,
    Delivery.last_reply,
    Delivery.next_attempt_at,
    Delivery.updated_at,
)
CSV_COLUMNS = [c.key for c in _ROW]


def _row(r: Any) -> DeliveryRow:
    waiting = r.state in (S.QUEUED, S.DEFERRED)
    return DeliveryRow(
        r.id,
        r.message_id,
        r.recipient,
        r.domain,
        r.state.value,
        r.attempts,
        r.last_phase,
        r.last_code,
        r.last_enhanced,
        r.last_class,
        r.last_reply,
        r.next_attempt_at if waiting else None,
        r.updated_at,
    )


def deliveries_page(
    session: Session, f: DeliveryFilter, after_id: int | None = None, limit: int = 50
) -> Page[DeliveryRow]:
    """The matching deliveries in id order after `after_id`, `limit` at most (1 to 1,000)."""
    limit = max(1, min(limit, 1000))
    query = select(*_ROW).where(*f.where(session), *_within(session, f))
    query = query.order_by(Delivery.id).limit(limit + 1)
    if after_id is not None:
        query = query.where(Delivery.id > after_id)
    rows = [_row(r) for r in session.execute(query)]
    more = len(rows) > limit
    return Page(rows[:limit], rows[limit - 1].id if more else None)


def _within(session: Session, f: DeliveryFilter) -> list[Any]:
    """The campaign's or message's id range (filters.id_bounds), as conditions."""
    bounds = filters.id_bounds(session, f)
    return [] if bounds is None else [Delivery.id.between(*bounds)]


def export_csv(session: Session, f: DeliveryFilter) -> Iterator[str]:
    """The matching deliveries as CSV lines (a header first), streamed in id order."""
    yield _csv_line(CSV_COLUMNS)
    for extra in filters.ranges(session, f):
        query = (
            select(*_ROW)
            .where(*f.where(session), *extra, *_within(session, f))
            .order_by(Delivery.id)
            .execution_options(yield_per=2000)
        )
        for r in session.execute(query):
            row = _row(r)
            yield _csv_line([_cell(getattr(row, name)) for name in CSV_COLUMNS])


def _csv_line(values: list[Any]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return "" if value is None else value


# --- a recipient's history ---------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptView:
    started_at: datetime
    finished_at: datetime
    phase: str
    code: int | None
    enhanced: str | None
    reply: str
    reply_class: str
    reason: str  # why the reply was judged so (replies.explain)


@dataclass(frozen=True)
class DeliveryHistory:
    id: int
    recipient: str
    state: str
    why: str  # what mailer concluded, and why
    next_attempt_at: datetime | None  # when it is tried next, while it waits
    updated_at: datetime
    attempts: list[AttemptView]


@dataclass(frozen=True)
class MessageHistory:
    id: int
    kind: str  # "campaign" or "transactional"
    campaign_id: int | None
    campaign_name: str | None
    template: str
    created_at: datetime
    deliveries: list[DeliveryHistory]


def recipient_history(session: Session, address: str, limit: int = 100) -> list[MessageHistory]:
    """Every message sent to `address` (the latest `limit` deliveries), newest first, with
    each attempt, the server's reply and the reason for each verdict."""
    found = list(
        session.scalars(
            select(Delivery)
            .where(*DeliveryFilter(recipient=address).where())
            .order_by(Delivery.id.desc())
            .limit(limit)
        )
    )
    if not found:
        return []
    tried = _attempts(session, [d.id for d in found])
    messages = {
        row.id: row
        for row in session.execute(
            select(
                Message.id,
                Message.campaign_id,
                Message.created_at,
                Campaign.name.label("campaign_name"),
                Template.name.label("template"),
            )
            .join(Template, Message.template_id == Template.id)
            .outerjoin(Campaign, Message.campaign_id == Campaign.id)
            .where(Message.id.in_({d.message_id for d in found}))
        )
    }
    out: dict[int, MessageHistory] = {}
    for d in found:
        m = messages[d.message_id]
        if d.message_id not in out:
            kind = "campaign" if m.campaign_id is not None else "transactional"
            out[d.message_id] = MessageHistory(
                m.id, kind, m.campaign_id, m.campaign_name, m.template, m.created_at, []
            )
        views = tried.get(d.id, [])
        waiting = d.state in (S.QUEUED, S.DEFERRED)
        out[d.message_id].deliveries.append(
            DeliveryHistory(
                d.id,
                d.recipient,
                d.state.value,
                _why(d, views),
                d.next_attempt_at if waiting else None,
                d.updated_at,
                views,
            )
        )
    return list(out.values())


def _attempts(session: Session, ids: list[int]) -> dict[int, list[AttemptView]]:
    # ix_attempts_delivery_id
    out: dict[int, list[AttemptView]] = {}
    for a in session.scalars(
        select(Attempt).where(Attempt.delivery_id.in_(ids)).order_by(Attempt.id)
    ):
        _, reason = explain(SMTPReply(a.code, a.reply, a.enhanced), Phase(a.phase))
        out.setdefault(a.delivery_id, []).append(
            AttemptView(
                a.started_at, a.finished_at, a.phase, a.code, a.enhanced, a.reply, a.outcome, reason
            )
        )
    return out


_CLOSED_HERE = {
    S.CANCELLED: "cancelled",
    S.SUPPRESSED: "suppressed",
}
_STATE_SAYS = {
    S.QUEUED: "queued: waiting to be sent",
    S.SENDING: "sending: a worker holds it now",
    S.SENT: "sent",
    S.DEFERRED: "deferred: tried again at the next attempt's time",
    S.BOUNCED: "bounced",
    S.FAILED: "failed",
    S.UNKNOWN: "unknown: it may have been delivered; an operator decides (retry or leave it)",
    S.EXPIRED: "expired: not sent in time",
    S.CANCELLED: "cancelled",
    S.SUPPRESSED: "suppressed: the address is on the suppression list",
}


def _why(d: Delivery, views: list[AttemptView]) -> str:
    """The delivery's state, and the reason: the last reply's, unless the delivery was closed
    without one (cancelled, suppressed, expired unsent), whose own note says why."""
    said = _STATE_SAYS[d.state]
    if d.last_phase == Phase.LOCAL.value or not views or d.state in _CLOSED_HERE:
        return f"{said} ({d.last_reply})" if d.last_reply else said
    return f"{said}: {views[-1].reason}"


# --- the audit log and the suppression list ----------------------------------------------------


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: datetime
    actor: str
    role: str
    action: str
    target: dict[str, Any]
    count: int | None  # None: stopped part-way


def audit_page(session: Session, after_id: int | None = None, limit: int = 50) -> Page[AuditRow]:
    """The audit log, newest first (by its primary key), after `after_id`."""
    limit = max(1, min(limit, 1000))
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit + 1)
    if after_id is not None:
        query = query.where(AuditEntry.id < after_id)
    rows = [
        AuditRow(e.id, e.at, e.actor, e.role, e.action, dict(e.target), e.count)
        for e in session.scalars(query)
    ]
    more = len(rows) > limit
    return Page(rows[:limit], rows[limit - 1].id if more else None)


@dataclass(frozen=True)
class SuppressionRow:
    address: str
    reason: str
    source_delivery_id: int | None
    created_at: datetime


def suppressions_page(
    session: Session, search: str | None = None, after: str | None = None, limit: int = 50
) -> Page[SuppressionRow]:
    """The list in address order after `after` (its unique index). With `search`, the
    addresses containing it (any case) among the next SEARCH_WINDOW: a page may then hold
    fewer than `limit` rows and still have a next one."""
    text = (search or "").strip().lower()
    limit = max(1, min(limit, 1000))
    query = select(Suppression).order_by(Suppression.address).limit(limit + 1)
    if after is not None:
        query = query.where(Suppression.address > after)
    end = None
    if text:
        end = _window_end(session, after)
        query = query.where(Suppression.address.contains(text, autoescape=True))
        if end is not None:
            query = query.where(Suppression.address <= end)
    rows = [
        SuppressionRow(s.address, s.reason, s.source_delivery_id, s.created_at)
        for s in session.scalars(query)
    ]
    if len(rows) > limit:
        return Page(rows[:limit], rows[limit - 1].address)
    return Page(rows, end)


def _window_end(session: Session, after: str | None) -> str | None:
    """The last address of the next SEARCH_WINDOW after `after` (None: the list ends first)."""
    query = (
        select(Suppression.address).order_by(Suppression.address).offset(SEARCH_WINDOW - 1).limit(1)
    )
    if after is not None:
        query = query.where(Suppression.address > after)
    return session.scalar(query)
