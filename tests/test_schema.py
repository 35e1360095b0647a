"""The models and the Alembic migrations describe the same schema, on both databases."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from mailer import db
from mailer.models import Base


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


def test_every_revision_downgrades_and_upgrades_again(tmp_path: object) -> None:
    """On a database of its own (SQLite): down to nothing and back up, step by step."""
    from alembic import command

    from mailer import migrate

    url = f"sqlite:///{tmp_path}/down.db"
    migrate.upgrade(url)
    head = migrate.current(url)
    config = migrate.alembic_config(url)
    command.downgrade(config, "base")
    assert migrate.current(url) is None
    migrate.upgrade(url)
    assert migrate.current(url) == head


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
