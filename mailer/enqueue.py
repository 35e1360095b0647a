"""The producer API: validate, write the outbox rows and commit, then publish wake-ups.

The database is the truth: rows are committed before anything is published, so a broker that
is down or loses a task delays mail (the dispatcher republishes) but never loses it. Anything
invalid raises InputError before a row is written; a campaign is written in one transaction,
so a bad row leaves no partial campaign behind.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailer import addresses, bulk, clock, compose, db, publish, suppressions, templates
from mailer.config import settings
from mailer.errors import InputError
from mailer.models import (
    Campaign,
    Delivery,
    DeliveryState,
    Message,
    Priority,
    Template,
)
from mailer.spec import MessageSpec, checked_context, no_nul

BATCH = 2000
WRITES_AHEAD = 2  # batches handed to the writer thread and not yet written, at most
RecipientRow = Mapping[str, Any] | tuple[int, Mapping[str, Any]]


def send(  # noqa: PLR0913 - the public API's options, one keyword each (as the CLI's)
    template: str,
    to: str | Sequence[str],
    context: Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    from_addr: str | None = None,
    headers: Mapping[str, str] | None = None,
    send_at: datetime | None = None,
    expires_at: datetime | None = None,
    priority: Priority = Priority.TRANSACTIONAL,
) -> int:
    """Queue one message to one or more recipients; returns the message id.

    The same `idempotency_key` twice returns the first message's id and sends nothing more,
    so a web request that is retried never mails twice.
    """
    recipients = [addresses.parse(a) for a in ([to] if isinstance(to, str) else to)]
    if not recipients:
        raise InputError("no recipients")
    spec = MessageSpec.build(
        template,
        context=context,
        from_addr=from_addr,
        headers=headers,
        send_at=send_at,
        expires_at=expires_at,
        priority=priority,
        idempotency_key=idempotency_key,
    )
    return _send(spec, recipients)


def _send(spec: MessageSpec, recipients: Sequence[addresses.Address]) -> int:
    """Queue the message `spec` describes to parsed recipients (at least one); returns the
    message id."""
    now = clock.now()
    try:
        message_id, ids = _write_message(spec, recipients, now)
    except IntegrityError:
        # the same key, sent at the same moment by a concurrent request: it won
        existing = _existing(spec.idempotency_key)
        if existing is None:
            raise
        return existing
    if ids and _due(spec.send_at, now):
        publish.publish(ids, spec.priority, settings().chunk_size)
    return message_id


def _existing(idempotency_key: str | None) -> int | None:
    if idempotency_key is None:
        return None
    with db.session_scope() as session:
        return _by_key(session, idempotency_key)


def _write_message(
    spec: MessageSpec, recipients: Sequence[addresses.Address], now: datetime
) -> tuple[int, list[int]]:
    """The message's rows, committed; (its id, the deliveries to publish). For a key already
    used: (that message's id, nothing to publish)."""
    with db.session_scope() as session:
        if spec.idempotency_key is not None:
            existing = _by_key(session, spec.idempotency_key)
            if existing is not None:
                return existing, []
        tmpl = templates.latest(session, spec.template)
        message = _message(session, tmpl, spec, campaign=None, now=now)
        _check_renders(tmpl, message, {"email": recipients[0].normalized, **spec.context})
        unique = {a.key: (a, None) for a in recipients}.values()
        _write_deliveries(session, message, _deliveries(session, unique), now)
        return message.id, list(_queued_ids(session, message.id))


@dataclass
class CampaignResult:
    campaign_id: int
    message_id: int
    queued: int = 0
    suppressed: int = 0
    duplicates: int = 0
    invalid: int = 0
    rejected: list[str] = field(default_factory=list)  # the first few invalid rows, explained


def send_campaign(  # noqa: PLR0913 - the public API's options, one keyword each (as the CLI's)
    template: str,
    recipients: Iterable[RecipientRow],
    *,
    name: str | None = None,
    from_addr: str | None = None,
    context: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    send_at: datetime | None = None,
    expires_at: datetime | None = None,
    skip_invalid: bool = False,
    progress: Callable[[int], None] | None = None,
) -> CampaignResult:
    """Queue one templated message to a stream of recipients (each a mapping with "email" and
    its own context). The stream is read once, in batches, never held in memory whole."""
    no_nul(name, "campaign name")
    spec = MessageSpec.build(
        template,
        context=context,
        from_addr=from_addr,
        headers=headers,
        send_at=send_at,
        expires_at=expires_at,
        priority=Priority.BULK,
    )
    return _campaign(spec, recipients, name=name, skip_invalid=skip_invalid, progress=progress)


def _campaign(
    spec: MessageSpec,
    recipients: Iterable[RecipientRow],
    *,
    name: str | None,
    skip_invalid: bool,
    progress: Callable[[int], None] | None,
) -> CampaignResult:
    now = clock.now()
    with db.session_scope() as session:
        tmpl = templates.latest(session, spec.template)
        campaign = Campaign(
            name=name or f"{spec.template} {now:%Y-%m-%d %H:%M}", paused=False, created_at=now
        )
        session.add(campaign)
        session.flush()
        message = _message(session, tmpl, spec, campaign=campaign, now=now)
        result = CampaignResult(campaign.id, message.id)
        rows = _Rows(tmpl, message, spec.context, skip_invalid, _header_variables(tmpl, message))
        seen = _Writing(session, message, rows, result, progress, now).write(recipients)
        if seen == 0:
            raise InputError("the recipient list is empty")
        # the rows the INSERTs skipped were already there: the same address met before
        result.duplicates = seen - result.invalid - result.queued - result.suppressed
        if result.queued == 0 and result.suppressed == 0:
            raise InputError("no valid recipient in the list; nothing was queued")
    if _due(spec.send_at, now):
        # a reading session: on SQLite it holds no write lock while the wake-ups go out
        with db.read_scope() as session:
            publish.publish(_queued_ids(session, message.id), spec.priority, settings().chunk_size)
    return result


@dataclass(frozen=True)
class _Rows:
    """How a campaign's rows are checked: each as the worker will use it."""

    tmpl: Template
    message: Message
    context: dict[str, Any]  # the message's, under each row's own
    skip_invalid: bool
    in_headers: frozenset[str]  # the context names the subject and the extra headers use

    def valid(
        self, batch: list[tuple[int, Mapping[str, Any]]], result: CampaignResult, *, first: bool
    ) -> list[tuple[addresses.Address, dict[str, Any]]]:
        """The batch's valid rows; the invalid ones counted in `result` (or raised)."""
        parsed: list[tuple[addresses.Address, dict[str, Any]]] = []
        ctx = self.context
        for line, row in batch:
            try:
                address = addresses.parse(str(row.get("email", "")))
                own = checked_context(row)
                _check_headers(self.tmpl, self.message, {**ctx, **own}, self.in_headers)
                if first and not parsed:
                    _check_renders(self.tmpl, self.message, {**ctx, **own})
            except InputError as exc:
                if not self.skip_invalid:
                    raise InputError(f"recipient {line}: {exc}") from None
                result.invalid += 1
                if len(result.rejected) < 20:
                    result.rejected.append(f"recipient {line}: {exc}")
                continue
            parsed.append((address, own))
        return parsed


@dataclass(frozen=True)
class _Writing:
    """A campaign's deliveries being written, batch by batch, in one transaction.

    The database writes one batch while this thread checks the next: a thread of its own runs
    each batch's INSERT (the session is used by that thread alone until the writing ends),
    with the batch after it already waiting so that the database never waits for the
    hand-over, and the suppression list is read here, through a session of its own
    (BENCHMARKS.md, "What each step bought": the enqueue rows).
    """

    session: Session
    message: Message
    rows: _Rows
    result: CampaignResult
    progress: Callable[[int], None] | None
    now: datetime

    def write(self, recipients: Iterable[RecipientRow]) -> int:
        """Check and write every row; the number of rows read."""
        seen = 0
        with (
            ThreadPoolExecutor(1, thread_name_prefix="mailer-enqueue") as writer,
            db.read_scope() as lookups,
        ):
            in_flight: deque[tuple[Future[Written], int]] = deque()
            try:
                for batch in bulk.chunks(_numbered(recipients), BATCH):
                    parsed = self.rows.valid(batch, self.result, first=seen == 0)
                    rows = _deliveries(lookups, parsed)
                    seen += len(batch)
                    if len(in_flight) == WRITES_AHEAD:
                        self._written(*in_flight.popleft())
                    write = writer.submit(
                        _write_deliveries, self.session, self.message, rows, self.now
                    )
                    in_flight.append((write, seen))
                while in_flight:
                    self._written(*in_flight.popleft())
            except BaseException:
                # nothing more is written, and the session is rolled back only once the
                # writer is done with it
                writer.shutdown(wait=False, cancel_futures=True)
                _settle(write for write, _ in in_flight)
                raise
        return seen

    def _written(self, write: Future[Written], seen: int) -> None:
        """Wait for a batch in flight (raising its error) and count what it wrote; report the
        recipients read up to it."""
        written = write.result()
        self.result.queued += written[False]
        self.result.suppressed += written[True]
        if self.progress:
            self.progress(seen)


def _settle(writes: Iterable[Future[Written]]) -> None:
    """Wait until the writes have ended, however they end; a second Ctrl-C meanwhile does not
    cut the wait short (a write is a fraction of a second; rolling back beside it is not
    safe)."""
    for write in writes:
        while True:
            try:
                write.exception()  # waits; its error, if any, is not the one to raise
                break
            except CancelledError:  # never started
                break
            except KeyboardInterrupt:
                continue


def _message(
    session: Session, tmpl: Template, spec: MessageSpec, *, campaign: Campaign | None, now: datetime
) -> Message:
    message = Message(
        campaign_id=campaign.id if campaign else None,
        template_id=tmpl.id,
        from_addr=spec.from_addr,
        context=spec.context,
        headers=spec.headers,
        token=secrets.token_hex(8),
        idempotency_key=spec.idempotency_key,
        priority=spec.priority,
        send_at=spec.send_at,
        expires_at=spec.expires_at,
        created_at=now,
    )
    session.add(message)
    session.flush()
    return message


def _check_renders(tmpl: Template, message: Message, context: dict[str, Any]) -> None:
    """Render and compose once, so a template or header error is reported now, not later."""
    rendered = templates.compiled(tmpl).render(context)
    compose.build(
        rendered,
        from_addr=message.from_addr,
        to=[context["email"]],
        msg_id=compose.message_id(message.token, "check.invalid", None),
        date=clock.now(),
        headers=templates.render_headers(message.headers, context),
    )


def _header_variables(tmpl: Template, message: Message) -> frozenset[str]:
    """The context names the subject and the extra headers use (the same for every row)."""
    return templates.variables(tmpl.subject).union(
        *(templates.variables(value) for value in message.headers.values())
    )


def _check_headers(
    tmpl: Template, message: Message, context: dict[str, Any], names: frozenset[str]
) -> None:
    """The parts of a campaign row that reach headers: checked for every row at enqueue.

    When every value the subject and extra headers use (`names`) is plain (no line break, no
    encoded word), they cannot inject a header line and nothing needs rendering; otherwise
    they are rendered and checked exactly as the worker will.
    """
    if all(name in context and _plain_value(context[name]) for name in names):
        return
    compose.check_header("Subject", templates.compiled(tmpl).render_subject(context))
    for name, value in templates.render_headers(message.headers, context).items():
        compose.check_header(name, value)


def _plain_value(value: Any) -> bool:
    """A context value that prints as a plain header value (compose's rule)."""
    if isinstance(value, str):
        return compose.is_plain_header(value)
    return isinstance(value, int | float) or value is None


Deliveries = dict[bool, list[dict[str, Any]]]  # rows by "on the suppression list"


def _deliveries(
    session: Session, recipients: Iterable[tuple[addresses.Address, Mapping[str, Any] | None]]
) -> Deliveries:
    """What differs from one delivery to the next (_write_deliveries adds the rest), split by
    whether the address is on the suppression list."""
    chosen = list(recipients)
    listed = suppressions.suppressed(session, [address.key for address, _ in chosen])
    split: Deliveries = {False: [], True: []}
    for address, own in chosen:
        row = {
            "recipient": address.normalized,
            "domain": address.domain,
            "context": own,  # a dict of its own (_context made it)
        }
        split[address.key in listed].append(row)
    return split


Written = dict[bool, int]  # rows inserted by "on the suppression list"


def _write_deliveries(
    session: Session, message: Message, rows: Deliveries, now: datetime
) -> Written:
    """INSERT the message's deliveries, queued or (on the suppression list) suppressed, and
    say how many of each were new (an address already among them is skipped)."""
    due = _due(message.send_at, now)
    written: Written = {}
    for blocked, chosen in rows.items():
        constant = {
            "message_id": message.id,
            "state": DeliveryState.SUPPRESSED if blocked else DeliveryState.QUEUED,
            "last_reply": "on the suppression list at enqueue" if blocked else None,
            "attempts": 0,
            "next_attempt_at": message.send_at or now,
            "published_at": now if due else None,
            "created_at": now,
            "updated_at": now,
        }
        written[blocked] = bulk.insert_rows(
            session, Delivery, chosen, constant=constant, ignore_conflicts=True
        )
    return written


def _by_key(session: Session, key: str) -> int | None:
    return session.scalar(select(Message.id).where(Message.idempotency_key == key))


def _queued_ids(session: Session, message_id: int) -> Iterable[int]:
    query = (
        select(Delivery.id)
        .where(Delivery.message_id == message_id, Delivery.state == DeliveryState.QUEUED)
        .order_by(Delivery.id)
    )
    return session.connection().execution_options(yield_per=5000).execute(query).scalars()


def _due(send_at: datetime | None, now: datetime) -> bool:
    return send_at is None or send_at <= now


def _numbered(rows: Iterable[RecipientRow]) -> Iterable[tuple[int, Mapping[str, Any]]]:
    for index, row in enumerate(rows, start=1):
        yield row if isinstance(row, tuple) else (index, row)
