"""Failed logins counted per user name and per client address: in Redis, or in this process.

A fixed window a key: after `limit` failures within `window` seconds the key is refused until
the window ends. Redis shares the count between the web processes; without it each process
counts alone (still a limit, only per process).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

PREFIX = "mailer:web:login:"


class Limiter(Protocol):
    def blocked(self, key: str) -> bool: ...
    def failed(self, key: str) -> None: ...
    def clear(self, key: str) -> None: ...


class MemoryLimiter:
    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._counts: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def _current(self, key: str, now: float) -> tuple[float, int]:
        started, count = self._counts.get(key, (now, 0))
        return (now, 0) if now - started >= self.window else (started, count)

    def blocked(self, key: str) -> bool:
        with self._lock:
            return self._current(key, time.monotonic())[1] >= self.limit

    def failed(self, key: str) -> None:
        with self._lock:
            now = time.monotonic()
            if len(self._counts) > 100_000:  # a flood of made-up names: forget the stale ones
                self._counts = {k: v for k, v in self._counts.items() if now - v[0] < self.window}
            started, count = self._current(key, now)
            self._counts[key] = (started, count + 1)

    def clear(self, key: str) -> None:
        with self._lock:
            self._counts.pop(key, None)


class RedisLimiter:
    """The same windows in Redis (INCR, then EXPIRE on the first failure). Should Redis be
    unreachable, the process's own counts stand in, so that the limit never lapses."""

    def __init__(self, client: redis.Redis[bytes], limit: int, window: float) -> None:
        self.client, self.limit, self.window = client, limit, window
        self.fallback = MemoryLimiter(limit, window)

    def blocked(self, key: str) -> bool:
        try:
            value = self.client.get(PREFIX + key)
        except redis.RedisError as exc:
            log.warning("login limits kept in this process: Redis unreachable (%s)", exc)
            return self.fallback.blocked(key)
        return (value is not None and int(value) >= self.limit) or self.fallback.blocked(key)

    def failed(self, key: str) -> None:
        try:
            with self.client.pipeline() as pipe:
                pipe.incr(PREFIX + key)
                pipe.expire(PREFIX + key, int(self.window), nx=True)
                pipe.execute()
        except redis.RedisError:
            self.fallback.failed(key)

    def clear(self, key: str) -> None:
        self.fallback.clear(key)
        with contextlib.suppress(redis.RedisError):
            self.client.delete(PREFIX + key)


def for_broker(broker_url: str, limit: int, window: float) -> Limiter:
    """Redis when the broker is Redis, else the process."""
    if broker_url.startswith(("redis://", "rediss://")):
        # no retries: a sign-in must not wait seconds on a Redis that is down
        client = redis.Redis.from_url(
            broker_url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        return RedisLimiter(client, limit, window)
    return MemoryLimiter(limit, window)
