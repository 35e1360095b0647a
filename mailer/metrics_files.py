"""The directory where a prefork worker's processes keep their metrics (prometheus_client's
multiprocess mode): where it is, emptied at worker start, the dead processes' gauges removed.

PROMETHEUS_MULTIPROC_DIR is prometheus_client's own variable, read by the library when it is
imported (it then keeps every value in a file a process there); mailer only looks up where it
points, so that it is named once for both.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from prometheus_client import multiprocess

log = logging.getLogger(__name__)
VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# a live gauge's file, per process: gauge_livesum_<pid>.db (prometheus_client's naming)
_LIVE_GAUGE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def directory() -> Path | None:
    """The multiprocess directory, or None when the metrics are per process."""
    value = os.environ.get(VARIABLE)
    return Path(value) if value else None


def clean(path: Path) -> int:
    """Empty `path` of metric files (a worker starting: what its processes counted before is
    gone, and a counter starting again from zero is a reset Prometheus understands); returns
    how many were removed. The directory is made if missing."""
    path.mkdir(parents=True, exist_ok=True)
    removed = 0
    for f in path.glob("*.db"):
        f.unlink(missing_ok=True)
        removed += 1
    return removed


def mark_dead(pid: int, path: Path) -> None:
    """Process `pid` is gone: its live gauges (open sessions) stop counting; its counters and
    histograms stay, as what it did."""
    multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def sweep(path: Path) -> list[int]:
    """Mark dead every process with live gauges in `path` that no longer runs (a pool process
    killed, which could not say so itself); returns their pids. Only right where this process
    sees the worker's processes (the same host, or the same PID namespace)."""
    gone = []
    for f in path.glob("gauge_live*.db"):
        match = _LIVE_GAUGE.match(f.name)
        if match and not _alive(int(match.group(1))):
            gone.append(int(match.group(1)))
    for pid in sorted(set(gone)):
        log.info("metrics: process %d is gone, its live gauges removed", pid)
        mark_dead(pid, path)
    return sorted(set(gone))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it runs, as another user
    return True
