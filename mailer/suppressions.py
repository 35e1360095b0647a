"""The suppression list: addresses never to mail again (hard bounces, complaints, imports)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, select
from sqlalchemy.orm import Session

from mailer import addresses, bulk
from mailer.errors import InputError, MailerError
from mailer.models import Suppression

_IMPORT_BATCH = 10_000

Entry = tuple[str, str, int | None]  # address, reason, source delivery


def add(session: Session, entries: Iterable[Entry], now: datetime) -> int:
    """Add addresses (compared case-insensitively); returns how many were new."""
    rows = [
        {"address": a.lower(), "reason": r, "source_delivery_id": d, "created_at": now}
        for a, r, d in entries
    ]
    if not rows:
        return 0
    # one statement a batch, counted by the database (an executemany's rowcount is not)
    return bulk.insert_rows(session, Suppression, rows, ignore_conflicts=True)


def add_checked(session: Session, raw: Iterable[str], reason: str, now: datetime) -> int:
    """Validate each address first: an invalid one raises before anything is written."""
    checked = [(addresses.parse(a).key, reason, None) for a in raw]
    return add(session, checked, now)


def import_rows(
    session: Session, rows: Iterable[tuple[int, Mapping[str, Any]]], reason: str, now: datetime
) -> tuple[int, int]:
    """Add numbered rows with an 'email' (and an optional 'reason'), in batches within the
    caller's transaction, so that memory stays flat and an invalid address (InputError naming
    its line) leaves nothing written. Returns how many were read and how many were new."""
    read = added = 0
    batch: list[Entry] = []
    for line, row in rows:
        try:
            key = addresses.parse(str(row["email"])).key
        except MailerError as exc:
            raise InputError(f"line {line}: {exc}") from None
        batch.append((key, row.get("reason") or reason, None))
        if len(batch) == _IMPORT_BATCH:
            added += add(session, batch, now)
            read, batch = read + len(batch), []
    return read + len(batch), added + add(session, batch, now)


def remove(session: Session, raw: Iterable[str]) -> int:
    keys = [a.strip().lower() for a in raw]
    result: Any = session.execute(delete(Suppression).where(Suppression.address.in_(keys)))
    return max(int(result.rowcount), 0)


def entries(session: Session) -> Iterator[Suppression]:
    yield from session.scalars(
        select(Suppression).order_by(Suppression.address).execution_options(yield_per=2000)
    )


def suppressed(session: Session, keys: list[str]) -> dict[str, str]:
    """Of these lower-cased addresses, those on the list, with the reason."""
    if not keys:
        return {}
    rows = session.connection().execute(_suppressed(bulk.postgresql(session)), {"keys": keys})
    return {address: reason for address, reason in rows}


@functools.cache
def _suppressed(postgresql: bool) -> Select[str, str]:
    return select(Suppression.address, Suppression.reason).where(
        bulk.among(Suppression.address, "keys", postgresql)
    )
