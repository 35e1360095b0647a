"""The overview's reads: the rate from samples, the queue by priority, the oldest due."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from mailer import clock, db
from mailer import overview as reads
from mailer.models import Delivery, Message
from tests.web import scenario


def test_a_rate_is_the_change_over_the_window() -> None:
    rates = reads.Rates(window=60)
    assert rates.observe(1, 100, at=1000.0) is None
    assert rates.observe(1, 150, at=1010.0) == 5.0
    assert rates.observe(1, 250, at=1020.0) == 7.5
    # samples older than the window are dropped: the rate follows the recent pace
    rates.observe(1, 250, at=1080.0)
    assert rates.observe(1, 250, at=1090.0) == 0.0
    assert rates.observe(2, 10, at=1090.0) is None  # each campaign its own


def test_the_queue_by_priority_and_the_oldest_due(web_db: str) -> None:
    data = scenario.build()
    rates = reads.Rates()
    with db.read_scope() as session:
        depth = reads.queue_depth(session, rates)
        assert depth.by_priority == {"transactional": {"queued": 1}, "bulk": {}}
        oldest = reads.oldest_due(session, clock.now())
        assert oldest is not None and oldest.recipient == scenario.POLICY[0]
        assert oldest.campaign_id is None
        assert reads.oldest_due(session, clock.now() - timedelta(hours=1)) is None
    # a delivery whose wake-up was lost: owed one, found by its due time instead
    with db.session_scope() as session:
        session.execute(
            update(Delivery).where(Delivery.state == "queued").values(published_at=None)
        )
    with db.read_scope() as session:
        owed = reads.oldest_due(session, clock.now())
        assert owed is not None and owed.recipient == scenario.POLICY[0]
        rows, before = reads.campaigns(session, rates)
        assert [r.status.id for r in rows] == [data.campaign_id] and before is None
        assert rows[0].seconds_left == 0.0


def test_the_transactional_latency_of_the_latest_sent(web_db: str) -> None:
    data = scenario.build()
    with db.read_scope() as session:
        assert reads.transactional_latency(session) is None  # the reset waits: none sent
    made = clock.now() - timedelta(seconds=100)
    with db.session_scope() as session:
        session.execute(
            update(Message).where(Message.id == data.transactional_id).values(created_at=made)
        )
        session.execute(
            update(Delivery)
            .where(Delivery.message_id == data.transactional_id)
            .values(state="sent", updated_at=made + timedelta(seconds=4))
        )
    with db.read_scope() as session:
        latency = reads.transactional_latency(session)
        assert latency == reads.Latency(median=4.0, p95=4.0, deliveries=1)
        # the campaign's deliveries are not transactional mail
        assert reads.transactional_latency(session, sample=1) == latency
