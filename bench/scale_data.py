"""What the scale run's history looks like: its plan (campaigns, transactional mail, over ~90
days) and the SQL expressions that make its rows, with no database access (unit-tested)."""

from __future__ import annotations

from dataclasses import dataclass

DAYS = 90
PRIME = 2147483647  # 2**31 - 1: hashed() multiplies below it, inside a bigint
CAMPAIGN_SHARE = 0.85  # the rest is transactional mail, one message a delivery
MEAN_CAMPAIGN = 100_000

# (domain, weight in 1000): the big mailbox providers, then a long tail of small domains
DOMAINS: tuple[tuple[str, int], ...] = (
    ("gmail.com", 350),
    ("yahoo.com", 120),
    ("outlook.com", 100),
    ("hotmail.com", 80),
    ("icloud.com", 60),
    ("aol.com", 20),
    ("gmx.de", 20),
    ("web.de", 20),
    ("orange.fr", 20),
)
TAIL_DOMAINS = 5000  # company domains sharing what the providers leave

FIRST = "anna ben clara david emma felix grace henry ines jonas karin leo maria noah olga paul"
LAST = "berg cruz diaz evans fischer garcia hansen ito jones kim lopez meyer novak ortiz smith"

# final states of the history, by share in 1000 (cumulative bounds are computed from these)
STATES: tuple[tuple[str, int], ...] = (
    ("sent", 930),
    ("bounced", 30),
    ("failed", 15),
    ("expired", 10),
    ("suppressed", 10),
    ("cancelled", 5),
)


@dataclass(frozen=True)
class Campaign:
    index: int
    size: int
    day: float  # days after the start of the history


@dataclass(frozen=True)
class Plan:
    deliveries: int
    campaigns: tuple[Campaign, ...]
    transactional: int
    population: int  # subscribers; a campaign's recipients are distinct among them

    def transactional_before(self, day: float) -> int:
        """How many transactional deliveries were made before `day` (spread evenly)."""
        return min(self.transactional, int(self.transactional * day / DAYS))


def plan(n: int) -> Plan:
    """n deliveries: CAMPAIGN_SHARE of them in campaigns of uneven sizes (a fifth to nearly
    twice MEAN_CAMPAIGN) sent at even intervals over DAYS days, the rest transactional."""
    in_campaigns = max(1, int(n * CAMPAIGN_SHARE))
    count = max(1, round(in_campaigns / MEAN_CAMPAIGN))
    weights = [0.2 + 1.6 * ((c * 0.6180339887) % 1.0) for c in range(count)]
    scale = in_campaigns / sum(weights)
    sizes = [max(1, int(w * scale)) for w in weights]
    sizes[-1] += in_campaigns - sum(sizes)
    if sizes[-1] < 1:  # rounding took it all: give the remainder to the largest
        big = sizes.index(max(sizes))
        sizes[big] += sizes[-1] - 1
        sizes[-1] = 1
    campaigns = tuple(Campaign(i, size, DAYS * (i + 0.5) / count) for i, size in enumerate(sizes))
    population = 2 * max(sizes) + 1
    if population % 7919 == 0:
        population += 2
    return Plan(n, campaigns, n - in_campaigns, population)


def subscriber(i: str, salt: str, population: int) -> str:
    """SQL: subscriber number of the i-th recipient of a campaign, distinct for distinct i below
    `population` (i -> a*i + b mod P is a bijection when a is prime to P)."""
    return f"mod(({i})::bigint * 7919 + ({salt})::bigint * 104729, {population})"


def hashed(expr: str, modulo: int) -> str:
    """SQL: a well-mixed number in [0, modulo) from an integer expression."""
    return f"mod(mod(mod(({expr})::bigint, {PRIME}) * 1103515245, {PRIME}), {modulo})"


def domain_sql(k: str) -> str:
    """SQL: subscriber k's domain (providers by weight, then the long tail)."""
    h = hashed(k, 1000)
    cases = []
    bound = 0
    for name, weight in DOMAINS:
        bound += weight
        cases.append(f"WHEN {h} < {bound} THEN '{name}'")
    tail = f"'corp' || {hashed(f'({k}) + 17', TAIL_DOMAINS)} || '.example'"
    return f"(CASE {' '.join(cases)} ELSE {tail} END)"


def local_part_sql(k: str) -> str:
    """SQL: subscriber k's mailbox name, 'first.lastK' (unique by K)."""
    first = FIRST.split()
    last = LAST.split()
    return (
        f"((ARRAY{first})[1 + {hashed(k, len(first))}] || '.' || "
        f"(ARRAY{last})[1 + {hashed(f'({k}) + 3', len(last))}] || ({k})::text)"
    )


def state_sql(key: str, states: tuple[tuple[str, int], ...] = STATES) -> str:
    """SQL: a final state for row `key`, by the shares in `states` (per 1000)."""
    h = hashed(f"({key}) + 101", 1000)
    bound = 0
    cases = []
    for name, share in states[:-1]:
        bound += share
        cases.append(f"WHEN {h} < {bound} THEN '{name}'")
    return f"(CASE {' '.join(cases)} ELSE '{states[-1][0]}' END)"


def attempts_sql(key: str, state: str) -> str:
    """SQL: how many attempts a delivery in `state` made: none if queued, or suppressed or
    cancelled before sending, else 1 to 4 (about two on average)."""
    h = hashed(f"({key}) + 211", 10)
    return (
        f"(CASE WHEN {state} IN ('suppressed', 'cancelled', 'queued') THEN 0 "
        f"WHEN {h} < 4 THEN 1 WHEN {h} < 6 THEN 2 WHEN {h} < 9 THEN 3 ELSE 4 END)"
    )


# what the last attempt of a delivery in each final state answered: phase, code, enhanced,
# reply, outcome
LAST_REPLY: dict[str, tuple[str, int | None, str | None, str, str]] = {
    "sent": ("dot", 250, "2.0.0", "250 2.0.0 Ok: queued as 4Xk9Qp3mZz", "delivered"),
    "bounced": (
        "rcpt",
        550,
        "5.1.1",
        "550 5.1.1 <user>: Recipient address rejected",
        "hard_bounce",
    ),
    "failed": ("dot", 554, "5.7.1", "554 5.7.1 Message rejected as spam", "message_failure"),
    "expired": ("rcpt", 451, "4.7.1", "451 4.7.1 Greylisted, try again later", "transient"),
    "unknown": ("dot", None, None, "connection lost after the final dot", "ambiguous"),
}
RETRY_REPLY = ("rcpt", 451, "4.7.1", "451 4.7.1 Greylisted, try again later", "transient")


def reply_sql(state: str, field: int) -> str:
    """SQL: field `field` of LAST_REPLY for the delivery state expression `state` (NULL for
    states without an attempt)."""
    cases = []
    for name, values in LAST_REPLY.items():
        cases.append(f"WHEN '{name}' THEN {literal(values[field])}")
    return f"(CASE {state} {' '.join(cases)} ELSE NULL END)"


def literal(value: str | int | None) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"
