"""The fault suite's machinery: its own redis-server, `mailer worker` / `mailer dispatcher`
subprocesses that can be killed with -9 (children found through /proc), a TCP proxy that cuts
the database off, waiting until every delivery is final, and the recipient-by-recipient
comparison of the SMTP server's stored copies with the database.

Nothing here knows a scenario; test_faults.py holds them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import func, select

from mailer import db
from mailer.models import Attempt, Delivery, DeliveryState, Message

# --- the numbers every scenario shares -----------------------------------------------------------

RECIPIENTS = 2000
CHUNK = 100
CONCURRENCY = 2
LEASE = 12
FINAL_TIMEOUT = 150.0  # generous: a scenario normally ends within 30 s
TIMINGS: dict[str, Any] = {
    "lease_seconds": LEASE,
    "dispatch_interval": 0.5,
    "republish_after": 2,
    "retry_first_delay": 1,
    "relay_backoff": 2,
    "chunk_size": CHUNK,
    # two sessions per process (one lane, as for a relay on this host), so that a campaign
    # lasts long enough for a fault to land in its middle
    "smtp_sessions": 2,
    "log_level": "INFO",
}
NOT_FINAL = ("queued", "sending", "deferred")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


# --- results -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the summary table."""

    scenario: str
    recipients: int
    delivered: int  # recipients with at least one stored copy
    duplicated: int  # stored copies beyond the first
    lost: int  # final state not sent (and not a held ambiguous send with a copy), or no copy
    seconds: float
    notes: str = ""


ROWS: list[Row] = []


def table(rows: Iterable[Row]) -> list[str]:
    header = ("scenario", "recipients", "delivered", "duplicated", "lost", "seconds", "notes")
    lines = [
        (
            r.scenario,
            str(r.recipients),
            str(r.delivered),
            str(r.duplicated),
            str(r.lost),
            f"{r.seconds:.1f}",
            r.notes,
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: tuple[str, ...]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.ljust(widths[i]) if i in (0, 6) else cell.rjust(widths[i]))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [fmt(header), rule, *(fmt(line) for line in lines)]


@dataclass
class Outcome:
    """The comparison of one scenario's server copies with its database states."""

    row: Row
    states: dict[str, str]  # recipient -> final state
    copies: collections.Counter[str]
    duplicated_recipients: set[str]
    lost_recipients: dict[str, str]  # recipient -> why
    stray: dict[str, int]  # copies the server stored for addresses not in the campaign

    def explain(self, limit: int = 15) -> str:
        lost = list(self.lost_recipients.items())[:limit]
        dups = sorted(self.duplicated_recipients)[:limit]
        return (
            f"states {dict(collections.Counter(self.states.values()))}; "
            f"lost (first {limit}): {lost}; duplicated (first {limit}): "
            f"{[(r, self.copies[r]) for r in dups]}; stray copies: {self.stray}"
        )


def compare(
    scenario: str,
    copies: collections.Counter[str],
    started: float,
    *,
    expected: Mapping[str, str] | None = None,
    notes: str = "",
    campaign: int | None = None,
) -> Outcome:
    """Recipient by recipient: the server's copies against the database's final states (of
    `campaign`'s deliveries only when given: the outbox holds others that are not sent).

    `expected` names recipients whose right outcome is not `sent` (a poison row: `failed`);
    they are judged by that state alone and never counted lost. A delivery held as `unknown`
    (the connection was lost after the final ".") with a stored copy counts as delivered.
    """
    expected = {k.lower(): v for k, v in (expected or {}).items()}
    with db.session_scope() as session:
        rows = session.execute(
            select(
                Delivery.recipient,
                Delivery.state,
                Delivery.attempts,
                Delivery.last_phase,
                Delivery.last_code,
                Delivery.last_reply,
            ).select_from(_in(campaign))
        ).all()
    states = {row.recipient.lower(): row.state.value for row in rows}
    last = {
        row.recipient.lower(): (
            f"{row.attempts} attempts, last at {row.last_phase}: {row.last_code} "
            f"{(row.last_reply or '')[:80]!r}"
        )
        for row in rows
    }
    lost: dict[str, str] = {}
    for recipient, state in states.items():
        n = copies[recipient]
        if recipient in expected:
            if state != expected[recipient]:
                lost[recipient] = (
                    f"state {state}, expected {expected[recipient]}, {n} copies; {last[recipient]}"
                )
            continue
        if state == "sent" and n >= 1:
            continue
        if state == "unknown" and n >= 1:
            continue  # held by the ambiguous policy; the server has it
        lost[recipient] = f"state {state}, {n} copies; {last[recipient]}"
    duplicated = {r for r in states if copies[r] > 1}
    row = Row(
        scenario=scenario,
        recipients=len(states),
        delivered=sum(1 for r in states if copies[r] >= 1),
        duplicated=sum(copies[r] - 1 for r in duplicated),
        lost=sum(1 for r in lost if r not in expected),
        seconds=time.monotonic() - started,
        notes=notes,
    )
    stray = {r: n for r, n in copies.items() if r not in states}
    return Outcome(row, states, copies, duplicated, lost, stray)


# --- the database, read by the test --------------------------------------------------------


def _in(campaign: int | None) -> Any:
    """The deliveries a scenario judges: all, or one campaign's."""
    if campaign is None:
        return Delivery.__table__
    return Delivery.__table__.join(
        Message.__table__,
        (Message.id == Delivery.message_id) & (Message.campaign_id == campaign),
    )


def state_counts(campaign: int | None = None) -> dict[str, int]:
    with db.session_scope() as session:
        rows = session.execute(
            select(Delivery.state, func.count()).select_from(_in(campaign)).group_by(Delivery.state)
        ).all()
    return {state.value: n for state, n in sorted(rows)}


def recipients_in(state: str) -> set[str]:
    with db.session_scope() as session:
        rows = session.scalars(select(Delivery.recipient).where(Delivery.state == state)).all()
    return {r.lower() for r in rows}


def stuck_in_sending(older_than: float) -> set[str]:
    """Recipients claimed (`sending`) more than `older_than` seconds ago: a chunk of 100 takes
    well under a second, so these belong to a process that is gone."""
    since = datetime.now(UTC) - timedelta(seconds=older_than)
    with db.session_scope() as session:
        rows = session.scalars(
            select(Delivery.recipient).where(
                Delivery.state == DeliveryState.SENDING, Delivery.updated_at < since
            )
        ).all()
    return {r.lower() for r in rows}


def attempts_by_outcome() -> dict[str, int]:
    with db.session_scope() as session:
        rows = session.execute(
            select(Attempt.outcome, func.count()).group_by(Attempt.outcome)
        ).all()
    return {str(outcome): n for outcome, n in rows}


def wait_final(
    timeout: float = FINAL_TIMEOUT, campaign: int | None = None
) -> tuple[bool, dict[str, int]]:
    """Poll until no delivery (of `campaign`, when given) is queued, sending or deferred;
    (done, counts per state)."""
    deadline = time.monotonic() + timeout
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            counts = state_counts(campaign)
        except Exception as exc:  # the test's own read must not end the wait
            counts = {"(read failed)": 1, str(exc)[:60]: 1}
        else:
            if counts and not any(counts.get(s) for s in NOT_FINAL):
                return True, counts
        time.sleep(0.5)
    return False, state_counts(campaign)


# --- processes -------------------------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid`, read from /proc (psutil is not installed)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            children.append(int(entry))
    return sorted(children)


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of `pid` in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


class Proc:
    """A subprocess in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._out = log.open("ab")
        self.popen = subprocess.Popen(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def children(self) -> list[int]:
        return child_pids(self.pid)

    def wait_children(self, n: int, timeout: float = 30.0) -> list[int]:
        if not wait_until(lambda: len(self.children()) >= n, timeout, every=0.2):
            raise AssertionError(
                f"{self.name}: {len(self.children())} pool processes after {timeout:.0f} s, "
                f"wanted {n}\n{self.tail()}"
            )
        return self.children()

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        """Block until the process's log holds `text` (it got that far)."""
        if not wait_until(lambda: text in self.log.read_text(errors="replace"), timeout, every=0.1):
            raise AssertionError(f"{self.name}: no {text!r} after {timeout:.0f} s\n{self.tail()}")

    def busiest_child(self, sample: float = 0.3) -> int:
        """The pool process that used the most CPU over `sample` seconds (running a chunk)."""
        before = {pid: cpu_ticks(pid) for pid in self.children()}
        time.sleep(sample)
        return max(before, key=lambda pid: cpu_ticks(pid) - before[pid])

    def kill_child(self, pid: int | None = None) -> int:
        """SIGKILL one pool process (the first child unless named)."""
        victim = pid if pid is not None else self.children()[0]
        os.kill(victim, signal.SIGKILL)
        return victim

    def kill_group(self) -> None:
        """SIGKILL the whole process group: the main process and every pool process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def terminate(self, timeout: float = 60.0) -> int | None:
        """SIGTERM to the main process only (Celery's warm shutdown); its exit status, or None
        if it is still running after `timeout`."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Stop it whatever state it is in (teardown): SIGTERM, then SIGKILL the group."""
        if self.alive():
            self.terminate(timeout=15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # the main process and any orphaned child
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self._out.close()

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"--- last {lines} lines of {self.log} ---\n" + "\n".join(text[-lines:])

    def grep(self, needle: str) -> list[str]:
        try:
            return [ln for ln in self.log.read_text(errors="replace").splitlines() if needle in ln]
        except OSError:
            return []


class RedisServer:
    """A redis-server of the scenario's own, without persistence; restartable on its port."""

    def __init__(self, logdir: Path) -> None:
        self.port = free_port()
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        # when the latest start answered its first ping (monotonic, and wall-clock)
        self.ready_at = self.ready_wall = 0.0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.starts += 1
        log = (self.logdir / f"redis-{self.starts}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        # no retries: redis-py's own (with backoff) would make a refused ping last a second
        # or more, and the server's start be noticed that late
        client = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            # polled finely: clients that retry reconnect within tens of milliseconds, and
            # `ready_at` is when they could, not when a coarse poll noticed
            if not wait_until(up, 15, every=0.005):
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            self.ready_at, self.ready_wall = time.monotonic(), time.time()
        finally:
            client.close()

    def started_empty(self) -> bool:
        """The running server loaded nothing at start: no persistence (its log says when a
        dataset is loaded), so whatever it holds was put there since."""
        log = (self.logdir / f"redis-{self.starts}.log").read_text(errors="replace")
        return "Ready to accept connections" in log and "loaded from" not in log.lower()

    def kill(self) -> None:
        """SIGKILL: everything queued in it is gone (no persistence)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def queued(self) -> int:
        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            return int(client.llen("bulk") + client.llen("transactional"))
        finally:
            client.close()


# --- the database proxy ------------------------------------------------------------------------


class TCPProxy:
    """A TCP proxy (asyncio, in a thread of its own) that can cut every connection and refuse
    new ones (it stops listening) until `recover()`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.accepted = 0
        self.dropped = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._down = False

    def start(self) -> TCPProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def outage(self) -> None:
        """Drop every open connection and refuse new ones."""
        self._call(self._cut())

    def recover(self) -> None:
        self._call(self._listen())

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        self._down = False
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )

    async def _cut(self) -> None:
        self._down = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._links):
            self.dropped += 1
            writer.transport.abort()
        self._links.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self._links.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._links.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()


# --- a scenario's rig --------------------------------------------------------------------------


@dataclass
class Rig:
    """What one scenario runs on: the SMTP server, its own Redis, and the processes it starts
    (all stopped by close(), whatever happened)."""

    server: Any  # ScriptedSMTPServer
    redis: RedisServer
    logdir: Path
    configure_env: Any
    procs: list[Proc] = field(default_factory=list)
    proxies: list[TCPProxy] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def configure(self, **variables: Any) -> None:
        self.configure_env(**variables)

    def start(self, name: str, args: list[str], env: Mapping[str, str] | None = None) -> Proc:
        environment = {**os.environ, **(env or {})}
        n = sum(1 for p in self.procs if p.name.startswith(name))
        proc = Proc(
            name if n == 0 else f"{name}-{n + 1}",
            [sys.executable, "-m", "mailer", *args],
            environment,
            self.logdir / f"{name}-{n + 1}.log",
        )
        self.procs.append(proc)
        return proc

    def worker(
        self, *extra: str, concurrency: int = CONCURRENCY, env: Mapping[str, str] | None = None
    ) -> Proc:
        proc = self.start("worker", ["worker", "--concurrency", str(concurrency), *extra], env)
        proc.wait_children(concurrency)
        return proc

    def dispatcher(self, env: Mapping[str, str] | None = None) -> Proc:
        return self.start("dispatcher", ["dispatcher"], env)

    def db_proxy(self, url: str) -> tuple[TCPProxy, str]:
        """A proxy in front of the database of `url`, and the URL through it (same options)."""
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        proxy = TCPProxy(parsed.host or "127.0.0.1", parsed.port or 5432).start()
        self.proxies.append(proxy)
        return proxy, parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False
        )

    def wait_copies(self, n: int, timeout: float = 60.0) -> None:
        """Block until the server stored `n` messages (the campaign is under way)."""
        if not self.server.wait_for(n, timeout=timeout):
            raise AssertionError(
                f"only {len(self.server.messages)} messages stored after {timeout:.0f} s; "
                f"states {state_counts()}\n{self.tails()}"
            )

    def finish(
        self,
        scenario: str,
        *,
        expected: Mapping[str, str] | None = None,
        notes: str = "",
        timeout: float = FINAL_TIMEOUT,
        campaign: int | None = None,
    ) -> Outcome:
        """Wait until every delivery (of `campaign`, when given) is final, compare, and record
        the row (also when the wait timed out, so that the table shows the failure); fails on
        a timeout."""
        done, counts = wait_final(timeout, campaign)
        outcome = compare(
            scenario,
            self.server.copies(),
            self.started,
            expected=expected,
            notes=notes,
            campaign=campaign,
        )
        if not done:
            outcome.row.notes = (outcome.row.notes + " TIMEOUT").strip()
        ROWS.append(outcome.row)
        if not done:
            raise AssertionError(
                f"{scenario}: deliveries still not final after {timeout:.0f} s: counts per "
                f"state {counts}; stored messages {len(self.server.messages)}\n{self.tails()}"
            )
        return outcome

    def tails(self, lines: int = 25) -> str:
        return "\n".join(p.tail(lines) for p in self.procs)

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.close()
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                proxy.close()
        self.redis.kill()
