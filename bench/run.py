"""Side-by-side throughput benchmark of mailer against its ceilings and the naive pattern.

    .venv/bin/python bench/run.py [--runs 3] [--recipients 20000] [--quick] [--only a,b]
                                  [--json bench/results/latest.json]

Everything runs on loopback in one session, against one SMTP sink (Postfix's smtp-sink when
installed, else bench/pysink.py), one private redis-server on a free port, a PostgreSQL schema
of its own (`mailer_bench` in database `test`, recreated and migrated for every run) and SQLite
files in a temporary directory. Every figure is the median of --runs runs; each run's raw
numbers, the settings and the machine go to the JSON file. See CASES for what each measures.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import infra
from infra import BENCH, PROCS, PYTHON, ROOT, BenchError

from mailer import config

PENDING = ("queued", "sending", "deferred")
# the ratios reported (numerator / denominator), of the medians and within each round
RATIOS = [
    *(
        (num, den)
        for num in ("mailer-pg", "mailer-sqlite")
        for den in ("lockstep", "pipelined", "smtp-source", "naive")
    ),
    ("mailer-pg-lockstep", "lockstep"),
    ("mailer-pg-rtt20", "lockstep-rtt20"),
    ("mailer-pg-rtt20", "pipelined-rtt20"),
]

CASES: dict[str, str] = {
    "lockstep": "(b) ceiling: 2 processes, each one persistent smtplib session, sendmail() in a "
    "loop of the same pre-built ~2 KB message; no queue, no DB. msgs/s = messages / (last "
    "process end - common start).",
    "pipelined": "(f) ceiling: 2 processes, each one raw socket using PIPELINING as an MTA "
    "does (body + '.' + next MAIL/RCPT/DATA in one write: 1 round trip per message).",
    "smtp-source": "(f) target 2b's reference, as the issue names it: Postfix's smtp-source "
    "(C) -> smtp-sink, --source-sessions (4) sessions kept open (-d), the same ~2 KB message. "
    "smtp-source does not pipeline (its man page: 'No SMTP command pipelining support'): it "
    "is C in lockstep. msgs/s = N / smtp-source's whole run (start to exit).",
    "naive": "(c) naive Celery: one task per message, each renders the same template, opens a "
    "new SMTP connection, sendmail(), QUIT; Celery defaults, worker --pool prefork "
    "--concurrency 2 (already running); msgs/s = N / (first publish -> the sink counted N).",
    "mailer-pg": "(d) mailer on PostgreSQL: send_campaign(N) with no worker running (enqueue "
    "rate, producer peak RSS), then `python -m mailer worker` drains it; msgs/s = sent / "
    "(first attempt started -> last delivery's outcome committed, from the DB); the rate "
    "from worker spawn is given too.",
    "mailer-sqlite": "(d) the same on SQLite (a fresh WAL file per run).",
    "mailer-pg-lockstep": "(d) mailer-pg with PIPELINING off (`?pipelining=off` on the relay "
    "URL): every command waits for its reply, as the lockstep ceiling's do.",
    "enqueue-csv": "(e) enqueue from a file: `mailer campaign send` of a --csv-recipients row "
    "CSV into PostgreSQL and the broker, as a user runs it; rate = rows / the process's "
    "whole life (start-up, every row committed, every wake-up published); its peak RSS.",
    "txn-busy": "(g) transactional latency under load: a mailer-pg campaign drains while "
    "mailer.send() is called every ~2% of the expected drain time (up to 50 calls); enqueue = "
    "the call's duration; end to end = the delivery's updated_at (state sent) - call time.",
    "txn-idle": "(g) the same latencies with an idle worker (after one warm-up message).",
    "lockstep-rtt20": "(h) context: the lockstep client through the delay proxy.",
    "pipelined-rtt20": "(h) context: the pipelined client through the delay proxy.",
    "mailer-pg-rtt20": "(h) mailer-pg end to end through bench/delayproxy.py, which holds "
    "every chunk 10 ms each way (20 ms round trip) in front of the sink; the worker runs as "
    "for a remote relay: --rtt-concurrency processes with MAILER_SMTP_SESSIONS=--rtt-sessions.",
}
DEFAULT_ORDER = list(CASES)


# --- helpers --------------------------------------------------------------------------------------


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


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


# --- the session ----------------------------------------------------------------------------------


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


# --- (b), (f): the raw clients --------------------------------------------------------------------


def case_client(b: Bench, mode: str, port: int, total: int, processes: int) -> dict[str, Any]:
    d = b.rundir(mode)
    base = b.sink.count()
    start_at = now() + 1.0  # every process connected and waiting by then
    per = [total // processes + (1 if i < total % processes else 0) for i in range(processes)]
    procs = [
        PROCS.start(
            [
                PYTHON,
                str(BENCH / "clients.py"),
                mode,
                "--port",
                str(port),
                "--count",
                str(n),
                "--start-at",
                str(start_at),
            ],
            stdout=d / f"client{i}.out",
            log=d / f"client{i}.log",
        )
        for i, n in enumerate(per)
    ]
    timeout = 60 + total * 0.2
    try:
        for p in procs:
            p.wait(timeout)
    finally:
        for p in procs:
            PROCS.stop(p, grace=1)
    results = []
    for i, p in enumerate(procs):
        if p.returncode != 0:
            raise BenchError(
                f"{mode} client {i} exited {p.returncode}: {tail(d / f'client{i}.log')}"
            )
        results.append(json.loads((d / f"client{i}.out").read_text().strip().splitlines()[-1]))
    sent = sum(r["sent"] for r in results)
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    infra.wait_for(lambda: b.sink.count() - base >= sent, 5)
    cpu = sum(r["cpu_s"] for r in results)
    return {
        "client_cpu_ms_per_msg": cpu * 1000 / sent,
        "msgs_per_s": sent / (end - start),
        "messages": sent,
        "processes": processes,
        "seconds": end - start,
        "sink_received": b.sink.count() - base,
        "per_process": results,
    }


def case_source(b: Bench, total: int, sessions: int) -> dict[str, Any]:
    """Postfix's smtp-source: `sessions` sessions kept open (-d), `total` messages in all, each
    the pre-built message (as a file of LF lines: smtp-source ends each line with CRLF and
    dot-stuffs it). Timed over the whole program (start, connect, send, QUIT): a few ms more
    than the raw clients' common start, which is not exposed by smtp-source."""
    import content

    exe = infra.postfix_tool("smtp-source")
    assert exe is not None  # main() skips the case without it
    d = b.rundir("smtp-source")
    message = d / "message.txt"
    message.write_bytes(content.build_message().replace(b"\r\n", b"\n"))
    argv = [exe, "-s", str(sessions), "-d", "-m", str(total), "-F", str(message)]
    argv += ["-f", content.SENDER, "-t", content.recipient(0)["email"]]
    argv.append(f"127.0.0.1:{b.sink.port}")
    base = b.sink.count()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = now()
    proc = PROCS.start(argv, log=d / "smtp-source.log")
    try:
        proc.wait(60 + total * 0.2)
    except subprocess.TimeoutExpired:
        raise BenchError(f"smtp-source did not finish: {tail(d / 'smtp-source.log')}") from None
    finally:
        PROCS.stop(proc, grace=1)
    t1 = now()
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise BenchError(f"smtp-source exited {proc.returncode}: {tail(d / 'smtp-source.log')}")
    infra.wait_for(lambda: b.sink.count() - base >= total, 5)
    received = b.sink.count() - base
    if received != total:
        raise BenchError(f"smtp-source sent {total} messages, the sink counted {received}")
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    return {
        "client_cpu_ms_per_msg": cpu * 1000 / total,
        "msgs_per_s": total / (t1 - t0),
        "messages": total,
        "sessions": sessions,
        "seconds": t1 - t0,
        "sink_received": received,
    }


# --- (c): naive Celery ----------------------------------------------------------------------------


class NaiveWorker:
    def __init__(self, b: Bench) -> None:
        self.dir = b.workdir / "naive-worker"
        self.dir.mkdir(exist_ok=True)
        self.env = dict(os.environ)
        self.env.update(
            BENCH_BROKER_URL=b.redis.url,
            BENCH_SMTP_PORT=str(b.sink.port),
            PYTHONPATH=str(BENCH),
        )
        b.redis.flush()
        self.log = self.dir / "worker.log"
        self.proc = PROCS.start(
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "naive_celery",
                "worker",
                "--pool",
                b.args.pool,
                "--concurrency",
                str(b.args.concurrency),
                "--loglevel",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            env=self.env,
            log=self.log,
            cwd=BENCH,
        )
        # ready when a few warm-up messages reached the sink (both pool processes touched)
        base = b.sink.count()
        warm = 2 * b.args.concurrency
        run_json(
            [PYTHON, str(BENCH / "naive_celery.py"), "publish", str(warm)],
            self.env,
            self.dir / "warm.log",
            60,
        )
        if not infra.wait_for(lambda: b.sink.count() - base >= warm, 60, 0.05):
            raise BenchError(f"the naive Celery worker did not deliver: {tail(self.log)}")

    def stop(self) -> None:
        PROCS.stop(self.proc)


def case_naive(b: Bench, worker: NaiveWorker) -> dict[str, Any]:
    d = b.rundir("naive")
    n = b.args.naive_recipients
    base = b.sink.count()
    rss = infra.RSSSampler(worker.proc.pid)
    cpu0 = (rss.cpu_seconds(), infra.machine_cpu())
    publisher = PROCS.start(
        [PYTHON, str(BENCH / "naive_celery.py"), "publish", str(n)],
        env=worker.env,
        stdout=d / "publish.out",
        log=d / "publish.log",
    )
    try:
        last, last_change = 0, now()
        while True:
            got = b.sink.count() - base
            t = now()
            if got >= n:
                cpu1 = (rss.cpu_seconds(), infra.machine_cpu())
                break
            if got != last:
                last, last_change = got, t
            elif t - last_change > b.args.stall_timeout:
                raise BenchError(f"naive: the sink stalled at {got}/{n}: {tail(worker.log)}")
            time.sleep(0.02)
        publisher.wait(30)
    finally:
        PROCS.stop(publisher, grace=2)
        peak = rss.stop()
        pss = rss.pss_peak_kb
    if publisher.returncode != 0:
        raise BenchError(
            f"naive publisher exited {publisher.returncode}: {tail(d / 'publish.log')}"
        )
    pub = json.loads((d / "publish.out").read_text().strip().splitlines()[-1])
    return {
        "msgs_per_s": n / (t - pub["first_publish"]),
        "messages": n,
        "seconds": t - pub["first_publish"],
        "publish_seconds": pub["published"] - pub["first_publish"],
        "worker_peak_rss_mb": peak / 1024,
        "worker_peak_pss_mb": pss / 1024,
        "worker_cpu_s": cpu1[0] - cpu0[0],
        "worker_cpu_ms_per_msg": (cpu1[0] - cpu0[0]) * 1000 / n,
        "machine_cpu_busy": infra.busy_fraction(cpu0[1], cpu1[1]),
    }


# --- (d), (g), (h): mailer ------------------------------------------------------------------------


class Outbox:
    """Read-only access to the benchmark's outbox (plain SQLAlchemy Core on mailer's tables)."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.engine = create_engine(url, poolclass=NullPool)

    def scalar(self, sql: str, **params: Any) -> Any:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())

    def pending(self, message_id: int | None = None) -> int:
        only = " AND message_id = :m" if message_id is not None else ""
        return int(
            self.scalar(
                "SELECT count(*) FROM deliveries WHERE state IN ('queued','sending','deferred')"
                + only,
                m=message_id,
            )
        )

    def states(self, message_id: int | None = None) -> dict[str, int]:
        where = "WHERE message_id = :m" if message_id is not None else ""
        return {
            str(s): int(c)
            for s, c in self.rows(
                f"SELECT state, count(*) FROM deliveries {where} GROUP BY state", m=message_id
            )
        }

    def close(self) -> None:
        self.engine.dispose()


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


def start_mailer_worker(b: Bench, env: dict[str, str], d: Path, concurrency: int) -> Any:
    argv = [PYTHON, "-m", "mailer", "worker", "--pool", b.args.pool]
    if b.args.pool != "solo":
        argv += ["--concurrency", str(concurrency)]
    return PROCS.start(argv, env=env, log=d / "worker.log")


def worker_errors(d: Path) -> tuple[int, str]:
    """Tasks that raised, as the worker logged them (count, the first such line)."""
    try:
        text = (d / "worker.log").read_text(errors="replace")
    except FileNotFoundError:
        return 0, ""
    lines = [line for line in text.splitlines() if "raised unexpected" in line]
    return len(lines), (lines[0][:600] if lines else "")


def watch(
    b: Bench,
    outbox: Outbox,
    worker: Any,
    d: Path,
    what: str,
    *,
    message_id: int | None = None,
    done: Callable[[int], bool] = lambda left: left == 0,
    on_poll: Callable[[int], None] | None = None,
    timeout: float | None = None,
) -> float:
    """Poll the outbox until done(pending) (default: no delivery queued, sending or deferred);
    returns when that was seen. Fails on a dead worker, on no progress for --stall-timeout,
    and after 10 s without progress when the worker logged failed tasks."""
    last, last_change = -1, now()
    deadline = now() + timeout if timeout else None
    while True:
        left = outbox.pending(message_id)
        t = now()
        if on_poll is not None:
            on_poll(left)
        if done(left):
            return t
        if worker.poll() is not None:
            raise BenchError(
                f"{what}: the worker exited ({worker.returncode}) with {left} deliveries "
                f"pending: {tail(d / 'worker.log')}"
            )
        if left != last:
            last, last_change = left, t
        else:
            stalled = t - last_change
            errors, first = worker_errors(d) if stalled > 10 else (0, "")
            if errors or stalled > b.args.stall_timeout:
                raise BenchError(
                    f"{what}: no progress for {stalled:.0f}s, {left} pending, states "
                    f"{outbox.states()}; {errors} task(s) failed in the worker, the first: "
                    f"{first or '-'}; worker log tail: {tail(d / 'worker.log', 800)}"
                )
        if deadline and t > deadline:
            raise BenchError(f"{what}: not drained after {timeout:.0f}s ({left} pending)")
        time.sleep(b.args.poll)


def wait_drained(
    b: Bench, outbox: Outbox, worker: Any, d: Path, what: str, timeout: float | None = None
) -> float:
    return watch(b, outbox, worker, d, what, timeout=timeout)


def latencies(
    outbox: Outbox, sends: list[dict[str, Any]], warm: dict[str, Any] | None = None
) -> dict[str, Any]:
    if not sends:
        return {"count": 0}
    cold = {"first_call_s": warm["returned"] - warm["call"]} if warm else {}
    ids = ",".join(str(int(s["message_id"])) for s in sends)
    done: dict[int, float | None] = {}
    picked: dict[int, float | None] = {}
    states: dict[str, int] = {}
    for message_id, state, updated, started in outbox.rows(
        "SELECT d.message_id, d.state, d.updated_at, "
        "(SELECT min(a.started_at) FROM attempts a WHERE a.delivery_id = d.id) "
        f"FROM deliveries d WHERE d.message_id IN ({ids})"
    ):
        states[str(state)] = states.get(str(state), 0) + 1
        if state == "sent":
            done[int(message_id)] = epoch(updated)
            picked[int(message_id)] = epoch(started)
    enqueue = [s["returned"] - s["call"] for s in sends]
    e2e = [done[s["message_id"]] - s["call"] for s in sends if done.get(s["message_id"])]
    # the wait until a worker began the SMTP transaction (queueing behind other work)
    pickup = [picked[s["message_id"]] - s["call"] for s in sends if picked.get(s["message_id"])]
    return {
        "count": len(sends),
        "sent": len(e2e),
        "states": states,
        "enqueue_p50": percentile(enqueue, 50),
        "enqueue_p99": percentile(enqueue, 99),
        "e2e_p50": percentile(e2e, 50),
        "e2e_p99": percentile(e2e, 99),
        "e2e_max": max(e2e) if e2e else None,
        "pickup_p50": percentile(pickup, 50),
        "pickup_p99": percentile(pickup, 99),
        "enqueue_s": enqueue,
        "e2e_s": e2e,
        "pickup_s": pickup,
        **cold,
    }


def case_mailer(
    b: Bench, label: str, kind: str, smtp_url: str, n: int, *, txn: bool = False
) -> dict[str, Any]:
    d = b.rundir(label)
    code = mailer_fingerprint()  # what the producer and the worker import
    url = fresh_database(b, kind, d)
    b.redis.flush()
    env = b.mailer_env(url, smtp_url)
    concurrency = b.args.mailer_concurrency
    if kind == "pg-rtt":
        # a relay 20 ms away: more processes, each sending over many sessions at once
        env["MAILER_SMTP_SESSIONS"] = str(b.args.rtt_sessions)
        concurrency = b.args.rtt_concurrency
    timeout = 300
    run_json([PYTHON, str(BENCH / "produce.py"), "setup"], env, d / "setup.log", timeout)
    enq = run_json(
        [PYTHON, str(BENCH / "produce.py"), "campaign", str(n)],
        env,
        d / "campaign.log",
        timeout + n / 50,
    )
    if enq["queued"] != n:
        raise BenchError(f"send_campaign queued {enq['queued']} of {n}: {enq}")
    outbox = Outbox(url)
    base = b.sink.count()
    sender = None
    stop_file = d / "stop-txn"
    worker = start_mailer_worker(b, env, d, concurrency)
    t_spawn = now()
    rss = infra.RSSSampler(worker.pid)
    try:
        mid = enq["message_id"]
        cpu: dict[str, Any] = {}

        def mark(left: int) -> None:
            # the worker's CPU from its first claim on (its start-up is not the drain) ...
            if "start" not in cpu and left < n:
                cpu["start"] = (rss.cpu_seconds(), infra.machine_cpu(), left)
            # ... to the moment the campaign is seen drained
            if left == 0:
                cpu["end"] = (rss.cpu_seconds(), infra.machine_cpu())

        if txn:
            # start calling mailer.send() once the worker has claimed its first chunk
            watch(
                b,
                outbox,
                worker,
                d,
                label,
                message_id=mid,
                done=lambda left: left < n,
                on_poll=mark,
            )
            expected = b.estimates.get(kind, n / 500)
            interval = max(0.02, 0.8 * expected / b.args.txn_count)
            sender = PROCS.start(
                [
                    PYTHON,
                    str(BENCH / "produce.py"),
                    "txn",
                    "--count",
                    str(b.args.txn_count),
                    "--interval",
                    f"{interval:.4f}",
                    "--stop-file",
                    str(stop_file),
                    "--warm-up",
                    "0",
                ],
                env=env,
                stdout=d / "txn.out",
                log=d / "txn.log",
            )
        # the campaign's own deliveries first, then (after the sender stops) everything
        t = watch(b, outbox, worker, d, label, message_id=mid, on_poll=mark)
        t_seen = t
        if sender is not None:
            stop_file.touch()
            sender.wait(60)
            wait_drained(b, outbox, worker, d, label)
        rss.sample(pss=True)  # the end of the drain, whenever the last reading was
    finally:
        peak = rss.stop()
        hwm = rss.hwm_kb
        pss = rss.pss_peak_kb
        workers = rss.processes
        if sender is not None:
            PROCS.stop(sender, grace=5)
        PROCS.stop(worker, grace=15)
    m = enq["message_id"]
    states = outbox.states(m)
    first_attempt = epoch(
        outbox.scalar(
            "SELECT min(a.started_at) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id "
            "WHERE d.message_id = :m",
            m=m,
        )
    )
    last_commit = epoch(
        outbox.scalar("SELECT max(updated_at) FROM deliveries WHERE message_id = :m", m=m)
    )
    attempts = int(
        outbox.scalar(
            "SELECT count(*) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id "
            "WHERE d.message_id = :m",
            m=m,
        )
    )
    sent = states.get("sent", 0)
    out: dict[str, Any] = {
        "recipients": n,
        "states": states,
        "attempts": attempts,
        "sink_received": b.sink.count() - base,
        "enqueue_per_s": n / (enq["end"] - enq["start"]),
        "enqueue_insert_per_s": n / (enq["rows_inserted"] - enq["start"])
        if enq["rows_inserted"] > enq["start"]
        else None,
        "enqueue_seconds": enq["end"] - enq["start"],
        "enqueue_commit_publish_seconds": enq["end"] - enq["rows_inserted"],
        "producer_peak_rss_mb": enq["peak_rss_kb"] / 1024,
        "worker_peak_rss_mb": peak / 1024,
        "worker_sum_vmhwm_mb": hwm / 1024,
        "worker_peak_pss_mb": pss / 1024,
        "worker_processes": workers,
        "msgs_per_s": sent / (last_commit - first_attempt)
        if sent and last_commit and first_attempt
        else None,
        "msgs_per_s_from_spawn": sent / (last_commit - t_spawn) if sent and last_commit else None,
        "drain_seconds": (last_commit - first_attempt) if last_commit and first_attempt else None,
        "worker_startup_seconds": (first_attempt - t_spawn) if first_attempt else None,
        "drained_seen_after_last_commit_s": t_seen - last_commit if last_commit else None,
        "worker_task_errors": worker_errors(d)[0],
        **code_check(code),
        "producer_cpu_s": enq["cpu_s"],
        "producer_cpu_ms_per_1k": enq["cpu_s"] * 1e6 / n,
    }
    if "start" in cpu and "end" in cpu:
        worker_cpu = cpu["end"][0] - cpu["start"][0]
        out["worker_cpu_s"] = worker_cpu
        out["worker_cpu_ms_per_msg"] = worker_cpu * 1000 / max(cpu["start"][2], 1)
        out["machine_cpu_busy"] = infra.busy_fraction(cpu["start"][1], cpu["end"][1])
    if sent != n:
        out["error"] = f"only {sent} of {n} deliveries ended sent: {states}"
    if sender is not None:
        txn_out = json.loads((d / "txn.out").read_text().strip().splitlines()[-1])
        out["txn"] = latencies(outbox, txn_out["sends"], txn_out.get("warm_up"))
        out["txn"]["interval_s"] = interval
    outbox.close()
    if out["drain_seconds"]:
        b.estimates.setdefault(kind, out["drain_seconds"])
    return out


def fresh_pg_case(b: Bench, label: str) -> tuple[Path, str, str, dict[str, str]]:
    """A run's directory, the mailer code it starts with, and a migrated PostgreSQL schema
    (its URL and the environment pointing there), with the broker emptied."""
    d = b.rundir(label)
    code = mailer_fingerprint()
    url = fresh_database(b, "pg", d)
    b.redis.flush()
    env = b.mailer_env(url, b.sink.url)
    run_json([PYTHON, str(BENCH / "produce.py"), "setup"], env, d / "setup.log", 300)
    return d, code, url, env


def case_enqueue_csv(b: Bench, n: int) -> dict[str, Any]:
    import content

    d, code, _, env = fresh_pg_case(b, "enqueue-csv")
    path = b.workdir / f"recipients-{n}.csv"
    if not path.exists():  # written once a session, outside the measurement
        content.write_csv(path, n)
    argv = [PYTHON, "-m", "mailer", "campaign", "send", "--template", content.TEMPLATE]
    argv += ["--recipients", str(path)]
    for name, value in content.HEADERS.items():
        argv += ["--header", f"{name}: {value}"]
    t0 = now()
    proc = PROCS.start(argv, env=env, log=d / "campaign.log")
    rss = infra.RSSSampler(proc.pid, interval=0.1)
    try:
        proc.wait(300 + n / 1000)
        elapsed = now() - t0
    except subprocess.TimeoutExpired:
        raise BenchError(f"mailer campaign send did not finish in {300 + n / 1000:.0f}s") from None
    finally:
        rss.stop()
        PROCS.stop(proc, grace=2)
    log = tail(d / "campaign.log")
    if proc.returncode != 0 or f"{n} queued" not in log:
        raise BenchError(f"mailer campaign send exited with {proc.returncode}: {log}")
    published = int(b.redis.client.llen("bulk"))
    chunk = config.load(env).chunk_size  # the producer's: its setting, or mailer's default
    if published != -(-n // chunk):
        raise BenchError(f"{published} wake-ups in the broker for {n} rows")
    return {
        "recipients": n,
        "enqueue_per_s": n / elapsed,
        "enqueue_seconds": elapsed,
        "producer_cpu_s": sum(rss.ticks.values()) / infra.CLK_TCK,
        "producer_peak_rss_mb": rss.hwm_kb / 1024,
        "wakeups_published": published,
        **code_check(code),
    }


def case_txn_idle(b: Bench) -> dict[str, Any]:
    d, code, url, env = fresh_pg_case(b, "txn-idle")
    outbox = Outbox(url)
    worker = start_mailer_worker(b, env, d, b.args.mailer_concurrency)
    try:
        # warm-up messages: the worker is up, and its processes' SMTP sessions and DB
        # connections are (most likely all) open
        warm = run_json(
            [
                PYTHON,
                str(BENCH / "produce.py"),
                "txn",
                "--count",
                str(2 * b.args.mailer_concurrency),
                "--interval",
                "0.05",
                "--to-prefix",
                "warm",
            ],
            env,
            d / "warm.log",
            60,
        )
        wait_drained(b, outbox, worker, d, "txn-idle warm-up", timeout=120)
        out = run_json(
            [
                PYTHON,
                str(BENCH / "produce.py"),
                "txn",
                "--count",
                str(b.args.txn_count),
                "--interval",
                str(b.args.txn_idle_interval),
                "--warm-up",
                "0.5",
            ],
            env,
            d / "txn.log",
            60 + b.args.txn_count * b.args.txn_idle_interval,
        )
        wait_drained(b, outbox, worker, d, "txn-idle", timeout=120)
    finally:
        PROCS.stop(worker, grace=15)
    result = latencies(outbox, out["sends"], out.get("warm_up"))
    result["warm_up_messages"] = latencies(outbox, warm["sends"])
    result["interval_s"] = b.args.txn_idle_interval
    result.update(code_check(code))
    outbox.close()
    return result


# --- the table ------------------------------------------------------------------------------------


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric figure (and of the `txn` sub-figures) over the good runs."""
    ok = [r for r in runs if "exception" not in r]
    out: dict[str, Any] = {}
    keys = {k for r in ok for k, v in r.items() if isinstance(v, int | float)}
    for key in sorted(keys):
        out[key] = median([r.get(key) for r in ok])
    sub = {k for r in ok for k, v in r.get("txn", {}).items() if isinstance(v, int | float)}
    if sub:
        out["txn"] = {k: median([r.get("txn", {}).get(k) for r in ok]) for k in sorted(sub)}
    return out


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _worker_rss(m: dict[str, Any]) -> str:
    return f"{m.get('worker_peak_rss_mb', 0):.0f} MB (PSS {m.get('worker_peak_pss_mb', 0):.0f})"


def _latencies(t: dict[str, Any]) -> str:
    """The transactional send's latencies: the call, and end to end."""
    return (
        f"call p50/p99 {fmt_ms(t.get('enqueue_p50'))}/{fmt_ms(t.get('enqueue_p99'))} ms, "
        f"end to end p50/p99 {fmt_ms(t.get('e2e_p50'))}/{fmt_ms(t.get('e2e_p99'))} ms"
    )


def summarize(
    report: dict[str, Any], args: argparse.Namespace
) -> tuple[list[list[str]], dict[str, float]]:
    """Table rows (what, msgs/s, CPU ms/msg, notes) and the ratios, from the runs' medians."""
    cases = report["cases"]
    rows: list[list[str]] = []
    conc = f"{args.pool} -c {args.concurrency}"
    for case, c in cases.items():
        if "skipped" in c:
            rows.append([case, "-", "-", c["skipped"]])
            continue
        m = c["median"] = _medians(c["runs"])
        errs = sum(1 for r in c["runs"] if "exception" in r)
        bad = f"; {errs} of {len(c['runs'])} run(s) FAILED" if errs else ""
        codes = {r.get("mailer_code") for r in c["runs"]} | {
            r["mailer_code_changed_to"] for r in c["runs"] if "mailer_code_changed_to" in r
        }
        codes.discard(None)
        if len(codes) > 1:
            bad += f"; mailer/ CHANGED between or during runs ({len(codes)} versions)"
        busy = m.get("machine_cpu_busy")
        machine = f"; machine {busy:.0%} busy" if busy is not None else ""
        if case in ("lockstep", "pipelined", "smtp-source", "lockstep-rtt20", "pipelined-rtt20"):
            via = f", through the {args.rtt_ms:g} ms RTT proxy" if case.endswith("rtt20") else ""
            who = f"{args.clients} client processes"
            if case == "smtp-source":
                who = f"{m.get('sessions', 0):.0f} sessions, no PIPELINING"
            notes = f"{m.get('messages', 0):.0f} msgs, {who}{via}"
            cpu = m.get("client_cpu_ms_per_msg")
            rows.append([case, fmt_rate(m.get("msgs_per_s")), _cpu(cpu), notes + bad])
        elif case == "naive":
            notes = f"{m.get('messages', 0):.0f} msgs, {conc}; worker RSS {_worker_rss(m)}{machine}"
            cpu = m.get("worker_cpu_ms_per_msg")
            rows.append([case, fmt_rate(m.get("msgs_per_s")), _cpu(cpu), notes + bad])
        elif case.startswith("mailer") or case == "txn-busy":
            how = f"{args.pool} -c {args.mailer_concurrency}"
            if case == "mailer-pg-lockstep":
                how += ", PIPELINING off"
            if case.endswith("rtt20"):
                how = (
                    f"{args.pool} -c {args.rtt_concurrency}, "
                    f"MAILER_SMTP_SESSIONS={args.rtt_sessions}"
                )
            notes = (
                f"{m.get('recipients', 0):.0f} rcpts, {how}; "
                f"{fmt_rate(m.get('msgs_per_s_from_spawn'))}/s from worker spawn; enqueue "
                f"{fmt_rate(m.get('enqueue_per_s'))}/s; peak RSS producer "
                f"{m.get('producer_peak_rss_mb', 0):.0f} MB, worker {_worker_rss(m)}{machine}"
            )
            if case == "txn-busy":
                t = m.get("txn", {})
                notes = f"send() during the campaign: {_latencies(t)}; " + notes
            cpu = m.get("worker_cpu_ms_per_msg")
            rows.append([case, fmt_rate(m.get("msgs_per_s")), _cpu(cpu), notes + bad])
        elif case == "enqueue-csv":
            notes = (
                f"{fmt_rate(m.get('enqueue_per_s'))} recipients/s: {m.get('recipients', 0):,.0f} "
                f"CSV rows in {m.get('enqueue_seconds', 0):.1f} s, process start to exit; "
                f"peak RSS {m.get('producer_peak_rss_mb', 0):.0f} MB"
            )
            rows.append([case, "-", "-", notes + bad])
        elif case == "txn-idle":
            notes = (
                f"send() to an idle worker: {_latencies(m)}; first call "
                f"of a process {fmt_ms(m.get('first_call_s'))} ms"
            )
            rows.append([case, "-", "-", notes + bad])

    def rate(case: str) -> float | None:
        value = cases.get(case, {}).get("median", {}).get("msgs_per_s")
        return float(value) if value else None

    ratios: dict[str, float] = {}
    for num, den in RATIOS:
        a, b = rate(num), rate(den)
        if a and b:
            ratios[f"{num} / {den}"] = a / b
    return rows, ratios


def round_ratios(report: dict[str, Any], ratios: dict[str, float]) -> dict[str, list[float]]:
    """Each ratio within each round (the runs of a round were made minutes apart): how much
    of a ratio's spread is the machine's."""
    out: dict[str, list[float]] = {}
    for num, den in RATIOS:
        name = f"{num} / {den}"
        if name not in ratios:
            continue
        a = report["cases"][num]["runs"]
        b = report["cases"][den]["runs"]
        out[name] = [
            x["msgs_per_s"] / y["msgs_per_s"]
            for x, y in zip(a, b, strict=False)
            if x.get("msgs_per_s") and y.get("msgs_per_s")
        ]
    return out


def print_table(
    rows: list[list[str]],
    ratios: dict[str, float],
    runs: int,
    by_round: dict[str, list[float]],
) -> None:
    head = ["what", "msgs/s", "CPU ms/msg", f"notes (median of {runs} run(s))"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    print()
    print(f"{head[0]:<{widths[0]}}  {head[1]:>{widths[1]}}  {head[2]:>{widths[2]}}  {head[3]}")
    print(f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * widths[2]}  {'-' * 40}")
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
    print(
        "\nmsgs/s: mailer = sent / (first attempt -> last outcome committed, from the DB); "
        "naive = N / (first publish -> the sink\ncounted N); clients = N / (common start -> "
        "last client done). CPU ms/msg: the sending processes only (worker tree\nor clients), "
        "not PostgreSQL, Redis or the sink. Other jobs on this machine make absolute figures "
        "noisy."
    )
    if ratios:
        print("\nratios (msgs/s): of the medians; and within each round, lowest to highest")
        for k, v in ratios.items():
            spread = sorted(by_round.get(k, []))
            rounds = f"   rounds {spread[0]:.2f}-{spread[-1]:.2f}" if len(spread) > 1 else ""
            print(f"  {k:<34} {v:6.2f}{rounds}")
    print()


# --- machine --------------------------------------------------------------------------------------


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


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs per case; figures are medians")
    p.add_argument(
        "--recipients",
        type=int,
        default=20000,
        help="campaign size (mailer) and message count (raw clients)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 run, 5000 recipients, smaller naive/latency cases",
    )
    p.add_argument("--only", help="comma-separated cases: " + ",".join(DEFAULT_ORDER))
    p.add_argument("--json", default=str(BENCH / "results" / "latest.json"), help="output file")
    p.add_argument(
        "--pool",
        default="prefork",
        choices=["prefork", "threads", "solo"],
        help="worker pool, mailer and naive alike",
    )
    p.add_argument("--concurrency", type=int, default=2, help="the naive worker's concurrency")
    p.add_argument(
        "--mailer-concurrency",
        type=int,
        default=os.cpu_count() or 1,
        help="mailer worker processes (default: mailer's own default, the CPU count)",
    )
    p.add_argument("--clients", type=int, default=2, help="processes of the raw clients")
    p.add_argument(
        "--source-sessions",
        type=int,
        default=4,
        help="smtp-source's sessions (the issue measured it with 4)",
    )
    p.add_argument("--naive-recipients", type=int, default=3000)
    p.add_argument(
        "--csv-recipients", type=int, default=1_000_000, help="rows of the enqueue-csv file"
    )
    p.add_argument(
        "--rtt-recipients", type=int, default=10000, help="campaign size through the delay proxy"
    )
    p.add_argument(
        "--rtt-concurrency",
        type=int,
        default=4,
        help="worker processes for the remote-relay case (README: a relay far away)",
    )
    p.add_argument(
        "--rtt-sessions",
        type=int,
        default=32,
        help="MAILER_SMTP_SESSIONS for the remote-relay case",
    )
    p.add_argument("--rtt-ms", type=float, default=20.0, help="round trip the proxy adds")
    p.add_argument("--txn-count", type=int, default=50)
    p.add_argument("--txn-idle-interval", type=float, default=0.1)
    p.add_argument("--sink", default="auto", choices=["auto", "smtp-sink", "python"])
    p.add_argument(
        "--pg-url",
        default=os.environ.get(
            "MAILER_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    p.add_argument("--pg-schema", default="mailer_bench")
    p.add_argument("--poll", type=float, default=0.25, help="seconds between DB polls")
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="give up a run after this long without progress",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, SQLite)")
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 1
        args.recipients = 5000
        args.naive_recipients = min(args.naive_recipients, 1000)
        args.rtt_recipients = min(args.rtt_recipients, 2000)
        args.csv_recipients = min(args.csv_recipients, 100_000)
    selected = args.only.split(",") if args.only else DEFAULT_ORDER
    unknown = [c for c in selected if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {','.join(CASES)}")
    args.cases = [c for c in DEFAULT_ORDER if c in selected]
    return args


def settle(b: Bench) -> None:
    """Before every run: the writes of the runs before it (a million-row enqueue leaves
    gigabytes for PostgreSQL's checkpointer and the kernel to flush) are flushed now, not
    during this run's measurement."""
    os.sync()
    if b.pg_url is None:
        return
    try:
        pg_execute(b.pg_url, "CHECKPOINT", autocommit=True)
    except Exception as exc:  # e.g. a role not allowed to: the run goes on unsettled
        print(f"  (CHECKPOINT failed: {exc.__class__.__name__}; runs may pay for earlier writes)")


class CaseRunner:
    """One case's runs. The runs of all cases are taken in turn (a run of each, then the
    next round), so that the machine's slow spells fall on every case alike and the ratios
    compare runs made at about the same time."""

    def __init__(self, b: Bench, case: str) -> None:
        self.b, self.case = b, case
        self.runs: list[dict[str, Any]] = []
        self.naive: list[NaiveWorker] = []
        a = b.args
        rtt_mode = case.split("-")[0]
        # the raw clients through the proxy: about 4 s of sending at its round trip
        per_msg = (4 if rtt_mode == "lockstep" else 1) * a.rtt_ms / 1000
        rtt_count = max(a.clients * 10, int(4.0 / per_msg) * a.clients)
        jobs: dict[str, Callable[[], dict[str, Any]]] = {
            "lockstep": lambda: case_client(b, case, b.sink.port, a.recipients, a.clients),
            "pipelined": lambda: case_client(b, case, b.sink.port, a.recipients, a.clients),
            "lockstep-rtt20": lambda: case_client(
                b, rtt_mode, b.delay_proxy().port, rtt_count, a.clients
            ),
            "pipelined-rtt20": lambda: case_client(
                b, rtt_mode, b.delay_proxy().port, rtt_count, a.clients
            ),
            "smtp-source": lambda: case_source(b, a.recipients, a.source_sessions),
            "naive": self._naive_run,
            "mailer-pg": lambda: case_mailer(b, case, "pg", b.sink.url, a.recipients),
            "mailer-sqlite": lambda: case_mailer(b, case, "sqlite", b.sink.url, a.recipients),
            "mailer-pg-lockstep": lambda: case_mailer(
                b, case, "pg", b.sink.url + "&pipelining=off", a.recipients
            ),
            "enqueue-csv": lambda: case_enqueue_csv(b, a.csv_recipients),
            "txn-busy": lambda: case_mailer(b, case, "pg", b.sink.url, a.recipients, txn=True),
            "txn-idle": lambda: case_txn_idle(b),
            "mailer-pg-rtt20": lambda: case_mailer(
                b, case, "pg-rtt", b.delay_proxy().url, a.rtt_recipients
            ),
        }
        self.job = jobs[case]

    def _naive_run(self) -> dict[str, Any]:
        if not self.naive:  # started on the first run; readiness failures count as that run's
            self.naive.append(NaiveWorker(self.b))
        return case_naive(self.b, self.naive[0])

    def close(self) -> None:
        for worker in self.naive:
            worker.stop()
        self.naive.clear()

    def once(self) -> None:
        case = self.case
        settle(self.b)
        t0 = now()
        try:
            result = self.job()
        except Exception as exc:
            result = {
                "exception": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
            print(f"  ! {case}: {result['exception'][:2000]}", flush=True)
        result["wall_seconds"] = now() - t0
        self.runs.append(result)
        show = result.get("msgs_per_s")
        extra = ""
        if "txn" in result or case == "txn-idle":
            t = result.get("txn", result)
            extra = (
                f" send() p50 {fmt_ms(t.get('enqueue_p50'))} ms, end-to-end p50/p99 "
                f"{fmt_ms(t.get('e2e_p50'))}/{fmt_ms(t.get('e2e_p99'))} ms"
            )
        if "enqueue_per_s" in result:
            extra += f" (enqueue {fmt_rate(result['enqueue_per_s'])}/s)"
        print(
            f"  {case} run {len(self.runs)}: {fmt_rate(show)} msgs/s{extra} "
            f"[{result['wall_seconds']:.1f}s]",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    infra.install_signal_handlers()
    workdir = Path(tempfile.mkdtemp(prefix="mailer-bench-"))
    report: dict[str, Any] = {"cases": {}}
    b: Bench | None = None
    failed = False
    t_start = now()
    try:
        report["machine"] = machine_info(None)
        pg_url, pg_note = pg_probe(args.pg_url)
        redis = infra.Redis(workdir)
        sink = infra.Sink(workdir, args.sink)
        b = Bench(args, workdir, redis, sink, pg_url, pg_note)
        report["config"] = {
            "args": {k: v for k, v in vars(args).items() if k != "cases"},
            "cases": args.cases,
            "sink": {"kind": sink.kind, "argv": sink.argv},
            "redis": {"version": redis.version, "url": redis.url},
            "postgresql": pg_note,
            "pg_schema": args.pg_schema,
            "mailer_env_passed_through": {
                k: v
                for k, v in os.environ.items()
                if k.startswith("MAILER_")
                and k
                not in (
                    "MAILER_DATABASE_URL",
                    "MAILER_BROKER_URL",
                    "MAILER_SMTP_URL",
                    "MAILER_FROM",
                    "MAILER_LOG_LEVEL",
                )
            },
            "message_bytes": len(__import__("content").build_message()),
        }
        print(
            f"mailer bench: {len(args.cases)} case(s) x {args.runs} run(s); sink {sink.kind} "
            f":{sink.port}, redis :{redis.port}, {pg_note}; work dir {workdir}",
            flush=True,
        )
        runners: dict[str, CaseRunner] = {}
        for case in args.cases:
            print(f"- {case}: {CASES[case]}", flush=True)
            skip = None
            if case.startswith(("mailer-pg", "txn")) and pg_url is None:
                skip = f"PostgreSQL unavailable: {pg_note}"
            if case == "smtp-source" and infra.postfix_tool("smtp-source") is None:
                skip = "smtp-source is not installed (apt-get install postfix)"
            if skip:
                report["cases"][case] = {"description": CASES[case], "runs": [], "skipped": skip}
                print(f"  skipped: {skip}")
                continue
            runners[case] = CaseRunner(b, case)
        try:
            for round_no in range(args.runs):
                if args.runs > 1:
                    print(f"round {round_no + 1} of {args.runs}", flush=True)
                for runner in runners.values():
                    runner.once()
        finally:
            for runner in runners.values():
                runner.close()
        for case, runner in runners.items():
            failed |= any("exception" in r or "error" in r for r in runner.runs)
            report["cases"][case] = {"description": CASES[case], "runs": runner.runs}
        rows, ratios = summarize(report, args)
        report["summary"] = [
            {
                "what": r[0],
                "msgs_per_s": report["cases"][r[0]].get("median", {}).get("msgs_per_s"),
                "cpu_ms_per_msg": r[2],
                "notes": r[3],
            }
            for r in rows
        ]
        report["ratios"] = ratios
        report["ratios_by_round"] = by_round = round_ratios(report, ratios)
        report["machine"]["yardstick_ms_end"] = yardstick_ms()
        print_table(rows, ratios, args.runs, by_round)
        print(
            "machine yardstick (a fixed pure-Python loop, lower is faster; compare machines "
            f"with it): {report['machine']['yardstick_ms_start']:.1f} ms at the start, "
            f"{report['machine']['yardstick_ms_end']:.1f} ms at the end\n"
        )
    except BaseException as exc:
        failed = True
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
        if not isinstance(exc, KeyboardInterrupt | SystemExit):
            traceback.print_exc()
        else:
            print(f"\ninterrupted ({exc!r}); stopping everything", file=sys.stderr)
    finally:
        PROCS.stop_all()
        if b is not None and b.pg_url is not None:
            with contextlib.suppress(Exception):
                pg_execute(b.pg_url, f"DROP SCHEMA IF EXISTS {args.pg_schema} CASCADE")
        report.setdefault("machine", {})["loadavg_end"] = os.getloadavg()
        report["machine"]["bench_seconds"] = now() - t_start
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {out}")
        if args.keep or failed:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
