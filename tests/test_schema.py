"""The models and the Alembic migrations describe the same schema, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, select, text

from mailer import db, suppressions
from mailer.models import Base, Suppression
from tests.conftest import PG_SCHEMA, PG_URL


@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression")
@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
def test_models_match_migrations(any_db: str) -> None:
    with db.engine(any_db).connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []


def test_upgrade_is_idempotent(any_db: str) -> None:
    from mailer import migrate

    migrate.upgrade(any_db)
    migrate.upgrade(any_db)
    assert migrate.current(any_db) is not None


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_every_revision_downgrades_and_upgrades_again(
    kind: str, tmp_path: Path, postgres_url: str | None
) -> None:
    """On a database of its own: down to nothing and back up."""
    from alembic import command

    from mailer import migrate

    if kind == "sqlite":
        url = f"sqlite:///{tmp_path}/down.db"
    else:
        if postgres_url is None:
            pytest.skip("PostgreSQL not reachable")
        url = _fresh_pg_schema(f"{PG_SCHEMA}_down")
    try:
        migrate.upgrade(url)
        head = migrate.current(url)
        command.downgrade(migrate.alembic_config(url), "base")
        assert migrate.current(url) is None
        migrate.upgrade(url)
        assert migrate.current(url) == head
    finally:
        db.reset()
        if kind == "postgresql":
            _pg_admin(f"DROP SCHEMA IF EXISTS {PG_SCHEMA}_down CASCADE")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_indexes_are_the_same_from_the_models_and_from_the_migrations(
    kind: str, tmp_path: Path, postgres_url: str | None
) -> None:
    """Autogenerate does not compare a partial index's WHERE: compare what each way creates."""
    from mailer import migrate

    if kind == "sqlite":
        migrated, modelled = f"sqlite:///{tmp_path}/m.db", f"sqlite:///{tmp_path}/c.db"
    else:
        if postgres_url is None:
            pytest.skip("PostgreSQL not reachable")
        migrated = _fresh_pg_schema(f"{PG_SCHEMA}_migrated")
        modelled = _fresh_pg_schema(f"{PG_SCHEMA}_modelled")
    try:
        migrate.upgrade(migrated)
        Base.metadata.create_all(db.engine(modelled))
        assert _index_definitions(migrated) == _index_definitions(modelled)
        definitions = _index_definitions(migrated)
        # every partial index, 0004's and 0011's too, with its predicate
        campaign = "ix_deliveries_message_id_state_updated_at_id_domain"
        for name in ("ix_deliveries_wakeup", "ix_deliveries_recipient", campaign):
            assert "WHERE" in definitions[name].upper(), name
        if kind == "postgresql":
            assert "INCLUDE (domain)" in definitions[campaign], definitions[campaign]
    finally:
        db.reset()
        if kind == "postgresql":
            _pg_admin(
                f"DROP SCHEMA IF EXISTS {PG_SCHEMA}_migrated CASCADE",
                f"DROP SCHEMA IF EXISTS {PG_SCHEMA}_modelled CASCADE",
            )


def _index_definitions(url: str) -> dict[str, str]:
    with db.engine(url).connect() as conn:
        if conn.dialect.name == "sqlite":
            rows = conn.execute(
                text("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
            )
        else:
            rows = conn.execute(
                text(
                    "SELECT indexname, replace(indexdef, current_schema() || '.', '') "
                    "FROM pg_indexes WHERE schemaname = current_schema()"
                )
            )
        return {name: " ".join(sql.split()) for name, sql in rows if name != "alembic_version_pkc"}


def _pg_admin(*statements: str) -> None:
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for statement in statements:
            conn.execute(text(statement))
    admin.dispose()


def _fresh_pg_schema(schema: str) -> str:
    _pg_admin(f"DROP SCHEMA IF EXISTS {schema} CASCADE", f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


def test_one_delivery_per_address_whatever_its_case(any_db: str) -> None:
    """The unique index on (message, lower(recipient)): autogenerate cannot compare
    expression indexes on SQLite, so this checks the database itself."""
    import mailer
    from tests.helpers import add_template, deliveries

    add_template()
    rows = [{"email": "Ann@Example.com", "name": "a"}, {"email": "ann@example.com", "name": "b"}]
    result = mailer.send_campaign("welcome", rows)
    assert (result.queued, result.duplicates) == (1, 1)
    assert [d.recipient for d in deliveries()] == ["Ann@example.com"]


def test_ids_past_32_bits_are_enqueued_sent_and_recorded(pg_db: str) -> None:
    """Migration 0003: with 32-bit ids, the sequences could not even be set this far."""
    import mailer
    from mailer.delivery import deliver_chunk
    from mailer.transport.memory import MemoryTransport
    from tests.helpers import add_template, attempts_of, deliveries, states

    past = 2**31 + 10
    with db.engine().begin() as conn:
        for table in ("messages", "deliveries", "attempts", "suppressions"):
            conn.execute(
                text("SELECT setval(pg_get_serial_sequence(:table, 'id'), :past)"),
                {"table": table, "past": past},
            )
    add_template()
    message_id = mailer.send(template="welcome", to=["a@example.com"], context={"name": "Ann"})
    assert message_id == past + 1
    ids = [d.id for d in deliveries()]
    assert ids == [past + 1]
    deliver_chunk(ids, transport=MemoryTransport())
    assert states() == {"a@example.com": "sent"}
    attempts = attempts_of("a@example.com")
    assert [(a.id, a.delivery_id, a.code) for a in attempts] == [(past + 1, past + 1, 250)]
    with db.session_scope() as session:
        now = datetime.now(UTC)
        suppressions.add(session, [("b@example.com", "bounced", past + 1)], now)
        found = session.execute(select(Suppression.id, Suppression.source_delivery_id)).all()
    assert [tuple(row) for row in found] == [(past + 1, past + 1)]
