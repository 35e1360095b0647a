"""The producer API: validate, write the outbox rows and commit, then publish wake-ups.

The database is the truth: rows are committed before anything is published, so a broker that
is down or loses a task delays mail (the dispatcher republishes) but never loses it. Anything
invalid raises InputError before a row is written; a campaign is written in one transaction,
so a bad row leaves no partial campaign behind.
"""

from __future__ import annotations

import json
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
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

MAX_CONTEXT_BYTES = 256 * 1024
BATCH = 2000
WRITES_AHEAD = 2  # batches handed to the writer thread and not yet written, at most
RecipientRow = Mapping[str, Any] | tuple[int, Mapping[str, Any]]


def send(
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
    _no_nul(idempotency_key, "idempotency_key")
    ctx = _context(context)
    now = clock.now()
    try:
        message_id, ids = _write_message(
            template,
            recipients,
            ctx,
            idempotency_key,
            from_addr,
            headers,
            send_at,
            expires_at,
            priority,
            now,
        )
    except IntegrityError:
        # the same key, sent at the same moment by a concurrent request: it won
        existing = _existing(idempotency_key)
        if existing is None:
            raise
        return existing
    if ids and _due(send_at, now):
        publish.publish(ids, priority, settings().chunk_size)
    return message_id


def _existing(idempotency_key: str | None) -> int | None:
    if idempotency_key is None:
        return None
    with db.session_scope() as session:
        return _by_key(session, idempotency_key)


def _write_message(
    template: str,
    recipients: list[addresses.Address],
    ctx: dict[str, Any],
    idempotency_key: str | None,
    from_addr: str | None,
    headers: Mapping[str, str] | None,
    send_at: datetime | None,
    expires_at: datetime | None,
    priority: Priority,
    now: datetime,
) -> tuple[int, list[int]]:
    """The message's rows, committed; (its id, the deliveries to publish). For a key already
    used: (that message's id, nothing to publish)."""
    with db.session_scope() as session:
        if idempotency_key is not None:
            existing = _by_key(session, idempotency_key)
            if existing is not None:
                return existing, []
        tmpl = templates.latest(session, template)
        message = _message(
            session,
            tmpl,
            from_addr,
            ctx,
            headers,
            send_at,
            expires_at,
            priority,
            idempotency_key,
            campaign=None,
            now=now,
        )
        _check_renders(tmpl, message, {"email": recipients[0].normalized, **ctx})
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


def send_campaign(
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
    _no_nul(name, "campaign name")
    ctx = _context(context)
    now = clock.now()
    with db.session_scope() as session:
        tmpl = templates.latest(session, template)
        campaign = Campaign(
            name=name or f"{template} {now:%Y-%m-%d %H:%M}", paused=False, created_at=now
        )
        session.add(campaign)
        session.flush()
        message = _message(
            session,
            tmpl,
            from_addr,
            ctx,
            headers,
            send_at,
            expires_at,
            Priority.BULK,
            None,
            campaign=campaign,
            now=now,
        )
        result = CampaignResult(campaign.id, message.id)
        seen = 0
        # The database writes one batch while this thread checks the next: a thread of its
        # own runs each batch's INSERT (the session is used by that thread alone until the
        # `with` ends), with the batch after it already waiting so that the database never
        # waits for the hand-over, and the suppression list is read here, through a session
        # of its own. PostgreSQL, 100,000 rows: 28,500/s without the writer thread; a million
        # CSV rows: 51,000/s with one batch in its hands, 61,000 with two.
        with (
            ThreadPoolExecutor(1, thread_name_prefix="mailer-enqueue") as writer,
            db.read_scope() as lookups,
        ):
            in_flight: deque[tuple[Future[Written], int]] = deque()
            try:
                for batch in bulk.chunks(_numbered(recipients), BATCH):
                    parsed = _campaign_rows(
                        tmpl, message, ctx, batch, result, skip_invalid, first=seen == 0
                    )
                    rows = _deliveries(lookups, parsed)
                    seen += len(batch)
                    if len(in_flight) == WRITES_AHEAD:
                        _written(in_flight.popleft(), result, progress)
                    write = writer.submit(_write_deliveries, session, message, rows, now)
                    in_flight.append((write, seen))
                while in_flight:
                    _written(in_flight.popleft(), result, progress)
            except BaseException:
                # nothing more is written, and the session is rolled back only once the
                # writer is done with it
                writer.shutdown(wait=False, cancel_futures=True)
                _settle(write for write, _ in in_flight)
                raise
        if seen == 0:
            raise InputError("the recipient list is empty")
        # the rows the INSERTs skipped were already there: the same address met before
        result.duplicates = seen - result.invalid - result.queued - result.suppressed
        if result.queued == 0 and result.suppressed == 0:
            raise InputError("no valid recipient in the list; nothing was queued")
    if _due(send_at, now):
        # a reading session: on SQLite it holds no write lock while the wake-ups go out
        with db.read_scope() as session:
            publish.publish(_queued_ids(session, message.id), Priority.BULK, settings().chunk_size)
    return result


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


def _written(
    in_flight: tuple[Future[Written], int],
    result: CampaignResult,
    progress: Callable[[int], None] | None,
) -> None:
    """Wait for a batch in flight (raising its error) and count what it wrote; report the
    recipients read up to it."""
    written, seen = in_flight[0].result(), in_flight[1]
    result.queued += written[False]
    result.suppressed += written[True]
    if progress:
        progress(seen)


def _campaign_rows(
    tmpl: Template,
    message: Message,
    ctx: dict[str, Any],
    batch: list[tuple[int, Mapping[str, Any]]],
    result: CampaignResult,
    skip_invalid: bool,
    *,
    first: bool,
) -> list[tuple[addresses.Address, dict[str, Any]]]:
    """The batch's valid rows, each checked as the worker will use it."""
    parsed: list[tuple[addresses.Address, dict[str, Any]]] = []
    in_headers = _header_variables(tmpl, message)
    for line, row in batch:
        try:
            address = addresses.parse(str(row.get("email", "")))
            own = _context(row)
            _check_headers(tmpl, message, {**ctx, **own}, in_headers)
            if first and not parsed:
                _check_renders(tmpl, message, {**ctx, **own})
        except InputError as exc:
            if not skip_invalid:
                raise InputError(f"recipient {line}: {exc}") from None
            result.invalid += 1
            if len(result.rejected) < 20:
                result.rejected.append(f"recipient {line}: {exc}")
            continue
        parsed.append((address, own))
    return parsed


def _message(
    session: Session,
    tmpl: Template,
    from_addr: str | None,
    ctx: dict[str, Any],
    headers: Mapping[str, str] | None,
    send_at: datetime | None,
    expires_at: datetime | None,
    priority: Priority,
    idempotency_key: str | None,
    *,
    campaign: Campaign | None,
    now: datetime,
) -> Message:
    sender = from_addr or settings().from_addr
    if not sender:
        raise InputError("no sender: pass from_addr (--from) or set MAILER_FROM")
    sender_address = addresses.parse(sender)
    extra = dict(headers or {})
    compose.check_extra_headers(extra)
    for when, label in ((send_at, "send_at"), (expires_at, "expires_at")):
        if when is not None and when.tzinfo is None:
            raise InputError(f"{label} must carry a time zone (e.g. 2026-12-01T09:00:00+00:00)")
    if send_at and expires_at and expires_at <= send_at:
        raise InputError("expires_at must be after send_at")
    message = Message(
        campaign_id=campaign.id if campaign else None,
        template_id=tmpl.id,
        from_addr=sender_address.normalized,
        context=ctx,
        headers=extra,
        token=secrets.token_hex(8),
        idempotency_key=idempotency_key,
        priority=priority,
        send_at=send_at,
        expires_at=expires_at,
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
    if isinstance(value, str):
        return "=?" not in value and not compose.LINE_BREAK.search(value)
    return isinstance(value, int | float) or value is None


def _context(context: Mapping[str, Any] | None) -> dict[str, Any]:
    """A template context as it will be stored: JSON, not too big, and no NUL (PostgreSQL
    cannot store one, and no mail should carry one)."""
    ctx = dict(context or {})
    try:
        encoded = _json(ctx)
    except (TypeError, ValueError) as exc:
        raise InputError(f"the context must be JSON: {exc}") from None
    if len(encoded) > MAX_CONTEXT_BYTES:
        raise InputError(
            f"the context is {len(encoded) / 1024:.0f} KiB; the limit is "
            f"{MAX_CONTEXT_BYTES // 1024} KiB (store large data elsewhere and pass a reference)"
        )
    if b"\\u0000" in encoded:  # a NUL, or only the text \u0000: the values say which
        named = next((k for k, v in ctx.items() if _has_nul(k) or _has_nul(v)), None)
        if named is not None:
            raise InputError(f"the context value {named!r} contains a NUL character; remove it")
    return ctx


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


def _json(ctx: dict[str, Any]) -> bytes:
    """The context as compact UTF-8 JSON. orjson (ten times faster) takes a context of
    strings, such as a CSV row; it would write NaN as null, so anything else (and a key that
    is not a string) goes to the json module, which refuses NaN and infinities (PostgreSQL
    would store them as null)."""
    if all(type(value) is str for value in ctx.values()):
        try:
            return orjson.dumps(ctx)
        except TypeError:
            pass
    return json.dumps(ctx, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode()


def _no_nul(value: str | None, what: str) -> None:
    if value is not None and "\0" in value:
        raise InputError(f"the {what} contains a NUL character; remove it")


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
