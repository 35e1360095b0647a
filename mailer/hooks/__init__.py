"""Hooks into the delivery use case: a no-op base class, and the hooks MAILER_HOOKS registers.

In the manner of dramatiq's middleware: a hook subclasses `Hooks` and overrides the methods
it needs; `mailer.delivery` calls them at each point of a chunk's life. Metrics, traffic
shaping and the like are each one hook in a module of its own (mailer.hooks.chunklog logs a
line a chunk). Register hooks with MAILER_HOOKS="package.module:attribute,...": the attribute
is a `Hooks` instance, or a subclass, made with no arguments.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from mailer import clock

if TYPE_CHECKING:
    from mailer.config import Settings
    from mailer.delivery import ChunkReport
    from mailer.models import DeliveryState
    from mailer.outcomes import Claimed, Verdict

# "not now" from before_transaction: until when, or for how long (a timedelta, or seconds)
NotNow = datetime | timedelta | float | None


@dataclass(eq=False)
class Chunk:
    """One chunk as its hooks see it, passed to each call: the relay, when it started (on
    the monotonic clock), and `notes`, where a hook keeps its own state for this chunk (under
    a key of its own)."""

    relay: str
    started: float
    notes: dict[str, Any] = field(default_factory=dict)


class Hooks:
    """Called by the delivery use case; every method does nothing here. Calls for one chunk
    come in order from its thread, except before_transaction, which comes from the thread
    sending the group (several at once over several lanes): it must be thread-safe. A hook
    that raises fails the chunk, as a bug in the worker does."""

    def chunk_claimed(self, chunk: Chunk, deliveries: Sequence[Claimed]) -> None:
        """The chunk claimed these deliveries (some may then be closed unsent: expired or
        suppressed)."""

    def before_transaction(self, chunk: Chunk, deliveries: Sequence[Claimed]) -> NotNow:
        """The group about to be sent in one transaction. None: send it. Not now: a time (an
        aware datetime, as mailer.clock gives) or a delay (a timedelta, or seconds); the
        group is handed back deferred until then, no attempt spent, and the rest of the chunk
        goes on."""
        return None

    def verdicts_recorded(self, chunk: Chunk, verdicts: Sequence[Verdict]) -> None:
        """These outcomes were written (the database transaction committed)."""

    def deliveries_released(
        self,
        chunk: Chunk,
        deliveries: Sequence[Claimed],
        state: DeliveryState,
        due: datetime,
        why: str,
    ) -> None:
        """These were handed back untried, in `state`, due again at `due`, for `why`."""

    def chunk_done(self, chunk: Chunk, report: ChunkReport) -> None:
        """The chunk is over (not called when it failed)."""


def asks_before_transaction(hooks: Hooks) -> bool:
    """Whether `hooks` may say "not now": if not, the use case skips the call per group."""
    if isinstance(hooks, _Chain):
        return any(asks_before_transaction(h) for h in hooks.hooks)
    return type(hooks).before_transaction is not Hooks.before_transaction


def until(answer: NotNow, now: datetime) -> datetime | None:
    """A "not now" answer as the time the group is due again; None: send it now."""
    if answer is None:
        return None
    if isinstance(answer, datetime):
        return answer
    if isinstance(answer, timedelta):
        return now + answer
    return now + timedelta(seconds=answer)


def for_settings(settings: Settings) -> Hooks | None:
    """The hooks a worker runs with: MAILER_HOOKS's, and the relay's limits when its URL sets
    any (mailer.hooks.shaping)."""
    relay = settings.smtp
    return _for(settings.hooks, relay.name, relay.windows(), settings.broker_url)


@functools.cache
def _for(paths: tuple[str, ...], relay: str, windows: tuple[str, ...], broker: str) -> Hooks | None:
    found = [resolve(path) for path in paths]
    if windows:
        from mailer.hooks import shaping

        found.append(shaping.RelayLimits(relay, windows, shaping.storage_url(broker)))
    if not found:
        return None
    return found[0] if len(found) == 1 else _Chain(found)


def resolve(path: str) -> Hooks:
    """The hook that "package.module:attribute" names; ValueError says what is wrong."""
    module_name, colon, attribute = path.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"{path!r} is not of the form package.module:attribute")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    found = getattr(module, attribute, None)
    if isinstance(found, type) and issubclass(found, Hooks):
        found = found()
    if not isinstance(found, Hooks):
        raise ValueError(f"{path!r} is not a mailer.hooks.Hooks subclass or instance")
    return found


class _Chain(Hooks):
    """Several hooks, called in the order registered; the latest "not now" wins."""

    def __init__(self, hooks: Sequence[Hooks]) -> None:
        self.hooks = list(hooks)

    def chunk_claimed(self, chunk: Chunk, deliveries: Sequence[Claimed]) -> None:
        for h in self.hooks:
            h.chunk_claimed(chunk, deliveries)

    def before_transaction(self, chunk: Chunk, deliveries: Sequence[Claimed]) -> NotNow:
        now = clock.now()
        answers = [until(h.before_transaction(chunk, deliveries), now) for h in self.hooks]
        later = [a for a in answers if a is not None]
        return max(later) if later else None

    def verdicts_recorded(self, chunk: Chunk, verdicts: Sequence[Verdict]) -> None:
        for h in self.hooks:
            h.verdicts_recorded(chunk, verdicts)

    def deliveries_released(
        self,
        chunk: Chunk,
        deliveries: Sequence[Claimed],
        state: DeliveryState,
        due: datetime,
        why: str,
    ) -> None:
        for h in self.hooks:
            h.deliveries_released(chunk, deliveries, state, due, why)

    def chunk_done(self, chunk: Chunk, report: ChunkReport) -> None:
        for h in self.hooks:
            h.chunk_done(chunk, report)
