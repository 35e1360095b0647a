"""The benchmark's cases besides mailer itself: what each case measures (CASES), the raw SMTP
clients and smtp-source (the ceilings), and the naive Celery pattern."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from typing import Any

import infra
from infra import BENCH, PROCS, PYTHON, BenchError
from session import Bench, now, run_json, tail

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
