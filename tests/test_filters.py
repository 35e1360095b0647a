"""DeliveryFilter: parsed from a query string, printed back, and each field selects what it says,
on SQLite and PostgreSQL, over a campaign whose deliveries met real (scripted) replies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

import mailer
from mailer import db, filters
from mailer.delivery import deliver_chunk
from mailer.filters import DeliveryFilter
from mailer.models import Delivery, DeliveryState
from mailer.replies import Phase, ReplyClass, SMTPReply
from mailer.transport.memory import MemoryTransport
from tests.helpers import add_template, deliveries

S = DeliveryState


def test_params_round_trip() -> None:
    f = DeliveryFilter(
        campaign_id=3,
        states=(S.FAILED, S.UNKNOWN),
        code="5xx",
        enhanced="5.7",
        reply_class=ReplyClass.HARD_BOUNCE,
        domain="example.com",
        reply_contains="<b>",
        recipient="ann@example.com",
        since=datetime(2026, 12, 1, tzinfo=UTC),
    )
    assert DeliveryFilter.from_params(f.to_params()) == f
    assert f.as_dict()["states"] == ["failed", "unknown"]
    assert f.as_dict()["reply_class"] == "hard_bounce"
    assert "message_id" not in f.as_dict()


def test_empty_values_are_left_out_and_ages_are_before_now() -> None:
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    f = DeliveryFilter.from_params({"campaign": "7", "code": "", "since": "2h"}, now=now)
    assert f == DeliveryFilter(campaign_id=7, since=now - timedelta(hours=2))
    paged = {"campaign": "7", "after": "120"}
    assert DeliveryFilter.from_params(paged, others=True) == DeliveryFilter(campaign_id=7)
    with pytest.raises(ValueError, match="after: not a filter"):
        DeliveryFilter.from_params(paged)


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"campaign": "x"}, "campaign: 'x' is not a campaign id"),
        ({"state": "lost"}, "state: 'lost' is not states separated by commas"),
        ({"code": "6xx"}, "code: '6xx' is not 4xx, 5xx or a reply code"),
        ({"enhanced": "5.1.1.1"}, "enhanced: '5.1.1.1' is not an enhanced status code"),
        ({"class": "soft"}, "class: 'soft' is not one of: delivered"),
        ({"since": "yesterday"}, "since: 'yesterday' is not ISO 8601"),
        ({"recipient": "nobody"}, "recipient: 'nobody' is not an email address"),
        ({"colour": "red"}, "colour: not a filter"),
    ],
)
def test_a_bad_value_names_its_field_and_the_form(params: dict[str, str], says: str) -> None:
    with pytest.raises(ValueError) as caught:
        DeliveryFilter.from_params(params)
    assert str(caught.value).startswith(says)


def _campaign() -> int:
    """Four recipients: sent, hard bounce (5.1.1), policy failure (5.7.1), deferred (450)."""
    add_template()
    transport = MemoryTransport()
    transport.script("gone@a.example", Phase.RCPT, SMTPReply.of(550, "5.1.1 No such user"))
    transport.script("spam@b.example", Phase.RCPT, SMTPReply.of(550, "5.7.1 Message <b>blocked"))
    transport.script("busy@b.example", Phase.RCPT, SMTPReply.of(450, "4.2.1 Try later"))
    rows = [
        {"email": e, "name": "x"}
        for e in ("ok@a.example", "gone@a.example", "spam@b.example", "Busy@B.example")
    ]
    result = mailer.send_campaign("welcome", rows)
    deliver_chunk([d.id for d in deliveries()], transport=transport)
    mailer.send(template="welcome", to="ok@a.example", context={"name": "y"})
    return result.campaign_id


def _match(f: DeliveryFilter) -> set[str]:
    with db.session_scope() as session:
        ids = list(session.scalars(f.ids()))
        found = session.scalars(select(Delivery.recipient).where(Delivery.id.in_(ids)))
        return {r.lower() for r in found}


def test_each_field_selects_what_it_says(any_db: str) -> None:
    campaign = _campaign()
    everyone = {"ok@a.example", "gone@a.example", "spam@b.example", "busy@b.example"}
    c = {"campaign_id": campaign}
    assert _match(DeliveryFilter(**c)) == everyone
    assert _match(DeliveryFilter(**c, states=(S.BOUNCED, S.FAILED))) == {
        "gone@a.example",
        "spam@b.example",
    }
    assert _match(DeliveryFilter(**c, code="4xx")) == {"busy@b.example"}
    assert _match(DeliveryFilter(**c, code="550")) == {"gone@a.example", "spam@b.example"}
    assert _match(DeliveryFilter(**c, enhanced="5.7")) == {"spam@b.example"}
    assert _match(DeliveryFilter(**c, enhanced="5.1.1")) == {"gone@a.example"}
    assert _match(DeliveryFilter(**c, enhanced="5.1")) == {"gone@a.example"}
    assert _match(DeliveryFilter(**c, reply_class=ReplyClass.HARD_BOUNCE)) == {"gone@a.example"}
    assert _match(DeliveryFilter(**c, reply_class=ReplyClass.DELIVERED)) == {"ok@a.example"}
    assert _match(DeliveryFilter(**c, domain="B.example")) == {"spam@b.example", "busy@b.example"}
    assert _match(DeliveryFilter(**c, reply_contains="<B>BLOCK")) == {"spam@b.example"}
    assert _match(DeliveryFilter(**c, reply_contains="%")) == set()  # no wildcard
    # the recipient across the campaign and the transactional message; its case ignored
    assert len(deliveries(recipient="ok@a.example")) == 2
    with db.session_scope() as session:
        both = list(session.scalars(DeliveryFilter(recipient="OK@a.example").ids()))
    assert len(both) == 2
    later = datetime.now(UTC) + timedelta(hours=1)
    assert _match(DeliveryFilter(**c, since=later)) == set()
    assert _match(DeliveryFilter(**c, until=later)) == everyone


def test_an_unscoped_filter_is_read_in_windows_of_ids(any_db: str) -> None:
    _campaign()
    f = DeliveryFilter(code="5xx")
    assert not f.scoped
    with db.session_scope() as session:
        pieces = [list(session.scalars(ids)) for ids in filters.windows(session, f, width=2)]
        whole = sorted(session.scalars(f.ids()))
    assert len(pieces) == 3  # five deliveries, two ids a window
    assert sorted(i for piece in pieces for i in piece) == whole and len(whole) == 2
