"""A relay's limits, held across every worker process and host (the relay URL's `rate=100/s`
and `daily=50000`, messages in any 24 hours): counted in Redis by the `limits` library (a
moving window, one Lua script a call), so that N processes send at the relay's rate and not N
times it, as a per-process limit such as Celery's `rate_limit` would (celery #5732).

A lane takes its messages from each window in blocks (a twentieth of a second's worth, at
least one), so that a fast relay costs a call to Redis every few messages, not every message;
a message taken and not used is lost, never sent twice: the error is toward sending less. When
a window is full a lane waits, if the wait is short (INLINE_WAIT); a longer one hands the
group back, due when the window has room, no attempt spent. Without Redis each process keeps
the windows itself, at its share of each limit (the limit over the CPU count, the worker's
default process count): slower, never a flood; said once in the log, and Redis is asked again
every RETRY_SHARED seconds.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import limits
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter
from redis.exceptions import RedisError

from mailer.hooks import Chunk, Hooks, NotNow

if TYPE_CHECKING:
    from mailer.outcomes import Claimed

log = logging.getLogger(__name__)
T = TypeVar("T")

# the longest wait a lane sleeps through for room in the window; a longer one hands back
INLINE_WAIT = 2.0
# a block is this many seconds' worth of the rate
BLOCK_SECONDS = 0.05
# after Redis failed, the seconds before it is asked again
RETRY_SHARED = 30.0
_AWAY = (RedisError, OSError)


class Window:
    """One limit of a relay ("100/second", "50000/day") and the messages a process holds from
    it, taken and not yet sent."""

    def __init__(self, limit: str) -> None:
        self.item = limits.parse(limit)
        per_second = self.item.amount / self.item.get_expiry()
        self.block = max(1, math.floor(per_second * BLOCK_SECONDS))
        self.in_hand = 0
        # this process's part of the limit, when each process keeps the window itself
        processes = os.cpu_count() or 1
        self.share = type(self.item)(max(1, self.item.amount // processes), self.item.multiples)


class RelayLimits(Hooks):
    """Asks the relay's windows before each transaction (a thread-safe hook: lanes share
    it): a group goes when every window has room for it."""

    def __init__(self, relay: str, windows: Sequence[str], storage_url: str) -> None:
        self.relay = relay
        self.windows = [Window(limit) for limit in windows]
        self._storage_url = storage_url
        self._limiter: MovingWindowRateLimiter | None = None
        self._fallback: MovingWindowRateLimiter | None = None
        self._away_since: float | None = None
        self._lock = threading.Lock()

    def before_transaction(self, chunk: Chunk, deliveries: Sequence[Claimed]) -> NotNow:
        wanted = len(deliveries)
        deadline = time.monotonic() + INLINE_WAIT
        with self._lock:
            for window in self.windows:
                # a transaction with more recipients than a window holds goes when it has
                # the whole window
                need = min(wanted, window.item.amount)
                while window.in_hand < need:
                    taken = min(max(window.block, need - window.in_hand), window.item.amount)
                    if self._take(window, taken):
                        window.in_hand += taken
                        continue
                    # what was taken from the other windows stays in hand for the next group
                    wait = self._wait(window)
                    if time.monotonic() + wait > deadline:
                        return wait
                    time.sleep(wait)
            for window in self.windows:
                window.in_hand -= min(wanted, window.in_hand)
        return None

    def _take(self, window: Window, n: int) -> bool:
        return self._ask(window, lambda limiter, item: limiter.hit(item, self.relay, cost=n))

    def _wait(self, window: Window) -> float:
        """Seconds until the window has room again (at least a millisecond)."""
        stats = self._ask(window, lambda limiter, item: limiter.get_window_stats(item, self.relay))
        return max(stats.reset_time - time.time(), 0.001)

    def _ask(
        self, window: Window, call: Callable[[MovingWindowRateLimiter, limits.RateLimitItem], T]
    ) -> T:
        """`call` on the shared window in Redis, or on this process's share of it when Redis
        is away."""
        if self._shared_usable():
            try:
                return call(self._shared(), window.item)
            except _AWAY as exc:
                self._went_away(exc)
        return call(self._local(), window.share)

    def _shared_usable(self) -> bool:
        """Redis is asked unless it failed within RETRY_SHARED seconds."""
        if self._away_since is None:
            return True
        if time.monotonic() - self._away_since < RETRY_SHARED:
            return False
        self._away_since = None
        log.info("relay %s: asking the shared rate limit again", self.relay)
        return True

    def _shared(self) -> MovingWindowRateLimiter:
        if self._limiter is None:
            self._limiter = MovingWindowRateLimiter(storage_from_string(self._storage_url))
        return self._limiter

    def _went_away(self, exc: Exception) -> None:
        self._away_since = time.monotonic()
        if self._fallback is None:  # said once a process
            log.warning(
                "relay %s: the shared rate limit is unavailable (%s); this process sends at "
                "its share of each limit, and asks again every %.0f s",
                self.relay,
                exc,
                RETRY_SHARED,
            )

    def _local(self) -> MovingWindowRateLimiter:
        if self._fallback is None:
            self._fallback = MovingWindowRateLimiter(MemoryStorage())
        return self._fallback


def storage_url(broker_url: str) -> str:
    """Where the windows are kept: the broker's Redis, or each process's memory when the
    broker is not Redis (memory://, in tests and the demo)."""
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        return broker_url
    return "memory://"
