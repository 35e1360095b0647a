"""The broker transport (broker.py): when Redis goes away, closing the lost connection's channels
reports a lost connection, which Celery recovers from by reconnecting, never another error, which
stops the worker. Runs against a redis-server of its own, since it kills it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from kombu import Connection, Queue
from kombu.common import ignore_errors

from mailer import broker
from mailer.celery_app import app
from tests.conftest import Configure, _missing
from tests.faults.harness import RedisServer


@pytest.fixture
def private_redis(tmp_path: Path) -> RedisServer:
    if shutil.which("redis-server") is None:
        _missing("redis-server", FileNotFoundError("redis-server is not on PATH"))
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    return server


def test_channels_of_a_lost_connection_close_as_lost(private_redis: RedisServer) -> None:
    conn = Connection(private_redis.url, transport=broker.TRANSPORT)
    conn.connect()
    channels = []
    for name in ("first", "second"):
        with conn.Producer() as producer:
            producer.publish({"n": name}, routing_key=name, declare=[Queue(name)])
        channel = conn.channel()
        assert channel.basic_get(name, no_ack=False) is not None  # held unacknowledged
        channels.append(channel)
    private_redis.kill()

    # what Celery does on a lost connection: collect it (the first channel cannot put its
    # message back, which ends kombu's loop over the channels), then close each consumer's
    # channel, ignoring connection errors
    conn.collect()
    still_open = [c for c in channels if not c.closed]
    assert still_open, "the scenario needs a channel left open by the collect"
    for channel in still_open:
        with pytest.raises(conn.connection_errors):
            channel.close()
        ignore_errors(conn, channel.close)  # as Celery does: nothing escapes


def test_the_worker_uses_it_for_redis_only(configure_env: Configure) -> None:
    configure_env(broker_url="redis://127.0.0.1:6379/0")  # configures the Celery app
    assert app.connection_for_write().transport_cls == broker.TRANSPORT
    configure_env(broker_url="memory://")
    assert app.connection_for_write().transport_cls == "memory"
