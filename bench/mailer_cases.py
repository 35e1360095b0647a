"""The benchmark's mailer cases: a campaign drained by a real worker (PostgreSQL, SQLite, without
PIPELINING, through the delay proxy, with transactional sends during it), enqueue from a CSV,
and transactional latency with an idle worker."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import infra
from infra import BENCH, PROCS, PYTHON, BenchError
from session import (
    Bench,
    code_check,
    epoch,
    fresh_database,
    mailer_fingerprint,
    now,
    percentile,
    run_json,
    tail,
)

from mailer import config


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
