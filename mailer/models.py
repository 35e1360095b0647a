"""The tables (SQLAlchemy 2 declarative). Alembic migrations are the only source of the schema."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql import func, text

# The ids of the tables that grow with every message sent: 64-bit. A 32-bit id ends at 2**31
# rows, under six years at a million deliveries a day. SQLite's INTEGER is 64-bit already, and
# only a column declared INTEGER PRIMARY KEY is its row id, numbered by itself (migration 0003).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class DeliveryState(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    FAILED = "failed"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    SUPPRESSED = "suppressed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self not in (DeliveryState.QUEUED, DeliveryState.SENDING, DeliveryState.DEFERRED)


class Priority(StrEnum):
    """Also the Celery queue name: workers serve `transactional` before `bulk`."""

    TRANSACTIONAL = "transactional"
    BULK = "bulk"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on every backend (SQLite keeps naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _enum(kind: type[Enum]) -> SAEnum:
    return SAEnum(
        kind,
        native_enum=False,
        length=16,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


JSONType = JSON().with_variant(JSONB(), "postgresql")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
    }


class Template(Base):
    __tablename__ = "templates"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    subject: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    html: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]


class Campaign(Base):
    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]


class Message(Base):
    """What is rendered: a template version, a sender, shared context and headers.

    A transactional message is one message with one delivery per recipient, all rendered
    alike and sent in one SMTP transaction. A campaign is one message whose deliveries each
    carry their own context, rendered and sent one by one.
    """

    __tablename__ = "messages"
    __table_args__ = (
        # the dispatcher's expiry pass starts from the messages that expired lately (0005)
        Index(
            "ix_messages_expires_at",
            "expires_at",
            postgresql_where=text("expires_at IS NOT NULL"),
            sqlite_where=text("expires_at IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    campaign_id: Mapped[int | None] = mapped_column(ForeignKey("campaigns.id"), index=True)
    template_id: Mapped[int] = mapped_column(ForeignKey("templates.id"))
    from_addr: Mapped[str] = mapped_column(String(320))
    context: Mapped[dict[str, Any]]
    headers: Mapped[dict[str, Any]]
    # random token from which every Message-ID of this message is derived (stable across retries)
    token: Mapped[str] = mapped_column(String(32))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    priority: Mapped[Priority] = mapped_column(_enum(Priority))
    send_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


# final states that `mailer purge` may delete; `unknown` is final but waits for an operator's
# decision (it may have been delivered), so it is kept
PURGEABLE = (
    DeliveryState.SENT,
    DeliveryState.BOUNCED,
    DeliveryState.FAILED,
    DeliveryState.EXPIRED,
    DeliveryState.SUPPRESSED,
    DeliveryState.CANCELLED,
)
SETTLED_WHERE = "state <> 'sending'"


WAITING_WHERE = "state IN ('queued', 'deferred')"
# a waiting delivery not published since it became due (the dispatcher's pass publishes it),
# or published and not claimed yet (republished only when the queue ran empty)
WAKEUP_OWED_WHERE = f"{WAITING_WHERE} AND (published_at IS NULL OR published_at < next_attempt_at)"
WAKEUP_GIVEN_WHERE = f"{WAITING_WHERE} AND published_at >= next_attempt_at"


def _where(predicate: str) -> dict[str, Any]:
    return {"postgresql_where": text(predicate), "sqlite_where": text(predicate)}


def _settled(name: str, *columns: Any, **options: Any) -> Index:
    """An index of the deliveries not in flight."""
    where = text(SETTLED_WHERE)
    return Index(name, *columns, postgresql_where=where, sqlite_where=where, **options)


class Delivery(Base):
    """One recipient of one message: the unit that is claimed, sent, retried and reported."""

    __tablename__ = "deliveries"
    __table_args__ = (
        # one delivery per address and message, addresses compared without case
        Index(
            "uq_deliveries_message_id_recipient",
            "message_id",
            func.lower(text("recipient")),
            unique=True,
        ),
        # what the dispatcher looks for; partial, so that a claim or an outcome, which moves a
        # delivery out of these states, adds no entry to them (migration 0002); the waiting
        # ones split by whether a wake-up is owed or was given (migration 0007)
        Index("ix_deliveries_wakeup", "next_attempt_at", **_where(WAKEUP_OWED_WHERE)),
        Index("ix_deliveries_published", "published_at", **_where(WAKEUP_GIVEN_WHERE)),
        Index(
            "ix_deliveries_leased",
            "lease_until",
            postgresql_where=text("state = 'sending'"),
            sqlite_where=text("state = 'sending'"),
        ),
        # the read paths of the dashboard and the actions (migrations 0004 and 0011); none
        # holds in-flight deliveries (`sending`), so that a claim adds no entry to them: the
        # few in flight are found through ix_deliveries_leased
        _settled("ix_deliveries_recipient", func.lower(text("recipient"))),
        # a campaign's deliveries by state and last change, and its per-domain counts read
        # from the index alone (the domain rides in each entry: one index, not two, takes an
        # entry at every outcome)
        _settled(
            "ix_deliveries_message_id_state_updated_at_id_domain",
            "message_id",
            "state",
            "updated_at",
            "id",
            postgresql_include=["domain"],
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_id: Mapped[int] = mapped_column(BigId, ForeignKey("messages.id"))
    recipient: Mapped[str] = mapped_column(String(320))
    domain: Mapped[str] = mapped_column(String(255))
    context: Mapped[dict[str, Any] | None]
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    lease_until: Mapped[datetime | None]
    published_at: Mapped[datetime | None]
    last_phase: Mapped[str | None] = mapped_column(String(16))
    last_code: Mapped[int | None] = mapped_column(Integer)
    last_enhanced: Mapped[str | None] = mapped_column(String(16))
    last_reply: Mapped[str | None] = mapped_column(Text)
    # replies.ReplyClass of the last reply, written with the outcome (migration 0007)
    last_class: Mapped[str | None] = mapped_column(String(24))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Attempt(Base):
    """One SMTP exchange for one delivery, with the server's exact answer."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(BigId, ForeignKey("deliveries.id"), index=True)
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime]
    phase: Mapped[str] = mapped_column(String(16))
    code: Mapped[int | None] = mapped_column(Integer)
    enhanced: Mapped[str | None] = mapped_column(String(16))
    reply: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(24))
    relay: Mapped[str] = mapped_column(String(300))
    tls: Mapped[bool] = mapped_column(Boolean)


class Suppression(Base):
    __tablename__ = "suppressions"
    __table_args__ = (
        # deleting a delivery looks here for the suppressions it caused (migration 0004)
        Index(
            "ix_suppressions_source_delivery_id",
            "source_delivery_id",
            postgresql_where=text("source_delivery_id IS NOT NULL"),
            sqlite_where=text("source_delivery_id IS NOT NULL"),
        ),
    )

    # BigId: an import that skips known addresses (ON CONFLICT DO NOTHING) spends an id on
    # each row it tries, kept or not
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)
    reason: Mapped[str] = mapped_column(Text)
    # SET NULL: purging the delivery that caused a suppression keeps the suppression
    source_delivery_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("deliveries.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime]


class AuditEntry(Base):
    """One operator action, as carried out: who, when, what it aimed at and how many rows."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32))
    # the filter (DeliveryFilter.as_dict), the addresses or the campaign the action was aimed at
    target: Mapped[dict[str, Any]]
    # None: the action stopped part-way (its batches committed so far stand)
    count: Mapped[int | None] = mapped_column(BigInteger)


class Relay(Base):
    """A relay's health: paused by a configuration error, or resting after throttling."""

    __tablename__ = "relays"

    name: Mapped[str] = mapped_column(String(300), primary_key=True)
    paused_reason: Mapped[str | None] = mapped_column(Text)
    backoff_until: Mapped[datetime | None]
    updated_at: Mapped[datetime]


class StateCount(Base):
    """How many deliveries a campaign (0: the transactional stream) has in each state, kept by
    triggers on `deliveries` (migration 0006; mailer/counts.py), so that a campaign's status
    reads a few rows, not its million deliveries."""

    __tablename__ = "state_counts"

    campaign_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    priority: Mapped[str] = mapped_column(String(16), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


class StateCountChange(Base):
    """A change to `state_counts` not yet folded in. On PostgreSQL each statement that moves
    deliveries appends its net changes here instead of updating the shared count rows, which
    every worker would otherwise wait on; the dispatcher folds them in each pass."""

    __tablename__ = "state_count_changes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(BigInteger, index=True)
    priority: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    n: Mapped[int] = mapped_column(BigInteger)


class CampaignBreakdown(Base):
    """A campaign's breakdown by reply class and recipient domain as last computed, with the
    state counts it was computed at (mailer/breakdowns.py decides when it is stale)."""

    __tablename__ = "campaign_breakdowns"

    campaign_id: Mapped[int] = mapped_column(
        ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True
    )
    computed_at: Mapped[datetime]
    counts: Mapped[dict[str, Any]]
    by_class: Mapped[dict[str, Any]]
    by_domain: Mapped[dict[str, Any]]


class Role(StrEnum):
    """What a dashboard user may do: viewers look, operators act, admins also manage users."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def can_act(self) -> bool:
        return self is not Role.VIEWER


class User(Base):
    """A dashboard account (`mailer user add`); the password is kept as an argon2 hash only."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[Role] = mapped_column(_enum(Role))
    password_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
