"""The hot statements' plans on a million-row outbox: each reads deliveries and attempts
through an index, none scans them whole (slow; CI runs it with `-m slow`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from mailer import clock, config, db
from tests import outbox_scale, plans
from tests.conftest import PG_URL

DELIVERIES = 1_000_000
SCHEMA = f"mailer_plans_{os.getpid()}"


@pytest.fixture(scope="module")
def outbox() -> Iterator[outbox_scale.Outbox]:
    try:
        built = outbox_scale.build(PG_URL, SCHEMA, DELIVERIES)
    except Exception as exc:  # no PostgreSQL here
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    previous = os.environ.get("MAILER_DATABASE_URL")
    os.environ["MAILER_DATABASE_URL"] = built.url
    config.reload()
    try:
        yield built
    finally:
        if previous is None:
            os.environ.pop("MAILER_DATABASE_URL", None)
        else:
            os.environ["MAILER_DATABASE_URL"] = previous
        config.reload()
        db.reset()
        outbox_scale.drop(PG_URL, SCHEMA)


SCENES = list(plans.scenes(plans.Scene(DELIVERIES, 5, clock.now())))


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENES)
def test_no_statement_scans_the_outbox(outbox: outbox_scale.Outbox, name: str) -> None:
    scene = plans.Scene(outbox.deliveries, 5, clock.now())
    statements = plans.capture(outbox.url, plans.scenes(scene)[name])
    print(plans.describe(name, statements))
    assert statements
    for st in statements:
        assert not st.seq_scans(), plans.describe(name, [st])
