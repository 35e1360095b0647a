"""The broker transport Celery uses: kombu's Redis transport, with one fault of kombu 5.7 mended.

When the broker goes away, Celery closes the lost connection's channels, and kombu puts each
channel's unacknowledged messages back first. The first channel that cannot (the broker is
gone) ends that loop with a connection error, and the connection lets go of its settings. The
channels after it are closed later, when their restore looks the settings up and fails with an
AttributeError; Celery takes that for a bug, logs "Unrecoverable error" and stops the worker
instead of reconnecting (seen in the fault suite's Redis restart, about one run in eight).

Here such a channel reports what happened, a lost connection, which Celery handles by
reconnecting. Its messages stay in Redis's unacknowledged set, restored after the visibility
timeout, and the dispatcher republishes whatever is due from the database in any case.

`install()` has kombu resolve the redis:// and rediss:// schemes to this transport. Naming it
as Celery's `broker_transport` instead would hide the scheme from kombu, which turns TLS on for
rediss:// by its name.

Every wait for the broker is short and bounded (RETRY): kombu's own policy waits 2, 4, ... 30 s
between tries, so that after a long outage a worker or the dispatcher could sleep for up to half
a minute after Redis came back. Here a producer (publish, backlog) tries three times within
CONNECT_TIMEOUT and gives up (the rows stay in the database for the next pass), and a worker's
consumer tries again every second, for as long as it takes (`Consumer`).
"""

from __future__ import annotations

import functools
from typing import Any

import kombu.transport
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

TRANSPORT = f"{__name__}:Transport"
CONSUMER = f"{__name__}:Consumer"
SCHEMES = ("redis", "rediss")
# seconds between two tries to reach the broker: at once, then half a second, then a second
RETRY = {"interval_start": 0.0, "interval_step": 0.5, "interval_max": 1.0}
CONNECT_TIMEOUT = 2.0  # seconds for one TCP connect, and for a producer's tries in all
PRODUCER_RETRIES = 2  # after the first try


def transport_options() -> dict[str, Any]:
    """kombu's options for every connection Celery makes: how a producer's connection retries
    (read by kombu when a channel is first needed) and how long a connect may hang."""
    return {
        **RETRY,
        "max_retries": PRODUCER_RETRIES,
        "connect_retries_timeout": CONNECT_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
    }


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's worker consumer, reconnecting at RETRY's intervals: Celery calls kombu's
    ensure_connection with its default intervals, which no setting changes."""

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(conn.ensure_connection, **RETRY)
        return super().ensure_connected(conn)


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Make this the transport of redis:// and rediss:// URLs in this process."""
    kombu.transport.TRANSPORT_ALIASES.update(dict.fromkeys(SCHEMES, TRANSPORT))
