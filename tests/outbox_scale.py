"""A big outbox for plan tests: a migrated PostgreSQL schema of its own, filled by
generate_series on the server (a million deliveries in seconds, not a Python loop)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, create_engine, text

from mailer import db, migrate

CAMPAIGN_SIZE = 100_000
# the history's mix, by a delivery's number modulo 100: most sent, some waiting for a retry,
# some closed as failed or bounced, some scheduled for tomorrow
_STATE = """CASE
    WHEN i % 100 < 88 THEN 'sent'
    WHEN i % 100 < 92 THEN 'deferred'
    WHEN i % 100 < 94 THEN 'failed'
    WHEN i % 100 < 95 THEN 'bounced'
    WHEN i % 100 < 96 THEN 'unknown'
    ELSE 'queued' END"""

# the class of the last reply that led to each state (none for what was never tried)
_CLASS = """CASE
    WHEN i % 100 < 88 THEN 'delivered'
    WHEN i % 100 < 92 THEN 'transient'
    WHEN i % 100 < 94 THEN 'message_failure'
    WHEN i % 100 < 95 THEN 'hard_bounce'
    WHEN i % 100 < 96 THEN 'ambiguous'
    END"""


@dataclass(frozen=True)
class Outbox:
    url: str  # the schema's URL (search_path set), for mailer's own engine
    schema: str
    deliveries: int
    attempts: int
    campaigns: int


def url_for(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


def build(
    base: str,
    schema: str,
    deliveries: int,
    *,
    attempts_each: int = 2,
    campaign_size: int = CAMPAIGN_SIZE,
) -> Outbox:
    """Drop and build `schema` with `deliveries` deliveries in campaigns of `campaign_size`
    (one message each), `attempts_each` attempts a delivery, then ANALYZE."""
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    admin.dispose()
    url = url_for(base, schema)
    migrate.upgrade(url)
    db.reset()
    campaigns = -(-deliveries // campaign_size)
    eng = create_engine(url)
    try:
        with eng.begin() as conn:
            _fill(conn, deliveries, campaigns, attempts_each, campaign_size)
        with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    finally:
        eng.dispose()
    return Outbox(url, schema, deliveries, deliveries * attempts_each, campaigns)


def _fill(
    conn: object, deliveries: int, campaigns: int, attempts_each: int, campaign_size: int
) -> None:
    run = conn.execute  # type: ignore[attr-defined]
    run(
        text(
            "INSERT INTO templates (id, name, version, subject, text, created_at) "
            "VALUES (1, 'scale', 1, 'Hello', 'Hi {{ name }}', now())"
        )
    )
    run(
        text(
            "INSERT INTO campaigns (id, name, paused, created_at) "
            "SELECT c, 'campaign ' || c, false, now() - interval '1 day' * (:n - c) "
            "FROM generate_series(1, :n) c"
        ),
        {"n": campaigns},
    )
    run(
        text(
            "INSERT INTO messages (id, campaign_id, template_id, from_addr, context, headers, "
            "token, priority, created_at) "
            "SELECT c, c, 1, 'news@example.com', '{}', '{}', md5(c::text), 'bulk', "
            "now() - interval '1 day' * (:n - c) FROM generate_series(1, :n) c"
        ),
        {"n": campaigns},
    )
    run(
        text(
            "INSERT INTO deliveries (id, message_id, recipient, domain, context, state, "
            "attempts, next_attempt_at, published_at, last_code, last_reply, last_class, "
            "created_at, updated_at) "
            "SELECT i, (i - 1) / :size + 1, 'user' || i || '@example' || (i % 100) || '.com', "
            "'example' || (i % 100) || '.com', jsonb_build_object('name', 'N' || i), "
            f"{_STATE}, 2, "
            "CASE WHEN i % 100 >= 96 THEN now() + interval '1 day' "
            "     WHEN i % 100 >= 88 AND i % 100 < 92 THEN now() + interval '1 hour' "
            "     ELSE now() - interval '1 day' END, "
            "now() - interval '1 day', 250, '250 2.0.0 Ok', "
            f"{_CLASS}, now() - interval '2 days', now() - interval '1 day' "
            "FROM generate_series(1, :n) i"
        ),
        {"n": deliveries, "size": campaign_size},
    )
    run(
        text(
            "INSERT INTO attempts (id, delivery_id, started_at, finished_at, phase, code, "
            "enhanced, reply, outcome, relay, tls) "
            "SELECT j, (j - 1) / :each + 1, now() - interval '1 day', now() - interval '1 day', "
            "'data', 250, '2.0.0', '250 2.0.0 Ok', 'delivered', 'default', true "
            "FROM generate_series(1, :n) j"
        ),
        {"n": deliveries * attempts_each, "each": attempts_each},
    )
    run(
        text(
            "INSERT INTO suppressions (id, address, reason, created_at) "
            "SELECT i, 'user' || i || '@example' || (i % 100) || '.com', 'import', now() "
            "FROM generate_series(1, :n, 97) i"
        ),
        {"n": deliveries},
    )
    for table in ("campaigns", "messages", "deliveries", "attempts", "suppressions", "templates"):
        run(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}"))


def drop(base: str, schema: str) -> None:
    admin: Engine = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    admin.dispose()
