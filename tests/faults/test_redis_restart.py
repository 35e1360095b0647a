"""Fault scenarios 4, 4b and 4c: Redis killed mid-campaign and restarted empty, on an empty
outbox, on a big one (issue 18) and after a long outage, with the time until sending resumes
measured and bounded.

Run alone: .venv/bin/python -m pytest -m faults -s tests/faults/test_redis_restart.py
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from mailer import db
from mailer.models import Delivery, Message
from tests.faults import backlog
from tests.faults.arrivals import Arrivals
from tests.faults.campaign import MIDWAY, assert_mid_campaign, queue_campaign
from tests.faults.harness import TIMINGS, Proc, Rig

pytestmark = pytest.mark.faults

# --- 4: Redis restarted without persistence ----------------------------------------------------

# sending must resume this soon after Redis comes back empty: the dispatcher's next pass (up to
# an interval away) sees the empty queue and republishes what was published more than
# MAILER_REPUBLISH_AFTER ago, one more interval for a pass that was under way, and 2 s for the
# worker to reconnect, take the wake-up and send (issue 18)
RESUME_BOUND = float(TIMINGS["republish_after"]) + 2 * float(TIMINGS["dispatch_interval"]) + 2


def test_redis_restart_loses_the_queue(rig: Rig) -> None:
    """Redis is killed and restarted empty: every queued wake-up is gone. The dispatcher sees
    the empty queue and republishes the queued deliveries older than MAILER_REPUBLISH_AFTER."""
    _redis_restart(rig, "4 Redis restart (queue lost)")


def test_redis_restart_with_a_big_outbox(rig: Rig, pg_db: str) -> None:
    """The same with the outbox of issue 18's operator already in the database: 300,000
    deliveries queued for tomorrow and a past campaign's history, analyzed. Every statement the
    dispatcher runs after the restart must stay quick on it, so that sending resumes within the
    same bound; the rows for tomorrow are neither sent nor published."""
    big = backlog.fill(pg_db)
    _redis_restart(rig, "4b Redis restart, big outbox", big)
    assert backlog.untouched(pg_db, big) == {"scheduled changed": 0, "history changed": 0}


# long enough that kombu's own policy (2, 4, ... 30 s between tries) would have the worker
# asleep for over ten seconds when Redis comes back
LONG_OUTAGE = 45.0


def test_redis_away_for_long_then_back_empty(rig: Rig) -> None:
    """Redis is killed and stays away for LONG_OUTAGE seconds: the worker and the dispatcher
    try again a second apart (broker.py), so sending resumes within the same bound."""
    _redis_restart(rig, "4c Redis away for 45 s (queue lost)", down=LONG_OUTAGE)


def _redis_restart(
    rig: Rig, scenario: str, big: backlog.Backlog | None = None, *, down: float = 1.0
) -> None:
    sent = queue_campaign()
    campaign = sent.campaign_id if big else None
    # the dispatcher up before the campaign is half sent: started after it, its first pass
    # could fall in the outage and republish into the new Redis before it is checked empty
    rig.dispatcher().wait_log("dispatcher active")
    worker = rig.worker()
    with Arrivals(rig.server) as arrivals:
        rig.wait_copies(MIDWAY)
        backlog_before = rig.redis.queued()
        killed_at = datetime.now(UTC)
        rig.redis.kill()
        assert_mid_campaign(rig)
        time.sleep(down)
        rig.redis.start()
        # its queue is gone; what the dispatcher republished may be in it already: the
        # publishes it retried through the outage land the moment Redis answers
        back, back_at = rig.redis.ready_at, rig.redis.ready_wall
        assert rig.redis.started_empty()
        outcome = rig.finish(
            scenario, notes=f"{backlog_before} tasks queued at the kill", campaign=campaign
        )
        # the copies sent on a wake-up the dispatcher published after the kill, which could
        # reach Redis only once it was back (those of tasks running at the kill, or restored
        # by the worker, do not tell that sending resumed). A pass's published_at is the time
        # it started, which may be before Redis came back.
        republished = _published_since(killed_at, campaign)
        first = arrivals.first(republished, after=back)
    resumed = None if first is None else first - back
    outcome.row.notes += (
        f"; resumed {'never' if resumed is None else f'{resumed:.1f} s'} after Redis came "
        f"back (bound {RESUME_BOUND:.1f} s: {_breakdown(worker, republished, back_at)})"
    )
    if big is not None:
        outcome.row.notes += f"; {big.describe()}"
    assert outcome.row.lost == 0, outcome.explain()
    assert outcome.row.duplicated == 0, outcome.explain()
    assert not outcome.stray, f"copies for recipients outside the campaign: {outcome.stray}"
    assert republished, "nothing was republished after Redis came back"
    assert resumed is not None and resumed <= RESUME_BOUND, (
        f"sending resumed {resumed} s after Redis came back, bound {RESUME_BOUND} s\n{rig.tails()}"
    )


def _published_since(when: datetime, campaign: int | None) -> dict[str, datetime]:
    """Recipient -> published_at, of the deliveries published at or after `when`."""
    with db.session_scope() as session:
        query = select(Delivery.recipient, Delivery.published_at).where(
            Delivery.published_at >= when
        )
        if campaign is not None:
            query = query.join(Message, Message.id == Delivery.message_id).where(
                Message.campaign_id == campaign
            )
        return {r.lower(): at for r, at in session.execute(query) if at is not None}


def _breakdown(worker: Proc, republished: dict[str, datetime], back_at: float) -> str:
    """Where the time went after Redis came back (epoch `back_at`): the worker's reconnection
    (its log's last "Connected to"), and the start of the dispatcher's first pass that
    republished (the published_at it wrote)."""
    parts = []
    connected = worker.grep("Connected to")
    if connected:
        stamp = datetime.strptime(connected[-1][:23], "%Y-%m-%d %H:%M:%S,%f")
        parts.append(f"worker reconnected {stamp.timestamp() - back_at:+.1f} s")
    if republished:
        started = min(republished.values()).timestamp() - back_at
        parts.append(f"republishing pass started {started:+.1f} s")
    return ", ".join(parts)
