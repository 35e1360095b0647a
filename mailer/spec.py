"""The message spec: what a message is apart from its recipients, built and checked once."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from mailer import addresses, compose
from mailer.config import settings
from mailer.errors import InputError
from mailer.models import Priority

MAX_CONTEXT_BYTES = 256 * 1024


@dataclass(frozen=True)
class MessageSpec:
    """A checked message: its template's name, the sender (normalised), the shared context,
    the extra headers, when it may go and until when, its priority and its idempotency key."""

    template: str
    from_addr: str
    context: dict[str, Any]
    headers: dict[str, str]
    send_at: datetime | None = None
    expires_at: datetime | None = None
    priority: Priority = Priority.TRANSACTIONAL
    idempotency_key: str | None = None

    @classmethod
    def build(  # noqa: PLR0913 - the public API's options, one keyword each (as the CLI's)
        cls,
        template: str,
        *,
        context: Mapping[str, Any] | None = None,
        from_addr: str | None = None,
        headers: Mapping[str, str] | None = None,
        send_at: datetime | None = None,
        expires_at: datetime | None = None,
        priority: Priority = Priority.TRANSACTIONAL,
        idempotency_key: str | None = None,
    ) -> MessageSpec:
        """The spec, or InputError saying what is wrong with the arguments."""
        no_nul(idempotency_key, "idempotency_key")
        ctx = checked_context(context)
        sender = from_addr or settings().from_addr
        if not sender:
            raise InputError("no sender: pass from_addr (--from) or set MAILER_FROM")
        sender_address = addresses.parse(sender)
        extra = dict(headers or {})
        compose.check_extra_headers(extra)
        _check_times(send_at, expires_at)
        return cls(
            template=template,
            from_addr=sender_address.normalized,
            context=ctx,
            headers=extra,
            send_at=send_at,
            expires_at=expires_at,
            priority=priority,
            idempotency_key=idempotency_key,
        )

    def due(self, now: datetime) -> bool:
        """May the message go at `now` (no send_at, or one already past)?"""
        return self.send_at is None or self.send_at <= now


def _check_times(send_at: datetime | None, expires_at: datetime | None) -> None:
    for when, label in ((send_at, "send_at"), (expires_at, "expires_at")):
        if when is not None and when.tzinfo is None:
            raise InputError(f"{label} must carry a time zone (e.g. 2026-12-01T09:00:00+00:00)")
    if send_at and expires_at and expires_at <= send_at:
        raise InputError("expires_at must be after send_at")


def checked_context(context: Mapping[str, Any] | None) -> dict[str, Any]:
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
    """The context as compact UTF-8 JSON. orjson (much faster) takes a context of strings,
    such as a CSV row; it would write NaN as null, so anything else (and a key that is not a
    string) goes to the json module, which refuses NaN and infinities (PostgreSQL would store
    them as null)."""
    if all(type(value) is str for value in ctx.values()):
        try:
            return orjson.dumps(ctx)
        except TypeError:
            pass
    return json.dumps(ctx, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode()


def no_nul(value: str | None, what: str) -> None:
    if value is not None and "\0" in value:
        raise InputError(f"the {what} contains a NUL character; remove it")
