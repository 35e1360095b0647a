"""The broker transport (broker.py): when Redis goes away, closing the lost connection's channels
reports a lost connection, which Celery recovers from by reconnecting, never another error, which
stops the worker. Runs against a redis-server of its own, since it kills it."""

from __future__ import annotations

import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Queue
from kombu.common import ignore_errors

from mailer import broker
from mailer.celery_app import app
from tests.conftest import Configure, _missing
from tests.faults.harness import RedisServer


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        _missing("redis-server", FileNotFoundError("redis-server is not on PATH"))
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_channels_of_a_lost_connection_close_as_lost(
    private_redis: RedisServer, configure_env: Configure
) -> None:
    configure_env(broker_url=private_redis.url)  # installs the transport
    conn = app.connection_for_write()
    assert isinstance(conn.transport, broker.Transport)
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
    # channel, ignoring connection errors only (kombu's own transport raised AttributeError)
    conn.collect()
    still_open = [c for c in channels if not c.closed]
    assert still_open, "the scenario needs a channel left open by the collect"
    for channel in still_open:
        ignore_errors(conn, channel.close)
        assert channel.closed


@pytest.mark.parametrize(
    ("url", "tls"),
    [("redis://127.0.0.1:6379/0", False), ("rediss://127.0.0.1:6380/0", True)],
)
def test_redis_urls_get_it_and_keep_their_tls(
    configure_env: Configure, url: str, tls: bool
) -> None:
    configure_env(broker_url=url)
    conn = app.connection_for_write()
    assert isinstance(conn.transport, broker.Transport)
    assert conn.as_uri().startswith(url.split(":")[0] + "://")
    # kombu turns TLS on for rediss:// by the scheme's name (unverified unless the URL says)
    assert bool(conn.ssl) is tls
    if tls:
        assert conn.ssl == {"ssl_cert_reqs": ssl.CERT_NONE}


def test_the_embedded_broker_keeps_kombus_transport(configure_env: Configure) -> None:
    configure_env(broker_url="memory://")
    assert not isinstance(app.connection_for_write().transport, broker.Transport)
