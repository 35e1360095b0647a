"""`mailer purge`: old finished deliveries go, with their attempts and the messages and
campaigns they leave empty; what is in flight, `unknown` or recent stays, and so does the
suppression list."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, event, select, text, update
from sqlalchemy.exc import OperationalError

import mailer
from mailer import db, retention
from mailer.cli import cli
from mailer.delivery import deliver_chunk
from mailer.models import Attempt, Campaign, Delivery, Message, Suppression
from mailer.replies import Phase, SMTPReply
from mailer.transport.memory import MemoryTransport
from tests.conftest import PG_SCHEMA, PG_URL
from tests.helpers import add_template, count, deliveries, states

LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)


def _campaign(addresses: list[str], *, bounce: str | None = None) -> mailer.CampaignResult:
    """A campaign sent to `addresses` (each accepted, or `bounce` refused for good)."""
    result = mailer.send_campaign("welcome", [{"email": a, "name": "x"} for a in addresses])
    transport = MemoryTransport()
    if bounce is not None:
        transport.script(bounce, Phase.RCPT, SMTPReply.of(550, "5.1.1 no such user"))
    deliver_chunk([d.id for d in deliveries(message_id=result.message_id)], transport=transport)
    return result


def _set(recipient: str, **values: Any) -> None:
    with db.session_scope() as session:
        session.execute(update(Delivery).where(Delivery.recipient == recipient).values(**values))


def _age(result: mailer.CampaignResult) -> None:
    """Make the campaign, its message and every delivery old."""
    with db.session_scope() as session:
        session.execute(
            update(Delivery)
            .where(Delivery.message_id == result.message_id)
            .values(updated_at=LONG_AGO)
        )
        session.execute(
            update(Message).where(Message.id == result.message_id).values(created_at=LONG_AGO)
        )
        session.execute(
            update(Campaign).where(Campaign.id == result.campaign_id).values(created_at=LONG_AGO)
        )


def _purge(*args: str) -> Any:
    return CliRunner().invoke(cli, ["purge", *args])


def test_old_finished_deliveries_go_with_their_attempts_and_the_rest_stays(any_db: str) -> None:
    add_template()
    mixed = _campaign(
        ["sent@x.org", "bounced@x.org", "unknown@x.org", "queued@x.org", "recent@x.org"],
        bounce="bounced@x.org",
    )
    _age(mixed)
    _set("unknown@x.org", state="unknown")
    _set("queued@x.org", state="queued")
    _set("recent@x.org", updated_at=datetime.now(UTC))
    assert count(Attempt) == 5

    result = _purge("--older-than", "90d")

    assert result.exit_code == 0, result.output
    assert "2 deliveries, 2 attempts, 0 messages, 0 campaigns deleted in 1 batches" in result.output
    assert states() == {
        "unknown@x.org": "unknown",
        "queued@x.org": "queued",
        "recent@x.org": "sent",
    }
    assert count(Attempt) == 3
    with db.session_scope() as session:
        kept = session.execute(select(Suppression.address, Suppression.source_delivery_id)).all()
    # the suppression a purged bounce caused stays, without its source
    assert [tuple(row) for row in kept] == [("bounced@x.org", None)]


def test_messages_and_campaigns_left_empty_go_too(any_db: str) -> None:
    add_template()
    gone, kept = _campaign(["a@x.org", "b@x.org"]), _campaign(["c@x.org"])
    _age(gone)
    _age(kept)
    _set("c@x.org", state="unknown")

    result = _purge("--older-than", "90d", "--batch", "1")

    assert result.exit_code == 0, result.output
    # a batch for each purged delivery, and one that reads the unknown one and keeps it
    assert "2 deliveries, 2 attempts, 1 messages, 1 campaigns deleted in 3 batches" in result.output
    with db.session_scope() as session:
        assert list(session.scalars(select(Message.id))) == [kept.message_id]
        assert list(session.scalars(select(Campaign.id))) == [kept.campaign_id]


def test_the_walk_stops_at_the_first_message_made_after_the_cut_off(any_db: str) -> None:
    add_template()
    old = _campaign(["a@x.org", "b@x.org", "c@x.org"])
    _age(old)
    # a retry restarts a delivery's created_at: the walk goes by its message's time instead
    _set("b@x.org", created_at=datetime.now(UTC))
    new = _campaign(["d@x.org"])
    # never the case (a delivery changes after its message is made), but if it were, the
    # walk would not reach it: a message made after the cut-off keeps all it has
    _set("d@x.org", updated_at=LONG_AGO)

    assert _purge("--older-than", "1d").exit_code == 0
    assert states() == {"d@x.org": "sent"}
    with db.session_scope() as session:
        assert list(session.scalars(select(Message.id))) == [new.message_id]


def test_batches_go_on_from_the_last_row_until_nothing_is_left(any_db: str) -> None:
    add_template()
    result = _campaign([f"r{i}@x.org" for i in range(7)])
    _age(result)
    cutoff = datetime.now(UTC) - timedelta(days=1)

    totals = [(t.batches, t.deliveries) for t in retention.purge(cutoff, 3)]

    assert totals == [(1, 3), (2, 6), (3, 7)]
    assert count(Delivery) == 0


def test_dry_run_counts_and_deletes_nothing(any_db: str) -> None:
    add_template()
    _age(_campaign(["a@x.org", "b@x.org"]))
    _campaign(["c@x.org"])

    result = _purge("--older-than", "90d", "--dry-run")

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("2 deliveries (sent, bounced, failed,")
    assert "nothing deleted" in result.output
    assert count(Delivery) == 3


@pytest.mark.parametrize("age", ["1h", "23h", "0d", "90", "d", "3y", "-5d"])
def test_ages_under_a_day_or_unreadable_are_refused(age: str, configure_env: Any) -> None:
    result = _purge("--older-than", age)
    assert result.exit_code == 2
    assert "--older-than" in result.output


def test_an_error_says_what_is_done_and_to_run_it_again(
    any_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_template()
    _age(_campaign(["a@x.org", "b@x.org"]))
    real = retention.purge_batch
    calls = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise OperationalError("DELETE", {}, Exception("server closed the connection"))
        return real(*args, **kwargs)

    monkeypatch.setattr(retention, "purge_batch", failing)

    result = _purge("--older-than", "90d", "--batch", "1")

    assert result.exit_code == 1
    assert "purge stopped: server closed the connection" in result.output
    assert "1 deliveries, 1 attempts, 0 messages, 0 campaigns deleted in 1 batches" in result.output
    assert "run the same command again" in result.output
    assert count(Delivery) == 1


def test_a_purge_neither_waits_for_nor_blocks_the_workers(pg_db: str) -> None:
    """Rows a worker holds are never the purge's; a finished row someone holds is skipped."""
    add_template()
    _age(_campaign(["held@x.org", "free@x.org", "queued@x.org"]))
    _set("queued@x.org", state="queued")
    other = create_engine(pg_db)
    with other.connect() as conn:
        conn.execute(text("SET lock_timeout = '2s'"))
        conn.execute(
            text(
                "SELECT id FROM deliveries WHERE recipient IN ('held@x.org', 'queued@x.org') "
                "FOR UPDATE"
            )
        )
        cutoff = datetime.now(UTC) - timedelta(days=1)
        totals = list(retention.purge(cutoff, 10))
        # and the other transaction can still update what it holds
        conn.execute(
            text("UPDATE deliveries SET state = 'sending' WHERE recipient = 'queued@x.org'")
        )
        conn.commit()
    other.dispose()
    assert [t.deliveries for t in totals] == [1]
    assert set(states()) == {"held@x.org", "queued@x.org"}


# The lookups the dashboard's indexes (migrations 0004 and 0011) are for, in the forms that
# reach them: a lookup that must see deliveries in flight asks ix_deliveries_leased for them
# (`state = 'sending'`).
CAMPAIGN_INDEX = "ix_deliveries_message_id_state_updated_at_id_domain"
LOOKUPS = {
    "recipient": (
        "ix_deliveries_recipient",
        "SELECT id FROM deliveries WHERE lower(recipient) = 'a@x.org' "
        "AND state <> 'sending' UNION ALL SELECT id FROM deliveries "
        "WHERE state = 'sending' AND lower(recipient) = 'a@x.org'",
    ),
    "domains, from the index alone": (
        f"Index Only Scan using {CAMPAIGN_INDEX}",
        "SELECT domain, count(*) FROM deliveries "
        "WHERE message_id = 1 AND state <> 'sending' GROUP BY domain",
    ),
    "a state by last change": (
        CAMPAIGN_INDEX,
        "SELECT id, recipient, updated_at "
        "FROM deliveries WHERE message_id = 1 AND state = 'failed' "
        "AND (updated_at, id) > ('2026-01-01', 0) ORDER BY updated_at, id LIMIT 100",
    ),
}


@pytest.mark.parametrize("lookup", sorted(LOOKUPS))
def test_each_lookup_can_use_its_index(lookup: str, pg_db: str) -> None:
    """The partial indexes' predicates are implied by the lookups' conditions. (Which plan
    wins at scale is for the million-row tests: here the tables are empty.)"""
    index, query = LOOKUPS[lookup]
    with db.engine().connect() as conn:
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        conn.execute(text("SET LOCAL enable_bitmapscan = off"))
        plan = "\n".join(conn.execute(text(f"EXPLAIN {query}")).scalars())
    assert index in plan, plan
    if lookup == "recipient":
        assert "ix_deliveries_leased" in plan, plan


# --- at scale (make slow) ----------------------------------------------------------------------

SCALE_SCHEMA = f"{PG_SCHEMA}_purge"
SCALE_LOAD = (
    # 200,000 one-recipient messages, then 80 campaign messages of 10,000 deliveries each, made
    # over 173 days in the order of their ids; half of everything changed more than 90 days ago
    "INSERT INTO templates (name, version, subject, text, created_at) "
    "VALUES ('t', 1, 's', 'x', now())",
    "INSERT INTO campaigns (id, name, paused, created_at) "
    "SELECT g, 'c' || g, false, now() - interval '180 days' FROM generate_series(1, 80) g",
    "INSERT INTO messages (id, campaign_id, template_id, from_addr, context, headers, token, "
    "priority, created_at) SELECT g, CASE WHEN g > 200000 THEN g - 200000 END, 1, 'f@x.org', "
    "'{}', '{}', md5(g::text), 'bulk', now() - interval '180 days' "
    "FROM generate_series(1, 200080) g",
    "INSERT INTO deliveries (id, message_id, recipient, domain, context, state, attempts, "
    "next_attempt_at, last_reply, created_at, updated_at) "
    "SELECT g, CASE WHEN g <= 200000 THEN g ELSE 200001 + (g - 200001) / 10000 END, "
    "'user' || g || '@example' || g % 50 || '.com', 'example' || g % 50 || '.com', "
    "CASE WHEN g > 200000 THEN jsonb_build_object('name', 'Reader ' || g) END, "
    "(ARRAY['sent', 'sent', 'sent', 'sent', 'bounced', 'failed', 'unknown', 'deferred'])"
    "[1 + g % 8], 2, now(), '250 2.0.0 Ok: queued as ' || md5(g::text), "
    "now() - (1000000 - g) * interval '15 seconds', now() - (1000000 - g) * interval '15 seconds' "
    "FROM generate_series(1, 1000000) g",
    "INSERT INTO attempts (delivery_id, started_at, finished_at, phase, code, reply, outcome, "
    "relay, tls) SELECT d.id, d.updated_at, d.updated_at, 'rcpt', 250, d.last_reply, "
    "'delivered', 'relay.example.org:587', true FROM deliveries d, generate_series(1, 2)",
    "INSERT INTO suppressions (address, reason, source_delivery_id, created_at) "
    "SELECT recipient, 'hard bounce', id, updated_at FROM deliveries WHERE state = 'bounced'",
    "SELECT setval(pg_get_serial_sequence('attempts', 'id'), (SELECT max(id) FROM attempts))",
)


@pytest.fixture
def million_deliveries(postgres_url: str | None) -> Iterator[str]:
    """1M deliveries and 2M attempts, analysed, in a schema of their own (dropped after)."""
    if postgres_url is None:
        pytest.skip("PostgreSQL not reachable")
    from mailer import migrate

    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCALE_SCHEMA} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {SCALE_SCHEMA}"))
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options=-csearch_path%3D{SCALE_SCHEMA}"
    try:
        migrate.upgrade(url)
        with db.engine(url).begin() as conn:
            for statement in SCALE_LOAD:
                conn.execute(text(statement))
        with db.engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
        yield url
    finally:
        db.reset()
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {SCALE_SCHEMA} CASCADE"))
        admin.dispose()


@pytest.mark.slow
def test_purge_batches_use_indexes_and_stay_short_on_a_million_rows(
    million_deliveries: str,
) -> None:
    url = million_deliveries
    cutoff = datetime.now(UTC) - timedelta(days=90)
    plans: list[str] = []

    def explain(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.startswith(("SELECT", "DELETE")):  # EXPLAIN ANALYZE, then undone
            cursor.execute("SAVEPOINT explain")
            cursor.execute(f"EXPLAIN (ANALYZE) {statement}", parameters)
            plans.append("\n".join(row[0] for row in cursor.fetchall()))
            cursor.execute("ROLLBACK TO SAVEPOINT explain")

    engine = db.engine(url)
    event.listen(engine, "before_cursor_execute", explain)
    try:
        with db.session_scope(url) as session:
            assert retention.count(session, cutoff) > 300_000
            assert retention.purge_batch(session, cutoff, 2000, after=None) is not None
    finally:
        event.remove(engine, "before_cursor_execute", explain)
    assert len(plans) >= 5  # count, choose, attempts, deliveries, messages
    for plan in plans:
        assert "Seq Scan" not in plan, plan

    slowest, started = 0.0, time.monotonic()
    for total in retention.purge(cutoff, 2000, url):
        slowest = max(slowest, time.monotonic() - started)
        started = time.monotonic()
        if total.batches == 50:
            break
    assert slowest < 1.0, f"a batch took {slowest:.2f}s"
