"""Each role's statement_timeout on PostgreSQL, and a killed client's statement stopped by the
server (client_connection_check_interval)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from mailer import config, db
from mailer.errors import ConfigError


@pytest.fixture
def role() -> Iterator[Any]:
    yield db.set_role
    db.set_role("producer")


def test_a_role_left_out_keeps_its_default() -> None:
    loaded = config.load({"MAILER_STATEMENT_TIMEOUTS": "worker=5"})
    assert loaded.statement_timeout("worker") == 5
    assert loaded.statement_timeout("dispatcher") == 60
    assert loaded.statement_timeout("cli") == 300


@pytest.mark.parametrize("value", ["web=5", "worker", "worker=-1", "worker=soon"])
def test_a_wrong_timeout_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="MAILER_STATEMENT_TIMEOUTS"):
        config.load({"MAILER_STATEMENT_TIMEOUTS": value})


def test_each_role_gets_its_timeout_and_the_schema_stays(
    pg_db: str, configure_env: Any, role: Any
) -> None:
    configure_env(statement_timeouts="worker=1.5,dispatcher=0")
    role("worker")
    with db.session_scope() as session:
        assert session.execute(text("SHOW statement_timeout")).scalar() == "1500ms"
        assert session.execute(text("SHOW client_connection_check_interval")).scalar() == "5s"
        # the URL's own options (the test schema's search_path) are kept beside them
        assert session.execute(text("SELECT count(*) FROM deliveries")).scalar() == 0
    started = time.monotonic()
    with pytest.raises(OperationalError, match="statement timeout"), db.session_scope() as s:
        s.execute(text("SELECT pg_sleep(10)"))
    assert time.monotonic() - started < 5
    role("dispatcher")
    with db.session_scope() as session:
        assert session.execute(text("SHOW statement_timeout")).scalar() == "0"


def test_a_killed_clients_statement_does_not_run_on(pg_db: str, tmp_path: Any) -> None:
    marker = f"mailer-killed-{os.getpid()}"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from sqlalchemy import text; from mailer import db\n"
            "with db.session_scope() as s:\n"
            f"    s.execute(text(\"SELECT pg_sleep(60), '{marker}'\"))\n",
        ],
        env={**os.environ, "MAILER_DATABASE_URL": pg_db},
    )
    # autocommit: pg_stat_activity is read once a transaction
    watcher = create_engine(pg_db, isolation_level="AUTOCOMMIT")
    running = text(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE :q AND pid <> pg_backend_pid()"
    )
    try:
        deadline = time.monotonic() + 20
        with watcher.connect() as conn:
            while conn.execute(running, {"q": f"%{marker}%"}).scalar() == 0:
                assert time.monotonic() < deadline, "the child's statement never started"
                time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait()
        killed = time.monotonic()
        # the server notices the client gone within the check interval (5 s), not in 60 s
        with watcher.connect() as conn:
            while conn.execute(running, {"q": f"%{marker}%"}).scalar() > 0:
                assert time.monotonic() - killed < db.CONNECTION_CHECK_MS / 1000 + 5
                time.sleep(0.2)
    finally:
        child.kill()
        watcher.dispose()
