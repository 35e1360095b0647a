"""The scale run's cases, each measured on one outbox (empty, or with the history): a campaign
drained by a real worker, the read-side commands on a 1M-recipient campaign, a suppression
import, a dispatcher pass over 1M due rows, and sending resumed after Redis is lost."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import content
import infra
import scale_load
from infra import BENCH, PROCS, PYTHON, BenchError
from outbox import Drain, Outbox, start_mailer_worker
from session import epoch, run_json, tail


@dataclass
class Side:
    """One outbox of the comparison and what the cases share on it."""

    name: str  # "empty" or "history"
    schema: str
    pg_url: str
    workdir: Path
    redis: infra.Redis
    sink: infra.Sink
    args: Any

    @property
    def url(self) -> str:
        return scale_load.schema_url(self.pg_url, self.schema, self.args.log_slow, self.app)

    @property
    def app(self) -> str:
        """The application_name of mailer's connections to this outbox: its schema's, so that
        two runs on one server (other schemas) never take each other's statements for their
        own orphans."""
        return f"mailer-scale-{self.schema}"[:63]

    def orphans(self) -> list[dict[str, Any]]:
        """Statements of this outbox's mailer processes still running on the server once the
        case has stopped them all (a client killed mid-statement): cancelled, and listed."""
        active = (
            "FROM pg_stat_activity WHERE application_name = %s AND state = 'active' "
            "AND backend_type = 'client backend'"
        )
        rows = self.sql(
            "SELECT pid, extract(epoch FROM now() - query_start), left(query, 300), "
            f"pg_cancel_backend(pid) {active}",
            self.app,
        )
        # a cancel is asynchronous: wait for it, so that the next case starts clean
        infra.wait_for(lambda: not self.sql(f"SELECT 1 {active}", self.app), 10, 0.2)
        return [{"pid": r[0], "running_s": float(r[1]), "statement": r[2]} for r in rows]

    def dir(self, case: str) -> Path:
        path = self.workdir / f"{self.name}-{case}"
        path.mkdir(exist_ok=True)
        return path

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            MAILER_DATABASE_URL=self.url,
            MAILER_BROKER_URL=self.redis.url,
            MAILER_SMTP_URL=self.sink.url,
            MAILER_FROM=content.SENDER,
            MAILER_LOG_LEVEL="WARNING",
            PYTHONDONTWRITEBYTECODE="1",
        )
        env.update(extra)
        return env

    def sql(self, statement: str, *params: Any) -> Any:
        with scale_load.connect(self.pg_url, self.schema) as conn:
            conn.execute(f"SET statement_timeout = {int(self.args.case_timeout * 1000)}")
            cur = conn.execute(statement, list(params))
            return cur.fetchall() if cur.description else cur.rowcount

    def campaign(self, size: int, state: str | None, *, when: datetime | None = None) -> int:
        """A synthetic campaign of `size` deliveries (all in `state`, or final by the
        history's shares); returns its campaign id (its message id is message_of())."""
        with scale_load.connect(self.pg_url, self.schema) as conn:
            conn.execute(f"SET statement_timeout = {int(self.args.case_timeout * 1000)}")
            row = conn.execute("SELECT max(id) FROM templates").fetchone()
            template = int(row[0]) if row and row[0] else _template(conn)
            campaign_id, _ = scale_load.insert_campaign(
                conn,
                None,
                template,
                when or datetime.now(UTC),
                size,
                900 + size % 97,
                2 * size + 1,
                state,
            )
            conn.execute("ANALYZE deliveries")
        return campaign_id

    def message_of(self, campaign_id: int) -> int:
        return int(self.sql("SELECT id FROM messages WHERE campaign_id = %s", campaign_id)[0][0])


def _template(conn: Any) -> int:
    row = conn.execute(
        "INSERT INTO templates (name, version, subject, text, html, created_at) "
        "VALUES ('scale-news', 1, 'News', 'Hello {{ name }}', NULL, now()) RETURNING id"
    ).fetchone()
    return int(row[0])


def timed_process(
    argv: list[str], env: dict[str, str], d: Path, label: str, timeout: float
) -> dict[str, Any]:
    """Run a command to its end (bounded), its wall time, peak RSS and output file."""
    out = d / f"{label}.out"
    t0 = time.monotonic()
    proc = PROCS.start(argv, env=env, stdout=out, log=d / f"{label}.log")
    rss = infra.RSSSampler(proc.pid, interval=0.1)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{label}: stalled, not done after {timeout:.0f}s") from None
    finally:
        elapsed = time.monotonic() - t0
        rss.stop()
        PROCS.stop(proc, grace=2)
    if proc.returncode != 0:
        raise BenchError(f"{label} exited with {proc.returncode}: {tail(d / f'{label}.log')}")
    return {"seconds": elapsed, "peak_rss_mb": rss.hwm_kb / 1024, "out": out}


def mailer_cli(side: Side, d: Path, label: str, *words: str) -> dict[str, Any]:
    argv = [PYTHON, "-m", "mailer", *words]
    return timed_process(argv, side.env(), d, label, side.args.command_timeout)


def helper(side: Side, d: Path, cmd: str, ident: int, **env: str) -> dict[str, Any]:
    argv = [PYTHON, str(BENCH / "scale_helper.py"), cmd, str(ident)]
    return run_json(argv, side.env(**env), d / f"helper-{cmd}.log", side.args.command_timeout)


# --- a: a campaign drained by a worker -------------------------------------------------------


def _worker(side: Side, d: Path, env: dict[str, str]) -> Any:
    b = SimpleNamespace(args=side.args)
    return start_mailer_worker(b, env, d, side.args.concurrency)  # type: ignore[arg-type]


class CountedOutbox(Outbox):
    """Polled through the campaign's state counts, as `campaign status` reads them: counting
    the campaign's rows at each poll cost 200 ms of the server's time on the history side,
    taken from the worker it watches."""

    def pending(self, message_id: int | None = None) -> int:
        if message_id is None:
            return super().pending(None)
        found = self.counted(message_id)
        return sum(found.get(state, 0) for state in ("queued", "sending", "deferred"))

    def counted(self, message_id: int) -> dict[str, int]:
        from sqlalchemy.orm import Session

        from mailer import counts

        campaign = self.scalar("SELECT campaign_id FROM messages WHERE id = :m", m=message_id)
        with Session(self.engine) as session:
            return counts.campaign(session, int(campaign))


def _enqueue(side: Side, d: Path, env: dict[str, str], n: int) -> dict[str, Any]:
    """A campaign of n recipients queued by bench/produce.py, as a producer would."""
    run_json([PYTHON, str(BENCH / "produce.py"), "setup"], env, d / "setup.log", 600)
    return run_json(
        [PYTHON, str(BENCH / "produce.py"), "campaign", str(n)],
        env,
        d / "enqueue.log",
        side.args.case_timeout,
    )


def case_campaign(side: Side) -> dict[str, Any]:
    n = side.args.campaign
    d = side.dir("campaign")
    env = side.env()
    side.redis.flush()
    enq = _enqueue(side, d, env, n)
    m = int(enq["message_id"])
    outbox = CountedOutbox(side.url)
    worker = _worker(side, d, env)
    try:
        drain = Drain(SimpleNamespace(args=side.args), outbox, worker, d)  # type: ignore[arg-type]
        drain.watch("campaign", message_id=m, timeout=side.args.case_timeout)
    finally:
        PROCS.stop(worker, grace=15)
    first, last, sent = outbox.rows(
        "SELECT min(a.started_at), max(d.updated_at), count(*) FILTER (WHERE d.state = 'sent') "
        "FROM deliveries d LEFT JOIN attempts a ON a.delivery_id = d.id WHERE d.message_id = :m",
        m=m,
    )[0]
    outbox.close()
    seconds = (epoch(last) or 0) - (epoch(first) or 0)
    return {
        "recipients": n,
        "sent": int(sent),
        "enqueue_s": enq["end"] - enq["start"],
        "drain_s": seconds,
        "msgs_per_s": int(sent) / seconds if seconds > 0 else None,
    }


# --- d: status, report, retry on a 1M-recipient campaign ---------------------------------------


def case_retry(side: Side) -> dict[str, Any]:
    """`mailer retry` of a campaign of --big failed deliveries while a worker sends another
    campaign: the retry's time, and the worker's rate during it against its rate before."""
    d = side.dir("retry")
    env = side.env()
    side.redis.flush()
    failed = side.campaign(side.args.big, "failed")
    m = int(_enqueue(side, d, env, 3 * side.args.campaign)["message_id"])
    outbox = CountedOutbox(side.url)
    worker = _worker(side, d, env)
    try:
        time.sleep(10)  # the worker at its pace
        t0, sent0 = time.monotonic(), outbox.counted(m).get("sent", 0)
        time.sleep(5)
        t1, sent1 = time.monotonic(), outbox.counted(m).get("sent", 0)
        retry = mailer_cli(side, d, "retry", "retry", "--campaign", str(failed))
        t2, sent2 = time.monotonic(), outbox.counted(m).get("sent", 0)
    finally:
        PROCS.stop(worker, grace=15)
        outbox.close()
    return {
        "failed": side.args.big,
        "retry_s": retry["seconds"],
        "retry_said": retry["out"].read_text().strip().splitlines()[-1],
        "rate_before": (sent1 - sent0) / (t1 - t0),
        "rate_during": (sent2 - sent1) / (t2 - t1),
        "campaign_left": 3 * side.args.campaign - sent2,
    }


def case_read_side(side: Side) -> dict[str, Any]:
    n = side.args.big
    d = side.dir("read-side")
    t0 = time.monotonic()
    cid = side.campaign(n, None)
    out: dict[str, Any] = {"recipients": n, "insert_s": time.monotonic() - t0}
    status = mailer_cli(side, d, "status", "campaign", "status", str(cid))
    out["status_cli_s"] = status["seconds"]
    out["status_call"] = _call(side, d, "status", cid)
    report = mailer_cli(side, d, "report", "report", str(cid), "--format", "csv")
    with report["out"].open("rb") as f:
        lines = sum(1 for _ in f)
    out.update(report_s=report["seconds"], report_peak_rss_mb=report["peak_rss_mb"])
    out["report_rows"] = lines - 1
    out["status_peak_rss_mb"] = status["peak_rss_mb"]  # the same process with no rows to hold
    report["out"].unlink()
    try:
        retry = mailer_cli(side, d, "retry", "retry", "--campaign", str(cid), "--dry-run")
    except BenchError as exc:  # the figures so far stand; the stall is this row's result
        out["retry_error"] = str(exc)
        out["left_running"] = side.orphans()
        return out
    out["retry_cli_s"] = retry["seconds"]
    out["retry_said"] = retry["out"].read_text().strip()
    out["retry_call"] = _call(side, d, "retry", cid)
    return out


def _call(side: Side, d: Path, cmd: str, ident: int) -> dict[str, Any]:
    try:
        got = helper(side, d, cmd, ident)
    except BenchError as exc:
        return {"error": str(exc)}
    got.pop("result", None)
    return got


# --- e: a suppression import ------------------------------------------------------------------


def suppression_csv(workdir: Path, n: int) -> Path:
    path = workdir / f"suppressions-{n}.csv"
    if not path.exists():
        with path.open("w") as f:
            f.write("email,reason\n")
            for i in range(n):
                f.write(f"gone{i}@old{i % 1000}.example.net,imported from the old provider\n")
    return path


def case_suppress(side: Side) -> dict[str, Any]:
    n = side.args.big
    d = side.dir("suppress")
    path = suppression_csv(side.workdir, n)
    run = mailer_cli(side, d, "import", "suppress", "import", str(path))
    return {
        "addresses": n,
        "seconds": run["seconds"],
        "per_s": n / run["seconds"],
        "peak_rss_mb": run["peak_rss_mb"],
        "said": tail(d / "import.log", 200) or run["out"].read_text().strip()[-200:],
    }


# --- b: a dispatcher pass over 1M due rows ---------------------------------------------------


def case_dispatch(side: Side) -> dict[str, Any]:
    n = side.args.big
    d = side.dir("dispatch")
    when = datetime.now(UTC) - timedelta(hours=1)
    cid = side.campaign(n, "deferred", when=when)
    # due an hour ago and never published: every row needs a wake-up
    side.redis.flush()
    run = mailer_cli(side, d, "dispatcher", "dispatcher", "--once")
    said = run["out"].read_text().strip()
    published = int(said.split()[1].rstrip(",")) if said.startswith("published") else None
    out = {"due": n, "pass_s": run["seconds"], "published": published, "said": said}
    cancel = mailer_cli(side, d, "cancel", "cancel", "--campaign", str(cid))
    out["cancel_s"] = cancel["seconds"]
    out["cancel_said"] = cancel["out"].read_text().strip()
    return out


# --- c: Redis lost with 1M rows queued --------------------------------------------------------


def restart_redis(redis: infra.Redis, d: Path) -> float:
    """SIGKILL the private redis-server and start it again, empty, on the same port; returns
    when it accepts connections."""
    argv = [str(a) for a in redis.proc.args]  # type: ignore[union-attr]
    PROCS.stop(redis.proc, grace=0, sig=signal.SIGKILL)
    redis.proc = PROCS.start(argv, log=d / "redis-again.log")
    infra.wait_port(redis.port, proc=redis.proc)
    return time.time()


def case_redis_lost(side: Side) -> dict[str, Any]:
    n = side.args.big
    d = side.dir("redis-lost")
    cid = side.campaign(n, "queued")
    m = side.message_of(cid)
    side.redis.flush()
    pub = helper(side, d, "publish", m)
    knobs = {"MAILER_REPUBLISH_AFTER": "5", "MAILER_DISPATCH_INTERVAL": "1"}
    env = side.env(**knobs)
    bound = 5 + 2 * 1 + 2
    dispatcher = PROCS.start([PYTHON, "-m", "mailer", "dispatcher"], env=env, log=d / "disp.log")
    worker = _worker(side, d, env)
    out: dict[str, Any] = {"queued": n, "wakeups_published": pub["published"], "bound_s": bound}
    try:
        before = _attempt_mark(side)
        if not infra.wait_for(lambda: _attempt_mark(side) - before >= 2000, 120, 0.5):
            raise BenchError(f"the worker sent under 2000 in 120s: {tail(d / 'worker.log')}")
        t_kill = time.time()
        t_back = restart_redis(side.redis, d)
        watermark = _attempt_mark(side)
        # long enough to measure a resume well past the bound, not only to judge it
        infra.wait_for(lambda: _attempt_mark(side) - watermark >= 5000, RESUME_WATCH, 0.5)
        out.update(_resume_figures(side, t_kill, t_back, before))
    finally:
        PROCS.stop(worker, grace=15)
        PROCS.stop(dispatcher, grace=20)
    out["met"] = out.get("resume_s") is not None and out["resume_s"] <= bound
    return out


RESUME_WATCH = 120.0  # seconds the Redis case watches for sending to resume


def _attempt_mark(side: Side) -> int:
    return int(side.sql("SELECT coalesce(max(id), 0) FROM attempts")[0][0])


def _resume_figures(side: Side, t_kill: float, t_back: float, first_id: int) -> dict[str, Any]:
    """Attempt start times around the restart: sending resumed at the end of the last pause of
    a second or more that ends after Redis came back (before it, prefetched chunks may still
    have been sent)."""
    rows = side.sql(
        "SELECT extract(epoch FROM started_at) FROM attempts WHERE id > %s ORDER BY started_at",
        first_id,
    )
    starts = [float(r[0]) for r in rows]
    after = [s for s in starts if s > t_back]
    if not after:
        return {
            "resume_s": None,
            "error": f"stalled: nothing sent {RESUME_WATCH:.0f}s after Redis came back",
        }
    resumed = after[0]
    longest = 0.0
    for a, b in itertools.pairwise(starts):
        if b > t_back and b - a >= 1.0 and a >= t_kill - 1:
            resumed = b
        if a >= t_kill - 1:
            longest = max(longest, b - a)
    return {
        "resume_s": resumed - t_back,
        "first_after_back_s": after[0] - t_back,
        "longest_pause_s": longest,
        "redis_down_s": t_back - t_kill,
        "sent_after_back": len(after),
    }
