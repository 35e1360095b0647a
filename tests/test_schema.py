"""The models and the Alembic migrations describe the same schema, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from mailer import db
from mailer.models import Base


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
