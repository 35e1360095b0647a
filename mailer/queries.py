"""The read side for the CLI and dashboards: reads the database, never the broker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, String, func, select, type_coerce
from sqlalchemy.orm import Session

from mailer import counts
from mailer.errors import NotFound
from mailer.models import Campaign, Delivery, DeliveryState, Message


@dataclass
class CampaignStatus:
    id: int
    name: str
    paused: bool
    created_at: datetime
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return sum(n for state, n in self.counts.items() if DeliveryState(state).final)

    @property
    def progress(self) -> float:
        return self.done / self.total if self.total else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "paused": self.paused,
            "created_at": self.created_at.isoformat(),
            "total": self.total,
            "done": self.done,
            "progress": round(self.progress, 4),
            "counts": self.counts,
        }


def campaign(session: Session, campaign_id: int) -> Campaign:
    found = session.get(Campaign, campaign_id)
    if found is None:
        raise NotFound(f"no campaign {campaign_id}")
    return found


def campaign_status(session: Session, campaign_id: int) -> CampaignStatus:
    c = campaign(session, campaign_id)
    found = counts.campaign(session, campaign_id)
    ordered = {str(s): found[str(s)] for s in DeliveryState if str(s) in found}
    return CampaignStatus(c.id, c.name, c.paused, c.created_at, ordered)


REPORT_COLUMNS = ("recipient", "state", "attempts", "code", "enhanced", "reply", "updated_at")
REPORT_BATCH = 5000  # rows fetched at a time from a server-side cursor: memory stays flat


def report(
    session: Session, campaign_id: int, states: list[DeliveryState] | None = None
) -> Iterator[dict[str, Any]]:
    """Per recipient: address, state, attempts and the server's last answer; streamed."""
    for row in report_rows(session, campaign_id, states):
        yield dict(zip(REPORT_COLUMNS, row, strict=True))


def report_rows(
    session: Session, campaign_id: int, states: list[DeliveryState] | None = None
) -> Iterator[tuple[Any, ...]]:
    """`report`'s rows as tuples in REPORT_COLUMNS order, ready to write (what a report of a
    million rows is written from). Read by the core: no ORM rows, no enum or time zone
    conversion a row; the time is read as UTC without a zone and given its +00:00 here."""
    campaign(session, campaign_id)
    postgresql = session.get_bind().dialect.name == "postgresql"
    updated = func.timezone("UTC", Delivery.updated_at) if postgresql else Delivery.updated_at
    query = (
        select(
            Delivery.recipient,
            type_coerce(Delivery.state, String),
            Delivery.attempts,
            Delivery.last_code,
            Delivery.last_enhanced,
            Delivery.last_reply,
            type_coerce(updated, DateTime(timezone=False)),
        )
        .join(Message, Delivery.message_id == Message.id)
        .where(Message.campaign_id == campaign_id)
        .order_by(Delivery.id)
    )
    if states:
        query = query.where(Delivery.state.in_(states))
    # the option on the statement: on the connection it would outlast the report
    rows = session.connection().execute(query.execution_options(yield_per=REPORT_BATCH))
    for recipient, state, attempts, code, enhanced, reply, at in rows:
        yield recipient, state, attempts, code, enhanced, reply or "", at.isoformat() + "+00:00"
