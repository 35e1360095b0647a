"""A big outbox under a fault scenario: deliveries scheduled for tomorrow and a sent campaign's
history, written by generate_series on the server into the scenario's (empty) database."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import create_engine, text

from mailer.models import DeliveryState

# the operator of issue 18: this many deliveries queued for tomorrow ...
SCHEDULED = 300_000
# ... beside an earlier campaign's history, one attempt a delivery
HISTORY = 300_000
# the history's final states, by a delivery's number modulo 100
_FINAL = """CASE
    WHEN i % 100 < 94 THEN 'sent'
    WHEN i % 100 < 97 THEN 'bounced'
    ELSE 'failed' END"""
# campaign and message ids of the two; the scenario's own campaign takes the next ones
SCHEDULED_CAMPAIGN = 1
HISTORY_CAMPAIGN = 2


@dataclass(frozen=True)
class Backlog:
    scheduled: int
    history: int
    attempts: int
    seconds: float  # to write it and ANALYZE

    @property
    def deliveries(self) -> int:
        return self.scheduled + self.history

    def describe(self) -> str:
        return (
            f"outbox {self.deliveries:,} rows before the campaign "
            f"({self.scheduled:,} for tomorrow, {self.history:,} history), "
            f"filled in {self.seconds:.1f} s"
        )


def fill(url: str, scheduled: int = SCHEDULED, history: int = HISTORY) -> Backlog:
    """Write the backlog into the empty tables of `url`, set the id sequences past it, and
    ANALYZE, as an operator's database would have statistics for it."""
    started = time.monotonic()
    eng = create_engine(url)
    try:
        with eng.begin() as conn:
            (empty,) = conn.execute(text("SELECT NOT EXISTS (SELECT 1 FROM deliveries)")).one()
            assert empty, "the backlog goes into an empty outbox (ids are chosen here)"
            _write(conn, scheduled, history)
        with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
    finally:
        eng.dispose()
    return Backlog(scheduled, history, history, time.monotonic() - started)


def _write(conn: Any, scheduled: int, history: int) -> None:
    conn.execute(
        text(
            "INSERT INTO templates (id, name, version, subject, text, created_at) "
            "VALUES (1, 'backlog', 1, 'Hello', 'Hi {{ name }}', now() - interval '3 days')"
        )
    )
    conn.execute(
        text(
            "INSERT INTO campaigns (id, name, paused, created_at) VALUES "
            "(:s, 'tomorrow', false, now()), (:h, 'last week', false, now() - interval '3 days')"
        ),
        {"s": SCHEDULED_CAMPAIGN, "h": HISTORY_CAMPAIGN},
    )
    conn.execute(
        text(
            "INSERT INTO messages (id, campaign_id, template_id, from_addr, context, headers, "
            "token, priority, send_at, created_at) "
            "SELECT c, c, 1, 'news@example.com', '{}', '{}', md5(c::text), 'bulk', "
            "CASE WHEN c = :s THEN now() + interval '1 day' END, now() - interval '1 day' "
            "FROM (VALUES (:s), (:h)) v(c)"
        ),
        {"s": SCHEDULED_CAMPAIGN, "h": HISTORY_CAMPAIGN},
    )
    # ids 1..scheduled: queued for tomorrow, never published; then the history
    conn.execute(
        text(
            "INSERT INTO deliveries (id, message_id, recipient, domain, context, state, "
            "attempts, next_attempt_at, created_at, updated_at) "
            "SELECT i, :s, 'later' || i || '@tomorrow' || (i % 50) || '.example', "
            "'tomorrow' || (i % 50) || '.example', jsonb_build_object('name', 'L' || i), "
            "'queued', 0, now() + interval '1 day', now(), now() "
            "FROM generate_series(1, :n) i"
        ),
        {"s": SCHEDULED_CAMPAIGN, "n": scheduled},
    )
    conn.execute(
        text(
            "INSERT INTO deliveries (id, message_id, recipient, domain, context, state, "
            "attempts, next_attempt_at, published_at, last_phase, last_code, last_reply, "
            "created_at, updated_at) "
            "SELECT i, :h, 'past' || i || '@history' || (i % 50) || '.example', "
            "'history' || (i % 50) || '.example', jsonb_build_object('name', 'P' || i), "
            f"{_FINAL}, 1, now() - interval '3 days', now() - interval '3 days', 'data', 250, "
            "'250 2.0.0 Ok', now() - interval '3 days', now() - interval '3 days' "
            "FROM generate_series(:first, :last) i"
        ),
        {"h": HISTORY_CAMPAIGN, "first": scheduled + 1, "last": scheduled + history},
    )
    conn.execute(
        text(
            "INSERT INTO attempts (id, delivery_id, started_at, finished_at, phase, code, "
            "enhanced, reply, outcome, relay, tls) "
            "SELECT i, i, now() - interval '3 days', now() - interval '3 days', 'data', 250, "
            "'2.0.0', '250 2.0.0 Ok', 'delivered', 'default', true "
            "FROM generate_series(:first, :last) i"
        ),
        {"first": scheduled + 1, "last": scheduled + history},
    )
    for table in ("templates", "campaigns", "messages", "deliveries", "attempts"):
        conn.execute(
            text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}")
        )


def untouched(url: str, backlog: Backlog) -> dict[str, int]:
    """The scheduled deliveries still queued and never published, and the history's rows, as
    the scenario found them: {what: count} of those that are not."""
    eng = create_engine(url)
    try:
        with eng.connect() as conn:
            moved = conn.execute(
                text(
                    "SELECT count(*) FILTER (WHERE message_id = :s AND (state <> :q "
                    "OR published_at IS NOT NULL)), "
                    "count(*) FILTER (WHERE message_id = :h AND updated_at > now() - "
                    "interval '1 day') FROM deliveries WHERE message_id IN (:s, :h)"
                ),
                {"s": SCHEDULED_CAMPAIGN, "h": HISTORY_CAMPAIGN, "q": DeliveryState.QUEUED.value},
            ).one()
    finally:
        eng.dispose()
    return {"scheduled changed": int(moved[0]), "history changed": int(moved[1])}
