"""A campaign's breakdown by reply class and by recipient domain, for the dashboard.

Counting a million-recipient campaign by domain reads its whole index range (BENCHMARKS.md,
"The dashboard at ten million rows"), too slow for every page view. The result is kept in
`campaign_breakdowns` with the state counts it was computed at: it is used again while those
counts have not moved, and at most `MAX_AGE` seconds while the campaign is sending.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailer import clock, counts, db
from mailer.models import CampaignBreakdown, Delivery, DeliveryState, Message
from mailer.replies import ReplyClass

S = DeliveryState
MAX_AGE = 60  # seconds a breakdown of a campaign that is still sending is shown
TOP = 10


@dataclass(frozen=True)
class Breakdown:
    """Deliveries not in flight, by the class of their last reply ("none": not tried yet) and
    by recipient domain (the `top` biggest, then "other"), as of `computed_at`."""

    by_class: dict[str, int]
    by_domain: dict[str, int]
    computed_at: datetime


def get(session: Session, campaign_id: int, *, max_age: float = MAX_AGE) -> Breakdown:
    """The kept breakdown while it holds, else one computed now and kept."""
    now = clock.now()
    state_counts = counts.campaign(session, campaign_id)
    kept = session.get(CampaignBreakdown, campaign_id)
    if kept is not None and kept.counts == state_counts:
        moving = any(state_counts.get(s, 0) for s in (S.QUEUED, S.DEFERRED, S.SENDING))
        if not moving or now - kept.computed_at < timedelta(seconds=max_age):
            return Breakdown(kept.by_class, kept.by_domain, kept.computed_at)
    fresh = compute(session, campaign_id, sent=state_counts.get(S.SENT, 0), now=now)
    _keep(session, campaign_id, state_counts, fresh)
    return fresh


def compute(
    session: Session, campaign_id: int, *, sent: int, now: datetime, top: int = TOP
) -> Breakdown:
    """Counted from the deliveries; `sent` from the state counts (a sent delivery's last reply
    is always "delivered")."""
    # the campaign's messages as values (see DeliveryFilter.where)
    messages = list(session.scalars(select(Message.id).where(Message.campaign_id == campaign_id)))
    not_sent = [s for s in S if s not in (S.SENT, S.SENDING)]
    classes = session.execute(
        select(Delivery.last_class, func.count())
        .where(Delivery.message_id.in_(messages), Delivery.state.in_(not_sent))
        .group_by(Delivery.last_class)
    ).all()
    by_class = {ReplyClass.DELIVERED.value: sent} if sent else {}
    for klass, n in sorted(classes, key=lambda r: -r[1]):
        key = klass or "none"
        by_class[key] = by_class.get(key, 0) + n
    # the campaign index alone (the domain rides in its entries); the total over every
    # domain comes with the top ones (a window over the groups, before the LIMIT)
    size = func.count().label("n")
    domains = session.execute(
        select(Delivery.domain, size, func.sum(func.count()).over())
        .where(Delivery.message_id.in_(messages), Delivery.state != S.SENDING)
        .group_by(Delivery.domain)
        .order_by(size.desc(), Delivery.domain)
        .limit(top)
    ).all()
    by_domain = {domain: count for domain, count, _ in domains}
    total = int(domains[0][2]) if domains else 0
    if total > sum(by_domain.values()):
        by_domain["other"] = total - sum(by_domain.values())
    return Breakdown(by_class, by_domain, now)


def _keep(
    session: Session, campaign_id: int, state_counts: dict[str, int], fresh: Breakdown
) -> None:
    values = {
        "campaign_id": campaign_id,
        "computed_at": fresh.computed_at,
        "counts": state_counts,
        "by_class": fresh.by_class,
        "by_domain": fresh.by_domain,
    }
    statement = db.dialect_insert(session)(CampaignBreakdown).values(values)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["campaign_id"],
            set_={k: statement.excluded[k] for k in values if k != "campaign_id"},
        )
    )
