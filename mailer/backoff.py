"""The retry schedule: a policy (data) and one pure function that applies it.

Defaults follow RFC 5321 4.5.4.1 and what MTAs do: the RFC asks for a retry interval of at
least 30 minutes and a give-up time of at least 4-5 days; Postfix starts at 300 s
(minimal_backoff_time), doubles up to 4000 s (maximal_backoff_time) and gives up after 5 days.
A first retry after 5 minutes clears most greylisting (which commonly wants 1-5 minutes),
doubling passes the 30-minute interval from the fourth failure on (300, 600, 1200, 2400 s), the
1-hour cap keeps a long outage from pushing the next try out by days, and 4 days is the RFC's
lower bound for giving up.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RetryPolicy:
    first_delay: float = 300.0
    factor: float = 2.0
    max_delay: float = 3600.0
    max_age: float = 4 * 86400.0
    max_attempts: int = 100
    # +-10 %: spreads the retries of a large deferred batch instead of waking them in one burst
    jitter: float = 0.1


def delay(policy: RetryPolicy, failures: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the `failures`-th failed attempt (1 for the first).

    The jitter applies to the capped delay too: deliveries that all reached the cap after a
    long outage are still spread out instead of waking together.
    """
    return _steady_delay(policy, failures) * (1.0 - policy.jitter + 2.0 * policy.jitter * rand())


def _steady_delay(policy: RetryPolicy, failures: int) -> float:
    exponent = max(failures - 1, 0)
    try:
        grown = policy.first_delay * policy.factor**exponent
    except OverflowError:  # float ** int raises instead of returning inf
        return policy.max_delay
    return min(policy.max_delay, grown)


def next_attempt(
    policy: RetryPolicy,
    *,
    failures: int,
    enqueued_at: datetime,
    now: datetime,
    hint: float | None = None,
    rand: Callable[[], float] = random.random,
) -> datetime | None:
    """When to try again after a transient failure, or None when the delivery should expire.

    A server's own hint ("try again in 300 seconds") is honoured as a lower bound. The last try
    is placed exactly at the maximum age, so that a delivery expires at that age, not a whole
    delay after it.
    """
    deadline = enqueued_at + timedelta(seconds=policy.max_age)
    if failures >= policy.max_attempts or now >= deadline:
        return None
    wait = delay(policy, failures, rand)
    if hint is not None:
        wait = max(wait, hint)
    return min(now + timedelta(seconds=wait), deadline)


_HINT = re.compile(
    r"\b(?:try\s+again|retry|wait)\D{0,24}?(\d{1,6})\s*"
    r"(s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?)\b",
    re.IGNORECASE,
)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def server_hint(text: str) -> float | None:
    """Seconds a server asked us to wait ("please try again in 5 minutes"), if it said so."""
    match = _HINT.search(text)
    if not match:
        return None
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)[0].lower()]
