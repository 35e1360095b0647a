"""The pipeline in one process: enqueue -> claim -> send -> record, and the dispatcher."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

import mailer
from mailer import bulk, clock, compose, db, delivery, dispatcher, enqueue, suppressions
from mailer.delivery import deliver_chunk
from mailer.errors import InputError
from mailer.models import Attempt, Delivery, DeliveryState, Message
from mailer.replies import Phase, SMTPReply
from mailer.transport.memory import MemoryTransport
from tests.helpers import add_template, attempts_of, count, deliveries, states


def _ids() -> list[int]:
    return [d.id for d in deliveries()]


def test_send_delivers_and_records_every_attempt(any_db: str) -> None:
    add_template()
    transport = MemoryTransport()
    message_id = mailer.send(
        template="welcome", to=["a@example.com", "b@example.com"], context={"name": "Ann"}
    )
    report = deliver_chunk(_ids(), transport=transport)
    assert report.attempted == 2
    assert len(transport.transactions) == 1  # one message, two recipients, one transaction
    assert transport.transactions[0].recipients == ("a@example.com", "b@example.com")
    assert states() == {"a@example.com": "sent", "b@example.com": "sent"}
    data = transport.sent[0][1].decode()
    assert "Subject: Hello Ann" in data and "Message-ID: <" in data
    assert [a.code for a in attempts_of("a@example.com")] == [250]
    assert deliveries()[0].message_id == message_id


def test_same_idempotency_key_twice_creates_one_message_and_one_send(any_db: str) -> None:
    add_template()
    first = enqueue.send("welcome", "a@example.com", {"name": "A"}, idempotency_key="signup-42")
    second = enqueue.send("welcome", "a@example.com", {"name": "A"}, idempotency_key="signup-42")
    assert first == second
    assert count(Message) == 1 and count(Delivery) == 1
    transport = MemoryTransport()
    deliver_chunk(_ids(), transport=transport)
    deliver_chunk(_ids(), transport=transport)
    assert len(transport.sent) == 1


def test_two_tasks_for_the_same_deliveries_send_each_message_once(any_db: str) -> None:
    add_template()
    enqueue.send_campaign(
        "welcome", ({"email": f"r{i}@example.com", "name": f"R{i}"} for i in range(40))
    )
    ids = _ids()
    transport = MemoryTransport()
    barrier = threading.Barrier(2)

    def task() -> None:
        barrier.wait()
        deliver_chunk(ids, transport=transport)

    threads = [threading.Thread(target=task) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = [recipient for recipient, _ in transport.sent]
    assert sorted(sent) == sorted(f"r{i}@example.com" for i in range(40))
    assert count(Attempt) == 40
    assert set(states().values()) == {"sent"}


def test_transient_reply_defers_and_the_dispatcher_retries_when_due(
    any_db: str, configure_env
) -> None:
    configure_env(retry_first_delay=60)
    add_template()
    transport = MemoryTransport()
    transport.script("a@example.com", Phase.RCPT, SMTPReply.of(451, "4.3.0 Try again later"))
    enqueue.send("welcome", "a@example.com", {"name": "A"})
    deliver_chunk(_ids(), transport=transport)
    [d] = deliveries()
    assert d.state is DeliveryState.DEFERRED and d.attempts == 1 and d.last_code == 451
    assert timedelta(seconds=50) < d.next_attempt_at - d.updated_at < timedelta(seconds=70)
    # not due yet: the dispatcher leaves it alone, and a stray task cannot claim it
    assert dispatcher.run_once(backlog=0).published == 0
    assert deliver_chunk(_ids(), transport=transport).claimed == 0
    later = clock.FakeClock(d.next_attempt_at + timedelta(seconds=1))
    with clock.using(later):
        assert dispatcher.run_once(backlog=1).published == 1
        deliver_chunk(_ids(), transport=transport)
    assert states() == {"a@example.com": "sent"}
    assert [a.code for a in attempts_of("a@example.com")] == [451, 250]


def test_dispatcher_republishes_queued_rows_whose_wakeup_was_lost(
    any_db: str, configure_env
) -> None:
    configure_env(republish_after=30)
    add_template()
    enqueue.send_campaign(
        "welcome", ({"email": f"r{i}@example.com", "name": "x"} for i in range(5))
    )
    # the broker still holds the tasks: nothing to do
    assert dispatcher.run_once(backlog=5).published == 0
    # the broker lost them (restart without persistence): once they are stale, publish again
    assert dispatcher.run_once(backlog=0).published == 0  # not stale yet
    with clock.using(clock.FakeClock(clock.now() + timedelta(seconds=31))):
        assert dispatcher.run_once(backlog=0).published == 5
        assert dispatcher.run_once(backlog=0).published == 0  # just published: not again


def test_dispatcher_republishes_deliveries_whose_lease_expired(any_db: str, configure_env) -> None:
    s = configure_env(lease_seconds=60)
    add_template()
    enqueue.send("welcome", "a@example.com", {"name": "A"})
    from mailer import db, outcomes

    with db.session_scope() as session:  # a worker claims, then dies before recording
        assert outcomes.claim(
            session, _ids(), clock.now(), clock.now() + timedelta(seconds=s.lease_seconds)
        )
    assert dispatcher.run_once(backlog=0).published == 0
    later = clock.FakeClock(clock.now() + timedelta(seconds=61))
    with clock.using(later):
        assert dispatcher.run_once(backlog=0).published == 1
        transport = MemoryTransport()
        deliver_chunk(_ids(), transport=transport)
    assert states() == {"a@example.com": "sent"}


def test_a_reply_with_a_nul_is_recorded_and_not_sent_again(any_db: str) -> None:
    # PostgreSQL cannot store a NUL in text: an outcome that could not be written would be
    # sent again after its lease, for ever
    add_template()
    transport = MemoryTransport()
    transport.script("a@example.com", Phase.DOT, SMTPReply.of(250, b"2.0.0 Ok\x00 queued"))
    enqueue.send("welcome", "a@example.com", {"name": "A"})
    deliver_chunk(_ids(), transport=transport)
    assert states() == {"a@example.com": "sent"}
    [attempt] = attempts_of("a@example.com")
    assert attempt.reply == "2.0.0 Ok\ufffd queued"
    assert deliveries()[0].last_reply == "2.0.0 Ok\ufffd queued"


def test_hard_bounce_suppresses_and_suppressed_addresses_are_not_queued(any_db: str) -> None:
    add_template()
    transport = MemoryTransport()
    transport.script("gone@example.com", Phase.RCPT, SMTPReply.of(550, "5.1.1 No such user"))
    enqueue.send("welcome", "gone@example.com", {"name": "G"})
    deliver_chunk(_ids(), transport=transport)
    assert states() == {"gone@example.com": "bounced"}
    result = enqueue.send_campaign(
        "welcome",
        [{"email": "Gone@example.com", "name": "G"}, {"email": "new@example.com", "name": "N"}],
    )
    assert (result.queued, result.suppressed) == (1, 1)


def test_campaign_rows_are_deduplicated_and_streamed(any_db: str) -> None:
    add_template()
    consumed = []

    def rows():
        for i in range(5000):
            consumed.append(i)
            yield {"email": f"user{i % 4000}@example.com", "name": "x"}

    result = enqueue.send_campaign("welcome", rows(), name="big")
    assert (result.queued, result.duplicates) == (4000, 1000)
    assert count(Delivery) == 4000


def test_invalid_row_refuses_the_whole_campaign_and_writes_nothing(any_db: str) -> None:
    add_template()
    rows = [{"email": "ok@example.com", "name": "a"}, {"email": "not-an-address", "name": "b"}]
    with pytest.raises(InputError, match=r"recipient 2: invalid address 'not-an-address'"):
        enqueue.send_campaign("welcome", rows)
    assert count(Message) == 0 and count(Delivery) == 0


def test_an_invalid_row_batches_later_rolls_back_the_batches_already_written(
    any_db: str,
) -> None:
    # the rows before it were handed to the writer thread; none of them may stay
    add_template()
    rows = [{"email": f"u{i}@example.com", "name": "x"} for i in range(3 * enqueue.BATCH)]
    rows.append({"email": "bad@", "name": "y"})
    with pytest.raises(InputError, match=rf"recipient {3 * enqueue.BATCH + 1}: invalid address"):
        enqueue.send_campaign("welcome", rows)
    assert count(Message) == 0 and count(Delivery) == 0


def test_suppressed_addresses_in_every_batch_are_written_as_suppressed(any_db: str) -> None:
    add_template()
    total = 2 * enqueue.BATCH + 10
    listed = {f"u{i}@example.com" for i in range(0, total, 7)}
    with db.session_scope() as session:
        suppressions.add(session, [(a.upper(), "complaint", None) for a in listed], clock.now())
    progress: list[int] = []
    result = enqueue.send_campaign(
        "welcome",
        ({"email": f"u{i}@example.com", "name": "x"} for i in range(total)),
        progress=progress.append,
    )
    assert (result.queued, result.suppressed) == (total - len(listed), len(listed))
    assert progress == [enqueue.BATCH, 2 * enqueue.BATCH, total]
    found = states()
    assert {a for a, state in found.items() if state == "suppressed"} == listed
    assert len(found) == total
    with db.session_scope() as session:
        reasons = {d.last_reply for d in session.scalars(select(Delivery))}
    assert reasons == {None, "on the suppression list at enqueue"}


def test_render_failure_fails_that_delivery_alone(any_db: str) -> None:
    add_template(text="Hi {{ name }}, your code is {{ code }}\n")
    rows = [{"email": f"r{i}@example.com", "name": "x", "code": "123"} for i in range(3)]
    del rows[1]["code"]  # a poison row: the body needs `code`
    enqueue.send_campaign("welcome", rows)
    transport = MemoryTransport()
    deliver_chunk(_ids(), transport=transport)
    assert states() == {
        "r0@example.com": "sent",
        "r1@example.com": "failed",
        "r2@example.com": "sent",
    }
    [poisoned] = deliveries(recipient="r1@example.com")
    assert "'code' is undefined" in (poisoned.last_reply or "")
    # the message after the poisoned one could not be announced: nothing was
    assert transport.following == [None, None] and transport.unkept == 0


def test_each_transaction_of_a_chunk_is_announced_behind_the_one_before(
    any_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_template()
    enqueue.send_campaign(
        "welcome", [{"email": f"r{i}@example.com", "name": "x"} for i in range(5)]
    )
    transport = MemoryTransport()
    composed = []
    real = delivery._compose
    monkeypatch.setattr(delivery, "_compose", lambda group: composed.append(group) or real(group))
    deliver_chunk(_ids(), transport=transport)
    assert len(transport.transactions) == 5
    assert transport.following == [*transport.transactions[1:], None]
    assert transport.unkept == 0
    # each message composed once: ahead of the one before it, or while that one was sent
    assert len(composed) == 5


def test_too_many_recipients_go_in_new_transactions_at_once(any_db: str) -> None:
    add_template()
    transport = MemoryTransport(max_recipients=3)
    to = [f"r{i}@example.com" for i in range(7)]
    mailer.send(template="welcome", to=to, context={"name": "x"})
    deliver_chunk(_ids(), transport=transport)
    assert set(states().values()) == {"sent"}
    assert [len(t.recipients) for t in transport.transactions] == [7, 4, 1]
    assert sorted(r for r, _ in transport.sent) == sorted(to)
    assert all(d.attempts == 1 for d in deliveries())


def test_an_unexpected_compose_error_fails_that_delivery_alone(any_db: str, monkeypatch) -> None:
    add_template()
    rows = [{"email": f"r{i}@example.com", "name": "x"} for i in range(3)]
    enqueue.send_campaign("welcome", rows)
    real = compose.build

    def build(rendered, **kw):
        if kw["to"] == ("r1@example.com",):
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return real(rendered, **kw)

    monkeypatch.setattr(compose, "build", build)
    transport = MemoryTransport()
    deliver_chunk(_ids(), transport=transport)
    assert states() == {
        "r0@example.com": "sent",
        "r1@example.com": "failed",
        "r2@example.com": "sent",
    }
    assert "UnicodeEncodeError" in (deliveries(recipient="r1@example.com")[0].last_reply or "")


def test_a_concurrent_send_with_the_same_key_returns_the_first_message(
    any_db: str, monkeypatch
) -> None:
    add_template()
    first = mailer.send(
        template="welcome", to="a@example.com", context={"name": "A"}, idempotency_key="k-1"
    )
    # the second request checked for the key before the first one committed
    real, calls = enqueue._by_key, []

    def by_key(session, key):
        calls.append(key)
        return None if len(calls) == 1 else real(session, key)

    monkeypatch.setattr(enqueue, "_by_key", by_key)
    again = mailer.send(
        template="welcome", to="a@example.com", context={"name": "A"}, idempotency_key="k-1"
    )
    assert again == first and len(calls) == 2
    assert count(Message) == 1 and count(Delivery) == 1


def test_an_interrupt_with_writes_in_flight_rolls_back_only_after_them(
    sqlite_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_template()
    log: list[str] = []
    insert = bulk.insert_rows

    def slow_insert(session: Any, model: Any, rows: Any, **options: Any) -> int:
        if rows:
            log.append("start")
            time.sleep(0.4)
        written = insert(session, model, rows, **options)
        if rows:
            log.append("end")
        return written

    rollback = Session.rollback

    def logged_rollback(self: Session) -> None:
        log.append("rollback")
        rollback(self)

    monkeypatch.setattr(bulk, "insert_rows", slow_insert)
    monkeypatch.setattr(Session, "rollback", logged_rollback)

    def second_interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    def rows() -> Iterator[dict[str, str]]:
        yield from ({"email": f"u{i}@example.com", "name": "x"} for i in range(3 * enqueue.BATCH))
        signal.setitimer(signal.ITIMER_REAL, 0.1)  # Ctrl-C again while the first is handled
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, second_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            enqueue.send_campaign("welcome", rows())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    time.sleep(0.6)  # a write still going on, or started later, would show now
    # the batch being written ended; the one queued behind it never started; the campaign was
    # rolled back after that, never beside a write
    assert log.count("start") == log.count("end") == 2
    assert log.index("rollback") > max(i for i, entry in enumerate(log) if entry == "end")
    assert count(Message) == 0 and count(Delivery) == 0
