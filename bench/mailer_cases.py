"""The benchmark's mailer cases: a campaign drained by a real worker (PostgreSQL, SQLite, without
PIPELINING, through the delay proxy, with transactional sends during it), enqueue from a CSV,
and transactional latency with an idle worker."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import infra
from infra import BENCH, PROCS, PYTHON, BenchError
from outbox import Drain, Outbox, latencies, start_mailer_worker, worker_errors
from session import (
    Bench,
    code_check,
    epoch,
    fresh_database,
    mailer_fingerprint,
    now,
    run_json,
    tail,
)

from mailer import config


class _CPUWindow:
    """The worker's CPU from its first claim on (its start-up is not the drain) to the moment
    the campaign is seen drained, and the machine's and PostgreSQL's over the same window."""

    def __init__(self, rss: Any, n: int) -> None:
        self.rss, self.n = rss, n
        self.start: tuple[float, tuple[int, int], int, float] | None = None
        self.end: tuple[float, tuple[int, int], float] | None = None

    def mark(self, left: int) -> None:
        if self.start is None and left < self.n:
            self.start = (
                self.rss.cpu_seconds(),
                infra.machine_cpu(),
                left,
                infra.postgres_cpu(),
            )
        if left == 0:
            self.end = (self.rss.cpu_seconds(), infra.machine_cpu(), infra.postgres_cpu())

    def figures(self) -> dict[str, Any]:
        if self.start is None or self.end is None:
            return {}
        worker_cpu = self.end[0] - self.start[0]
        return {
            "worker_cpu_s": worker_cpu,
            "worker_cpu_ms_per_msg": worker_cpu * 1000 / max(self.start[2], 1),
            "postgres_cpu_ms_per_msg": (self.end[2] - self.start[3]) * 1000 / max(self.start[2], 1),
            "machine_cpu_busy": infra.busy_fraction(self.start[1], self.end[1]),
        }


def _campaign_env(b: Bench, kind: str, url: str, smtp_url: str) -> tuple[dict[str, str], int]:
    """The worker's environment and process count for a kind of case."""
    env = b.mailer_env(url, smtp_url)
    concurrency = b.args.mailer_concurrency
    if kind == "pg-rtt":
        # a relay 20 ms away: more processes, each sending over many sessions at once
        env["MAILER_SMTP_SESSIONS"] = str(b.args.rtt_sessions)
        concurrency = b.args.rtt_concurrency
    return env, concurrency


def _enqueue_campaign(env: dict[str, str], d: Path, n: int) -> dict[str, Any]:
    """Migrate the schema and enqueue an n-recipient campaign with no worker running."""
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
    return enq


def _start_txn_sender(
    b: Bench, env: dict[str, str], d: Path, interval: float, stop_file: Path
) -> Any:
    """A process calling mailer.send() every `interval` until `stop_file` exists."""
    return PROCS.start(
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


def _enqueue_figures(enq: dict[str, Any], n: int) -> dict[str, Any]:
    return {
        "enqueue_per_s": n / (enq["end"] - enq["start"]),
        "enqueue_insert_per_s": n / (enq["rows_inserted"] - enq["start"])
        if enq["rows_inserted"] > enq["start"]
        else None,
        "enqueue_seconds": enq["end"] - enq["start"],
        "enqueue_commit_publish_seconds": enq["end"] - enq["rows_inserted"],
        "producer_peak_rss_mb": enq["peak_rss_kb"] / 1024,
    }


def _memory_figures(rss: Any) -> dict[str, Any]:
    """Stop the sampler; the worker tree's memory over the drain."""
    peak = rss.stop()
    return {
        "worker_peak_rss_mb": peak / 1024,
        "worker_sum_vmhwm_mb": rss.hwm_kb / 1024,
        "worker_peak_pss_mb": rss.pss_peak_kb / 1024,
        "worker_processes": rss.processes,
    }


def _drain_figures(
    outbox: Outbox, m: int, t_spawn: float, t_seen: float
) -> tuple[dict[str, int], int, dict[str, Any]]:
    """The message's states, its attempts, and the drain's rates and times, from the DB."""
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
    rates = {
        "msgs_per_s": sent / (last_commit - first_attempt)
        if sent and last_commit and first_attempt
        else None,
        "msgs_per_s_from_spawn": sent / (last_commit - t_spawn) if sent and last_commit else None,
        "drain_seconds": (last_commit - first_attempt) if last_commit and first_attempt else None,
        "worker_startup_seconds": (first_attempt - t_spawn) if first_attempt else None,
        "drained_seen_after_last_commit_s": t_seen - last_commit if last_commit else None,
    }
    return states, attempts, rates


def case_mailer(
    b: Bench, label: str, kind: str, smtp_url: str, n: int, *, txn: bool = False
) -> dict[str, Any]:
    d = b.rundir(label)
    code = mailer_fingerprint()  # what the producer and the worker import
    url = fresh_database(b, kind, d)
    b.redis.flush()
    env, concurrency = _campaign_env(b, kind, url, smtp_url)
    enq = _enqueue_campaign(env, d, n)
    outbox = Outbox(url)
    base = b.sink.count()
    sender = None
    interval = 0.0
    stop_file = d / "stop-txn"
    worker = start_mailer_worker(b, env, d, concurrency)
    t_spawn = now()
    rss = infra.RSSSampler(worker.pid)
    drain = Drain(b, outbox, worker, d)
    cpu = _CPUWindow(rss, n)
    try:
        mid = enq["message_id"]
        if txn:
            # start calling mailer.send() once the worker has claimed its first chunk
            drain.watch(label, message_id=mid, done=lambda left: left < n, on_poll=cpu.mark)
            expected = b.estimates.get(kind, n / 500)
            interval = max(0.02, 0.8 * expected / b.args.txn_count)
            sender = _start_txn_sender(b, env, d, interval, stop_file)
        # the campaign's own deliveries first, then (after the sender stops) everything
        t_seen = drain.watch(label, message_id=mid, on_poll=cpu.mark)
        if sender is not None:
            stop_file.touch()
            sender.wait(60)
            drain.drained(label)
        rss.sample(pss=True)  # the end of the drain, whenever the last reading was
    finally:
        memory = _memory_figures(rss)
        if sender is not None:
            PROCS.stop(sender, grace=5)
        PROCS.stop(worker, grace=15)
    states, attempts, rates = _drain_figures(outbox, enq["message_id"], t_spawn, t_seen)
    out: dict[str, Any] = {
        "recipients": n,
        "states": states,
        "attempts": attempts,
        "sink_received": b.sink.count() - base,
        **_enqueue_figures(enq, n),
        **memory,
        **rates,
        "worker_task_errors": worker_errors(d)[0],
        **code_check(code),
        "producer_cpu_s": enq["cpu_s"],
        "producer_cpu_ms_per_1k": enq["cpu_s"] * 1e6 / n,
        **cpu.figures(),
    }
    sent = states.get("sent", 0)
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
    drain = Drain(b, outbox, worker, d)
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
        drain.drained("txn-idle warm-up", timeout=120)
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
        drain.drained("txn-idle", timeout=120)
    finally:
        PROCS.stop(worker, grace=15)
    result = latencies(outbox, out["sends"], out.get("warm_up"))
    result["warm_up_messages"] = latencies(outbox, warm["sends"])
    result["interval_s"] = b.args.txn_idle_interval
    result.update(code_check(code))
    outbox.close()
    return result
