"""The use case, framework-free: claim a chunk -> render -> send -> classify -> record.

Deliveries of one message that share its context go out in one SMTP transaction; a campaign's
deliveries, each with its own context, go out one by one over the process's sessions, two at a
time in step. Outcomes are recorded in batches; a relay-wide failure (throttling, unreachable,
misconfigured) stops the chunk and hands the untried deliveries back without spending their
attempts, and so does a chunk still sending at half its lease (a slow relay): it begins
nothing more, and what it has not begun goes back to the queue. No reply of the relay is
awaited past three quarters of the lease: one that late counts as none (the message held as
unknown, or the relay resting), so that outcomes are recorded before the chunk may be handed
out again.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Row, Select, select
from sqlalchemy.orm import Session

from mailer import bulk, clock, compose, db, outcomes, suppressions, templates
from mailer.config import Settings
from mailer.config import settings as current_settings
from mailer.errors import InputError
from mailer.models import DeliveryState, Message, Template
from mailer.outcomes import Claimed, Verdict
from mailer.replies import Phase, ReplyClass, SMTPReply, classify
from mailer.transport.base import Outgoing, Transport
from mailer.transport.base import send as transport_send
from mailer.transport.relay import RelayConfig
from mailer.transport.smtp import new_session

log = logging.getLogger(__name__)
S = DeliveryState
# recipients in one transaction: RFC 5321 4.5.3.1.8 obliges servers to take 100
MAX_RECIPIENTS = 100
# outcomes are written every FLUSH_EVERY (every 50, the worker ran 5 % slower; 200 was no
# faster, and this bounds what a killed process sent without recording) or FLUSH_SECONDS,
# whichever comes first
FLUSH_EVERY = 100
FLUSH_SECONDS = 1.0
# sessions one sending thread (a lane) drives in step: it writes a message to each, then reads
# their replies, so that one wait for the relay covers them all (measured: ~10 % less CPU a
# message over two sessions in step than over one, BENCHMARKS.md)
IN_STEP = 2


class _Limits(NamedTuple):
    """A chunk's time, on the monotonic clock: no transaction begins from `begin_by` on, and
    no wait for the relay lasts past `end_by`."""

    begin_by: float
    end_by: float


@dataclass
class _Work:
    delivery: Claimed
    message: _Message


@dataclass(slots=True)
class _Message:
    """A message as sending needs it, shared by its deliveries in a chunk."""

    id: int
    from_addr: str
    domain: str
    context: dict[str, Any]
    headers: dict[str, str]
    token: str
    expires_at: datetime | None
    source: Row[Any]  # with its template's columns (_sources)
    compiled: templates.Compiled | None = None

    def template(self) -> templates.Compiled:
        # compiled on first use, in the attempt: a template that fails fails its deliveries
        # alone, as a poison message should, not the claim
        if self.compiled is None:
            self.compiled = templates.compiled(self.source)
        return self.compiled


@dataclass
class ChunkReport:
    claimed: int = 0
    attempted: int = 0
    released: int = 0


def deliver_chunk(
    ids: Sequence[int], *, transport: Transport | None = None, settings: Settings | None = None
) -> ChunkReport:
    """Claim, send and record a chunk. Its transactions go out over MAILER_SMTP_SESSIONS
    persistent sessions at once (lanes of two driven in step, see _send), unless a
    `transport` is given."""
    s = settings or current_settings()
    name = transport.name if transport is not None else s.smtp.name
    now = clock.now()
    lease = now + timedelta(seconds=s.lease_seconds)
    # no transaction begins after half the lease, and no wait for the relay lasts past three
    # quarters of it: the rest is for recording, before the chunk may be handed out again
    start = time.monotonic()
    limits = _Limits(start + s.lease_seconds / 2, start + s.lease_seconds * 3 / 4)
    work, closed = db.retrying(
        lambda db_: _claim(db_, ids, lease, name, now),
        what="claiming deliveries",
        budget=s.lease_seconds / 2,
    )
    report = ChunkReport(claimed=len(work) + closed)
    recorder = _Recorder(s, lease, {w.delivery.id: w.delivery for w in work})
    stopped: list[ReplyClass] = []
    untried: list[_Work] = []
    aside: list[Verdict] = []
    sending = _send(list(_transactions(work)), transport, s, stopped, aside, limits)
    try:
        for group, verdicts in sending:
            if verdicts is None:  # the relay failed meanwhile, or time ran out: not tried
                untried += group
                continue
            report.attempted += len(group)
            recorder.add(verdicts)
    finally:
        # whatever happens, what was sent is recorded (else it would go out again), that of
        # other sessions still sending when this loop ended early too (`aside`)
        sending.close()
        recorder.pending += aside
        recorder.flush()
    if untried:
        report.released = len(untried)
        _hand_back(untried, stopped, lease, s)
    return report


def _send(
    groups: list[list[_Work]],
    transport: Transport | None,
    s: Settings,
    stopped: list[ReplyClass],
    aside: list[Verdict],
    limits: _Limits,
) -> Generator[tuple[list[_Work], list[Verdict] | None]]:
    """Each group's verdicts, as they come; after a relay-wide failure, or from
    `limits.begin_by` on, the groups not yet begun come back untried (None). Closed early, it
    starts nothing more and waits for the sessions still sending, whose verdicts it puts
    `aside`."""
    halted: list[bool] = []

    def over() -> bool:  # a relay-wide failure, the consumer gone, or out of time
        return bool(stopped or halted) or time.monotonic() >= limits.begin_by

    def attempt(
        relay: Transport,
        group: list[_Work],
        composed: Outgoing | str,
        following: Outgoing | None,
        meanwhile: Callable[[], object] | None,
    ) -> tuple[list[_Work], list[Verdict] | None]:
        if over():
            return group, None
        verdicts = _attempt(group, relay, composed, following, meanwhile, limits.end_by)
        if any(v.klass.relay_wide for v in verdicts):
            stopped.append(next(v.klass for v in verdicts if v.klass.relay_wide))
        return group, verdicts

    if transport is not None:
        yield from _in_step(groups, [transport], attempt, over, aside)
        return
    # a chunk has its lanes to itself (chunks at once in a threaded worker take different
    # ones, or wait for one), so a process keeps MAILER_SMTP_SESSIONS sessions, no more
    with _lanes(s.smtp_sessions).lease(-(-len(groups) // IN_STEP)) as lanes:
        if len(lanes) == 1:  # sent from this thread
            yield from _in_step(groups, lanes[0].sessions(s.smtp), attempt, over, aside)
            return
        # Several lanes, each sending from a thread of its own. At most one step per lane in
        # flight: if recording stalls (the database is away), little more is sent before this
        # generator's consumer is back.
        slots = [i for i, lane in enumerate(lanes) for _ in range(lane.size)]
        runs = [
            _in_step(
                [g for n, g in enumerate(groups) if slots[n % len(slots)] == i],
                lane.sessions(s.smtp),
                attempt,
                over,
                aside,
            )
            for i, lane in enumerate(lanes)
        ]
        ahead = {lane.thread.submit(next, runs[i], None): i for i, lane in enumerate(lanes)}
        try:
            while ahead:
                done, _ = wait(ahead, return_when=FIRST_COMPLETED)
                for future in done:
                    i = ahead.pop(future)
                    result = future.result()
                    if result is not None:
                        yield result
                        ahead[lanes[i].thread.submit(next, runs[i], None)] = i
        finally:
            # ended early (the consumer failed, or a lane did): the lanes go back idle, and
            # what they were sending, or had sent and not yet handed on, is kept to be recorded
            halted.append(True)
            for future in ahead:
                try:
                    result = future.result()
                except Exception:
                    log.exception("a sending lane failed")
                    continue
                if result is not None and result[1] is not None:
                    aside.extend(result[1])
            for run in runs:
                run.close()  # idle now: its step's verdicts not handed on go `aside`


Attempt = Callable[
    [Transport, list[_Work], Outgoing | str, Outgoing | None, Callable[[], object] | None],
    tuple[list[_Work], list[Verdict] | None],
]


def _in_step(
    groups: list[list[_Work]],
    sessions: Sequence[Transport],
    attempt: Attempt,
    over: Callable[[], bool],
    aside: list[Verdict],
) -> Generator[tuple[list[_Work], list[Verdict] | None]]:
    """The groups over a lane's sessions, in step: each step writes one message to each
    session, and reads their replies only then (the last written first), so that one wait for
    the relay covers them all. Closed early, it puts the verdicts of its step not yet handed
    on `aside` (those messages went out: they must be recorded).

    Each session's next message is composed before its current one is sent, so that its
    envelope can go out behind it (SMTPSession.send's `following`), and the step after next
    while the server takes the step's last message (`meanwhile`); once `over()`, nothing more
    is composed."""
    composed: dict[int, Outgoing | str] = {}

    def compose(index: int) -> Outgoing | str | None:
        if index >= len(groups):
            return None
        found = composed.get(index)
        if found is None:
            if over():
                return None
            found = composed[index] = _composed(groups[index])
        return found

    width = max(1, min(len(sessions), len(groups)))
    Results = dict[int, tuple[list[_Work], list[Verdict] | None]]

    def send(index: int, step: range, results: Results, failed: list[Exception]) -> None:
        """Send the step's group `index` and, once its message is out, the ones after it:
        their replies are read in the reverse order."""
        if index >= step.stop:  # the step's last message is out: compose the step after next
            for ahead in range(step.start + 2 * width, step.start + 3 * width):
                compose(ahead)
            return
        if index in results or failed:
            return
        then = functools.partial(send, index + 1, step, results, failed)
        current = compose(index)
        if current is None:  # over: the group goes back untried
            results[index] = (groups[index], None)
        else:
            upcoming = compose(index + width)
            try:
                results[index] = attempt(
                    sessions[index - step.start],
                    groups[index],
                    current,
                    upcoming if isinstance(upcoming, Outgoing) else None,
                    then,
                )
            except Exception as exc:  # raised once this step's verdicts are handed on
                failed.append(exc)
                return
        then()  # the transaction ended before its "." (so the wait never came), or was over

    for first in range(0, len(groups), width):
        step = range(first, min(first + width, len(groups)))
        results: Results = {}
        failed: list[Exception] = []
        send(first, step, results, failed)
        pending = [results[index] for index in step if index in results]
        for index in step:
            composed.pop(index, None)
        try:
            while pending:
                yield pending.pop(0)
        finally:
            aside += [v for _, verdicts in pending for v in verdicts or ()]
        if failed:
            raise failed[0]


class _Lane:
    """A sending thread and the sessions it drives in step. Both live as long as the process;
    the chunk that leases the lane has them to itself."""

    def __init__(self, number: int, size: int) -> None:
        self.thread = ThreadPoolExecutor(1, thread_name_prefix=f"smtp-{number}")
        self.size = size
        self._sessions: dict[RelayConfig, list[Transport]] = {}

    def sessions(self, relay: RelayConfig) -> list[Transport]:
        if relay not in self._sessions:
            self._sessions[relay] = [new_session(relay) for _ in range(self.size)]
        return self._sessions[relay]


class _Lanes:
    """This process's lanes: MAILER_SMTP_SESSIONS sessions, IN_STEP to a lane."""

    def __init__(self, sessions: int) -> None:
        count = -(-sessions // IN_STEP)
        self.free: queue.SimpleQueue[_Lane] = queue.SimpleQueue()
        for n in range(count):
            self.free.put(_Lane(n, sessions // count + (n < sessions % count)))

    @contextmanager
    def lease(self, wanted: int) -> Iterator[list[_Lane]]:
        """Up to `wanted` lanes no other chunk is using (waiting for the first one)."""
        taken = [self.free.get()]
        while len(taken) < wanted:
            try:
                taken.append(self.free.get_nowait())
            except queue.Empty:
                break
        try:
            yield taken
        finally:
            for lane in taken:
                self.free.put(lane)


_pools: dict[int, _Lanes] = {}
_pools_lock = threading.Lock()


def _lanes(sessions: int) -> _Lanes:
    with _pools_lock:
        if sessions not in _pools:
            _pools[sessions] = _Lanes(sessions)
        return _pools[sessions]


def _claim(
    session: Session, ids: Sequence[int], lease: datetime, relay: str, now: datetime
) -> tuple[list[_Work], int]:
    """Claim what is due among `ids` and load what sending it needs, in one transaction.
    Deliveries that must not go out (suppressed, expired) are closed here; while the relay is
    paused or resting nothing is claimed. Returns the work and how many were closed."""
    block = outcomes.relay_block(session, relay, now)
    if block is not None:
        outcomes.postpone(session, ids, block.until, now)
        return [], 0
    claimed = outcomes.claim(session, ids, now, lease)
    if not claimed:
        return [], 0
    sources = {"ids": list({c.message_id for c in claimed})}
    loaded = session.connection().execute(_sources(bulk.postgresql(session)), sources)
    messages = {
        m.id: _Message(
            m.id,
            m.from_addr,
            m.from_addr.rpartition("@")[2],
            m.context,
            m.headers,
            m.token,
            m.expires_at,
            m,
        )
        for m in loaded
    }
    keys = [c.recipient.lower() for c in claimed]  # the suppression list's key
    suppressed = suppressions.suppressed(session, keys)
    closed: dict[int, tuple[DeliveryState, str]] = {}
    work: list[_Work] = []
    for c, key in zip(claimed, keys, strict=True):
        message = messages[c.message_id]
        if message.expires_at is not None and now >= message.expires_at:
            closed[c.id] = (S.EXPIRED, f"message expired at {message.expires_at.isoformat()}")
        elif key in suppressed:
            closed[c.id] = (S.SUPPRESSED, f"suppressed: {suppressed[key]}")
        else:
            work.append(_Work(c, message))
    if closed:
        outcomes.finish_unsent(session, closed, lease, now)
    return work, len(closed)


@functools.cache
def _sources(postgresql: bool) -> Select[Any]:
    """The messages (and their templates) that claimed deliveries belong to, as plain rows:
    loading ORM objects cost more than the query."""
    m, t = Message, Template
    return (
        select(m.id, m.from_addr, m.context, m.headers, m.token, m.expires_at)
        .add_columns(t.name, t.version, t.subject, t.text, t.html)
        .join(t, m.template_id == t.id)
        .where(bulk.among(m.id, "ids", postgresql))
    )


def _transactions(work: list[_Work]) -> Iterator[list[_Work]]:
    """Deliveries rendered alike (same message, no own context) share a transaction."""
    shared: dict[int, list[_Work]] = {}
    for item in work:
        if item.delivery.context is None:
            group = shared.setdefault(item.message.id, [])
            group.append(item)
            if len(group) == MAX_RECIPIENTS:
                yield shared.pop(item.message.id)
        else:
            yield [item]
    yield from shared.values()


def _composed(group: list[_Work]) -> Outgoing | str:
    """The group's message, or why it cannot be composed (a poison message fails alone; the
    rest of the chunk goes on)."""
    try:
        return _compose(group)
    except InputError as exc:
        return str(exc)
    except Exception as exc:
        log.exception("delivery %d could not be composed", group[0].delivery.id)
        return f"could not be composed: {type(exc).__name__}: {exc}"


def _attempt(
    group: list[_Work],
    relay: Transport,
    outgoing: Outgoing | str,
    following: Outgoing | None,
    meanwhile: Callable[[], object] | None,
    deadline: float | None,
) -> list[Verdict]:
    if isinstance(outgoing, str):
        reply = SMTPReply.lost(outgoing)
        return [_verdict(w, reply, Phase.LOCAL, relay.name, False, clock.now()) for w in group]
    by_address = {w.delivery.recipient: w for w in group}
    verdicts: list[Verdict] = []
    batches = [outgoing.recipients]
    while batches:
        batch = batches.pop(0)
        # a batch split off (too many recipients) is not the transaction announced: the
        # session then drops what it sent ahead, and `following` goes out anew
        whole = batch == outgoing.recipients
        result = transport_send(
            relay,
            outgoing if whole else outgoing._replace(recipients=batch),
            following if whole else None,
            meanwhile if whole else None,
            deadline=deadline,
        )
        again = []
        for r in result.results:
            klass = classify(r.reply, r.phase)
            if klass is ReplyClass.TOO_MANY_RECIPIENTS and len(batch) > 1:
                again.append(r.recipient)
                continue
            verdicts.append(
                Verdict(
                    by_address[r.recipient].delivery.id,
                    r.recipient,
                    r.reply,
                    r.phase,
                    klass,
                    result.relay,
                    result.tls,
                    result.started,
                    result.finished,
                )
            )
        if len(again) == len(batch):  # the server took none of them: halve the transaction
            batches += [tuple(again[: len(again) // 2]), tuple(again[len(again) // 2 :])]
        elif again:  # the server took some: the rest go in a new transaction at once
            batches.append(tuple(again))
        if batches and any(v.klass.relay_wide for v in verdicts):
            break
    if len(verdicts) < len(group):  # (one verdict a recipient at most)
        decided = {v.recipient for v in verdicts}
        # the relay failed while a too-many-recipients split was under way: the recipients not
        # yet tried share that failure (relay-wide: no attempt spent)
        failure = next(v for v in verdicts if v.klass.relay_wide)
        verdicts += [
            failure._replace(delivery_id=w.delivery.id, recipient=w.delivery.recipient)
            for w in group
            if w.delivery.recipient not in decided
        ]
    return verdicts


def _verdict(
    w: _Work, reply: SMTPReply, phase: Phase, relay: str, tls: bool, started: datetime
) -> Verdict:
    return Verdict(
        w.delivery.id,
        w.delivery.recipient,
        reply,
        phase,
        classify(reply, phase),
        relay,
        tls,
        started,
        clock.now(),
    )


def _compose(group: list[_Work]) -> Outgoing:
    first = group[0]
    message = first.message
    context: dict[str, Any] = {"email": first.delivery.recipient, **message.context}
    if first.delivery.context is not None:
        context.update(first.delivery.context)
    rendered = message.template().render(context)
    headers = templates.render_headers(message.headers, context)
    recipients = tuple(w.delivery.recipient for w in group)
    own = first.delivery.id if first.delivery.context is not None else None
    smtputf8 = not all(a.isascii() for a in (message.from_addr, *recipients))
    data = compose.build(
        rendered,
        from_addr=message.from_addr,
        to=recipients,
        msg_id=compose.message_id(message.token, message.domain, own),
        date=clock.now(),
        headers=headers,
        smtputf8=smtputf8,
    )
    return Outgoing(message.from_addr, recipients, data, smtputf8)


def _hand_back(rest: list[_Work], stopped: list[ReplyClass], lease: datetime, s: Settings) -> None:
    """Deliveries not tried go back with their attempts: paused (configuration, which
    outranks a resting relay) or time run out (no relay-wide stop: the only other reason a
    group comes back untried): queued, due now, and the dispatcher's next pass publishes
    them; resting: deferred until the relay's rest is over."""
    now = clock.now()
    if not stopped:
        log.warning(
            "%d deliveries of a chunk not begun by half their lease (MAILER_LEASE_SECONDS=%g) "
            "go back to the queue: the relay is slow for a chunk of this size (lower "
            "MAILER_CHUNK_SIZE, or raise MAILER_SMTP_SESSIONS)",
            len(rest),
            s.lease_seconds,
        )
    if not stopped or ReplyClass.CONFIGURATION in stopped:
        state, when = S.QUEUED, now
    else:
        state, when = S.DEFERRED, now + timedelta(seconds=s.relay_backoff)
    ids = [w.delivery.id for w in rest]
    db.retrying(
        lambda db_: outcomes.release(db_, ids, lease, state=state, not_before=when, now=now),
        what="handing back deliveries",
        budget=s.lease_seconds / 2,
    )


class _Recorder:
    """Collects verdicts and writes them in batches: one transaction per FLUSH_EVERY outcomes
    or FLUSH_SECONDS, whichever comes first."""

    def __init__(self, s: Settings, lease: datetime, claimed: dict[int, Claimed]) -> None:
        self.settings = s
        self.lease = lease
        self.claimed = claimed
        self.pending: list[Verdict] = []
        self.since = time.monotonic()

    def add(self, verdicts: list[Verdict]) -> None:
        self.pending.extend(verdicts)
        if len(self.pending) >= FLUSH_EVERY or time.monotonic() - self.since >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        self.since = time.monotonic()
        if batch:
            now = clock.now()
            db.retrying(
                lambda db_: outcomes.record(
                    db_, batch, self.claimed, self.lease, self.settings, now
                ),
                what="recording outcomes",
                # sent mail not recorded is sent again after its lease: wait long for the
                # database (the fenced write still lands if nobody has taken the rows over)
                budget=self.settings.lease_seconds * 2,
            )
