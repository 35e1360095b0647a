"""Failed sign-ins counted per key: in the process, and in Redis shared between processes."""

from __future__ import annotations

import redis

from mailer.web import ratelimit


def test_memory_limiter_blocks_after_the_limit_until_cleared() -> None:
    limiter = ratelimit.MemoryLimiter(limit=3, window=900)
    for _ in range(3):
        assert not limiter.blocked("user:ann")
        limiter.failed("user:ann")
    assert limiter.blocked("user:ann") and not limiter.blocked("user:bob")
    limiter.clear("user:ann")
    assert not limiter.blocked("user:ann")


def test_memory_limiter_forgets_after_the_window() -> None:
    limiter = ratelimit.MemoryLimiter(limit=1, window=0.0)
    limiter.failed("addr:192.0.2.1")
    assert not limiter.blocked("addr:192.0.2.1")  # a window of nothing has always ended


def test_redis_limiter_is_shared_between_processes(clean_broker: str) -> None:
    first = ratelimit.for_broker(clean_broker, 2, 900)
    second = ratelimit.for_broker(clean_broker, 2, 900)
    assert isinstance(first, ratelimit.RedisLimiter)
    first.failed("user:ann")
    second.failed("user:ann")
    assert first.blocked("user:ann") and second.blocked("user:ann")
    client = redis.Redis.from_url(clean_broker)
    assert 0 < client.ttl(ratelimit.PREFIX + "user:ann") <= 900
    second.clear("user:ann")
    assert not first.blocked("user:ann")


def test_without_redis_the_process_still_counts() -> None:
    limiter = ratelimit.for_broker("redis://127.0.0.1:1/0", limit=2, window=900)
    limiter.failed("user:ann")
    limiter.failed("user:ann")
    assert limiter.blocked("user:ann")
    assert isinstance(ratelimit.for_broker("memory://", 2, 900), ratelimit.MemoryLimiter)
