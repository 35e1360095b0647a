"""The scale run's history plan and the SQL it makes rows with (bench/scale_data.py), and the
size option of bench/scale.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import scale_data as sd
import scale_load


@pytest.mark.parametrize("n", [1, 7, 1000, 99_999, 1_000_000, 10_000_000])
def test_plan_accounts_for_every_delivery(n: int) -> None:
    p = sd.plan(n)
    assert sum(c.size for c in p.campaigns) + p.transactional == n
    assert all(c.size >= 1 for c in p.campaigns)
    assert p.population > max(c.size for c in p.campaigns)
    assert p.population % 7919 != 0  # the subscriber mapping stays a bijection
    days = [c.day for c in p.campaigns]
    assert days == sorted(days) and days[0] > 0 and days[-1] < sd.DAYS


def test_plan_at_ten_million_has_campaigns_of_uneven_size() -> None:
    p = sd.plan(10_000_000)
    sizes = [c.size for c in p.campaigns]
    assert 80 <= len(sizes) <= 90
    assert min(sizes) < sd.MEAN_CAMPAIGN / 2 < sd.MEAN_CAMPAIGN * 1.5 < max(sizes)
    assert p.transactional == 1_500_000
    assert p.transactional_before(sd.DAYS / 2) == 750_000
    assert p.transactional_before(sd.DAYS * 2) == p.transactional


def test_shares_add_up() -> None:
    assert sum(share for _, share in sd.STATES) == 1000
    assert sum(weight for _, weight in sd.DOMAINS) < 1000  # the rest is the long tail


def test_literal_quotes() -> None:
    assert sd.literal(None) == "NULL"
    assert sd.literal(250) == "250"
    assert sd.literal("it's") == "'it''s'"


def test_count_option() -> None:
    import scale

    assert scale.count("10M") == 10_000_000
    assert scale.count("1.5m") == 1_500_000
    assert scale.count("500k") == 500_000
    assert scale.count("1_000") == 1000
    with pytest.raises(argparse.ArgumentTypeError):
        scale.count("lots")
    with pytest.raises(argparse.ArgumentTypeError):
        scale.count("0")


def test_conninfo_drops_the_driver() -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    assert scale_load.conninfo(url) == "postgresql://postgres@127.0.0.1:5432/test"
    assert scale_load.schema_url(url, "s").endswith("?options=-csearch_path%3Ds")


def test_sql_pieces_on_postgresql(postgres_url: str | None) -> None:
    """The expressions give distinct subscribers within a campaign, the states and domains in
    about their shares, and valid addresses."""
    if postgres_url is None:
        pytest.skip("PostgreSQL not reachable")
    import psycopg

    n, population = 20_000, 40_001
    k = sd.subscriber("g", "5", population)
    sql = (
        f"SELECT count(DISTINCT k), count(*) FILTER (WHERE st = 'sent'), "
        f"count(*) FILTER (WHERE dom = 'gmail.com'), count(*) FILTER (WHERE dom LIKE 'corp%%'), "
        f"count(*) FILTER (WHERE a NOT LIKE '%%_@_%%'), max(att), min(att) "
        f"FROM (SELECT k, st, dom, {sd.local_part_sql('k')} || '@' || dom AS a, "
        f"{sd.attempts_sql('g', 'st')} AS att FROM (SELECT g, k, {sd.state_sql('g')} AS st, "
        f"{sd.domain_sql('k')} AS dom FROM (SELECT g, {k} AS k "
        f"FROM generate_series(0, {n - 1}) g) a) b) c"
    )
    with psycopg.connect(scale_load.conninfo(postgres_url)) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    distinct, sent, gmail, tail, bad, most, least = row
    assert distinct == n
    assert abs(sent / n - 0.93) < 0.02
    assert abs(gmail / n - 0.35) < 0.02
    assert abs(tail / n - 0.20) < 0.02
    assert bad == 0
    assert (least, most) == (0, 4)


def test_slow_log_keeps_each_statement_with_its_plan(tmp_path: Path) -> None:
    import scale_pglog

    log = tmp_path / "pg.log"
    log.write_text("2026-12-07 20:00:00.000 UTC [1] LOG:  duration: 5.0 ms  plan:\n\tbefore\n")
    slow = scale_pglog.SlowLog(log)
    slow.mark()
    with log.open("a") as f:
        f.write(
            "2026-12-07 20:00:01.000 UTC [2] postgres@test LOG:  duration: 12.5 ms  plan:\n"
            "\tQuery Text: SELECT 1\n\tResult  (cost=0.00..0.01 rows=1 width=4)\n"
            "2026-12-07 20:00:02.000 UTC [3] LOG:  checkpoint starting: wal\n"
            "2026-12-07 20:00:03.000 UTC [2] postgres@test LOG:  duration: 99.0 ms  plan:\n"
            "\tQuery Text: SELECT 2\n"
        )
    found = slow.slowest()
    assert [s["ms"] for s in found] == [99.0, 12.5]
    assert found[1]["statement"] == (
        "plan:\nQuery Text: SELECT 1\nResult  (cost=0.00..0.01 rows=1 width=4)"
    )
    assert scale_pglog.SlowLog(tmp_path / "absent.log").slowest() == []
