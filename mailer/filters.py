"""Which deliveries an operator means: one filter for the CLI's options, the web's query string,
the read side's pages and the actions, with one parser and one printer for both front ends.

Every filter is bounded on a big outbox by its scope: a campaign (its messages, then their
deliveries through the indexes that begin with message_id), a message, a delivery, or a
recipient (ix_deliveries_recipient, plus the few in flight through ix_deliveries_leased). A
filter with no scope is only ever read in windows of ids (`windows`) or one page at a time.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.orm import Session

from mailer import clock
from mailer.models import Campaign, Delivery, DeliveryState, Message
from mailer.replies import ReplyClass

# the width of the id windows in which a filter without a scope is read (by the primary key)
WINDOW = 100_000

_ENHANCED = re.compile(r"[245](\.\d{1,3}){1,2}")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# each field's accepted form, for the errors of `from_params`
FORMS = {
    "campaign": "a campaign id (a whole number)",
    "message": "a message id (a whole number)",
    "delivery": "a delivery id (a whole number)",
    "state": "states separated by commas, of: " + ", ".join(s.value for s in DeliveryState),
    "code": "4xx, 5xx or a reply code such as 550",
    "enhanced": "an enhanced status code such as 5.1.1, or its start such as 5.7",
    "class": "one of: " + ", ".join(c.value for c in ReplyClass),
    "domain": "a recipient domain such as example.com",
    "reply": "text to find in the last reply (any case)",
    "recipient": "an email address",
    "since": "ISO 8601 (UTC when no zone is given) or an age such as 30m, 2h, 1d",
    "until": "ISO 8601 (UTC when no zone is given) or an age such as 30m, 2h, 1d",
}


@dataclass(frozen=True)
class DeliveryFilter:
    """Deliveries by campaign, message, delivery, state, last reply (code, enhanced code,
    class, text), recipient domain, recipient, and last change (`since` <= updated_at <
    `until`). Every field given must hold; none given matches everything."""

    campaign_id: int | None = None
    message_id: int | None = None
    delivery_id: int | None = None
    states: tuple[DeliveryState, ...] = ()
    code: str | None = None  # "4xx", "5xx" or an exact code such as "550"
    enhanced: str | None = None  # "5.1.1", or a prefix such as "5.7"
    reply_class: ReplyClass | None = None
    domain: str | None = None
    reply_contains: str | None = None
    recipient: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        # checked here too, so that a filter built in code is as valid as a parsed one
        object.__setattr__(self, "states", tuple(DeliveryState(s) for s in self.states))
        if self.code is not None:
            code_range(self.code)
        if self.enhanced is not None and not _ENHANCED.fullmatch(self.enhanced):
            raise ValueError(f"enhanced: {self.enhanced!r} is not {FORMS['enhanced']}")
        for name in ("since", "until"):
            when = getattr(self, name)
            if when is not None and when.tzinfo is None:
                raise ValueError(f"{name}: a naive datetime; give a time zone")

    @property
    def scoped(self) -> bool:
        """Narrowed by campaign, message, delivery or recipient: read through their indexes."""
        return any(
            v is not None
            for v in (self.campaign_id, self.message_id, self.delivery_id, self.recipient)
        )

    @property
    def empty(self) -> bool:
        return self == DeliveryFilter()

    def where(self, session: Session | None = None) -> list[ColumnElement[bool]]:
        """The conditions on `deliveries` (for a statement of the caller's own). With a
        session, a campaign's messages are looked up first and given as values, so that the
        planner estimates from their statistics rather than from a subquery it cannot see
        into."""
        return [*self._scope(session), *self._reply(), *self._rest()]

    def _scope(self, session: Session | None) -> Iterator[ColumnElement[bool]]:
        d = Delivery
        if self.campaign_id is not None:
            messages = select(Message.id).where(Message.campaign_id == self.campaign_id)
            if session is None:
                yield d.message_id.in_(messages)
            else:  # ix_messages_campaign_id
                yield d.message_id.in_(list(session.scalars(messages)) or [0])
        if self.message_id is not None:
            yield d.message_id == self.message_id
        if self.delivery_id is not None:
            yield d.id == self.delivery_id
        if self.recipient is not None:
            yield _recipient_is(self.recipient.strip().lower())

    def _reply(self) -> Iterator[ColumnElement[bool]]:
        d = Delivery
        if self.code is not None:
            low, high = code_range(self.code)
            yield d.last_code.between(low, high)
        if self.enhanced is not None:
            prefix = self.enhanced + "."
            yield or_(d.last_enhanced == self.enhanced, d.last_enhanced.startswith(prefix))
        if self.reply_class is not None:
            yield d.last_class == self.reply_class.value
        if self.reply_contains:
            yield d.last_reply.icontains(self.reply_contains, autoescape=True)

    def _rest(self) -> Iterator[ColumnElement[bool]]:
        d = Delivery
        if self.states:
            yield d.state.in_(self.states)
        if self.domain is not None:
            yield d.domain == self.domain.strip().lower()
        if self.since is not None:
            yield d.updated_at >= self.since
        if self.until is not None:
            yield d.updated_at < self.until

    def ids(self, session: Session | None = None) -> Select[Any]:
        """SELECT deliveries.id of the matching deliveries (for outcomes.requeue and kin)."""
        return select(Delivery.id).where(*self.where(session))

    # --- the front ends' forms ----------------------------------------------------------------

    @classmethod
    def from_params(
        cls, params: Mapping[str, str], *, now: datetime | None = None, others: bool = False
    ) -> DeliveryFilter:
        """From a query string's or the CLI's values (keys as in FORMS; empty values are left
        out); ValueError naming the field and the form it accepts. A key that is not a
        filter's is an error too, unless `others` (a query string that also pages)."""
        values: dict[str, Any] = {}
        for key, raw in params.items():
            text = (raw or "").strip()
            if not text or (others and key not in FORMS):
                continue
            if key not in FORMS:
                raise ValueError(f"{key}: not a filter; filters are {', '.join(FORMS)}")
            try:
                values[_FIELD[key]] = _parse(key, text, now)
            except ValueError:
                raise ValueError(f"{key}: {raw!r} is not {FORMS[key]}") from None
        return cls(**values)

    def to_params(self) -> dict[str, str]:
        """The query string's values (from_params reads them back to an equal filter)."""
        out: dict[str, str] = {}
        for key, name in _FIELD.items():
            value = getattr(self, name)
            if value is None or value == ():
                continue
            if key == "state":
                out[key] = ",".join(s.value for s in value)
            elif isinstance(value, datetime):
                out[key] = value.isoformat()
            else:
                out[key] = str(value)
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, the fields given only (the audit log's record of the target)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or value == ():
                continue
            if isinstance(value, datetime):
                value = value.isoformat()
            elif f.name == "states":
                value = [s.value for s in value]
            elif isinstance(value, ReplyClass):
                value = value.value
            out[f.name] = value
        return out

    def describe(self) -> str:
        """One line for people: 'campaign=3 state=failed,unknown'."""
        return " ".join(f"{k}={v}" for k, v in self.to_params().items()) or "everything"


_FIELD = {
    "campaign": "campaign_id",
    "message": "message_id",
    "delivery": "delivery_id",
    "state": "states",
    "code": "code",
    "enhanced": "enhanced",
    "class": "reply_class",
    "domain": "domain",
    "reply": "reply_contains",
    "recipient": "recipient",
    "since": "since",
    "until": "until",
}


def _parse(key: str, text: str, now: datetime | None) -> Any:
    if key in ("campaign", "message", "delivery"):
        if not text.isdigit():
            raise ValueError(text)
        return int(text)
    if key == "state":
        return tuple(DeliveryState(s.strip().lower()) for s in text.split(",") if s.strip())
    if key == "class":
        return ReplyClass(text.lower())
    if key == "code":
        code_range(text)
        return text.lower()
    if key == "enhanced":
        if not _ENHANCED.fullmatch(text):
            raise ValueError(text)
        return text
    if key in ("since", "until"):
        return parse_time(text, now)
    if key == "recipient" and "@" not in text:
        raise ValueError(text)
    return text


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (UTC when no zone is given), or an age such as 30m, 2h, 1d before `now`."""
    if text[:-1].isdigit() and text[-1:] in _UNITS:
        return (now or clock.now()) - timedelta(seconds=int(text[:-1]) * _UNITS[text[-1]])
    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def code_range(code: str) -> tuple[int, int]:
    """ "4xx" -> (400, 499); "550" -> (550, 550); ValueError with the accepted forms."""
    text = code.strip().lower()
    if len(text) == 3 and text[0] in "245" and text[1:] == "xx":
        base = int(text[0]) * 100
        return base, base + 99
    if len(text) == 3 and text.isdigit() and text[0] in "245":
        return int(text), int(text)
    raise ValueError(f"code: {code!r} is not {FORMS['code']}")


def _recipient_is(address: str) -> ColumnElement[bool]:
    # ix_deliveries_recipient holds no delivery in flight; those few come from
    # ix_deliveries_leased (each side of the OR has an index of its own: a BitmapOr)
    low = func.lower(Delivery.recipient)
    return and_(
        low == address,
        or_(
            and_(Delivery.state != DeliveryState.SENDING, low == address),
            Delivery.state == DeliveryState.SENDING,
        ),
    )


def ranges(
    session: Session, f: DeliveryFilter, width: int = WINDOW
) -> Iterator[list[ColumnElement[bool]]]:
    """The extra conditions under which to read `f` piece by piece: none when it is scoped;
    else windows of `width` ids, each a range of the primary key, so that no statement reads
    the whole outbox at once."""
    if f.scoped:
        yield []
        return
    low, high = session.execute(select(func.min(Delivery.id), func.max(Delivery.id))).one()
    if low is None:
        return
    for start in range(low, high + 1, width):
        yield [Delivery.id >= start, Delivery.id < start + width]


# (database, scope, its id, its row's created_at) -> the ids' range; see id_bounds
_BOUNDS: dict[tuple[str, str, int, datetime], tuple[int, int]] = {}
_BOUNDS_KEPT = 4096


def id_bounds(session: Session, f: DeliveryFilter) -> tuple[int, int] | None:
    """The smallest and largest delivery id of `f`'s campaign or message (None: `f` has
    neither). A page in id order starts and ends there: the primary key's walk, which serves
    ORDER BY id LIMIT, would otherwise read every older delivery before the scope's first
    (and every newer one after a rare filter's last match). The range is fixed once the
    deliveries are committed (nothing is added to a message later, and a purge only narrows
    it), so it is read once a process, from the index of settled deliveries (id is in it)
    and the few in flight (ix_deliveries_leased)."""
    if f.message_id is not None:
        born = select(Message.created_at).where(Message.id == f.message_id)
        scope, key_id = "message", f.message_id
        messages: Any = [f.message_id]
    elif f.campaign_id is not None:
        born = select(Campaign.created_at).where(Campaign.id == f.campaign_id)
        scope, key_id = "campaign", f.campaign_id
        messages = select(Message.id).where(Message.campaign_id == f.campaign_id)
    else:
        return None
    created = session.scalar(born)
    if created is None:
        return (1, 0)  # no such campaign or message: an empty range
    key = (str(session.connection().engine.url), scope, key_id, created)
    if key not in _BOUNDS:
        found = _range(session, messages)
        if found is None:
            return (1, 0)  # not committed yet, or purged: nothing to keep
        if len(_BOUNDS) >= _BOUNDS_KEPT:
            _BOUNDS.clear()
        _BOUNDS[key] = found
    return _BOUNDS[key]


def _range(session: Session, messages: Any) -> tuple[int, int] | None:
    d = Delivery
    sides = [
        session.execute(
            select(func.min(d.id), func.max(d.id)).where(d.message_id.in_(messages), state)
        ).one()
        for state in (d.state != DeliveryState.SENDING, d.state == DeliveryState.SENDING)
    ]
    lows = [low for low, _ in sides if low is not None]
    highs = [high for _, high in sides if high is not None]
    return (min(lows), max(highs)) if lows else None


def windows(session: Session, f: DeliveryFilter, width: int = WINDOW) -> Iterator[Select[Any]]:
    """`f.ids()`, whole when it is scoped, else window by window (`ranges`)."""
    for extra in ranges(session, f, width):
        yield f.ids(session).where(*extra)
