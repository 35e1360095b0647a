"""Fixtures of the fault suite (run alone: `python -m pytest -m faults -s tests/faults`).

Every scenario gets its own redis-server on a free port (the shared Redis on 6379 is never
touched), the SMTP server of `smtp_server`, and the PostgreSQL schema of `pg_db`. The schema
lives in a database of this run's own (`mailer_faults_<pid>` on the same server, dropped at the
end): other test runs drop and re-create `mailer_test` in the shared database at their start,
and the dispatcher's advisory lock is per database, so sharing either would let another run's
schema reset or dispatcher break or stall a scenario. Process logs: /tmp/mailer-faults/run-<pid>/.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from mailer import db
from tests.faults import harness

# as in tests/conftest.py
PG_URL = os.environ.get(
    "MAILER_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
PG_SCHEMA = "mailer_test"
FAULTS_DATABASE = "mailer_faults"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The suite kills processes and takes minutes: it runs only when asked for (-m faults),
    not as part of a plain `pytest tests`."""
    if "faults" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="the fault suite runs only when selected: -m faults")
    for item in items:
        if item.get_closest_marker("faults") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """As the shared fixture (a migrated `mailer_test` schema), but in a database of this
    session's own, dropped at its end."""
    database = f"{FAULTS_DATABASE}_{os.getpid()}"
    try:
        admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            _drop_abandoned(conn)
            conn.execute(text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
            conn.execute(text(f"CREATE DATABASE {database}"))
        base = make_url(PG_URL).set(database=database)
        own = create_engine(base, isolation_level="AUTOCOMMIT")
        with own.connect() as conn:
            conn.execute(text(f"CREATE SCHEMA {PG_SCHEMA}"))
        own.dispose()
    except Exception as exc:
        if os.environ.get("MAILER_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"PostgreSQL is required but unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    url = base.update_query_dict({"options": f"-csearch_path={PG_SCHEMA}"}).render_as_string(
        hide_password=False
    )
    from mailer import migrate

    migrate.upgrade(url)
    db.reset()
    try:
        yield url
    finally:
        db.reset()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        admin.dispose()


def _drop_abandoned(conn: Any) -> None:
    """Databases left by fault runs whose process is gone (killed before its teardown)."""
    names = conn.execute(
        text("SELECT datname FROM pg_database WHERE datname LIKE :p"),
        {"p": f"{FAULTS_DATABASE}_%"},
    ).scalars()
    for name in list(names):
        pid = name.rsplit("_", 1)[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# every process's output, one folder per scenario, kept after the run (folders of earlier
# runs are removed when the next run starts)
LOGS_ROOT = Path(os.environ.get("MAILER_FAULTS_LOGS", "/tmp/mailer-faults"))
LOGS = LOGS_ROOT / f"run-{os.getpid()}"


@pytest.fixture(scope="session", autouse=True)
def _old_logs_removed() -> None:
    for folder in LOGS_ROOT.glob("run-*"):
        pid = folder.name.removeprefix("run-")
        if folder != LOGS and not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def rig(
    pg_db: str, smtp_server: Any, configure_env: Any, request: pytest.FixtureRequest
) -> Iterator[harness.Rig]:
    """Own Redis started, settings in force for this process and every child it starts."""
    logdir = LOGS / re.sub(r"[^\w.-]+", "_", request.node.name)
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir(parents=True)
    redis_server = harness.RedisServer(logdir)
    rig = harness.Rig(smtp_server, redis_server, logdir, configure_env)
    try:
        redis_server.start()
        configure_env(
            broker_url=redis_server.url,
            smtp_url=smtp_server.url(tls="none"),
            **harness.TIMINGS,
        )
        yield rig
    finally:
        rig.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not harness.ROWS:
        return
    terminalreporter.section("fault scenarios")
    # in the order of the scenarios' numbers, whichever module ran them
    for line in harness.table(sorted(harness.ROWS, key=lambda r: r.scenario.split()[0])):
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"process logs: {LOGS}")
    bad = [r.scenario for r in harness.ROWS if r.lost]
    if bad:
        terminalreporter.write_line(f"LOST deliveries in: {', '.join(bad)}", red=True)
