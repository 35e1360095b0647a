"""What the benchmark records about the machine it ran on, and the PostgreSQL probe."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import timeit
from datetime import UTC, datetime
from typing import Any

from infra import ROOT
from session import Bench, mailer_fingerprint


def yardstick_ms() -> float:
    """A fixed pure-Python workload's time in ms (best of 5): the machine under a session
    changes, and this says by how much, where msgs/s alone cannot."""

    def work() -> int:
        table: dict[int, str] = {}
        for i in range(200_000):
            table[i % 1000] = str(i)
        return len(table)

    return min(timeit.repeat(work, number=1, repeat=5)) * 1000


def machine_info(b: Bench | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "yardstick_ms_start": yardstick_ms(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        info["mem_total_mb"] = int(f.readline().split()[1]) // 1024
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    for dist in ("celery", "kombu", "sqlalchemy", "psycopg", "redis", "jinja2"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            info[dist] = version(dist)
    with contextlib.suppress(Exception):
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "mailer"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        info["git_head"] = head
        info["mailer_dirty_files"] = dirty.splitlines()
    info["mailer_code"] = mailer_fingerprint()
    return info


def pg_probe(url: str) -> tuple[str | None, str | None]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    try:
        eng = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
        with eng.connect() as conn:
            version = conn.execute(text("SHOW server_version")).scalar()
        eng.dispose()
        return url, f"PostgreSQL {version}"
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
