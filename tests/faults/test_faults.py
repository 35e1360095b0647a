"""Fault scenarios: a real campaign of 2,000 recipients through real processes (own
redis-server, `mailer worker` and `mailer dispatcher` subprocesses, PostgreSQL, the scripted
SMTP server), a fault in the middle, then the server's stored copies compared with the
database, recipient by recipient. Each scenario adds a row to the table printed at the end.
Redis restarted empty (scenarios 4, 4b) is in test_redis_restart.py.

Run alone: .venv/bin/python -m pytest -m faults -s tests/faults
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from mailer import db, dispatcher, enqueue, publish, recipients
from mailer.models import Attempt, Delivery, DeliveryState, Priority
from tests.faults.campaign import (
    MIDWAY,
    assert_mid_campaign,
    queue_campaign,
    recipient_address,
)
from tests.faults.harness import (
    CHUNK,
    CONCURRENCY,
    LEASE,
    RECIPIENTS,
    Rig,
    attempts_by_outcome,
    recipients_in,
    state_counts,
    stuck_in_sending,
    wait_until,
)
from tests.helpers import add_template

pytestmark = pytest.mark.faults


# --- 0: the control ------------------------------------------------------------------------------


def test_control_without_fault(rig: Rig) -> None:
    """The same campaign with no fault: the baseline the other rows compare with."""
    queue_campaign()
    rig.worker()
    rig.dispatcher()
    outcome = rig.finish("0 control (no fault)", notes=f"lease {LEASE} s")
    assert outcome.row.lost == 0, outcome.explain()
    assert outcome.row.duplicated == 0, outcome.explain()
    assert set(outcome.states.values()) == {"sent"}, outcome.explain()


# --- 1, 2: kill -9 ------------------------------------------------------------------------------


def test_kill_9_of_a_pool_process(rig: Rig) -> None:
    """A pool process dies mid-chunk; Celery replaces it and the worker goes on. Deliveries it
    had claimed stay `sending` until their lease runs out, then the dispatcher hands them out
    again: every recipient delivered; duplicates only among what was in flight at the kill."""
    # three times the usual campaign, and a relay that takes a few milliseconds a message: a
    # chunk then lasts long enough for the kill to land in one (on a fast machine the whole
    # campaign went out in about two seconds, and a kill between two chunks, which leaves
    # nothing `sending`, often found it over, with no room for another)
    total = 3 * RECIPIENTS
    rig.server.reply("DOT", "250 2.0.0 Ok: queued", delay=0.004)
    queue_campaign(total)
    worker = rig.worker()
    rig.dispatcher()
    rig.wait_copies(MIDWAY // 2)
    in_flight: set[str] = set()
    stuck: set[str] = set()
    kills = 0
    while not stuck and kills < 5 and len(rig.server.messages) < total:
        # the busiest pool process is running a chunk; if the kill still fell between two
        # chunks (nothing left `sending` a moment later), kill again
        victim = worker.kill_child(worker.busiest_child())
        killed_at = time.monotonic()
        kills += 1
        in_flight |= recipients_in("sending")
        assert_mid_campaign(rig, total)
        assert wait_until(
            lambda v=victim: len(worker.children()) >= CONCURRENCY and v not in worker.children(),
            20,
        ), f"the pool did not replace the killed process\n{worker.tail()}"
        time.sleep(max(0.0, killed_at + 1.3 - time.monotonic()))
        stuck = stuck_in_sending(older_than=1.0)
    assert stuck, f"{kills} kill(s) never caught a pool process in the middle of a chunk"

    outcome = rig.finish(
        "1 kill -9 pool process",
        notes=(
            f"{kills} kill(s); {len(in_flight)} in flight, {len(stuck)} left sending; "
            f"dup bound {CHUNK * CONCURRENCY}"
        ),
    )
    row = outcome.row
    assert row.lost == 0, outcome.explain()
    assert worker.alive(), "the worker's main process did not survive its child's death"
    assert row.duplicated <= CHUNK * CONCURRENCY, outcome.explain()
    assert outcome.duplicated_recipients <= in_flight, (
        "a duplicate outside what was in flight at the kill: "
        f"{sorted(outcome.duplicated_recipients - in_flight)[:10]}"
    )


def test_kill_9_of_the_whole_worker(rig: Rig) -> None:
    """The main process and its pool die at once (killpg); a new worker is started. Tasks it
    had reserved stay unacknowledged in Redis (visibility timeout >= 1 h), so their queued
    deliveries come back through the dispatcher's lost-wake-up rule, the claimed ones through
    the lease."""
    queue_campaign()
    worker = rig.worker()
    rig.dispatcher()
    rig.wait_copies(MIDWAY)
    worker.kill_group()
    in_flight = recipients_in("sending")
    assert_mid_campaign(rig)
    time.sleep(1)
    rig.worker()

    outcome = rig.finish(
        "2 kill -9 whole worker",
        notes=f"{len(in_flight)} in flight at the kill; dup bound {CHUNK * CONCURRENCY}",
    )
    assert outcome.row.lost == 0, outcome.explain()
    assert outcome.row.duplicated <= CHUNK * CONCURRENCY, outcome.explain()
    assert outcome.duplicated_recipients <= in_flight, (
        "a duplicate outside what was in flight at the kill: "
        f"{sorted(outcome.duplicated_recipients - in_flight)[:10]}"
    )


# --- 3: warm shutdown ---------------------------------------------------------------------------


def test_sigterm_warm_shutdown_and_restart(rig: Rig) -> None:
    """SIGTERM: the worker finishes the chunks it runs, records them, QUITs its SMTP sessions
    and exits; a restarted worker does the rest. Nothing lost, nothing twice."""
    queue_campaign()
    worker = rig.worker()
    rig.dispatcher()
    rig.wait_copies(MIDWAY)
    status = worker.terminate(timeout=60)
    assert status is not None, f"the worker did not stop within 60 s of SIGTERM\n{worker.tail()}"
    assert_mid_campaign(rig)
    stopped = {
        "connections": rig.server.connections,
        "quits": rig.server.quits,
        "stored": len(rig.server.messages),
        "sending": len(recipients_in("sending")),
    }
    restarted = rig.worker()
    outcome = rig.finish(
        "3 SIGTERM + restart",
        notes=f"at the stop: {stopped['connections']} connections, {stopped['quits']} QUITs",
    )
    assert restarted.terminate(timeout=60) is not None, "the second worker ignored SIGTERM"

    assert outcome.row.lost == 0, outcome.explain()
    assert outcome.row.duplicated == 0, outcome.explain()
    assert status == 0, f"warm shutdown exited with {status}\n{worker.tail()}"
    assert stopped["sending"] == 0, f"deliveries left `sending` by a warm shutdown: {stopped}"
    assert stopped["quits"] >= stopped["connections"], (
        f"SMTP sessions ended without QUIT at the warm shutdown: {stopped}"
    )
    assert rig.server.quits >= rig.server.connections, (
        f"{rig.server.connections} connections, {rig.server.quits} QUITs at the end"
    )


# --- 5: the database unreachable -----------------------------------------------------------------


def test_database_unreachable_for_15_seconds(rig: Rig, pg_db: str) -> None:
    """Workers and two dispatchers (one active, one standing by) reach PostgreSQL through a
    proxy that drops every connection and refuses new ones for 15 s. Writes are retried
    (db.retrying: claims for half a lease, records for two leases); a chunk whose record gives
    up leaves its deliveries `sending` until the lease runs out, so a few may go out twice
    (bounded); none may be lost.
    Afterwards the dispatchers must still be there, one of them active."""
    proxy, through_proxy = rig.db_proxy(pg_db)
    env = {"MAILER_DATABASE_URL": through_proxy}
    queue_campaign()
    # the dispatchers settle first: the worker is quick enough to finish while they start
    active = rig.dispatcher(env=env)
    assert wait_until(lambda: active.grep("dispatcher active"), 15), active.tail()
    standby = rig.dispatcher(env=env)
    assert wait_until(lambda: standby.grep("standing by"), 15), standby.tail()
    worker = rig.worker(env=env)
    rig.wait_copies(MIDWAY)
    proxy.outage()
    assert_mid_campaign(rig)
    stored_at_cut = len(rig.server.messages)
    time.sleep(15)
    stored_during = len(rig.server.messages) - stored_at_cut
    proxy.recover()

    outcome = rig.finish(
        "5 database down 15 s",
        notes=(
            f"{proxy.dropped} connections cut, {stored_during} stored during the outage; "
            f"dup bound {CHUNK * CONCURRENCY}"
        ),
    )
    assert outcome.row.lost == 0, outcome.explain()
    assert outcome.row.duplicated <= CHUNK * CONCURRENCY, outcome.explain()
    assert worker.alive(), f"the worker died of the database outage\n{worker.tail()}"
    # The dispatchers: the advisory lock lived on the active one's connection, which the outage
    # cut. Both must survive the outage, and one only may be active afterwards: a dispatcher
    # started now (as a supervisor would start one) must stand by while the first one runs.
    survived = {d.name: d.alive() for d in (active, standby)}
    late = rig.dispatcher(env=env)
    assert wait_until(lambda: late.grep("dispatcher active") or late.grep("standing by"), 15), (
        late.tail()
    )
    late_active = bool(late.grep("dispatcher active"))
    outcome.row.notes += (
        f"; standby {'survived' if survived[standby.name] else 'DIED'}, "
        f"a new dispatcher {'became ACTIVE too' if late_active else 'stood by'}"
    )
    assert all(survived.values()), (
        f"a dispatcher died of the database outage: {survived}\n{standby.tail(6)}"
    )
    assert active.alive() and not late_active, (
        "two dispatchers active: the first lost its advisory lock with its connection during "
        "the outage and went on publishing; a dispatcher started afterwards took the lock too"
    )


# --- 6: the SMTP server down ---------------------------------------------------------------------


def test_smtp_server_down_then_back(rig: Rig) -> None:
    """The relay stops answering for 8 s (connections refused), then comes back on its port:
    deliveries are deferred while the relay rests (no attempt spent), then all delivered once."""
    queue_campaign()
    rig.worker()
    rig.dispatcher()
    rig.wait_copies(MIDWAY)
    # Down gracefully, as a relay goes: from now on every transaction is refused at DATA, so
    # that no body is written into a connection about to close, and those whose body is under
    # way end first. Stopped at once, the server may cut a session after the client wrote the
    # final "." and before it stored the message: an ambiguous send, which
    # MAILER_AMBIGUOUS=hold keeps as `unknown` with no copy (scenario 7 covers that case).
    # Stopping the pool processes for a moment first still let one through: a process stopped
    # between its check of the connection and its write of the body.
    rig.server.reply("DATA", "421 4.3.2 Service shutting down")
    time.sleep(0.5)
    rig.server.stop()
    rig.server.clear()
    assert_mid_campaign(rig)
    time.sleep(8)
    during = state_counts()
    rig.server.start()

    outcome = rig.finish(
        "6 SMTP server down 8 s",
        notes=f"deferred during the outage: {during.get('deferred', 0)}",
    )
    assert outcome.row.lost == 0, outcome.explain()
    assert outcome.row.duplicated == 0, outcome.explain()
    assert set(outcome.states.values()) == {"sent"}, outcome.explain()
    assert during.get("deferred", 0) > 0, f"nothing was deferred while the relay was down: {during}"
    assert attempts_by_outcome().get("connection", 0) > 0
    with db.session_scope() as session:
        spent = session.scalars(select(Delivery.attempts).distinct()).all()
    assert set(spent) == {1}, f"a relay outage spent recipients' attempts: {sorted(spent)}"


# --- 7: the connection dropped at each phase -----------------------------------------------------

PRE_DOT = ("rcpt", "data", "body")
PER_PHASE = 3


@pytest.mark.parametrize("policy", ["hold", "retry"])
def test_connection_dropped_at_each_phase(rig: Rig, policy: str) -> None:
    """Drops at the greeting and at MAIL (the next few sessions/transactions), and at RCPT,
    DATA, the body and after the final "." for a few recipients each. Before ".": exactly one
    copy in the end. After ".": hold -> `unknown` with the one stored copy; retry -> `sent`
    with two copies (duplicates by policy)."""
    rig.configure(ambiguous=policy)
    picked: dict[str, list[str]] = {}
    step = RECIPIENTS // (PER_PHASE * 4 + 1)
    addresses = iter(recipient_address(i) for i in range(step, RECIPIENTS, step))
    for phase in (*PRE_DOT, "after_dot"):
        picked[phase] = [next(addresses) for _ in range(PER_PHASE)]
        for address in picked[phase]:
            rig.server.drop(phase, recipient=address, times=1)
    rig.server.drop("greeting", times=PER_PHASE)
    rig.server.drop("mail", times=PER_PHASE)
    # The server drops "body" after reading the start of it. A small message (body and final
    # "." written at once) is wholly in the socket buffers by then, and the client cannot tell
    # that drop from one after "." (it reads no reply to "."): it is ambiguous. A 9.6 MB body,
    # more than the loopback buffers hold (tcp_wmem max 4 MB), makes the drop land while the
    # client is still writing: a drop before ".", which must be retried.
    queue_campaign(extra={address: {"big": 100_000} for address in picked["body"]})  # 9.6 MB
    rig.worker()
    rig.dispatcher()

    after_dot = set(picked["after_dot"])
    outcome = rig.finish(
        f"7 drops at each phase ({policy})",
        notes=(
            f"{len(after_dot)} after '.'"
            + ("; held unknown" if policy == "hold" else "; duplicates by policy")
        ),
    )
    assert outcome.row.lost == 0, outcome.explain()
    for phase in PRE_DOT:
        for address in picked[phase]:
            assert (outcome.states[address], outcome.copies[address]) == ("sent", 1), (
                f"dropped at {phase}: {address} ended {outcome.states[address]} with "
                f"{outcome.copies[address]} copies"
            )
    want = ("unknown", 1) if policy == "hold" else ("sent", 2)
    for address in after_dot:
        assert (outcome.states[address], outcome.copies[address]) == want, (
            f"dropped after '.': {address} ended {outcome.states[address]} with "
            f"{outcome.copies[address]} copies, expected {want}"
        )
    others = {r for r in outcome.states if r not in after_dot}
    assert all(outcome.states[r] == "sent" and outcome.copies[r] == 1 for r in others), (
        outcome.explain()
    )
    assert outcome.row.duplicated == (0 if policy == "hold" else len(after_dot))
    assert outcome.duplicated_recipients == (set() if policy == "hold" else after_dot)
    with db.session_scope() as session:
        phases = dict(
            session.execute(
                select(Delivery.recipient, Attempt.phase)
                .join(Attempt, Attempt.delivery_id == Delivery.id)
                .where(Delivery.recipient.in_(after_dot), Attempt.code.is_(None))
            ).all()
        )
    assert set(phases.values()) == {"dot"}, f"after-'.' drops recorded at phases {phases}"
    # the greeting and MAIL drops were served (the rules are used up)
    assert not rig.server._script.rules, f"drops never triggered: {rig.server._script.rules}"


# --- 8: duplicate wake-ups ---------------------------------------------------------------------


def test_every_chunk_published_three_times_and_two_dispatchers(rig: Rig) -> None:
    """Every chunk goes to the broker three times (send_campaign, then publish() twice more),
    two worker nodes run them concurrently, two `mailer dispatcher` processes run at once and
    a third, lock-less dispatcher loop (run_once) runs in this process; some recipients are
    deferred once (451) so the dispatchers have retries to publish. The compare-and-set claim
    must make every message go out once."""
    busy = [recipient_address(i) for i in range(7, RECIPIENTS, 50)]
    for address in busy:
        rig.server.reply("RCPT", "451 4.3.0 Mailbox busy, try again", recipient=address, times=1)
    queue_campaign()
    with db.session_scope() as session:
        ids = list(session.scalars(select(Delivery.id).order_by(Delivery.id)))
    for _ in range(2):
        assert publish.publish(ids, Priority.BULK, CHUNK) == len(ids)
    queued = rig.redis.queued()
    first, second = rig.dispatcher(), rig.dispatcher()
    stop = threading.Event()

    def lockless() -> None:
        while not stop.wait(0.5):
            with contextlib.suppress(Exception):
                dispatcher.run_once()

    loop = threading.Thread(target=lockless, daemon=True)
    loop.start()
    try:
        rig.worker("--hostname", "one@%h")
        rig.worker("--hostname", "two@%h")
        outcome = rig.finish(
            "8 chunks x3, 2+1 dispatchers",
            notes=f"{queued} tasks for {len(ids) // CHUNK} chunks; {len(busy)} deferred once",
        )
    finally:
        stop.set()
        loop.join(timeout=10)
    assert outcome.row.lost == 0, outcome.explain()
    assert outcome.row.duplicated == 0, outcome.explain()
    assert set(outcome.states.values()) == {"sent"}, outcome.explain()
    assert queued == 3 * (len(ids) // CHUNK)
    assert first.alive() and second.alive(), "a dispatcher died"
    standing_by = first.grep("standing by") + second.grep("standing by")
    outcome.row.notes += "; one dispatcher stood by" if standing_by else "; both active"


# --- 9: a poison row ----------------------------------------------------------------------------


def test_poison_row_fails_alone(rig: Rig, tmp_path: Path) -> None:
    """A JSON Lines campaign whose body uses {{ coupon }}; one row (not the first, which the
    producer renders as a check) has no coupon. That delivery fails with the render error; the
    rest of its chunk, and of the campaign, is delivered."""
    add_template(
        "coupon",
        subject="Hello {{ name }}",
        text="Hi {{ name }}, your coupon is {{ coupon }}.\n",
    )
    poison_index = 1234
    poison = recipient_address(poison_index)
    path = tmp_path / "recipients.jsonl"
    with path.open("w") as out:
        for i in range(RECIPIENTS):
            row = {"email": recipient_address(i), "name": f"n{i}", "coupon": f"C{i:05d}"}
            if i == poison_index:
                del row["coupon"]
            out.write(json.dumps(row) + "\n")
    result = enqueue.send_campaign("coupon", recipients.read(path), name="poison")
    assert result.queued == RECIPIENTS
    rig.worker()
    rig.dispatcher()

    outcome = rig.finish("9 poison row", expected={poison: "failed"}, notes="1 failed by design")
    assert outcome.row.lost == 0, outcome.explain()
    assert outcome.row.duplicated == 0, outcome.explain()
    with db.session_scope() as session:
        bad = session.scalars(select(Delivery).where(Delivery.recipient == poison)).one()
        ids = list(session.scalars(select(Delivery.id).order_by(Delivery.id)))
        index = ids.index(bad.id)
        siblings = set(ids[index - index % CHUNK : index - index % CHUNK + CHUNK]) - {bad.id}
        sibling_states = {
            state.value
            for state in session.scalars(select(Delivery.state).where(Delivery.id.in_(siblings)))
        }
    assert bad.state is DeliveryState.FAILED, f"the poison row ended {bad.state}"
    assert "'coupon' is undefined" in (bad.last_reply or ""), bad.last_reply
    assert bad.last_phase == "local", bad.last_phase
    assert outcome.copies[poison] == 0
    assert len(siblings) == CHUNK - 1 and sibling_states == {"sent"}, sibling_states
    assert outcome.row.delivered == RECIPIENTS - 1
