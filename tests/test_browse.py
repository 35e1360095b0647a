"""The dashboard's read side: keyset pages, the CSV export, a campaign's breakdown, a
recipient's history with the reason for each verdict, the audit and suppression pages."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest

import mailer
from mailer import actions, breakdowns, browse, clock, db, filters, suppressions
from mailer.actions import Actor, Role
from mailer.delivery import deliver_chunk
from mailer.filters import DeliveryFilter
from mailer.models import DeliveryState
from mailer.replies import Phase, SMTPReply
from mailer.transport.memory import MemoryTransport
from tests.helpers import add_template, deliveries

S = DeliveryState


def _campaign(n: int = 12) -> int:
    """`n` recipients over three domains; r0 bounces (5.1.1), r1 fails (5.7.1), r2 is
    deferred (450), the rest are sent."""
    add_template()
    transport = MemoryTransport()
    transport.script("r0@a.example", Phase.RCPT, SMTPReply.of(550, "5.1.1 No such user"))
    transport.script("r1@b.example", Phase.RCPT, SMTPReply.of(550, "5.7.1 <script>x</script>"))
    transport.script("r2@c.example", Phase.RCPT, SMTPReply.of(450, "4.2.0 Greylisted, come back"))
    domains = ["a.example", "b.example", "c.example"]
    rows = [{"email": f"r{i}@{domains[i % 3]}", "name": "x"} for i in range(n)]
    result = mailer.send_campaign("welcome", rows)
    deliver_chunk([d.id for d in deliveries()], transport=transport)
    return result.campaign_id


def test_pages_by_keyset_cover_every_match_once(any_db: str) -> None:
    campaign = _campaign()
    f = DeliveryFilter(campaign_id=campaign)
    seen: list[int] = []
    after = None
    with db.session_scope() as session:
        while True:
            page = browse.deliveries_page(session, f, after, limit=5)
            seen += [r.id for r in page.rows]
            if page.next_after is None:
                break
            after = page.next_after
    assert seen == sorted(d.id for d in deliveries()) and len(seen) == 12
    with db.session_scope() as session:
        [row] = browse.deliveries_page(
            session, DeliveryFilter(campaign_id=campaign, code="4xx")
        ).rows
    assert (row.recipient, row.state, row.last_class) == ("r2@c.example", "deferred", "transient")
    assert row.next_attempt_at is not None and row.next_attempt_at > datetime.now(UTC)


def test_export_csv_streams_the_filter(any_db: str) -> None:
    campaign = _campaign()
    with db.session_scope() as session:
        text = "".join(browse.export_csv(session, DeliveryFilter(campaign_id=campaign, code="5xx")))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["recipient"] for r in rows] == ["r0@a.example", "r1@b.example"]
    assert rows[1]["last_reply"] == "5.7.1 <script>x</script>" and rows[1]["state"] == "failed"
    assert rows[0]["last_class"] == "hard_bounce" and rows[0]["next_attempt_at"] == ""


def test_breakdown_by_class_and_domain(any_db: str) -> None:
    campaign = _campaign()
    with db.session_scope() as session:
        b = breakdowns.compute(session, campaign, sent=9, now=clock.now(), top=2)
    assert b.by_class == {"delivered": 9, "hard_bounce": 1, "message_failure": 1, "transient": 1}
    assert b.by_domain == {"a.example": 4, "b.example": 4, "other": 4}


def test_a_kept_breakdown_is_used_until_the_counts_move_or_it_ages(any_db: str) -> None:
    campaign = _campaign()  # r2 is deferred: the campaign is still sending
    fake = clock.FakeClock()
    with clock.using(fake):
        with db.session_scope() as session:
            first = breakdowns.get(session, campaign)
        assert first.by_class["delivered"] == 9 and first.computed_at == fake()
        fake.set(fake() + timedelta(seconds=30))
        with db.session_scope() as session:
            assert breakdowns.get(session, campaign).computed_at == first.computed_at
        fake.set(fake() + timedelta(seconds=31))  # older than MAX_AGE while sending
        with db.session_scope() as session:
            aged = breakdowns.get(session, campaign)
        assert aged.computed_at == fake()
        with db.session_scope() as session:  # the deferred one is cancelled: counts move
            actions.cancel(session, Actor("t", Role.OPERATOR), DeliveryFilter(campaign_id=campaign))
        fake.set(fake() + timedelta(seconds=1))
        with db.session_scope() as session:
            done = breakdowns.get(session, campaign)
        assert done.computed_at == fake() and done.by_class.get("transient", 0) == 1
        fake.set(fake() + timedelta(days=1))  # finished: kept however old
        with db.session_scope() as session:
            assert breakdowns.get(session, campaign).computed_at == done.computed_at


def test_recipient_history_says_what_was_concluded_and_why(any_db: str) -> None:
    campaign = _campaign()
    mailer.send(template="welcome", to="R0@a.example", context={"name": "reset"})
    with db.session_scope() as session:
        history = browse.recipient_history(session, "r0@A.example")
        deferred = browse.recipient_history(session, "r2@c.example")
    assert [(m.kind, m.campaign_id) for m in history] == [
        ("transactional", None),
        ("campaign", campaign),
    ]
    # the transactional message came after the bounce: closed as suppressed, never tried
    transactional, bounced = history[0].deliveries[0], history[1].deliveries[0]
    assert transactional.state == "suppressed" and transactional.attempts == []
    assert transactional.why.startswith("suppressed: the address is on the suppression list")
    assert bounced.state == "bounced" and history[1].template == "welcome"
    [attempt] = bounced.attempts
    assert (attempt.code, attempt.enhanced, attempt.reply_class) == (550, "5.1.1", "hard_bounce")
    assert "does not exist" in attempt.reason and "suppression list" in attempt.reason
    assert bounced.why.startswith("bounced: 5.1.1 in reply to RCPT")
    [waiting] = deferred[0].deliveries
    assert "greylisting" in waiting.why and waiting.next_attempt_at is not None


def test_audit_page_newest_first(any_db: str) -> None:
    campaign = _campaign()
    ann = Actor("ann", Role.OPERATOR)
    with db.session_scope() as session:
        for _ in range(3):
            actions.pause_campaign(session, ann, campaign)
    with db.session_scope() as session:
        first = browse.audit_page(session, limit=2)
        second = browse.audit_page(session, first.next_after, limit=2)
    ids = [e.id for e in first.rows + second.rows]
    assert ids == sorted(ids, reverse=True) and len(ids) == 3 and second.next_after is None
    assert first.rows[0].target == {"campaign_id": campaign}


def test_suppressions_page_searches_in_windows(
    any_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.now(UTC)
    with db.session_scope() as session:
        names = [f"user{i:02}@{'x' if i % 5 else 'y'}.example" for i in range(20)]
        suppressions.add_checked(session, names, "test", now)
    monkeypatch.setattr(browse, "SEARCH_WINDOW", 6)
    found: list[str] = []
    after = None
    pages = 0
    with db.session_scope() as session:
        plain = browse.suppressions_page(session, limit=50)
        while True:
            page = browse.suppressions_page(session, "@Y.", after, limit=3)
            found += [r.address for r in page.rows]
            pages += 1
            if page.next_after is None:
                break
            after = page.next_after
    assert len(plain.rows) == 20 and plain.next_after is None
    assert found == [f"user{i:02}@y.example" for i in (0, 5, 10, 15)]
    assert pages >= 3  # a window reads six addresses at most


def test_a_page_keeps_to_its_campaigns_ids(any_db: str) -> None:
    first = _campaign(6)
    second = mailer.send_campaign(
        "welcome", [{"email": f"s{i}@d.example", "name": "x"} for i in range(3)]
    ).campaign_id
    with db.session_scope() as session:
        low, high = filters.id_bounds(session, DeliveryFilter(campaign_id=second)) or (0, 0)
        page = browse.deliveries_page(session, DeliveryFilter(campaign_id=second))
        none = browse.deliveries_page(session, DeliveryFilter(campaign_id=first, code="421"))
        missing = filters.id_bounds(session, DeliveryFilter(campaign_id=999))
    assert [r.recipient for r in page.rows] == ["s0@d.example", "s1@d.example", "s2@d.example"]
    assert (low, high) == (page.rows[0].id, page.rows[-1].id) and low > 6
    assert none.rows == [] and none.next_after is None
    assert missing == (1, 0)  # no such campaign: an empty range
