"""The Celery app and its settings, nothing else."""

from __future__ import annotations

from celery import Celery
from kombu.entity import Exchange, Queue

from mailer import broker
from mailer.config import Settings, settings
from mailer.models import Priority

app = Celery("mailer", include=["mailer.tasks"])


# Each queue on a direct exchange of its own name, bound by its own name. Given none, Celery
# binds every queue to the default queue's exchange and key (bulk/bulk), and a task published
# to that exchange reaches every queue. Producers publish to the nameless default exchange by
# queue name (publish.py; Celery does the same for a direct queue named in `queue=`), which
# kombu's Redis transport delivers with no binding: a wake-up sent before any worker declared
# the queues is kept, while one sent to a named exchange whose binding is not yet in Redis
# would be dropped.
def queues() -> list[Queue]:
    """The task queues, transactional first (the order workers take them in)."""
    return [Queue(p.value, Exchange(p.value, type="direct"), routing_key=p.value) for p in Priority]


def configure(s: Settings | None = None) -> Celery:
    s = s or settings()
    broker.install()  # kombu's Redis transport with a fault mended
    app.conf.update(
        broker_url=s.broker_url,
        # JSON only: a pickle payload from anyone who can write to Redis would run code here
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        # a task is acknowledged when it is done, and given back if its worker process dies;
        # the database claim makes the redelivered copy harmless
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # a chunk's sending plus the time it may wait for the database to record outcomes
        # (delivery.py: up to two leases); a lost or killed chunk is taken over after its lease
        task_time_limit=max(int(s.lease_seconds * 3), 60),
        broker_transport_options={
            "visibility_timeout": max(3600, int(s.lease_seconds * 6)),
            # the queues in the order given (transactional first), not in turn: taken in turn,
            # every other free process went to a campaign chunk however many transactional
            # messages waited (see BENCHMARKS.md, "What each step bought")
            "queue_order_strategy": "priority",
            # every wait for the broker short and bounded (broker.py)
            **broker.transport_options(),
        },
        broker_connection_retry_on_startup=True,
        # a worker that lost the broker tries again every second (broker.Consumer) for as
        # long as it takes: Celery's 100 tries would stop it after a couple of minutes
        broker_connection_max_retries=None,
        worker_consumer=broker.CONSUMER,
        # when the broker connection drops, let a running chunk finish and record what it sent
        # (cancelling it would leave sent mail unrecorded, to be sent again after the lease);
        # its redelivered copy then claims nothing
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_queues=queues(),
        task_default_queue=Priority.BULK.value,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


configure()
