"""Wake-ups: every chunk of ids reaches the broker (in pipelines), and a broker that is down is
logged, never raised, since the rows are already committed."""

from __future__ import annotations

import base64
import json
import logging

import pytest
import redis

from mailer import publish
from mailer.models import Priority
from tests.conftest import Configure, free_port


def test_every_chunk_reaches_the_queue_once(clean_broker: str, configure_env: Configure) -> None:
    configure_env(broker_url=clean_broker)
    ids = list(range(1, 1051))
    assert publish.publish(iter(ids), Priority.BULK, 100) == 1050
    queued = redis.Redis.from_url(clean_broker).lrange("bulk", 0, -1)
    assert len(queued) == 11  # ten chunks of 100 and one of 50
    chunks = []
    for raw in queued:
        message = json.loads(raw)
        assert message["headers"]["task"] == publish.TASK
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        chunks.append(args[0])
    assert sorted(i for chunk in chunks for i in chunk) == ids
    assert sorted(len(chunk) for chunk in chunks) == [50] + [100] * 10


def test_a_broker_that_is_down_is_logged_not_raised(
    configure_env: Configure, caplog: pytest.LogCaptureFixture
) -> None:
    configure_env(broker_url=f"redis://127.0.0.1:{free_port()}/0")
    with caplog.at_level(logging.WARNING, logger="mailer.publish"):
        assert publish.publish(range(1, 301), Priority.BULK, 100) == 0
    assert "broker unreachable" in caplog.text
    assert "the dispatcher will publish them" in caplog.text
