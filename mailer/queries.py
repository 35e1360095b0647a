"""The read side for the CLI and dashboards: reads the database, never the broker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
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


def report(
    session: Session, campaign_id: int, states: list[DeliveryState] | None = None
) -> Iterator[dict[str, Any]]:
    """Per recipient: address, state, attempts and the server's last answer; streamed."""
    campaign(session, campaign_id)
    query = (
        select(
            Delivery.recipient,
            Delivery.state,
            Delivery.attempts,
            Delivery.last_code,
            Delivery.last_enhanced,
            Delivery.last_reply,
            Delivery.updated_at,
        )
        .join(Message, Delivery.message_id == Message.id)
        .where(Message.campaign_id == campaign_id)
        .order_by(Delivery.id)
        .execution_options(yield_per=2000)
    )
    if states:
        query = query.where(Delivery.state.in_(states))
    for row in session.execute(query):
        yield {
            "recipient": row.recipient,
            "state": row.state.value,
            "attempts": row.attempts,
            "code": row.last_code,
            "enhanced": row.last_enhanced,
            "reply": row.last_reply or "",
            "updated_at": row.updated_at.isoformat(),
        }


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
