"""The bench session (its work directory, redis-server, sink and PostgreSQL) and the helpers
every case uses: helper processes, timestamps, statistics and fresh databases."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import infra
from infra import PROCS, ROOT, BenchError


def now() -> float:
    return time.time()


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def run_json(argv: list[str], env: dict[str, str], log: Path, timeout: float) -> dict[str, Any]:
    """Run a helper process to completion (as a tracked process) and parse its JSON line."""
    out = log.with_suffix(".out")
    proc = PROCS.start(argv, env=env, stdout=out, log=log)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(argv[1:3])} did not finish in {timeout:.0f}s") from None
    finally:
        PROCS.stop(proc, grace=2)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[1:3])} exited with {proc.returncode}: {tail(log)}")
    lines = out.read_text().strip().splitlines()
    if not lines:
        raise BenchError(f"{' '.join(argv[1:3])} printed nothing: {tail(log)}")
    return dict(json.loads(lines[-1]))


def tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except FileNotFoundError:
        return "(no log)"


def mailer_fingerprint() -> str:
    """A hash of mailer/'s sources now: runs that differ here ran different code (mailer is
    being edited while benchmarks run)."""
    digest = hashlib.sha1()
    for path in sorted((ROOT / "mailer").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        with contextlib.suppress(OSError):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def code_check(before: str) -> dict[str, Any]:
    """The mailer code a run started with, and a flag when it changed during the run."""
    after = mailer_fingerprint()
    out: dict[str, Any] = {"mailer_code": before}
    if after != before:
        out["mailer_code_changed_to"] = after
    return out


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    redis: infra.Redis
    sink: infra.Sink
    pg_url: str | None
    pg_note: str | None
    proxy: infra.DelayProxy | None = None
    run_no: int = 0
    estimates: dict[str, float] = field(default_factory=dict)

    def rundir(self, label: str) -> Path:
        self.run_no += 1
        path = self.workdir / f"{self.run_no:02d}-{label}"
        path.mkdir()
        return path

    def delay_proxy(self) -> infra.DelayProxy:
        if self.proxy is None:
            self.proxy = infra.DelayProxy(self.workdir, self.sink.port, self.args.rtt_ms / 2000)
        return self.proxy

    def mailer_env(self, database_url: str, smtp_url: str) -> dict[str, str]:
        # e.g. rate=1000000/s: the shaping hook on, its limit out of reach
        smtp_url = infra.with_options(smtp_url, self.args.relay_options)
        env = dict(os.environ)
        env.update(
            MAILER_DATABASE_URL=database_url,
            MAILER_BROKER_URL=self.redis.url,
            MAILER_SMTP_URL=smtp_url,
            MAILER_FROM=content_sender(),
            MAILER_LOG_LEVEL="WARNING",
            PYTHONDONTWRITEBYTECODE="1",
        )
        return env


def content_sender() -> str:
    import content

    return content.SENDER


def pg_execute(url: str, *statements: str, autocommit: bool = False) -> None:
    """Run statements on PostgreSQL over a connection of their own (in one transaction, or
    each on its own with `autocommit`, as CHECKPOINT needs)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    level = "AUTOCOMMIT" if autocommit else "READ COMMITTED"
    eng = create_engine(url, poolclass=NullPool, isolation_level=level)
    try:
        with eng.begin() as conn:
            for sql in statements:
                conn.execute(text(sql))
    finally:
        eng.dispose()


def fresh_database(b: Bench, kind: str, d: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{d / 'mailer.db'}"
    if b.pg_url is None:
        raise BenchError(f"PostgreSQL unavailable: {b.pg_note}")
    return fresh_schema(b.pg_url, b.args.pg_schema)


def fresh_schema(pg_url: str, schema: str) -> str:
    """An empty PostgreSQL schema (dropped first if it exists), and the URL that uses it."""
    pg_execute(pg_url, f"DROP SCHEMA IF EXISTS {schema} CASCADE", f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in pg_url else "?"
    return f"{pg_url}{sep}options=-csearch_path%3D{schema}"
