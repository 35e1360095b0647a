"""A relay's rate (`rate=` in its URL) held across worker processes through Redis
(mailer.hooks.shaping): what the hook answers, and real workers sending at the rate."""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from mailer import clock, db, enqueue, hooks
from mailer.hooks import shaping
from mailer.models import Attempt
from tests.helpers import add_template, count, deliveries, wait_until

CHUNK = hooks.Chunk("relay.example:25", 0.0)


def _group(n: int) -> list[Any]:
    return [object()] * n


def test_a_full_window_hands_a_long_wait_back_and_spends_nothing() -> None:
    hook = shaping.RelayLimits("r-hour", ["5/hour"], "memory://")
    answers = [hook.before_transaction(CHUNK, _group(1)) for _ in range(5)]
    assert answers == [None] * 5
    wait = hook.before_transaction(CHUNK, _group(1))
    # the window frees its first message in an hour: far past INLINE_WAIT, so handed back
    assert isinstance(wait, float) and 3590 < wait <= 3600
    assert hook.before_transaction(CHUNK, _group(1)) is not None  # still nothing to spare


def test_a_group_takes_as_many_as_it_holds_and_blocks_are_kept_for_later() -> None:
    hook = shaping.RelayLimits("r-block", ["100/minute"], "memory://")
    assert hook.windows[0].block == 1  # a twentieth of a second's worth, at least one
    fast = shaping.RelayLimits("r-fast", ["1000/second"], "memory://")
    assert fast.windows[0].block == 50
    assert fast.before_transaction(CHUNK, _group(3)) is None
    assert fast.windows[0].in_hand == 47  # the rest of the block, for the next groups
    assert hook.before_transaction(CHUNK, _group(100)) is None
    assert hook.before_transaction(CHUNK, _group(1)) is not None


def test_a_group_goes_when_every_window_has_room() -> None:
    hook = shaping.RelayLimits("r-two", ["100/second", "3/day"], "memory://")
    assert [hook.before_transaction(CHUNK, _group(1)) for _ in range(3)] == [None] * 3
    wait = hook.before_transaction(CHUNK, _group(1))
    assert isinstance(wait, float) and wait > 86000  # the day's three are spent
    # what the group took from the rate's window stays in hand for the next
    assert hook.windows[0].in_hand == hook.windows[0].block - 3


def test_a_transaction_bigger_than_the_window_goes_when_it_has_the_whole_window() -> None:
    hook = shaping.RelayLimits("r-big", ["5/hour"], "memory://")
    assert hook.before_transaction(CHUNK, _group(8)) is None  # 8 recipients, one transaction
    assert hook.before_transaction(CHUNK, _group(1)) is not None  # and the hour is spent


def test_hooks_for_a_relay_with_a_rate(configure_env: Any) -> None:
    assert hooks.for_settings(configure_env(smtp_url="smtp://h:25?tls=none")) is None
    found = hooks.for_settings(configure_env(smtp_url="smtp://h:25?tls=none&rate=10/s&daily=500"))
    assert isinstance(found, shaping.RelayLimits)
    assert found.relay == "h:25"
    assert [str(w.item) for w in found.windows] == ["10 per 1 second", "500 per 1 day"]
    assert shaping.storage_url("memory://") == "memory://"
    assert shaping.storage_url("redis://127.0.0.1:6379/3") == "redis://127.0.0.1:6379/3"


def test_without_redis_a_process_keeps_its_share_and_says_so_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shaping.os, "cpu_count", lambda: 2)
    # nothing listens on port 9
    hook = shaping.RelayLimits("r-away", ["10/hour"], "redis://127.0.0.1:9/0")
    with caplog.at_level(logging.WARNING, logger="mailer.hooks.shaping"):
        answers = [hook.before_transaction(CHUNK, _group(1)) for _ in range(6)]
    assert answers[:5] == [None] * 5  # half of 10 an hour: two processes by default
    assert answers[5] is not None
    warnings = [r for r in caplog.records if "shared rate limit is unavailable" in r.message]
    assert len(warnings) == 1


def _on_two_workers(
    configure_env: Any, worker_process: Any, broker: str, smtp_server: Any, limit: str, n: int
) -> None:
    """A campaign of `n` to a relay with `limit`, sent by two worker processes of two sessions
    each over the test's Redis (emptied by the clean_broker fixture)."""
    configure_env(
        broker_url=broker,
        smtp_url=f"{smtp_server.url(tls='none')}&{limit}",
        smtp_sessions=2,
        log_level="WARNING",
    )
    add_template()
    enqueue.send_campaign(
        "welcome", [{"email": f"u{i}@example.com", "name": "u"} for i in range(n)]
    )
    worker_process("--concurrency", "1")
    worker_process("--concurrency", "1")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("rate", "n"),
    [
        (50, 600),
        # the acceptance: 3,000 at 100 a second, half a minute (make slow)
        pytest.param(100, 3000, marks=pytest.mark.slow),
    ],
)
def test_two_workers_send_at_the_relay_rate_together(
    pg_db: str,
    clean_broker: str,
    smtp_server: Any,
    configure_env: Any,
    worker_process: Any,
    running_dispatcher: Any,
    rate: int,
    n: int,
) -> None:
    """Two worker processes of two sessions each, a relay limited to `rate` a second: `n`
    messages go out at the rate +- 10 %, none is sent twice, no attempt is spent waiting."""
    configure_env(dispatch_interval=0.5)
    _on_two_workers(configure_env, worker_process, clean_broker, smtp_server, f"rate={rate}/s", n)
    running_dispatcher()
    assert wait_until(lambda: all(d.state.value == "sent" for d in deliveries()), timeout=120)

    assert count(Attempt) == n  # no attempt spent on a message held back
    assert all(copies == 1 for copies in smtp_server.copies().values())
    with db.session_scope() as session:
        started = sorted(session.scalars(select(Attempt.started_at)))
    seconds = (started[-1] - started[0]).total_seconds()
    assert rate * 0.9 <= (n - 1) / seconds <= rate * 1.1, f"{(n - 1) / seconds:.1f} a second"
    # and no second held more than the window allows, give or take a lane's block in hand
    window = timedelta(seconds=1)
    busiest = max(bisect_left(started, t + window) - i for i, t in enumerate(started))
    assert busiest <= rate + 2 * 2 * shaping.Window(f"{rate}/second").block


@pytest.mark.integration
def test_a_daily_cap_sends_exactly_that_many_and_the_rest_wait_unspent(
    pg_db: str,
    clean_broker: str,
    smtp_server: Any,
    configure_env: Any,
    worker_process: Any,
) -> None:
    cap, n = 1000, 1200
    _on_two_workers(configure_env, worker_process, clean_broker, smtp_server, f"daily={cap}", n)
    tomorrow = clock.now() + timedelta(hours=23)

    def settled() -> bool:
        found = Counter(d.state.value for d in deliveries())
        return found == {"sent": cap, "deferred": n - cap}

    assert wait_until(settled, timeout=120), Counter(d.state.value for d in deliveries())
    # handed back untried (deferred, as a hook's "not now" leaves them), due when the
    # window's first message is a day old
    held = [d for d in deliveries() if d.state.value == "deferred"]
    assert all(d.attempts == 0 and d.next_attempt_at > tomorrow for d in held)
    assert count(Attempt) == cap  # no attempt spent on the ones held back
    assert sum(smtp_server.copies().values()) == cap
