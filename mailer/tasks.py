"""Thin Celery tasks and worker signals: ids in, delivery.deliver_chunk does the work."""

from __future__ import annotations

import gc
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown, worker_shutdown

from mailer import db, delivery
from mailer.celery_app import app
from mailer.transport import smtp


@app.task(name="mailer.deliver")
def deliver(ids: list[int]) -> None:
    delivery.deliver_chunk(ids)


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # connections inherited from the parent must not be shared with it
    db.reset(after_fork=True)
    # what the process has built so far (modules, Celery, SQLAlchemy) lives as long as it: out
    # of the collector's way, its collections cost far less a message (BENCHMARKS.md)
    gc.freeze()


@worker_process_shutdown.connect
@worker_shutdown.connect
def _quit_sessions(**_: Any) -> None:
    smtp.close_all()
