"""The dispatcher stops on SIGTERM even inside a long statement, and leaves none running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.helpers import wait_until

EXIT_WITHIN = 5.0


def test_sigterm_cancels_the_statement_in_flight_and_exits(
    pg_db: str, clean_broker: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "MAILER_DATABASE_URL": pg_db,
        "MAILER_BROKER_URL": clean_broker,
        "MAILER_DISPATCH_INTERVAL": "0.2",
        "MAILER_LOG_LEVEL": "INFO",
    }
    holder = create_engine(pg_db)
    lock = holder.connect()
    # the test's lock makes the dispatcher's first statement (expire's UPDATE) wait, as a
    # long statement would
    lock.execute(text("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE"))
    log = tmp_path / "dispatcher.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailer", "dispatcher"], env=env, stdout=out, stderr=out
        )
    try:
        blocked = wait_until(lambda: _blocked_on_lock(holder, lock), timeout=30.0, every=0.1)
        assert blocked, log.read_text()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=EXIT_WITHIN + 5)
        took = time.monotonic() - started
        assert took < EXIT_WITHIN, (took, log.read_text())
        assert proc.returncode == 0, log.read_text()
        # the server is not left running it: nothing waits on the lock any more
        assert wait_until(lambda: not _blocked_on_lock(holder, lock), timeout=2.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lock.rollback()
        lock.close()
        holder.dispose()


def _blocked_on_lock(eng: object, lock: object) -> bool:
    """Whether a backend waits for the lock that `lock`'s backend holds."""
    with eng.connect() as conn:  # type: ignore[attr-defined]
        holder_pid = lock.execute(text("SELECT pg_backend_pid()")).scalar()  # type: ignore[attr-defined]
        waiting = conn.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
            {"pid": holder_pid},
        ).scalar()
        return bool(waiting)
