"""A relay's health: paused (its configuration is wrong) or resting (throttled, unreachable).

The worker checks `block` before it claims, the dispatcher before it publishes; `observe`
turns a batch of replies into a pause or a rest; an operator resumes with `resume`. Rows of
the `relays` table, one per relay name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from mailer import db
from mailer.models import Relay
from mailer.replies import Phase, ReplyClass, SMTPReply

log = logging.getLogger(__name__)


class Heard(Protocol):
    """A relay's reply as `observe` needs it (outcomes.Verdict has this shape)."""

    @property
    def relay(self) -> str: ...
    @property
    def klass(self) -> ReplyClass: ...
    @property
    def phase(self) -> Phase: ...
    @property
    def reply(self) -> SMTPReply: ...


@dataclass(frozen=True)
class Block:
    """Why the relay cannot be used now, and until when (paused: until an operator resumes
    it; the work is due again at once, and the dispatcher holds back meanwhile)."""

    until: datetime
    why: str


_health_of = select(Relay.paused_reason, Relay.backoff_until).where(Relay.name == bindparam("name"))


def block(session: Session, name: str, now: datetime) -> Block | None:
    """Why relay `name` cannot be used now; None when it is usable."""
    state = session.connection().execute(_health_of, {"name": name}).first()
    if state is None:
        return None
    if state.paused_reason:
        return Block(now, f"paused: {state.paused_reason}")
    if state.backoff_until is not None and state.backoff_until > now:
        return Block(state.backoff_until, f"resting until {state.backoff_until.isoformat()}")
    return None


def observe(session: Session, heard: Iterable[Heard], rest_seconds: float, now: datetime) -> None:
    """What a batch of replies says of its relay: a configuration error pauses it (and
    outranks the rest); throttling or a failed connection rests it `rest_seconds`."""
    replies = list(heard)
    for h in replies:
        if h.klass is ReplyClass.CONFIGURATION:
            pause(session, h.relay, f"{h.phase.value}: {h.reply}", now)
            return
    for h in replies:
        if h.klass in (ReplyClass.THROTTLED, ReplyClass.CONNECTION):
            rest(session, h.relay, now + timedelta(seconds=rest_seconds), now)
            return


def pause(session: Session, name: str, reason: str, now: datetime) -> None:
    """Use relay `name` no more until an operator resumes it."""
    _upsert(session, name, {"paused_reason": reason, "updated_at": now})
    log.error(
        "relay %s paused: %s -- fix the configuration, then `mailer relay resume`", name, reason
    )


def rest(session: Session, name: str, until: datetime, now: datetime) -> None:
    """Use relay `name` no more until `until`."""
    _upsert(session, name, {"backoff_until": until, "updated_at": now})
    log.warning("relay %s throttled or unreachable: resting until %s", name, until.isoformat())


def resume(session: Session, name: str, now: datetime) -> None:
    """Relay `name` is usable again: neither paused nor resting."""
    _upsert(session, name, {"paused_reason": None, "backoff_until": None, "updated_at": now})


def _upsert(session: Session, name: str, values: dict[str, Any]) -> None:
    stmt = db.dialect_insert(session)(Relay).values(name=name, **values)
    session.execute(stmt.on_conflict_do_update(index_elements=["name"], set_=values))
