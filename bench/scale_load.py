"""Loading the scale run's outboxes: a history of N deliveries (and about 2N attempts) made by
generate_series in a PostgreSQL schema of its own, kept between runs, reset to its loaded rows
before each run, and the synthetic campaigns (final, due, queued) the cases measure on."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import scale_data as sd
from infra import PYTHON, ROOT, BenchError
from psycopg.types.json import Jsonb

Say = Callable[[str], None]
TABLES = ("attempts", "suppressions", "deliveries", "messages", "campaigns", "templates")
ATTEMPT_BATCH = 500_000  # deliveries whose attempts one statement inserts
TXN_BATCH = 500_000


def conninfo(url: str) -> str:
    """A libpq URL from a SQLAlchemy one (postgresql+psycopg://... -> postgresql://...)."""
    scheme, rest = url.split("://", 1)
    return "postgresql://" + rest if scheme.startswith("postgresql") else url


def schema_url(pg_url: str, schema: str, slow_ms: int | None = None, app: str = "") -> str:
    """The SQLAlchemy URL that uses `schema` (as bench/session.py's fresh_schema writes it),
    logging its statements slower than `slow_ms`, with their plans, in the server log if
    given, its connections
    named `app` (in pg_stat_activity) if given."""
    sep = "&" if "?" in pg_url else "?"
    # auto_explain logs each slow statement with its plan (a superuser's startup options may
    # load it for their own session)
    slow = (
        f"%20-csession_preload_libraries%3Dauto_explain%20-cauto_explain.log_min_duration%3D{slow_ms}"
        if slow_ms
        else ""
    )
    name = f"&application_name={app}" if app else ""
    return f"{pg_url}{sep}options=-csearch_path%3D{schema}{slow}{name}"


def connect(pg_url: str, schema: str) -> psycopg.Connection[Any]:
    return psycopg.connect(conninfo(pg_url), autocommit=True, options=f"-csearch_path={schema}")


def migrate(pg_url: str, schema: str, log: Path) -> None:
    """`mailer db upgrade` against the schema, as an operator would run it."""
    _mailer_db(pg_url, schema, log, "upgrade")


def recount(pg_url: str, schema: str, log: Path) -> None:
    """`mailer db recount`: the load and the reset write with triggers off."""
    _mailer_db(pg_url, schema, log, "recount")


def _mailer_db(pg_url: str, schema: str, log: Path, command: str) -> None:
    env = _env(schema_url(pg_url, schema))
    with log.open("ab") as out:
        done = subprocess.run(
            [PYTHON, "-m", "mailer", "db", command],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=out,
            timeout=1800,
            check=False,
        )
    if done.returncode != 0:
        raise BenchError(f"mailer db {command} failed in {schema}: see {log}")


def _env(url: str) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(MAILER_DATABASE_URL=url, MAILER_LOG_LEVEL="WARNING")
    return env


def fresh(pg_url: str, schema: str, log: Path) -> None:
    with connect(pg_url, "public") as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.execute(f"CREATE SCHEMA {schema}")
    migrate(pg_url, schema, log)


# --- the history ------------------------------------------------------------------------------


@dataclass
class Ids:
    """The next explicit ids of the load (messages get theirs from here, not their sequence, so
    that a batch of transactional messages and its deliveries agree without a round trip)."""

    message: int = 1
    campaign: int = 1


def history_marks(pg_url: str, schema: str) -> dict[str, Any] | None:
    """What a previous load left (its size and last ids), or None if there is none."""
    with connect(pg_url, schema) as conn:
        found = conn.execute("SELECT to_regclass('scale_history') IS NOT NULL").fetchone()
        if not found or not found[0]:
            return None
        row = conn.execute("SELECT marks FROM scale_history").fetchone()
    return dict(row[0]) if row else None


def load_history(pg_url: str, schema: str, n: int, log: Path, say: Say) -> dict[str, Any]:
    """A fresh schema with n deliveries of history; returns the load's timings and counts."""
    timings: dict[str, float] = {}
    t = time.monotonic()
    fresh(pg_url, schema, log)
    timings["migrate_s"] = time.monotonic() - t
    p = sd.plan(n)
    say(
        f"history: {n:,} deliveries, {len(p.campaigns)} campaigns, "
        f"{p.transactional:,} transactional, over {sd.DAYS} days"
    )
    with connect(pg_url, schema) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        # no foreign-key triggers during the bulk load (the rows are made consistent)
        conn.execute("SET session_replication_role = replica")
        indexes = _drop_indexes(conn)
        t = time.monotonic()
        templates = _templates(conn)
        _deliveries(conn, p, templates, say)
        timings["deliveries_s"] = time.monotonic() - t
        t = time.monotonic()
        _attempts(conn, say)
        timings["attempts_s"] = time.monotonic() - t
        t = time.monotonic()
        _suppressions(conn)
        _sequences(conn)
        timings["suppressions_s"] = time.monotonic() - t
        t = time.monotonic()
        for sql in indexes:
            say(f"  index: {sql.split(' ON ')[0].split()[-1]}")
            conn.execute(sql)
        timings["indexes_s"] = time.monotonic() - t
        t = time.monotonic()
        say("  VACUUM ANALYZE")
        for table in TABLES:
            conn.execute(f"VACUUM (ANALYZE) {table}")
        timings["vacuum_analyze_s"] = time.monotonic() - t
        t = time.monotonic()
        recount(pg_url, schema, log)
        timings["recount_s"] = time.monotonic() - t
        marks = _marks(conn, n)
        marks["load"] = timings
        marks["sizes"] = table_sizes(conn)
        conn.execute("CREATE TABLE scale_history (marks jsonb NOT NULL)")
        conn.execute("INSERT INTO scale_history VALUES (%s)", [Jsonb(marks)])
    return marks


def _drop_indexes(conn: psycopg.Connection[Any]) -> list[str]:
    """Drop the indexes of the growing tables that no constraint owns, returning their
    definitions: building one index over the loaded rows beats keeping it up row by row."""
    rows = conn.execute(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) "
        "FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid "
        "JOIN pg_namespace ns ON ns.oid = t.relnamespace "
        "WHERE ns.nspname = current_schema() AND t.relname IN ('deliveries', 'attempts', "
        "'messages') AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = "
        "i.indexrelid)"
    ).fetchall()
    for name, _ in rows:
        conn.execute(f"DROP INDEX {name}")
    return [sql for _, sql in rows]


def _templates(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    ids = []
    for name, subject in (("scale-news", "News for {{ name }}"), ("scale-reset", "Your order")):
        row = conn.execute(
            "INSERT INTO templates (name, version, subject, text, html, created_at) "
            "VALUES (%s, 1, %s, 'Hello {{ name }}', NULL, now() - interval '120 days') "
            "RETURNING id",
            [name, subject],
        ).fetchone()
        assert row is not None
        ids.append(int(row[0]))
    return ids[0], ids[1]


def _deliveries(
    conn: psycopg.Connection[Any], p: sd.Plan, templates: tuple[int, int], say: Say
) -> None:
    """Campaigns in time order, each preceded by the transactional mail sent before it, so
    that ids grow with time as they do in a real outbox."""
    start = datetime.now(UTC) - timedelta(days=sd.DAYS)
    ids = Ids()
    txn_done = 0
    loaded = 0
    t0 = time.monotonic()
    for c in p.campaigns:
        upto = p.transactional_before(c.day)
        while txn_done < upto:
            step = min(TXN_BATCH, upto - txn_done)
            insert_transactional(conn, p, ids, templates[1], start, txn_done, step)
            txn_done += step
            loaded += step
        when = start + timedelta(days=c.day)
        insert_campaign(conn, ids, templates[0], when, c.size, c.index, p.population)
        loaded += c.size
        rate = loaded / max(time.monotonic() - t0, 1e-6)
        say(f"  deliveries: {loaded:,} of {p.deliveries:,} ({rate:,.0f}/s)")
    while txn_done < p.transactional:
        step = min(TXN_BATCH, p.transactional - txn_done)
        insert_transactional(conn, p, ids, templates[1], start, txn_done, step)
        txn_done += step
    say(f"  deliveries: {p.deliveries:,} loaded in {time.monotonic() - t0:.0f}s")


def insert_campaign(  # noqa: PLR0913 (the campaign's shape, each a plain value)
    conn: psycopg.Connection[Any],
    ids: Ids | None,
    template: int,
    when: datetime,
    size: int,
    salt: int,
    population: int,
    state: str | None = None,
) -> tuple[int, int]:
    """A campaign (one message) of `size` deliveries created at `when`: in final states by the
    history's shares, or all in `state`. Returns (campaign id, message id)."""
    campaign_id, message_id = _campaign_rows(conn, ids, template, when, salt)
    k = sd.subscriber("g", str(salt), population)
    key = f"g + {salt * 1_000_003}"
    st = sd.literal(state) if state else sd.state_sql(key)
    conn.execute(
        "INSERT INTO deliveries (message_id, recipient, domain, context, state, attempts, "
        "next_attempt_at, lease_until, published_at, last_phase, last_code, last_enhanced, "
        "last_reply, created_at, updated_at) "
        f"SELECT %(m)s, local || '@' || dom, dom, jsonb_build_object('name', initcap("
        f"split_part(local, '.', 1)), 'token', md5(k::text)), st, "
        f"{sd.attempts_sql(key, 'st')}, t, NULL, "
        "CASE WHEN st IN ('queued', 'deferred') THEN NULL ELSE t END, "
        f"{sd.reply_sql('st', 0)}, "
        f"{sd.reply_sql('st', 1)}, {sd.reply_sql('st', 2)}, {sd.reply_sql('st', 3)}, t, "
        "t + g * interval '2 ms' "
        f"FROM (SELECT g, k, {sd.domain_sql('k')} AS dom, {sd.local_part_sql('k')} AS local, "
        f"{st}::text AS st, %(t)s::timestamptz AS t "
        f"FROM (SELECT g, {k} AS k FROM generate_series(0, %(n)s::bigint - 1) g) a) b",
        {"m": message_id, "t": when, "n": size},
    )
    return campaign_id, message_id


def _campaign_rows(
    conn: psycopg.Connection[Any], ids: Ids | None, template: int, when: datetime, salt: int
) -> tuple[int, int]:
    """The campaign and its message (explicit ids during the load, sequences afterwards)."""
    cid = f"{ids.campaign}, " if ids else ""
    mid = f"{ids.message}, " if ids else ""
    row = conn.execute(
        f"INSERT INTO campaigns ({'id, ' if ids else ''}name, paused, created_at) "
        f"VALUES ({cid}%s, false, %s) RETURNING id",
        [f"Newsletter {salt}", when],
    ).fetchone()
    assert row is not None
    campaign_id = int(row[0])
    row = conn.execute(
        f"INSERT INTO messages ({'id, ' if ids else ''}campaign_id, template_id, from_addr, "
        "context, headers, token, idempotency_key, priority, send_at, expires_at, created_at) "
        f"VALUES ({mid}%s, %s, 'news@shop.example.com', '{{}}', "
        '\'{"List-Unsubscribe": "<https://shop.example.com/u/{{ token }}>"}\', '
        "md5(%s::text), NULL, 'bulk', NULL, NULL, %s) RETURNING id",
        [campaign_id, template, f"c{salt}{when}", when],
    ).fetchone()
    assert row is not None
    if ids:
        ids.campaign += 1
        ids.message += 1
    return campaign_id, int(row[0])


def insert_transactional(  # noqa: PLR0913 (the batch's place in the plan)
    conn: psycopg.Connection[Any],
    p: sd.Plan,
    ids: Ids,
    template: int,
    start: datetime,
    first: int,
    count: int,
) -> None:
    """Transactional deliveries first..first+count-1 of the plan, one message each."""
    step = timedelta(days=sd.DAYS) / max(p.transactional, 1)
    args: dict[str, Any] = {"base": ids.message - first, "a": first, "n": count}
    args.update(tpl=template, start=start, step=step)
    conn.execute(
        "INSERT INTO messages (id, campaign_id, template_id, from_addr, context, headers, "
        "token, idempotency_key, priority, send_at, expires_at, created_at) "
        "SELECT %(base)s::bigint + g, NULL, %(tpl)s, 'orders@shop.example.com', jsonb_build_object("
        "'link', 'https://shop.example.com/o/' || md5(g::text)), '{}', md5('t' || g), "
        "'order-' || g, 'transactional', NULL, NULL, %(start)s::timestamptz + g * %(step)s "
        "FROM generate_series(%(a)s::bigint, %(a)s::bigint + %(n)s::bigint - 1) g",
        args,
    )
    k = sd.hashed("g", p.population)
    key = "g + 77"
    conn.execute(
        "INSERT INTO deliveries (message_id, recipient, domain, context, state, attempts, "
        "next_attempt_at, lease_until, published_at, last_phase, last_code, last_enhanced, "
        "last_reply, created_at, updated_at) "
        "SELECT %(base)s::bigint + g, local || '@' || dom, dom, NULL, st, "
        f"{sd.attempts_sql(key, 'st')}, "
        f"t, NULL, t, {sd.reply_sql('st', 0)}, {sd.reply_sql('st', 1)}, "
        f"{sd.reply_sql('st', 2)}, {sd.reply_sql('st', 3)}, t, t + interval '1 second' "
        f"FROM (SELECT g, {sd.domain_sql('k')} AS dom, {sd.local_part_sql('k')} AS local, "
        f"{sd.state_sql(key)}::text AS st, %(start)s::timestamptz + g * %(step)s AS t "
        f"FROM (SELECT g, {k} AS k FROM generate_series(%(a)s::bigint, "
        "%(a)s::bigint + %(n)s::bigint - 1) g) a) b",
        args,
    )
    ids.message += count


def _attempts(conn: psycopg.Connection[Any], say: Say) -> None:
    """Each delivery's attempts: retries answered 451, the last one its final reply."""
    row = conn.execute("SELECT min(id), max(id) FROM deliveries").fetchone()
    assert row is not None
    lo, hi = int(row[0]), int(row[1])
    retry = [sd.literal(v) for v in sd.RETRY_REPLY]
    last = [sd.reply_sql("d.state", i) for i in range(5)]
    fields = ", ".join(
        f"CASE WHEN k < d.attempts THEN {r} ELSE {f} END" for r, f in zip(retry, last, strict=True)
    )
    t0 = time.monotonic()
    total = 0
    for a in range(lo, hi + 1, ATTEMPT_BATCH):
        cur = conn.execute(
            "INSERT INTO attempts (delivery_id, started_at, finished_at, phase, code, enhanced, "
            "reply, outcome, relay, tls) "
            f"SELECT d.id, s, s + interval '180 ms', {fields}, 'smtp.relay.example:587', true "
            "FROM deliveries d, LATERAL (SELECT k, d.created_at + (k - 1) * interval "
            "'15 minutes' + mod(d.id, 1000) * interval '1 ms' AS s "
            "FROM generate_series(1, d.attempts) k) x "
            "WHERE d.id >= %s AND d.id < %s ORDER BY d.id, k",
            [a, a + ATTEMPT_BATCH],
        )
        total += cur.rowcount
        rate = total / max(time.monotonic() - t0, 1e-6)
        say(
            f"  attempts: {total:,} (deliveries to {min(a + ATTEMPT_BATCH, hi + 1):,}, "
            f"{rate:,.0f}/s)"
        )


def _suppressions(conn: psycopg.Connection[Any]) -> None:
    """The addresses that bounced are on the suppression list, as the worker leaves them."""
    conn.execute(
        "INSERT INTO suppressions (address, reason, source_delivery_id, created_at) "
        "SELECT DISTINCT ON (lower(recipient)) lower(recipient), last_reply, id, updated_at "
        "FROM deliveries WHERE state = 'bounced' ORDER BY lower(recipient), id "
        "ON CONFLICT DO NOTHING"
    )


def _sequences(conn: psycopg.Connection[Any]) -> None:
    for table in TABLES:
        conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
            f"coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
        )


def _marks(conn: psycopg.Connection[Any], n: int) -> dict[str, Any]:
    marks: dict[str, Any] = {"deliveries_planned": n, "loaded_at": datetime.now(UTC).isoformat()}
    for table in TABLES:
        row = conn.execute(f"SELECT coalesce(max(id), 0), count(*) FROM {table}").fetchone()
        assert row is not None
        marks[f"max_{table}"] = int(row[0])
        marks[f"rows_{table}"] = int(row[1])
    return marks


def table_sizes(conn: psycopg.Connection[Any]) -> dict[str, dict[str, int]]:
    """Bytes on disk of each growing table: its heap and its indexes."""
    out = {}
    for table in ("deliveries", "attempts", "messages", "suppressions"):
        row = conn.execute(
            "SELECT pg_table_size(%s), pg_indexes_size(%s)", [table, table]
        ).fetchone()
        assert row is not None
        out[table] = {"table_bytes": int(row[0]), "index_bytes": int(row[1])}
    return out


def reset(pg_url: str, schema: str, marks: dict[str, Any], say: Say, log: Path) -> None:
    """Delete what earlier runs added above the loaded history (children first)."""
    t0 = time.monotonic()
    with connect(pg_url, schema) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("DELETE FROM attempts WHERE delivery_id > %s", [marks["max_deliveries"]])
        for table in TABLES:
            conn.execute(f"DELETE FROM {table} WHERE id > %s", [marks[f"max_{table}"]])
        conn.execute("DELETE FROM relays")
        for table in TABLES:
            conn.execute(f"VACUUM (ANALYZE) {table}")
    recount(pg_url, schema, log)
    say(f"history reset to its loaded rows in {time.monotonic() - t0:.1f}s")
