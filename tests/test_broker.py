"""The broker transport (broker.py): when Redis goes away, closing the lost connection's channels
reports a lost connection, which Celery recovers from by reconnecting, never another error, which
stops the worker. Runs against a redis-server of its own, since it kills it."""

from __future__ import annotations

import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path

import kombu.exceptions
import kombu.utils.functional
import pytest
from kombu import Queue
from kombu.common import ignore_errors

from mailer import broker, publish
from mailer.celery_app import app
from mailer.models import Priority
from tests.conftest import Configure, _missing, free_port
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


# --- every wait for the broker is short and bounded ------------------------------------------


@pytest.fixture
def dead_broker(configure_env: Configure, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A broker URL on which nothing listens; the seconds kombu sleeps between tries, recorded
    (and not slept)."""
    configure_env(broker_url=f"redis://127.0.0.1:{free_port()}/0")
    slept: list[float] = []
    monkeypatch.setattr(kombu.utils.functional, "sleep", slept.append)
    return slept


def test_the_configured_policy_is_short_and_bounded(configure_env: Configure) -> None:
    configure_env(broker_url="redis://127.0.0.1:6379/0")
    conf = app.conf
    options = conf.broker_transport_options
    assert options["interval_max"] <= 1 and options["interval_start"] <= 1
    assert options["max_retries"] <= 3 and options["connect_retries_timeout"] <= 2
    assert options["socket_connect_timeout"] <= 2
    assert conf.broker_connection_retry and conf.broker_connection_max_retries in (None, 0)
    assert conf.worker_consumer == broker.CONSUMER


def test_a_producer_gives_up_on_a_dead_broker_after_short_waits(dead_broker: list[float]) -> None:
    assert publish.backlog() is None
    assert publish.publish([1, 2, 3], Priority.BULK, 2) == 0
    # a few short waits each (kombu sleeps a long wait a second at a time: the sum tells),
    # never kombu's 2, 4, ... 30 s
    assert 0 < sum(dead_broker) <= 4 * broker.RETRY["interval_max"], dead_broker


def test_a_worker_reconnects_a_second_apart_however_long_the_broker_is_away(
    dead_broker: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    tries = 12  # kombu's own policy would wait 2, 4, ... 24 s between these
    monkeypatch.setitem(app.conf, "broker_connection_max_retries", tries)
    consumer = object.__new__(broker.Consumer)  # only what ensure_connected reads
    consumer.app = app
    consumer.first_connection_attempt = False
    consumer.broker_connection_retry_attempt = 0
    with pytest.raises(kombu.exceptions.OperationalError):
        consumer.ensure_connected(app.connection_for_read())
    # (kombu sleeps a long wait a second at a time: the sum tells the policy)
    assert 0 < sum(dead_broker) <= tries * broker.RETRY["interval_max"], dead_broker
