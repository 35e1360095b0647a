"""Batch statements (mailer/bulk.py) write exactly what row-by-row statements would, on both
databases: every column type the outbox uses, NULLs, JSON contexts, key sets of any size."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from mailer import bulk, db
from mailer.models import Campaign, Delivery, DeliveryState, Message, Priority, Template

NOW = datetime(2026, 11, 28, 12, 30, 15, 123456, tzinfo=UTC)


def _message() -> int:
    with db.session_scope() as session:
        template = Template(name="t", version=1, subject="s", text="x", created_at=NOW)
        campaign = Campaign(name="c", paused=False, created_at=NOW)
        session.add_all([template, campaign])
        session.flush()
        message = Message(
            campaign_id=campaign.id,
            template_id=template.id,
            from_addr="a@example.com",
            context={},
            headers={},
            token="t" * 32,
            priority=Priority.BULK,
            created_at=NOW,
        )
        session.add(message)
        session.flush()
        return message.id


def _row(message_id: int, i: int, context: dict[str, object] | None) -> dict[str, object]:
    return {
        "message_id": message_id,
        "recipient": f"r{i}@example.com",
        "domain": "example.com",
        "context": context,
        "state": DeliveryState.QUEUED.value,
        "attempts": 0,
        "next_attempt_at": NOW + timedelta(seconds=i),
        "published_at": None,
        "created_at": NOW,
        "updated_at": NOW,
    }


def test_insert_update_and_among_round_trip(any_db: str) -> None:
    message_id = _message()
    contexts: list[dict[str, object] | None] = [
        None,
        # 2**70 + 1: an integer over 64 bits that a float cannot hold either (db._json_loads)
        {"name": 'Zoë "quoted" \\ back', "n": 2**70 + 1, "nested": {"x": [1, None, True]}},
        {"line": "a\u2028b", "emoji": "\U0001f600"},
    ]
    rows = [_row(message_id, i, c) for i, c in enumerate(contexts)]
    with db.session_scope() as session:
        bulk.insert_rows(session, Delivery, rows)
        # a duplicate (case differs) is skipped with ignore_conflicts, not an error
        bulk.insert_rows(session, Delivery, [_row(message_id, 0, None)], ignore_conflicts=True)
    with db.session_scope() as session:
        stored = session.scalars(select(Delivery).order_by(Delivery.id)).all()
        assert [d.context for d in stored] == contexts
        assert [d.next_attempt_at for d in stored] == [r["next_attempt_at"] for r in rows]
        assert all(d.published_at is None for d in stored)
        ids = [d.id for d in stored]
        changed = bulk.update_rows(
            session,
            Delivery,
            "id",
            [{"id": ids[0], "state": "sent", "last_code": 250, "last_reply": "2.0.0 ok"}],
            fence={"state": DeliveryState.QUEUED.value},
            constant={"updated_at": NOW + timedelta(hours=1)},
        )
        assert changed == 1
        # the fence holds: the row is no longer queued, so a second update changes nothing
        again = bulk.update_rows(
            session,
            Delivery,
            "id",
            [{"id": ids[0], "state": "failed", "last_code": 554, "last_reply": "no"}],
            fence={"state": DeliveryState.QUEUED.value},
            constant={"updated_at": NOW},
        )
        assert again == 0
    with db.session_scope() as session:
        first = session.get(Delivery, ids[0])
        assert first is not None
        assert (first.state, first.last_code, first.last_reply) == ("sent", 250, "2.0.0 ok")
        assert first.updated_at == NOW + timedelta(hours=1)
        for keys in ([], ids[1:], [*ids, 10**9]):
            found = session.scalars(
                select(Delivery.id).where(
                    bulk.among(Delivery.id, "keys", bulk.postgresql(session))
                ),
                {"keys": keys},
            ).all()
            assert sorted(found) == sorted(k for k in keys if k in ids)


def test_constant_values_are_written_to_every_row_nulls_included(any_db: str) -> None:
    message_id = _message()
    varying = [{"recipient": f"c{i}@example.com", "domain": "example.com"} for i in range(3)]
    constant = {
        "message_id": message_id,
        "context": None,
        "state": DeliveryState.SUPPRESSED,
        "last_reply": None,  # a NULL for a text column, sent once as a parameter
        "attempts": 0,
        "next_attempt_at": NOW,
        "published_at": None,  # and for a timestamp column
        "created_at": NOW,
        "updated_at": NOW,
    }
    with db.session_scope() as session:
        bulk.insert_rows(session, Delivery, varying, constant=constant)
    with db.session_scope() as session:
        stored = session.scalars(select(Delivery).order_by(Delivery.id)).all()
        assert [d.recipient for d in stored] == [r["recipient"] for r in varying]
        for d in stored:
            assert (d.message_id, d.state, d.next_attempt_at) == (message_id, "suppressed", NOW)
            assert d.context is None and d.last_reply is None and d.published_at is None
