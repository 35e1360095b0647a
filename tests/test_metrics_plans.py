"""The scrape's statements on a million-row outbox: the queue depth reads the state counts, the
oldest due time one end of each dispatcher index; neither reads the deliveries whole (slow).

By hand, at another size, with the scrape's time (median and worst of 50):

    PYTHONPATH=. .venv/bin/python tests/test_metrics_plans.py 10000000
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Iterator

import pytest

from mailer import clock, config, db, metrics, metrics_outbox
from tests import outbox_scale, plans
from tests.conftest import PG_URL

DELIVERIES = 1_000_000
SCHEMA = f"mailer_metrics_plans_{os.getpid()}"


@pytest.fixture(scope="module")
def outbox() -> Iterator[outbox_scale.Outbox]:
    try:
        built = outbox_scale.build(PG_URL, SCHEMA, DELIVERIES, attempts_each=1)
    except Exception as exc:  # no PostgreSQL here
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    try:
        yield built
    finally:
        db.reset()
        outbox_scale.drop(PG_URL, SCHEMA)


def _statements(url: str) -> list[plans.Statement]:
    return plans.capture(url, lambda s: metrics_outbox.read(s, clock.now()))


@pytest.mark.slow
def test_a_scrape_reads_no_table_of_the_outbox_whole(outbox: outbox_scale.Outbox) -> None:
    statements = _statements(outbox.url)
    print(plans.describe("scrape", statements))
    reads = [st for st in statements if st.sql.lstrip().upper().startswith("SELECT")]
    assert len(reads) == 3
    for st in reads:
        assert not st.seq_scans(), plans.describe("scrape", [st])
    depth, owed, woken = reads
    assert depth.scans() == []  # the counts only, never the deliveries
    for oldest, index in ((owed, "ix_deliveries_wakeup"), (woken, "ix_deliveries_published")):
        assert {i for _, rel, i in oldest.scans() if rel == "deliveries"} == {index}
        assert "Limit" in {node["Node Type"] for node in plans._nodes(oldest.plan)}


def scrape_times(url: str, rounds: int = 50) -> list[float]:
    """Seconds each of `rounds` whole scrapes took (the outbox's collector alone)."""
    previous = os.environ.get("MAILER_DATABASE_URL")
    os.environ["MAILER_DATABASE_URL"] = url
    config.reload()
    db.reset()
    try:
        source = metrics.registry()
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            metrics.scrape(source)
            times.append(time.perf_counter() - started)
        return times
    finally:
        if previous is None:
            os.environ.pop("MAILER_DATABASE_URL", None)
        else:
            os.environ["MAILER_DATABASE_URL"] = previous
        config.reload()
        db.reset()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else DELIVERIES
    schema = os.environ.get("PLANS_SCHEMA", f"mailer_metrics_{n}")
    if os.environ.get("PLANS_BUILD", "1") == "1":
        started = time.perf_counter()
        outbox_scale.build(PG_URL, schema, n, attempts_each=1)
        print(f"built {n:,} deliveries in {time.perf_counter() - started:.0f} s", flush=True)
    url = outbox_scale.url_for(PG_URL, schema)
    print(plans.describe("scrape", _statements(url)))
    times = scrape_times(url)
    print(
        f"scrape at {n:,} deliveries: median {statistics.median(times) * 1000:.1f} ms, "
        f"worst {max(times) * 1000:.1f} ms of {len(times)}"
    )


if __name__ == "__main__":
    main()
