"""Batch statements (mailer/bulk.py) write exactly what row-by-row statements would, on both
databases: every column type the outbox uses, NULLs, JSON contexts, key sets of any size."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailer import bulk, db
from mailer.models import Attempt, Campaign, Delivery, DeliveryState, Message, Priority, Template

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


def _attempt(delivery_id: int) -> dict[str, object]:
    return {
        "delivery_id": delivery_id,
        "started_at": NOW,
        "finished_at": NOW,
        "phase": "dot",
        "code": 250,
        "enhanced": "2.0.0",
        "reply": "2.0.0 ok",
        "outcome": "delivered",
        "relay": "r",
        "tls": False,
    }


def test_a_refused_copy_raises_as_a_statement_would(pg_db: str) -> None:
    """Attempts go by COPY on PostgreSQL: its errors come out as SQLAlchemy's, and nothing of
    the batch is written."""
    message_id = _message()
    with db.session_scope() as session:
        bulk.insert_rows(session, Delivery, [_row(message_id, 0, None)])
        delivery_id = session.scalars(select(Delivery.id)).one()
    refused = pytest.raises(IntegrityError, match="fk_attempts_delivery_id_deliveries")
    with refused, db.session_scope() as session:
        bulk.insert_rows(session, Attempt, [_attempt(delivery_id), _attempt(10**9)])
    with db.session_scope() as session:
        assert session.scalars(select(Attempt)).all() == []
        assert bulk.insert_rows(session, Attempt, [_attempt(delivery_id)] * 2) == 2
    with db.session_scope() as session:
        [first, _] = session.scalars(select(Attempt).order_by(Attempt.id)).all()
        assert (first.delivery_id, first.started_at, first.code, first.tls) == (
            delivery_id,
            NOW,
            250,
            False,
        )


def test_a_copy_on_a_lost_connection_is_retried_on_a_new_one(pg_db: str) -> None:
    """A connection lost under a COPY does not lose the batch: db.retrying's next try, on a
    new connection, writes it (once)."""
    message_id = _message()
    with db.session_scope() as session:
        bulk.insert_rows(session, Delivery, [_row(message_id, 0, None)])
        delivery_id = session.scalars(select(Delivery.id)).one()
    tries: list[int] = []

    def write(session: Session) -> int:
        tries.append(1)
        if len(tries) == 1:  # the server ends this connection (as a restart would)
            pid = session.scalar(text("SELECT pg_backend_pid()"))
            with db.session_scope() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})
        return bulk.insert_rows(session, Attempt, [_attempt(delivery_id)])

    assert db.retrying(write, what="writing attempts", budget=30) == 1
    assert len(tries) == 2
    with db.session_scope() as session:
        assert len(session.scalars(select(Attempt)).all()) == 1


def test_a_copy_after_a_column_changed_type_is_retried_with_the_new_type(pg_db: str) -> None:
    """Binary COPY sends values typed as the columns were when first read on a connection: a
    migration that widens one while the worker runs must not make every later write fail
    (sent mail unrecorded is sent again)."""
    message_id = _message()
    with db.session_scope() as session:
        bulk.insert_rows(session, Delivery, [_row(message_id, 0, None)])
        delivery_id = session.scalars(select(Delivery.id)).one()
        bulk.insert_rows(session, Attempt, [_attempt(delivery_id)])  # the types read
    try:
        with db.session_scope() as other:
            other.execute(text("ALTER TABLE attempts ALTER COLUMN code TYPE bigint"))
        written = db.retrying(
            lambda session: bulk.insert_rows(session, Attempt, [_attempt(delivery_id)]),
            what="writing attempts",
            budget=10,
        )
        assert written == 1
        with db.session_scope() as session:
            assert [a.code for a in session.scalars(select(Attempt))] == [250, 250]
    finally:
        with db.session_scope() as other:
            other.execute(text("ALTER TABLE attempts ALTER COLUMN code TYPE integer"))


@pytest.mark.parametrize(
    "document",
    [
        b'{"n": 123456789012345678}',  # 18 digits: orjson's
        b'{"n": 1234567890123456789}',  # 19 digits: the json module reads it (orjson could)
        b'{"n": 12345678901234567890123, "s": "x"}',
        b'{"s": "1234567890123456789"}',  # digits in a string: either reads it alike
        b'{"a": 123456789, "b": 1234567890}',  # two short runs are not one long one
        '{"n": 98765432109876543210}',  # as str (SQLite)
    ],
)
def test_json_columns_read_every_integer_exactly(document: bytes | str) -> None:
    # (repr: an integer read as a float would compare equal where the float is exact)
    assert repr(db._json_loads(document)) == repr(json.loads(document))
