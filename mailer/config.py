"""Settings from the environment: the only module that reads os.environ."""

from __future__ import annotations

import functools
import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from mailer.backoff import RetryPolicy
from mailer.errors import ConfigError
from mailer.transport.relay import RelayConfig, parse_relay_url

AmbiguousPolicy = Literal["hold", "retry"]
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    database_url: str
    broker_url: str
    smtp: RelayConfig
    from_addr: str | None
    retry: RetryPolicy
    ambiguous: AmbiguousPolicy
    chunk_size: int
    smtp_sessions: int
    lease_seconds: float
    dispatch_interval: float
    republish_after: float
    relay_backoff: float
    log_level: str
    hooks: tuple[str, ...] = ()
    # (role, seconds) pairs, 0 for none: see MAILER_STATEMENT_TIMEOUTS
    statement_timeouts: tuple[tuple[str, float], ...] = ()

    def statement_timeout(self, role: str) -> float:
        return dict(self.statement_timeouts).get(role, 0.0)


# name, default, meaning: `mailer config` prints these, and the README's table lists them
VARIABLES: list[tuple[str, str, str]] = [
    ("MAILER_DATABASE_URL", "sqlite:///mailer.db", "SQLAlchemy URL of the outbox database"),
    ("MAILER_BROKER_URL", "redis://127.0.0.1:6379/0", "Redis URL of the Celery broker"),
    (
        "MAILER_SMTP_URL",
        "smtp://localhost:25",
        "relay: smtp[s]://[user[:pass]@]host[:port][?tls=...]",
    ),
    ("MAILER_FROM", "", "default sender address (required unless given per call)"),
    ("MAILER_RETRY_FIRST_DELAY", "300", "seconds before the first retry of a transient failure"),
    ("MAILER_RETRY_FACTOR", "2", "growth factor of the retry delay"),
    ("MAILER_RETRY_MAX_DELAY", "3600", "cap on one retry delay, seconds"),
    (
        "MAILER_RETRY_MAX_AGE",
        "345600",
        "a delivery still deferred this long after enqueue expires (4 days)",
    ),
    (
        "MAILER_RETRY_MAX_ATTEMPTS",
        "100",
        "a delivery deferred this many times expires (about 4 days of hourly tries)",
    ),
    (
        "MAILER_AMBIGUOUS",
        "hold",
        "connection lost after the final '.': hold (state unknown) or retry",
    ),
    (
        "MAILER_SMTP_SESSIONS",
        "auto",
        "SMTP sessions each worker process keeps and sends over at once, two to a thread in "
        "step (auto: 2 for a relay on this host, 4 for any other)",
    ),
    (
        "MAILER_CHUNK_SIZE",
        "500",
        "deliveries per Celery task; a chunk still sending at half its lease hands the rest back",
    ),
    ("MAILER_LEASE_SECONDS", "300", "a claimed delivery not recorded by then is handed out again"),
    ("MAILER_DISPATCH_INTERVAL", "5", "seconds between dispatcher passes"),
    (
        "MAILER_REPUBLISH_AFTER",
        "60",
        "a queued delivery unclaimed this long, with the queue empty, is republished",
    ),
    (
        "MAILER_RELAY_BACKOFF",
        "60",
        "seconds a relay rests after throttling (421, 4.7.x) or a failed connection",
    ),
    ("MAILER_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    (
        "MAILER_HOOKS",
        "",
        "delivery hooks, comma-separated `package.module:attribute` paths of mailer.hooks.Hooks "
        "subclasses or instances (e.g. mailer.hooks.chunklog:ChunkLog logs a line a chunk)",
    ),
    (
        "MAILER_STATEMENT_TIMEOUTS",
        "worker=30,dispatcher=60,producer=60,cli=300",
        "PostgreSQL `statement_timeout` in seconds for each role: worker, dispatcher, producer "
        "(a web backend that imports mailer), cli (0: none; a role left out keeps its default; "
        "`mailer db upgrade` has none)",
    ),
    (
        "MAILER_WEB_SECRET",
        "",
        "key that signs `mailer web`'s session cookies (required by `mailer web`, at least 16 "
        "characters: `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)",
    ),
    ("MAILER_WEB_COOKIE_SECURE", "0", "1: the session cookie is sent over HTTPS only"),
    (
        "MAILER_WEB_TRUSTED_HEADER",
        "",
        "single sign-on: a header naming the user, set by a proxy in MAILER_WEB_TRUSTED_PROXIES",
    ),
    (
        "MAILER_WEB_TRUSTED_PROXIES",
        "",
        "comma-separated addresses or networks of the proxies whose MAILER_WEB_TRUSTED_HEADER "
        "is believed",
    ),
]
_DEFAULTS = {name: default for name, default, _ in VARIABLES}


def load(env: Mapping[str, str] = os.environ) -> Settings:
    """Read and check every setting; a bad value raises ConfigError naming its variable."""

    def get(name: str) -> str:
        return env.get(name) or _DEFAULTS[name]

    def parsed(name: str, parse: Callable[[str], T]) -> T:
        try:
            return parse(get(name))
        except (ValueError, ArgumentError) as exc:
            raise ConfigError(name, f"{exc} (got {_redact(name, get(name))!r})") from None

    smtp = parsed("MAILER_SMTP_URL", parse_relay_url)
    return Settings(
        database_url=parsed("MAILER_DATABASE_URL", _database_url),
        broker_url=parsed("MAILER_BROKER_URL", _broker_url),
        smtp=smtp,
        from_addr=get("MAILER_FROM") or None,
        retry=RetryPolicy(
            first_delay=parsed("MAILER_RETRY_FIRST_DELAY", _seconds),
            factor=parsed("MAILER_RETRY_FACTOR", _factor),
            max_delay=parsed("MAILER_RETRY_MAX_DELAY", _seconds),
            max_age=parsed("MAILER_RETRY_MAX_AGE", _seconds),
            max_attempts=parsed("MAILER_RETRY_MAX_ATTEMPTS", _count),
        ),
        ambiguous=parsed("MAILER_AMBIGUOUS", _ambiguous),
        chunk_size=parsed("MAILER_CHUNK_SIZE", _count),
        smtp_sessions=parsed("MAILER_SMTP_SESSIONS", lambda value: _sessions(value, smtp)),
        lease_seconds=parsed("MAILER_LEASE_SECONDS", _seconds),
        dispatch_interval=parsed("MAILER_DISPATCH_INTERVAL", _seconds),
        republish_after=parsed("MAILER_REPUBLISH_AFTER", _seconds),
        relay_backoff=parsed("MAILER_RELAY_BACKOFF", _seconds),
        log_level=parsed("MAILER_LOG_LEVEL", _log_level),
        hooks=parsed("MAILER_HOOKS", _hooks),
        statement_timeouts=parsed("MAILER_STATEMENT_TIMEOUTS", _timeouts),
    )


@functools.cache
def settings() -> Settings:
    """The process's settings, read once."""
    return load()


def reload() -> Settings:
    """Forget the cached settings (tests and the demo change the environment)."""
    settings.cache_clear()
    return settings()


def _sessions(value: str, relay: RelayConfig) -> int:
    """More sessions pay while a process waits for a distant relay's answers. A relay on this
    host answers at once: two sessions, which one thread drives in step (lanes.IN_STEP), so
    that one wait covers both; more would be threads of one process contending for the
    interpreter (BENCHMARKS.md). The worker's several processes already keep the relay busy."""
    if value.strip().lower() == "auto":
        return 2 if _on_this_host(relay.host) else 4
    return _count(value)


def _on_this_host(host: str) -> bool:
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _redact(name: str, value: str) -> str:
    """A URL setting as it may be shown: never a password, even one written without its @."""
    if name not in ("MAILER_SMTP_URL", "MAILER_DATABASE_URL", "MAILER_BROKER_URL"):
        return value
    scheme, _, rest = value.partition("://")
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    if "@" in netloc:
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    if ":" in netloc and not netloc.rsplit(":", 1)[1].isdigit():
        return f"{scheme}://***"
    return value


def _database_url(value: str) -> str:
    url = make_url(value)
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError("only sqlite:/// and postgresql:// databases are supported")
    if url.get_backend_name() == "postgresql" and url.drivername == "postgresql":
        value = url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return value


def _broker_url(value: str) -> str:
    if not value.startswith(("redis://", "rediss://", "memory://")):
        raise ValueError("must be a redis:// or rediss:// URL")
    return value


def _seconds(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("must be a finite number of seconds")
    if number < 0:
        raise ValueError("must be zero or more seconds")
    return number


def _factor(value: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 1:
        raise ValueError("must be 1 or more")
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be a whole number of 1 or more")
    return number


def _ambiguous(value: str) -> AmbiguousPolicy:
    if value not in ("hold", "retry"):
        raise ValueError("must be hold or retry")
    return value  # type: ignore[return-value]


def _log_level(value: str) -> str:
    if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return value.upper()


def _hooks(value: str) -> tuple[str, ...]:
    """Each path imported now, so that a worker with a wrong one does not start."""
    from mailer import hooks  # not at the top: a hook's module may import the rest of mailer

    paths = tuple(path.strip() for path in value.split(",") if path.strip())
    for path in paths:
        hooks.resolve(path)
    return paths


@dataclass(frozen=True)
class WebSettings:
    """`mailer web`'s settings, read only by the commands that serve the dashboard."""

    secret: str
    cookie_secure: bool
    trusted_header: str | None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def web(env: Mapping[str, str] = os.environ) -> WebSettings:
    """The dashboard's settings; a bad value raises ConfigError naming its variable. An empty
    secret is returned as it is: the command decides whether it may run without one."""

    def parsed(name: str, parse: Callable[[str], T]) -> T:
        value = env.get(name) or _DEFAULTS[name]
        try:
            return parse(value)
        except ValueError as exc:
            raise ConfigError(name, f"{exc} (got {value!r})") from None

    secret = env.get("MAILER_WEB_SECRET", "")
    if secret and len(secret) < 16:
        raise ConfigError("MAILER_WEB_SECRET", "must be at least 16 characters")
    return WebSettings(
        secret=secret,
        cookie_secure=parsed("MAILER_WEB_COOKIE_SECURE", _flag),
        trusted_header=(env.get("MAILER_WEB_TRUSTED_HEADER") or "").strip() or None,
        trusted_proxies=parsed("MAILER_WEB_TRUSTED_PROXIES", _networks),
    )


def _flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError("must be 0 or 1")
    return value == "1"


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False)
        for part in value.split(",")
        if part.strip()
    )


ROLES = ("worker", "dispatcher", "producer", "cli")


def _timeouts(value: str) -> tuple[tuple[str, float], ...]:
    """`role=seconds,...` over the defaults, so that one role can be changed alone."""
    found = dict(_role_seconds(_DEFAULTS["MAILER_STATEMENT_TIMEOUTS"]))
    found.update(_role_seconds(value))
    return tuple(found.items())


def _role_seconds(value: str) -> list[tuple[str, float]]:
    pairs = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        role, equals, seconds = item.partition("=")
        role = role.strip()
        if not equals or role not in ROLES:
            raise ValueError(f"{item!r} is not role=seconds with a role of {', '.join(ROLES)}")
        pairs.append((role, _seconds(seconds)))
    return pairs
