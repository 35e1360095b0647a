"""The hot statements' plans on a million-row outbox: each reads deliveries and attempts
through an index, none scans them whole (slow; CI runs it with `-m slow`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

import pytest

from mailer import clock, config, db, dispatcher
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


# a running campaign of CAMPAIGN_SIZE deliveries, all due and published, none claimed yet: the
# dispatcher's pass reads what it publishes, not the campaign's backlog (at most a batch from
# each of its three indexes: owed, leased, given)
BACKLOG_CASES = {
    "queue busy": ("1 minute", 0, False, 0),
    "queue empty, wake-ups recent": ("1 minute", 0, True, 0),
    "queue empty, wake-ups lost": ("2 hours", 0, True, dispatcher.BATCH),
    # two hours on, the history's deferred deliveries are due and owed a wake-up too
    "two hours on, wake-ups lost": ("1 minute", 2, True, dispatcher.BATCH),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BACKLOG_CASES)
def test_a_dispatcher_pass_reads_what_it_publishes_not_the_backlog(
    outbox: outbox_scale.Outbox, case: str
) -> None:
    published_ago, hours_on, queue_empty, expected = BACKLOG_CASES[case]
    scene = plans.Scene(outbox.deliveries, 5, clock.now())
    when = scene.now + timedelta(hours=hours_on)
    scan = plans.dispatch_scan(when, queue_empty=queue_empty, republish_after=3600)
    statements = plans.capture_analyzed(
        outbox.url, plans.running_campaign(scene, published_ago), scan
    )
    print(plans.describe(case, statements))
    (st,) = statements
    used = {index for _, relation, index in st.scans() if relation == "deliveries"}
    assert used <= {"ix_deliveries_wakeup", "ix_deliveries_leased", "ix_deliveries_published"}
    assert not st.seq_scans()
    read = st.rows_read("deliveries")
    assert read <= 3 * dispatcher.BATCH, f"{read} rows read for {expected} found"
    if expected == 0:
        assert read < 100, read
