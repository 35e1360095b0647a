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
"""

from __future__ import annotations

from typing import Any

import kombu.transport
from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

TRANSPORT = f"{__name__}:Transport"
SCHEMES = ("redis", "rediss")


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
