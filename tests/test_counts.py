"""The state counts kept by triggers agree with the deliveries after every kind of write."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

import mailer
from mailer import clock, counts, db, dispatcher, outcomes, retention, suppressions
from mailer.delivery import deliver_chunk
from mailer.filters import DeliveryFilter
from mailer.models import Delivery, DeliveryState, Message
from mailer.replies import Phase, SMTPReply
from mailer.transport.memory import MemoryTransport
from tests.helpers import add_template


def _counted(session: Session) -> dict[tuple[int, str, str], int]:
    """What a GROUP BY over every delivery says: the truth the counts must match."""
    campaign = func.coalesce(Message.campaign_id, 0)
    rows = session.execute(
        select(campaign, Message.priority, Delivery.state, func.count())
        .join(Message, Delivery.message_id == Message.id)
        .group_by(campaign, Message.priority, Delivery.state)
    )
    return {(c, str(p), str(s)): n for c, p, s, n in rows}


def _kept(session: Session) -> dict[tuple[int, str, str], int]:
    rows = session.execute(
        text(
            "SELECT campaign_id, priority, state, sum(n) FROM (SELECT campaign_id, priority, "
            "state, n FROM state_counts UNION ALL SELECT campaign_id, priority, state, n "
            "FROM state_count_changes) x GROUP BY 1, 2, 3 HAVING sum(n) <> 0"
        )
    )
    return {(int(c), p, s): int(n) for c, p, s, n in rows}


def _agree(campaign_ids: list[int]) -> None:
    with db.session_scope() as session:
        assert _kept(session) == _counted(session)
        truth = _counted(session)
        for cid in [0, *campaign_ids]:
            expected = {s: n for (c, _, s), n in truth.items() if c == cid}
            assert counts.campaign(session, cid) == expected
        totals: dict[tuple[str, str], int] = {}
        for (_, p, s), n in truth.items():
            totals[(p, s)] = totals.get((p, s), 0) + n
        assert counts.totals(session) == totals


def test_counts_follow_every_write(any_db, configure_env) -> None:
    configure_env(retry_first_delay=60, retry_max_age=3600)
    add_template()
    transport = MemoryTransport()
    transport.script("r3@example.com", Phase.RCPT, SMTPReply.of(451, "4.7.1 Greylisted"), times=9)
    transport.script("r4@example.com", Phase.RCPT, SMTPReply.of(550, "5.1.1 No such user"))
    fake = clock.FakeClock()
    with clock.using(fake):
        with db.session_scope() as session:
            suppressions.add(session, [("r9@example.com", "test", None)], fake())
        rows = [{"email": f"r{i}@example.com", "name": str(i)} for i in range(12)]
        first = mailer.send_campaign("welcome", rows, name="one")
        second = mailer.send_campaign("welcome", rows[:5], name="two")
        mailer.send(
            template="welcome", to=["t@example.com", "u@example.com"], context={"name": "T"}
        )
        ids = [first.campaign_id, second.campaign_id]
        _agree(ids)  # inserted: queued, and suppressed at enqueue

        with db.session_scope() as session:
            every = list(session.scalars(select(Delivery.id).order_by(Delivery.id)))
        deliver_chunk(every[:10], transport=transport)
        _agree(ids)  # claimed, then sent, deferred, bounced

        dispatcher.run_once(backlog=1)  # folds the changes
        with db.session_scope() as session:
            assert session.scalar(text("SELECT count(*) FROM state_count_changes")) == 0
        _agree(ids)

        with db.session_scope() as session:
            second_ids = DeliveryFilter(campaign_id=second.campaign_id).ids()
            outcomes.cancel(session, second_ids, fake())
            outcomes.requeue(session, DeliveryFilter().ids(), fake(), include_suppressed=False)
            # a statement that changes no state, and one that changes some and not others
            session.execute(update(Delivery).values(published_at=fake()))
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_(every[::2]))
                .values(state=DeliveryState.UNKNOWN)
            )
        _agree(ids)

        fake.set(fake() + timedelta(days=100))
        for _ in retention.purge(fake() - timedelta(days=90), batch=4):
            pass
        _agree(ids)  # deleted


def test_recount_and_truncate_start_from_the_deliveries(pg_db, configure_env) -> None:
    add_template()
    result = mailer.send_campaign(
        "welcome", [{"email": "a@example.com", "name": "A"}, {"email": "b@x.org", "name": "B"}]
    )
    with db.session_scope() as session:
        session.execute(text("DELETE FROM state_counts"))
        session.execute(text("DELETE FROM state_count_changes"))
        assert counts.campaign(session, result.campaign_id) == {}
        counts.recount(session)
    with db.session_scope() as session:
        assert counts.campaign(session, result.campaign_id) == {"queued": 2}
        session.execute(text("TRUNCATE deliveries CASCADE"))
    with db.session_scope() as session:
        assert counts.totals(session) == {}
