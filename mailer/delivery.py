"""The delivery use case, framework-free: claim a chunk, compose, attempt, record.

Deliveries of one message that share its context go out in one SMTP transaction; a campaign's
deliveries, each with its own context, go out one by one over the process's sessions
(mailer.lanes sends them). Outcomes are recorded in batches; a relay-wide failure
(throttling, unreachable, misconfigured) stops the chunk and hands the untried deliveries
back without spending their attempts, and so does a chunk still sending at half its lease (a
slow relay): it begins nothing more, and what it has not begun goes back to the queue. No
reply of the relay is awaited past three quarters of the lease: one that late counts as none
(the message held as unknown, or the relay resting), so that outcomes are recorded before the
chunk may be handed out again. The hooks MAILER_HOOKS registers (mailer.hooks) are called at
each point of a chunk's life.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Row, Select, select
from sqlalchemy.orm import Session

from mailer import (
    bulk,
    clock,
    compose,
    db,
    hooks,
    lanes,
    outcomes,
    relay_health,
    suppressions,
    templates,
)
from mailer.config import Settings
from mailer.config import settings as current_settings
from mailer.errors import InputError
from mailer.models import DeliveryState, Message, Template
from mailer.outcomes import Claimed, Verdict
from mailer.replies import Phase, ReplyClass, SMTPReply, classify
from mailer.transport.base import Outgoing, Transport
from mailer.transport.base import send as transport_send
from mailer.transport.smtp import new_session

log = logging.getLogger(__name__)
S = DeliveryState
# recipients in one transaction: RFC 5321 4.5.3.1.8 obliges servers to take 100
MAX_RECIPIENTS = 100
# outcomes are written every FLUSH_EVERY or FLUSH_SECONDS, whichever comes first: fewer
# outcomes a write made the worker slower, more were no faster (BENCHMARKS.md), and this
# bounds what a killed process sent without recording
FLUSH_EVERY = 100
FLUSH_SECONDS = 1.0


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


class _Held(NamedTuple):
    """A hook said "not now" to a group: it goes back, due `until`, no attempt spent."""

    until: datetime


# what attempting a group comes to: its verdicts, or held back by a hook
_Result = list[Verdict] | _Held
# how lanes attempt a group: (session, group, composed, composed next or None, meanwhile)
_Attempt = Callable[
    [Transport, list["_Work"], Outgoing | str, Outgoing | str | None, Callable[[], object]],
    _Result,
]


@dataclass
class ChunkReport:
    claimed: int = 0
    attempted: int = 0
    released: int = 0


class _Chunk(NamedTuple):
    """What a chunk's steps share: its settings, its lease, its hooks (None: none registered)
    and the hooks' view of it."""

    settings: Settings
    lease: datetime
    hooked: hooks.Hooks | None
    seen: hooks.Chunk


def deliver_chunk(
    ids: Sequence[int], *, transport: Transport | None = None, settings: Settings | None = None
) -> ChunkReport:
    """Claim, send and record a chunk. Its transactions go out over MAILER_SMTP_SESSIONS
    persistent sessions at once (mailer.lanes), unless a `transport` is given."""
    s = settings or current_settings()
    name = transport.name if transport is not None else s.smtp.name
    now = clock.now()
    lease = now + timedelta(seconds=s.lease_seconds)
    # no transaction begins after half the lease, and no wait for the relay lasts past three
    # quarters of it: the rest is for recording, before the chunk may be handed out again
    start = time.monotonic()
    limits = _Limits(start + s.lease_seconds / 2, start + s.lease_seconds * 3 / 4)
    chunk = _Chunk(s, lease, hooks.for_settings(s), hooks.Chunk(name, start))
    claimed, work = db.retrying(
        lambda db_: _claim(db_, ids, lease, name, now),
        what="claiming deliveries",
        budget=s.lease_seconds / 2,
    )
    report = ChunkReport(claimed=len(claimed))
    if not claimed:
        return report
    if chunk.hooked is not None:
        chunk.hooked.chunk_claimed(chunk.seen, claimed)
    recorder = _Recorder(chunk, {w.delivery.id: w.delivery for w in work})
    steps = lanes.Steps(_composed, _attempts(chunk, limits.end_by), _stops)
    over = transport or lanes.Sessions(
        s.smtp_sessions, s.smtp, functools.partial(new_session, s.smtp)
    )
    sending = lanes.send(list(_transactions(work)), steps, limits.begin_by, over)
    held: list[tuple[list[_Work], _Held]] = []
    try:
        for group, result in sending:
            if isinstance(result, list):
                report.attempted += len(group)
                recorder.add(result)
            else:
                held.append((group, result))
    finally:
        # whatever happens, what was sent is recorded (else it would go out again), that of
        # other sessions still sending when this loop ended early too
        ending = sending.close()
        for result in ending.unhanded:
            if isinstance(result, list):
                recorder.pending += result
        recorder.flush()
    report.released = _hand_back(chunk, [w for g in ending.untried for w in g], ending.stops, held)
    if chunk.hooked is not None:
        chunk.hooked.chunk_done(chunk.seen, report)
    return report


def _claim(
    session: Session, ids: Sequence[int], lease: datetime, relay: str, now: datetime
) -> tuple[list[Claimed], list[_Work]]:
    """Claim what is due among `ids` and load what sending it needs, in one transaction.
    Deliveries that must not go out (suppressed, expired) are closed here; while the relay is
    paused or resting nothing is claimed. Returns what was claimed, and the work to send."""
    block = relay_health.block(session, relay, now)
    if block is not None:
        outcomes.postpone(session, ids, block.until, now)
        return [], []
    claimed = outcomes.claim(session, ids, now, lease)
    if not claimed:
        return [], []
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
        why = outcomes.unsendable(message.expires_at, suppressed.get(key), now)
        if why is None:
            work.append(_Work(c, message))
        else:
            closed[c.id] = why
    if closed:
        outcomes.finish_unsent(session, closed, lease, now)
    return claimed, work


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


def _attempts(chunk: _Chunk, deadline: float) -> _Attempt:
    """How lanes attempt a group: sent, no reply awaited past `deadline`; where a hook may
    say "not now", asked first (decided once a chunk: no hook, no call)."""
    hooked = chunk.hooked
    asks = hooked if hooked is not None and hooks.asks_before_transaction(hooked) else None

    def attempt(
        relay: Transport,
        group: list[_Work],
        outgoing: Outgoing | str,
        following: Outgoing | str | None,
        meanwhile: Callable[[], object],
    ) -> _Result:
        if asks is not None:
            answer = asks.before_transaction(chunk.seen, [w.delivery for w in group])
            if answer is not None:
                now = clock.now()
                return _Held(hooks.until(answer, now) or now)
        ahead = following if isinstance(following, Outgoing) else None
        return _attempt(group, relay, outgoing, ahead, meanwhile, deadline)

    return attempt


def _stops(result: _Result) -> ReplyClass | None:
    """The relay-wide failure among a group's verdicts, which stops the chunk."""
    if isinstance(result, list):
        for v in result:
            if v.klass.relay_wide:
                return v.klass
    return None


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


def _hand_back(
    chunk: _Chunk,
    untried: list[_Work],
    stops: list[ReplyClass],
    held: list[tuple[list[_Work], _Held]],
) -> int:
    """Hand back, attempts unspent, what was not tried (where and when as outcomes.untried
    decides) and what hooks held back (outcomes.held); returns how many went back."""
    now = clock.now()
    if untried:
        if not stops:  # the only other reason a group comes back untried: time ran out
            log.warning(
                "%d deliveries of a chunk not begun by half their lease (MAILER_LEASE_SECONDS="
                "%g) go back to the queue: the relay is slow for a chunk of this size (lower "
                "MAILER_CHUNK_SIZE, or raise MAILER_SMTP_SESSIONS)",
                len(untried),
                chunk.settings.lease_seconds,
            )
        state, due = outcomes.untried(stops, chunk.settings, now)
        why = f"the relay failed: {stops[0].value}" if stops else "time ran out"
        _release(chunk, untried, (state, due), why, now)
    for group, answer in held:
        _release(chunk, group, outcomes.held(answer.until, now), "a hook said not now", now)
    return len(untried) + sum(len(group) for group, _ in held)


def _release(
    chunk: _Chunk, rest: list[_Work], to: tuple[DeliveryState, datetime], why: str, now: datetime
) -> None:
    state, due = to
    ids = [w.delivery.id for w in rest]
    db.retrying(
        lambda db_: outcomes.release(db_, ids, chunk.lease, state=state, not_before=due, now=now),
        what="handing back deliveries",
        budget=chunk.settings.lease_seconds / 2,
    )
    if chunk.hooked is not None:
        chunk.hooked.deliveries_released(chunk.seen, [w.delivery for w in rest], state, due, why)


class _Recorder:
    """Collects verdicts and writes them in batches: one transaction per FLUSH_EVERY outcomes
    or FLUSH_SECONDS, whichever comes first."""

    def __init__(self, chunk: _Chunk, claimed: dict[int, Claimed]) -> None:
        self.chunk = chunk
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
        if not batch:
            return
        now = clock.now()
        s, lease = self.chunk.settings, self.chunk.lease
        db.retrying(
            lambda db_: outcomes.record(db_, batch, self.claimed, lease, s, now),
            what="recording outcomes",
            # sent mail not recorded is sent again after its lease: wait long for the
            # database (the fenced write still lands if nobody has taken the rows over)
            budget=s.lease_seconds * 2,
        )
        if self.chunk.hooked is not None:
            self.chunk.hooked.verdicts_recorded(self.chunk.seen, batch)
