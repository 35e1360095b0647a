"""The scale run's steps that must run inside mailer (a process of their own, MAILER_* in the
environment): publishing a message's wake-ups, and timing the read side's calls without the
interpreter's start-up. Prints one JSON object.

    python bench/scale_helper.py publish MESSAGE_ID   wake-ups for its queued deliveries
    python bench/scale_helper.py status CAMPAIGN_ID   queries.campaign_status, timed
    python bench/scale_helper.py retry CAMPAIGN_ID    what `retry --dry-run` counts, timed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

REPEAT = 3


def publish(message_id: int) -> dict[str, Any]:
    from sqlalchemy import select, update

    from mailer import clock, config, db
    from mailer import publish as wakeups
    from mailer.models import Delivery, DeliveryState, Priority

    t0 = time.time()
    with db.session_scope() as session:
        ids = list(
            session.scalars(
                select(Delivery.id)
                .where(Delivery.message_id == message_id, Delivery.state == DeliveryState.QUEUED)
                .order_by(Delivery.id)
            )
        )
    published = wakeups.publish(ids, Priority.BULK, config.settings().chunk_size)
    with db.session_scope() as session:
        session.execute(
            update(Delivery)
            .where(Delivery.message_id == message_id)
            .values(published_at=clock.now())
        )
    return {"ids": len(ids), "published": published, "seconds": time.time() - t0}


def _timed(call: Callable[[], Any]) -> dict[str, Any]:
    """The first call (after the engine and a connection are up: what is left is the
    statements' own cost) and the best of the next ones."""
    from sqlalchemy import text

    from mailer import db

    with db.session_scope() as session:
        session.execute(text("SELECT 1"))
    times = []
    result = None
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t0)
    return {"first_s": times[0], "best_s": min(times[1:] or times), "result": result}


def status(campaign_id: int) -> dict[str, Any]:
    from mailer import db, queries

    def call() -> Any:
        with db.session_scope() as session:
            return queries.campaign_status(session, campaign_id).as_dict()

    return _timed(call)


def retry(campaign_id: int) -> dict[str, Any]:
    from mailer import db, outcomes
    from mailer.filters import DeliveryFilter
    from mailer.models import DeliveryState as S

    states = [S.FAILED, S.EXPIRED, S.UNKNOWN]  # retry's default

    def call() -> int:
        with db.session_scope() as session:
            ids = DeliveryFilter(campaign_id=campaign_id, states=tuple(states)).ids()
            return int(outcomes.retry_candidates(session, ids, include_suppressed=False))

    return _timed(call)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cmd", choices=["publish", "status", "retry"])
    parser.add_argument("id", type=int)
    args = parser.parse_args()
    command = {"publish": publish, "status": status, "retry": retry}[args.cmd]
    sys.stdout.write(json.dumps(command(args.id), default=str) + "\n")


if __name__ == "__main__":
    main()
