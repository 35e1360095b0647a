"""Wake-ups for workers: publish chunks of delivery ids to the broker. Only a hint; may be lost."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from kombu.exceptions import BatchPublishError, ChannelError, OperationalError

from mailer import bulk
from mailer.celery_app import app
from mailer.models import Priority

log = logging.getLogger(__name__)
TASK = "mailer.deliver"
PUBLISH_BATCH = 500  # Redis commands per pipeline (a task is one)
_ONE_QUICK_RETRY = {
    "max_retries": 1,
    "interval_start": 0.2,
    "interval_step": 0,
    "interval_max": 0.2,
}


def publish(ids: Iterable[int], priority: Priority, chunk_size: int) -> int:
    """Publish the ids in chunks; returns how many ids went out (0 if the broker could not
    take them all). A broker that is down is logged, not raised: the rows are committed and
    the dispatcher publishes them later."""
    sent = 0
    try:
        # a connection from the settings in force now (not a pool made under older settings)
        with app.connection_for_write() as connection:
            producer = app.amqp.Producer(connection)
            # kombu sends the tasks to Redis in pipelines, up to PUBLISH_BATCH at a time,
            # instead of one round trip each
            with producer.batch(max_size=PUBLISH_BATCH):
                for chunk in bulk.chunks(ids, chunk_size):
                    app.send_task(
                        TASK,
                        args=[chunk],
                        queue=priority.value,
                        producer=producer,
                        retry=True,
                        # no declaration per task: Celery sends a task for a named direct
                        # queue to the nameless default exchange, which Redis delivers by
                        # queue name with no binding, so wake-ups published before any worker
                        # declared the queues are kept (celery_app.queues); kombu's check per
                        # task was a fifth of publishing (BENCHMARKS.md, "What each step bought")
                        declare=[],
                        retry_policy=_ONE_QUICK_RETRY,
                        # what logs and monitors show for the arguments; Celery's own repr of
                        # a chunk's hundreds of ids cost more than the rest of publishing
                        argsrepr=f"[{len(chunk)} delivery ids from {chunk[0]}]",
                    )
                    sent += len(chunk)
    except (OperationalError, BatchPublishError) as exc:
        # a batch that failed may have reached Redis in part: a wake-up twice is harmless
        # (claims are compare-and-set), one lost is republished by the dispatcher
        log.warning(
            "broker unreachable (%s): the deliveries stay queued in the database and the "
            "dispatcher will publish them",
            exc,
        )
        return 0
    return sent


def backlog(queues: Sequence[Priority] = tuple(Priority)) -> int | None:
    """Tasks waiting in the broker, or None if the broker cannot say."""
    total = 0
    try:
        with app.connection_for_read() as connection:
            channel = connection.default_channel
            for queue in queues:
                try:
                    total += channel.queue_declare(queue=queue.value, passive=True).message_count
                except ChannelError:
                    pass  # a queue that does not exist holds nothing
                    channel = connection.channel()
    except OperationalError:
        return None
    return total
