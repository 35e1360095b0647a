"""The read side for the CLI and dashboards: reads the database, never the broker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Select, String, func, select, type_coerce
from sqlalchemy.orm import Session

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
    rows = session.execute(
        select(Delivery.state, func.count())
        .join(Message, Delivery.message_id == Message.id)
        .where(Message.campaign_id == campaign_id)
        .group_by(Delivery.state)
    ).all()
    counts: dict[str, int] = {str(state): n for state, n in rows}
    ordered = {str(s): counts[str(s)] for s in DeliveryState if str(s) in counts}
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


@dataclass
class Selection:
    """Which deliveries an operator means: by campaign or message, state, last code, age."""

    campaign_id: int | None = None
    message_id: int | None = None
    states: list[DeliveryState] | None = None
    code: str | None = None  # "4xx", "5xx" or an exact code such as "550"
    since: datetime | None = None

    def ids(self) -> Select[Any]:
        query = select(Delivery.id).join(Message, Delivery.message_id == Message.id)
        if self.campaign_id is not None:
            query = query.where(Message.campaign_id == self.campaign_id)
        if self.message_id is not None:
            query = query.where(Delivery.message_id == self.message_id)
        if self.states:
            query = query.where(Delivery.state.in_(self.states))
        if self.code is not None:
            low, high = code_range(self.code)
            query = query.where(Delivery.last_code.between(low, high))
        if self.since is not None:
            query = query.where(Delivery.updated_at >= self.since)
        return query


def code_range(code: str) -> tuple[int, int]:
    """ "4xx" -> (400, 499); "550" -> (550, 550); ValueError with the accepted forms."""
    text = code.strip().lower()
    if len(text) == 3 and text[0] in "245" and text[1:] == "xx":
        base = int(text[0]) * 100
        return base, base + 99
    if len(text) == 3 and text.isdigit() and text[0] in "245":
        return int(text), int(text)
    raise ValueError(f"{code!r} is not a reply code: use 4xx, 5xx or a code such as 550")
