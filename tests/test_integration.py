"""The whole path with real parts: Redis, PostgreSQL, a `celery worker` process, an SMTP server."""

from __future__ import annotations

import signal
import time

import pytest
import redis
from sqlalchemy import func, select

import mailer
from mailer import db, enqueue
from mailer.models import Attempt, Delivery, DeliveryState
from tests.helpers import add_template, count, deliveries, wait_until

pytestmark = pytest.mark.integration


def _all_final() -> bool:
    return all(d.state.final for d in deliveries())


def test_campaign_of_500_through_real_worker(
    pg_db, clean_broker, smtp_server, configure_env, worker_process, running_dispatcher
) -> None:
    busy = {f"busy{i}@example.com" for i in range(40)}
    unknown = {f"nobody{i}@example.com" for i in range(20)}
    normal = {f"user{i}@example.com" for i in range(440)}
    for address in busy:
        smtp_server.reply("RCPT", "451 4.3.0 Mailbox busy, try again", recipient=address, times=1)
    for address in unknown:
        smtp_server.reply("RCPT", "550 5.1.1 No such user", recipient=address)
    configure_env(
        broker_url=clean_broker,
        smtp_url=smtp_server.url(tls="none"),
        retry_first_delay=1,
        dispatch_interval=0.5,
        log_level="WARNING",
    )
    add_template()
    rows = [{"email": a, "name": a.split("@")[0]} for a in sorted(busy | unknown | normal)]
    result = enqueue.send_campaign("welcome", rows)
    assert result.queued == 500
    worker_process("--concurrency", "2")
    running_dispatcher()
    assert wait_until(_all_final, timeout=120), f"not finished: {_summary()}"

    final = {d.recipient: d for d in deliveries()}
    assert {a for a, d in final.items() if d.state.value == "sent"} == busy | normal
    assert {a for a, d in final.items() if d.state.value == "bounced"} == unknown
    assert all(final[a].attempts == 2 for a in busy)
    copies = smtp_server.copies()
    assert all(copies[a] == 1 for a in busy | normal), "a sent recipient was stored twice or never"
    assert all(copies[a] == 0 for a in unknown)
    assert count(Attempt) == 500 + len(busy)
    with db.session_scope() as session:
        for attempt in session.query(Attempt):
            assert attempt.code in (250, 451, 550) and attempt.reply
    bounced = final[sorted(unknown)[0]]
    assert (bounced.last_code, bounced.last_enhanced) == (550, "5.1.1")
    assert "No such user" in (bounced.last_reply or "")


def test_tasks_lost_by_the_broker_are_sent_after_the_dispatcher_runs(
    pg_db, clean_broker, smtp_server, configure_env, worker_process, running_dispatcher
) -> None:
    configure_env(
        broker_url=clean_broker,
        smtp_url=smtp_server.url(tls="none"),
        republish_after=1,
        dispatch_interval=0.5,
        log_level="WARNING",
    )
    add_template()
    enqueue.send_campaign(
        "welcome", [{"email": f"r{i}@example.com", "name": "x"} for i in range(50)]
    )
    redis.Redis.from_url(clean_broker).flushdb()  # the broker loses every queued task
    worker_process("--concurrency", "1")
    assert not wait_until(_all_final, timeout=3), "sent without the dispatcher?"
    running_dispatcher()
    assert wait_until(_all_final, timeout=60), _summary()
    assert {d.state.value for d in deliveries()} == {"sent"}
    assert set(smtp_server.copies().values()) == {1}


def _summary() -> dict[str, int]:
    out: dict[str, int] = {}
    for d in deliveries():
        out[d.state.value] = out.get(d.state.value, 0) + 1
    return out


def test_transactional_mail_overtakes_a_running_campaign(
    pg_db, clean_broker, smtp_server, configure_env, worker_process
) -> None:
    """The transactional queue comes first: password resets wait for the chunks the worker's
    processes are busy with, never for the campaign's chunks queued behind them, however many
    resets there are (taking the queues in turn, each reset after the first waited for a
    chunk more)."""
    settings = configure_env(
        broker_url=clean_broker, smtp_url=smtp_server.url(tls="none"), log_level="WARNING"
    )
    add_template()
    add_template("reset", subject="Reset your password", text="Click {{ link }}\n")
    total = 20_000
    rows = ({"email": f"user{i}@example.com", "name": "x"} for i in range(total))
    enqueue.send_campaign("welcome", rows)
    worker_process("--concurrency", "2")
    assert wait_until(
        lambda: smtp_server.wait_for(200, timeout=0) or len(smtp_server.messages) >= 200, timeout=60
    ), "the campaign did not start"
    started = time.monotonic()
    resets = [
        mailer.send(template="reset", to=f"ann{i}@example.com", context={"link": "https://x/r"})
        for i in range(6)
    ]
    sent_before = len(smtp_server.messages)  # every reset is queued by now
    assert wait_until(lambda: all(_state_of(m) == "sent" for m in resets), timeout=120)
    latency = time.monotonic() - started
    with db.session_scope() as session:
        resets_done = session.scalar(
            select(func.max(Delivery.updated_at)).where(Delivery.message_id.in_(resets))
        )
        campaign_done = session.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(
                Delivery.message_id.not_in(resets),
                Delivery.state == DeliveryState.SENT,
                Delivery.updated_at <= resets_done,
            )
        )
    print(
        f"6 transactional messages during the campaign: the last sent after {latency:.2f} s; "
        f"{campaign_done} of {total} campaign messages were sent before it"
    )
    # at most the rest of the two chunks running once they were queued (prefetch 1: nothing
    # else reserved); taking the queues in turn gave about five chunks more
    assert campaign_done <= sent_before + 2 * settings.chunk_size


def _state_of(message_id: int) -> str | None:
    with db.session_scope() as session:
        state = session.scalar(select(Delivery.state).where(Delivery.message_id == message_id))
    return state.value if state else None


def test_a_worker_reuses_sessions_and_quits_each_one(
    pg_db, clean_broker, smtp_server, configure_env, worker_process
) -> None:
    configure_env(
        broker_url=clean_broker,
        smtp_url=smtp_server.url(tls="none"),
        log_level="WARNING",
        smtp_sessions=1,  # one process, one session: 1,000 messages are 10 sessions of 100
    )
    add_template()
    enqueue.send_campaign(
        "welcome", [{"email": f"r{i}@example.com", "name": "x"} for i in range(1000)]
    )
    worker = worker_process("--concurrency", "1")
    assert wait_until(_all_final, timeout=120), _summary()
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=30)
    assert len(smtp_server.messages) == 1000
    assert smtp_server.connections <= 10  # 100 messages per session
    assert smtp_server.quits == smtp_server.connections  # each session ended with QUIT
