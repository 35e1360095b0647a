"""Memory: `mailer campaign send` streams a one-million-row CSV in bounded memory (slow; CI runs
it on its own with `-m slow`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, func, select

from mailer.models import Delivery

ROWS = 1_000_000
MAX_RSS_KIB = 150 * 1024
CHUNK = 1000
TIMEOUT = 1800.0


def _write_csv(path: Path) -> None:
    with path.open("w", encoding="utf-8") as out:
        out.write("email,name,code\n")
        for start in range(0, ROWS, 10_000):
            out.write(
                "".join(
                    f"user{i}@example{i % 100}.com,Name {i},{i:07d}\n"
                    for i in range(start, start + 10_000)
                )
            )


def _mailer(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-m", "mailer", *args], env=env, check=True, timeout=120)


# Linux keeps a process's peak RSS across exec, and a child forked from this test process
# starts at its size (hundreds of MiB after the other slow tests): the command is started by a
# small Python that forks it afresh and reports the command's own peak
_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run_measured(argv: list[str], env: dict[str, str], log: Path) -> tuple[int, int, float]:
    """Run argv; its exit status, its own peak RSS in KiB and the wall time."""
    peak = log.with_suffix(".peak")
    started = time.perf_counter()
    with log.open("wb") as output:
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(peak), *argv],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=TIMEOUT,
            check=False,
        )
    return done.returncode, int(peak.read_text()), time.perf_counter() - started


@pytest.mark.slow
def test_a_million_row_campaign_is_queued_in_bounded_memory(
    tmp_path: Path, clean_broker: str
) -> None:
    recipients = tmp_path / "million.csv"
    _write_csv(recipients)
    (tmp_path / "subject.txt").write_text("Hello {{ name }}")
    (tmp_path / "text.txt").write_text("Hi {{ name }}, your code is {{ code }}.\n")
    database = f"sqlite:///{tmp_path / 'million.db'}"
    env = {
        **os.environ,
        "MAILER_DATABASE_URL": database,
        "MAILER_BROKER_URL": clean_broker,
        "MAILER_FROM": "news@example.com",
        "MAILER_SMTP_URL": "smtp://127.0.0.1:9?tls=none",
        "MAILER_LOG_LEVEL": "WARNING",
        "MAILER_CHUNK_SIZE": str(CHUNK),
    }
    _mailer(env, "db", "upgrade")
    _mailer(
        env,
        "template",
        "add",
        "million",
        "--subject",
        str(tmp_path / "subject.txt"),
        "--text",
        str(tmp_path / "text.txt"),
    )

    log = tmp_path / "campaign.log"
    argv = [
        sys.executable,
        "-m",
        "mailer",
        "campaign",
        "send",
        "--template",
        "million",
        "--recipients",
        str(recipients),
    ]
    status, peak_kib, elapsed = _run_measured(argv, env, log)
    output = log.read_text()
    print(
        f"\n{ROWS:,} rows in {elapsed:.1f} s = {ROWS / elapsed:,.0f} rows/s; "
        f"peak RSS {peak_kib / 1024:.1f} MiB\n{output.strip()}"
    )
    assert status == 0, output
    assert f"{ROWS} queued" in output
    engine = create_engine(database)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Delivery)) == ROWS
    engine.dispose()
    broker = redis.Redis.from_url(clean_broker)
    assert broker.llen("bulk") == ROWS // CHUNK  # every delivery's wake-up was published
    broker.flushdb()
    assert peak_kib < MAX_RSS_KIB, f"peak RSS {peak_kib / 1024:.1f} MiB, limit 150 MiB"
