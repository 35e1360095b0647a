"""The retry schedule: delay growth, cap and jitter, expiry, the deadline, server hints."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from mailer.backoff import RetryPolicy, delay, next_attempt, server_hint

POLICY = RetryPolicy(
    first_delay=300.0, factor=2.0, max_delay=3600.0, max_age=4 * 86400.0, max_attempts=30
)
START = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
MIDDLE = 0.5  # rand() value that puts the jitter at zero


def mid() -> float:
    return MIDDLE


def const(value: float) -> Callable[[], float]:
    return lambda: value


def test_delay_grows_by_the_factor() -> None:
    assert [delay(POLICY, n, mid) for n in (1, 2, 3, 4)] == [300.0, 600.0, 1200.0, 2400.0]
    triple = RetryPolicy(first_delay=60.0, factor=3.0, max_delay=10_000.0)
    assert [delay(triple, n, mid) for n in (1, 2, 3)] == [60.0, 180.0, 540.0]


def test_delay_before_any_failure_is_the_first_delay() -> None:
    assert delay(POLICY, 0, mid) == 300.0


@pytest.mark.parametrize("failures", [5, 6, 30, 1_000, 10_000])
def test_delay_is_capped_at_max_delay(failures: int) -> None:
    # 10 000 failures would overflow 2.0 ** n: the cap still holds
    assert delay(POLICY, failures, mid) == POLICY.max_delay


@pytest.mark.parametrize("failures", [1, 3, 50])
def test_jitter_stays_within_ten_percent(failures: int) -> None:
    steady = delay(POLICY, failures, mid)
    low = delay(POLICY, failures, lambda: 0.0)
    high = delay(POLICY, failures, lambda: 1.0)
    assert low == pytest.approx(steady * 0.9)
    assert high == pytest.approx(steady * 1.1)
    for i in range(101):
        assert low <= delay(POLICY, failures, const(i / 100)) <= high


def test_jitter_uses_the_default_random_source() -> None:
    for _ in range(200):
        assert 270.0 <= delay(POLICY, 1) <= 330.0


def test_no_jitter_policy_is_exact() -> None:
    exact = RetryPolicy(jitter=0.0)
    assert delay(exact, 2, lambda: 0.99) == 600.0


def test_next_attempt_is_now_plus_the_delay() -> None:
    now = START + timedelta(hours=1)
    when = next_attempt(POLICY, failures=2, enqueued_at=START, now=now, rand=mid)
    assert when == now + timedelta(seconds=600)


def test_next_attempt_is_none_at_max_attempts() -> None:
    now = START + timedelta(hours=1)
    assert next_attempt(POLICY, failures=29, enqueued_at=START, now=now, rand=mid) is not None
    assert next_attempt(POLICY, failures=30, enqueued_at=START, now=now, rand=mid) is None
    assert next_attempt(POLICY, failures=31, enqueued_at=START, now=now, rand=mid) is None


@pytest.mark.parametrize("after", [timedelta(0), timedelta(seconds=1), timedelta(days=3)])
def test_next_attempt_is_none_at_and_after_max_age(after: timedelta) -> None:
    now = START + timedelta(seconds=POLICY.max_age) + after
    assert next_attempt(POLICY, failures=1, enqueued_at=START, now=now, rand=mid) is None


def test_the_last_try_is_placed_exactly_at_the_deadline() -> None:
    deadline = START + timedelta(seconds=POLICY.max_age)
    now = deadline - timedelta(minutes=10)
    when = next_attempt(POLICY, failures=8, enqueued_at=START, now=now, rand=mid)
    assert when == deadline
    # ... and a failure at the deadline expires the delivery
    assert next_attempt(POLICY, failures=9, enqueued_at=START, now=when, rand=mid) is None


def test_a_retry_well_before_the_deadline_is_not_moved() -> None:
    deadline = START + timedelta(seconds=POLICY.max_age)
    now = deadline - timedelta(hours=2)
    when = next_attempt(POLICY, failures=8, enqueued_at=START, now=now, rand=lambda: 1.0)
    assert when == now + timedelta(seconds=3960)
    assert when is not None and when < deadline


def test_a_server_hint_is_a_lower_bound() -> None:
    now = START + timedelta(minutes=30)
    longer = next_attempt(POLICY, failures=1, enqueued_at=START, now=now, hint=900.0, rand=mid)
    assert longer == now + timedelta(seconds=900)
    shorter = next_attempt(POLICY, failures=1, enqueued_at=START, now=now, hint=60.0, rand=mid)
    assert shorter == now + timedelta(seconds=300)


def test_a_server_hint_does_not_push_past_the_deadline() -> None:
    deadline = START + timedelta(seconds=POLICY.max_age)
    now = deadline - timedelta(minutes=5)
    when = next_attempt(POLICY, failures=1, enqueued_at=START, now=now, hint=7200.0, rand=mid)
    assert when == deadline


def test_a_whole_schedule_expires_by_attempts_or_age() -> None:
    now, failures = START, 0
    while True:
        failures += 1
        when = next_attempt(POLICY, failures=failures, enqueued_at=START, now=now, rand=mid)
        if when is None:
            break
        assert now < when <= START + timedelta(seconds=POLICY.max_age)
        now = when
    assert failures == POLICY.max_attempts


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("4.7.1 Greylisted, please try again in 300 seconds", 300.0),
        ("4.2.0 Please retry in 5 minutes", 300.0),
        ("4.7.0 Too many connections, wait 1 hour", 3600.0),
        ("4.7.1 Try again in 30s", 30.0),
        ("4.7.1 please try again after 2 min.", 120.0),
        ("4.3.2 System busy, retry after 10 mins", 600.0),
        ("4.7.1 Greylisted for 5 minutes, Try Again In 6 Minutes", 360.0),
        ("4.7.0 rate limited, retry in 2 hrs", 7200.0),
        ("4.7.1 Please try\nagain in 90 sec", 90.0),
    ],
)
def test_server_hint_reads_a_wait(text: str, seconds: float) -> None:
    assert server_hint(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "4.7.0 Try again later, closing connection. (EHLO) d2e1a72fcca58-6e2b1f0b7a0si1234567pfh."
        "123 - gsmtp",
        "4.7.500 Server busy. Please try again later from [203.0.113.7]. (S77714)",
        "4.7.1 Greylisting in action, please come back in 00:05:00",
        "4.3.0 Try again later",
        "4.2.1 The user you are trying to contact is receiving mail at a rate that",
        "5.1.1 retry count 3 exceeded",
        "4.7.1 await 5 minutes",  # "wait" only as a word
        "",
    ],
)
def test_server_hint_is_none_without_a_stated_wait(text: str) -> None:
    assert server_hint(text) is None
