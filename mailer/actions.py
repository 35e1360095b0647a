"""Every operator action, once, for the CLI and the web: retry, cancel, suppress, unsuppress,
pause and resume a campaign, resume a relay, import and export the suppression list.

Each action checks the actor's role, does its work through the module that owns it
(outcomes.py for states, suppressions.py for the list, relay_health.py for relays), and writes
one audit row in the caller's transaction, so that the change and its record commit together.
`preview` (and its kin) counts what an action would change and writes nothing: the dry run the
CLI's --dry-run and the web's confirmation show.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, exists, func, literal, select
from sqlalchemy.orm import Session

from mailer import batches, clock, config, counts, db, filters, outcomes, relay_health, suppressions
from mailer.errors import InputError, PermissionDenied
from mailer.filters import DeliveryFilter
from mailer.models import AuditEntry, Delivery, DeliveryState, Role, Suppression


@dataclass(frozen=True)
class Actor:
    """Who acts: a person's name and role (the web's login; the CLI's OS user)."""

    name: str
    role: Role


def cli_actor(name: str | None = None) -> Actor:
    """The CLI's actor: `--as NAME`, else the OS user. Whoever runs the CLI holds the
    database's URL and could change anything: an admin."""
    return Actor(name or getpass.getuser(), Role.ADMIN)


class Action(StrEnum):
    RETRY = "retry"
    CANCEL = "cancel"
    SUPPRESS = "suppress"
    UNSUPPRESS = "unsuppress"
    PAUSE = "pause"
    RESUME = "resume"
    RELAY_RESUME = "relay_resume"
    SUPPRESS_IMPORT = "suppress_import"
    SUPPRESS_EXPORT = "suppress_export"


@dataclass(frozen=True)
class Done:
    """An action carried out: how many rows it changed and its audit row."""

    action: Action
    count: int
    audit_id: int
    target: dict[str, Any] = field(default_factory=dict)


S = DeliveryState
_WAITING = (S.QUEUED, S.DEFERRED)


# --- deliveries by filter ----------------------------------------------------------------------


def preview(
    session: Session, action: Action, target: DeliveryFilter, *, include_suppressed: bool = False
) -> int:
    """How many rows `action` (retry, cancel, suppress or unsuppress) would change for
    `target`: deliveries for retry and cancel, addresses for the suppression list."""
    _aimed(target)
    count = _COUNTERS.get(action)
    if count is None:
        raise InputError(f"{action.value} does not take a filter")
    return sum(count(session, ids, include_suppressed) for ids in filters.windows(session, target))


def retry(
    session: Session,
    actor: Actor,
    target: DeliveryFilter,
    *,
    include_suppressed: bool = False,
    now: datetime | None = None,
    progress: batches.Progress | None = None,
) -> Done:
    """Queue the matching deliveries again with a fresh budget (outcomes.requeue); addresses
    on the suppression list are left out unless `include_suppressed`, which also unlists them."""
    _allowed(actor)
    _aimed(target)
    when = now or clock.now()
    audited = {**target.as_dict(), **({"include_suppressed": True} if include_suppressed else {})}
    entry = _begin(session, actor, Action.RETRY, audited, when)
    n = sum(
        outcomes.requeue(
            session, ids, when, include_suppressed=include_suppressed, progress=progress
        )
        for ids in filters.windows(session, target)
    )
    return _finish(session, entry, n)


def cancel(
    session: Session,
    actor: Actor,
    target: DeliveryFilter,
    *,
    now: datetime | None = None,
    progress: batches.Progress | None = None,
) -> Done:
    """Cancel the matching deliveries that have not gone out (queued, deferred)."""
    _allowed(actor)
    _aimed(target)
    when = now or clock.now()
    entry = _begin(session, actor, Action.CANCEL, target.as_dict(), when)
    n = sum(
        outcomes.cancel(session, ids, when, progress) for ids in filters.windows(session, target)
    )
    return _finish(session, entry, n)


def suppress(
    session: Session,
    actor: Actor,
    target: DeliveryFilter,
    *,
    reason: str = "added by an operator",
    now: datetime | None = None,
) -> Done:
    """Put the recipients of the matching deliveries on the suppression list."""
    _allowed(actor)
    _aimed(target)
    when = now or clock.now()
    n = 0
    for ids in filters.windows(session, target):
        # the filter's own SELECT with other columns: no second scan of deliveries
        chosen = ids.with_only_columns(
            func.lower(Delivery.recipient),
            literal(reason, type_=Suppression.reason.type),
            literal(when, type_=Suppression.created_at.type),
        ).distinct()
        insert = db.dialect_insert(session)(Suppression).from_select(
            ["address", "reason", "created_at"], chosen
        )
        # SQLAlchemy keeps an INSERT's rowcount only when asked to
        result: Any = session.execute(
            insert.on_conflict_do_nothing(index_elements=["address"]).execution_options(
                preserve_rowcount=True
            )
        )
        n += max(int(result.rowcount), 0)
    return _audit(session, actor, Action.SUPPRESS, {**target.as_dict(), "reason": reason}, n, when)


def unsuppress(
    session: Session, actor: Actor, target: DeliveryFilter, *, now: datetime | None = None
) -> Done:
    """Take the recipients of the matching deliveries off the suppression list (their mail
    is not retried by this: see `retry`)."""
    _allowed(actor)
    _aimed(target)
    when = now or clock.now()
    n = 0
    for ids in filters.windows(session, target):
        result: Any = session.execute(
            delete(Suppression)
            .where(Suppression.address.in_(_addresses(ids)))
            .execution_options(synchronize_session=False)
        )
        n += max(int(result.rowcount), 0)
    return _audit(session, actor, Action.UNSUPPRESS, target.as_dict(), n, when)


def _addresses(ids: Any) -> Any:
    return ids.with_only_columns(func.lower(Delivery.recipient))


def _count_retry(session: Session, ids: Any, include_suppressed: bool) -> int:
    return outcomes.retry_candidates(session, ids, include_suppressed=include_suppressed)


def _count_cancel(session: Session, ids: Any, _include_suppressed: bool) -> int:
    chosen = ids.with_only_columns(func.count()).where(Delivery.state.in_(_WAITING))
    return session.scalar(chosen) or 0


def _count_suppress(session: Session, ids: Any, _include_suppressed: bool) -> int:
    listed = exists().where(Suppression.address == func.lower(Delivery.recipient))
    chosen = ids.with_only_columns(func.count(func.distinct(func.lower(Delivery.recipient))))
    return session.scalar(chosen.where(~listed)) or 0


def _count_unsuppress(session: Session, ids: Any, _include_suppressed: bool) -> int:
    chosen = select(func.count()).where(Suppression.address.in_(_addresses(ids)))
    return session.scalar(chosen) or 0


_COUNTERS = {
    Action.RETRY: _count_retry,
    Action.CANCEL: _count_cancel,
    Action.SUPPRESS: _count_suppress,
    Action.UNSUPPRESS: _count_unsuppress,
}


# --- addresses ---------------------------------------------------------------------------------


def preview_addresses(session: Session, action: Action, raw: Iterable[str]) -> int:
    """How many of these addresses `suppress` would add, or `unsuppress` would remove."""
    keys = sorted({a.strip().lower() for a in raw if a.strip()})
    listed = len(suppressions.suppressed(session, keys))
    if action is Action.SUPPRESS:
        return len(keys) - listed
    if action is Action.UNSUPPRESS:
        return listed
    raise InputError(f"{action.value} does not take addresses")


def suppress_addresses(
    session: Session,
    actor: Actor,
    raw: Iterable[str],
    *,
    reason: str = "added by an operator",
    now: datetime | None = None,
) -> Done:
    """Add addresses to the list (each checked first: an invalid one changes nothing)."""
    _allowed(actor)
    given = list(raw)
    when = now or clock.now()
    n = suppressions.add_checked(session, given, reason, when)
    target = {"addresses": given, "reason": reason}
    return _audit(session, actor, Action.SUPPRESS, target, n, when)


def unsuppress_addresses(
    session: Session, actor: Actor, raw: Iterable[str], *, now: datetime | None = None
) -> Done:
    """Take addresses off the list."""
    _allowed(actor)
    given = list(raw)
    when = now or clock.now()
    n = suppressions.remove(session, given)
    return _audit(session, actor, Action.UNSUPPRESS, {"addresses": given}, n, when)


def import_suppressions(
    session: Session,
    actor: Actor,
    rows: Iterable[tuple[int, Mapping[str, Any]]],
    *,
    reason: str = "imported",
    source: str = "",
    now: datetime | None = None,
) -> Done:
    """Add numbered rows with an 'email' (and an optional 'reason'), as suppressions.
    import_rows does: an invalid address refuses the whole file. The audit's target holds the
    source's name and how many rows were read."""
    _allowed(actor)
    when = now or clock.now()
    read, added = suppressions.import_rows(session, rows, reason, when)
    target = {"source": source, "read": read, "reason": reason}
    return _audit(session, actor, Action.SUPPRESS_IMPORT, target, added, when)


def export_suppressions(
    session: Session, actor: Actor, *, now: datetime | None = None
) -> tuple[Done, Iterator[Suppression]]:
    """The whole list, streamed in address order, and the export's audit row (any role:
    reading is not acting, but the list is personal data, so who took a copy is kept)."""
    when = now or clock.now()
    n = session.scalar(select(func.count()).select_from(Suppression)) or 0
    done = _audit(session, actor, Action.SUPPRESS_EXPORT, {}, n, when)
    return done, suppressions.entries(session)


# --- campaigns and relays ----------------------------------------------------------------------


def preview_campaign(session: Session, campaign_id: int) -> int:
    """How many of the campaign's deliveries wait to be sent (what a pause holds back and a
    resume hands out again)."""
    from mailer import queries

    queries.campaign(session, campaign_id)  # NotFound
    found = counts.campaign(session, campaign_id)  # a few rows, not the waiting deliveries
    return sum(found.get(state, 0) for state in _WAITING)


def pause_campaign(
    session: Session,
    actor: Actor,
    campaign_id: int,
    *,
    now: datetime | None = None,
    progress: batches.Progress | None = None,
) -> Done:
    """Hand out no more of the campaign's deliveries (those in flight finish)."""
    return _set_paused(session, actor, campaign_id, True, now or clock.now(), progress)


def resume_campaign(
    session: Session,
    actor: Actor,
    campaign_id: int,
    *,
    now: datetime | None = None,
    progress: batches.Progress | None = None,
) -> Done:
    """Hand the campaign's deliveries out again (the dispatcher publishes them)."""
    return _set_paused(session, actor, campaign_id, False, now or clock.now(), progress)


def _set_paused(
    session: Session,
    actor: Actor,
    campaign_id: int,
    paused: bool,
    now: datetime,
    progress: batches.Progress | None,
) -> Done:
    _allowed(actor)
    waiting = preview_campaign(session, campaign_id)  # NotFound for a campaign that is not
    action = Action.PAUSE if paused else Action.RESUME
    entry = _begin(session, actor, action, {"campaign_id": campaign_id}, now)
    outcomes.pause_campaign(session, campaign_id, paused, now, progress)
    return _finish(session, entry, waiting)


def preview_relay(session: Session, name: str | None = None, now: datetime | None = None) -> int:
    """1 when the relay is paused or resting (a resume changes it), else 0."""
    relay = name or config.settings().smtp.name
    return int(relay_health.block(session, relay, now or clock.now()) is not None)


def resume_relay(
    session: Session, actor: Actor, name: str | None = None, *, now: datetime | None = None
) -> Done:
    """Use the relay (the configured one by default) again after fixing its configuration."""
    _allowed(actor)
    relay = name or config.settings().smtp.name
    when = now or clock.now()
    changed = preview_relay(session, relay, when)
    relay_health.resume(session, relay, when)
    return _audit(session, actor, Action.RELAY_RESUME, {"relay": relay}, changed, when)


# --- checks and the record ---------------------------------------------------------------------


def _allowed(actor: Actor) -> None:
    if not actor.role.can_act:
        raise PermissionDenied(
            f"{actor.name} is a {actor.role.value}: viewers may look but not act "
            "(an admin can give the operator role)"
        )


def _aimed(target: DeliveryFilter) -> None:
    # a state alone would reach every campaign and message ever sent
    if target.empty or target == DeliveryFilter(states=target.states):
        raise InputError(
            "say which deliveries: a campaign, message, delivery, recipient, code, "
            "enhanced code, class, domain, reply text or time, not only states"
        )


def _audit(
    session: Session,
    actor: Actor,
    action: Action,
    target: dict[str, Any],
    count: int,
    now: datetime,
) -> Done:
    return _finish(session, _begin(session, actor, action, target, now), count)


def _begin(
    session: Session, actor: Actor, action: Action, target: dict[str, Any], now: datetime
) -> AuditEntry:
    """The audit row, before the work: an action that commits in batches and stops part-way
    leaves its row, with no count (NULL: it did not finish)."""
    entry = AuditEntry(
        at=now, actor=actor.name, role=actor.role.value, action=action.value, target=target
    )
    session.add(entry)
    session.flush()
    return entry


def _finish(session: Session, entry: AuditEntry, count: int) -> Done:
    entry.count = count
    session.flush()
    return Done(Action(entry.action), count, entry.id, dict(entry.target))
