"""The Celery queues: each on an exchange and routing key of its own, so that a task sent to one
queue reaches that queue only, whether sent the ordinary Celery way or by mailer's publish, and
with no worker started (no queue declared) yet."""

from __future__ import annotations

import pytest
import redis

from mailer import publish
from mailer.celery_app import app
from mailer.models import Priority
from tests.conftest import Configure

QUEUES = [p.value for p in Priority]


def _lengths(url: str) -> dict[str, int]:
    client = redis.Redis.from_url(url)
    return {name: int(client.llen(name)) for name in QUEUES}


def _only(name: str, count: int = 1) -> dict[str, int]:
    return {q: count if q == name else 0 for q in QUEUES}


def test_each_queue_has_an_exchange_and_routing_key_of_its_own() -> None:
    declared = app.amqp.queues
    assert sorted(declared) == sorted(QUEUES)
    for name in QUEUES:
        assert declared[name].exchange.name == name
        assert declared[name].exchange.type == "direct"
        assert declared[name].routing_key == name


@pytest.mark.parametrize("queue", QUEUES)
def test_a_task_sent_to_a_queue_reaches_that_queue_only(
    clean_broker: str, configure_env: Configure, queue: str
) -> None:
    configure_env(broker_url=clean_broker)
    app.send_task("mailer.deliver", args=[[1, 2]], queue=queue)
    assert _lengths(clean_broker) == _only(queue)


@pytest.mark.parametrize("queue", QUEUES)
def test_a_task_sent_to_a_queues_exchange_reaches_that_queue_only(
    clean_broker: str, configure_env: Configure, queue: str
) -> None:
    configure_env(broker_url=clean_broker)
    with app.connection_for_write() as connection:  # declared and bound, as a worker does
        for declared in app.amqp.queues.values():
            declared.bind(connection.default_channel).declare()
    app.send_task("mailer.deliver", args=[[1, 2]], exchange=queue, routing_key=queue)
    assert _lengths(clean_broker) == _only(queue)


@pytest.mark.parametrize("priority", list(Priority))
def test_publish_lands_in_its_queue_with_no_worker_started(
    clean_broker: str, configure_env: Configure, priority: Priority
) -> None:
    configure_env(broker_url=clean_broker)
    assert publish.publish(range(1, 251), priority, 100) == 250
    assert _lengths(clean_broker) == _only(priority.value, 3)
    # nothing was declared: the wake-ups did not need a binding to arrive
    assert redis.Redis.from_url(clean_broker).keys("_kombu.binding*") == []
