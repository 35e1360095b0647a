"""Watching mailer's outbox during a case: read-only access to its tables, the worker draining
it, and the latencies of transactional sends."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra import PROCS, PYTHON, BenchError
from session import Bench, epoch, now, percentile, tail


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


@dataclass
class Drain:
    """A worker draining the outbox, watched through the database."""

    b: Bench
    outbox: Outbox
    worker: Any
    d: Path  # the run's directory, with the worker's log

    def watch(
        self,
        what: str,
        *,
        message_id: int | None = None,
        done: Callable[[int], bool] = lambda left: left == 0,
        on_poll: Callable[[int], None] | None = None,
        timeout: float | None = None,
    ) -> float:
        """Poll the outbox until done(pending) (default: no delivery queued, sending or
        deferred); returns when that was seen. Fails on a dead worker, on no progress for
        --stall-timeout, and after 10 s without progress when the worker logged failed tasks."""
        last, last_change = -1, now()
        deadline = now() + timeout if timeout else None
        while True:
            left = self.outbox.pending(message_id)
            t = now()
            if on_poll is not None:
                on_poll(left)
            if done(left):
                return t
            self._check_worker(what, left)
            if left != last:
                last, last_change = left, t
            else:
                self._check_progress(what, left, t - last_change)
            if deadline and t > deadline:
                raise BenchError(f"{what}: not drained after {timeout:.0f}s ({left} pending)")
            time.sleep(self.b.args.poll)

    def drained(self, what: str, timeout: float | None = None) -> float:
        return self.watch(what, timeout=timeout)

    def _check_worker(self, what: str, left: int) -> None:
        if self.worker.poll() is not None:
            raise BenchError(
                f"{what}: the worker exited ({self.worker.returncode}) with {left} deliveries "
                f"pending: {tail(self.d / 'worker.log')}"
            )

    def _check_progress(self, what: str, left: int, stalled: float) -> None:
        errors, first = worker_errors(self.d) if stalled > 10 else (0, "")
        if errors or stalled > self.b.args.stall_timeout:
            raise BenchError(
                f"{what}: no progress for {stalled:.0f}s, {left} pending, states "
                f"{self.outbox.states()}; {errors} task(s) failed in the worker, the first: "
                f"{first or '-'}; worker log tail: {tail(self.d / 'worker.log', 800)}"
            )


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
