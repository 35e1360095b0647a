"""Schema upgrades through Alembic, the only source of the schema."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from mailer import db

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# any constant works; it only has to be the same for every process that migrates
_MIGRATION_LOCK = 0x6D61696C


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = db.engine(url)
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the schema to `revision`. On PostgreSQL an advisory lock serialises containers
    that start at once; SQLite serialises writers by itself."""
    config = alembic_config(url)
    eng = config.attributes["engine"]
    with eng.begin() as connection:
        if connection.dialect.name == "postgresql":
            # a migration may rewrite a big table: no role's statement_timeout applies
            connection.execute(text("SET LOCAL statement_timeout = 0"))
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def current(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with db.engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
