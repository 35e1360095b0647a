"""Retries on a controllable clock, relay throttling, operator actions, send_at / expires_at."""

from __future__ import annotations

import itertools
from datetime import timedelta

from click.testing import CliRunner

import mailer
from mailer import backoff, clock, db, dispatcher
from mailer.cli import cli
from mailer.delivery import deliver_chunk
from mailer.models import Delivery, Suppression
from mailer.replies import Phase, SMTPReply
from mailer.transport.memory import MemoryTransport
from tests.helpers import add_template, attempts_of, count, deliveries, states

POLICY = {
    "retry_first_delay": 60,
    "retry_factor": 2,
    "retry_max_delay": 600,
    "retry_max_age": 3600,
    "relay_backoff": 120,
}


def _ids() -> list[int]:
    return [d.id for d in deliveries()]


def _run_until_quiet(fake: clock.FakeClock, transport: MemoryTransport, limit: int = 100) -> None:
    """Jump the clock to the next due delivery, run the dispatcher and the worker's task."""
    for _ in range(limit):
        pending = [d for d in deliveries() if not d.state.final]
        if not pending:
            return
        fake.set(max(fake(), min(d.next_attempt_at for d in pending)) + timedelta(seconds=1))
        if dispatcher.run_once(backlog=1).published:
            deliver_chunk(_ids(), transport=transport)
    raise AssertionError(f"still pending after {limit} rounds: {states()}")


def test_451_three_times_then_250_follows_the_schedule(any_db, configure_env) -> None:
    settings = configure_env(**POLICY)
    add_template()
    transport = MemoryTransport()
    transport.script("grey@example.com", Phase.RCPT, SMTPReply.of(451, "4.7.1 Greylisted"), times=3)
    transport.script(
        "busy@example.com", Phase.RCPT, SMTPReply.of(451, "4.3.0 Try later"), times=999
    )
    transport.script("gone@example.com", Phase.RCPT, SMTPReply.of(550, "5.1.1 No such user"))
    fake = clock.FakeClock()
    with clock.using(fake):
        start = fake()
        mailer.send(template="welcome", to=["grey@example.com"], context={"name": "G"})
        mailer.send(template="welcome", to=["busy@example.com"], context={"name": "B"})
        mailer.send(template="welcome", to=["gone@example.com"], context={"name": "N"})
        deliver_chunk(_ids(), transport=transport)
        _run_until_quiet(fake, transport)

    final = {d.recipient: d for d in deliveries()}
    grey = attempts_of("grey@example.com")
    assert final["grey@example.com"].state.value == "sent"
    assert [a.code for a in grey] == [451, 451, 451, 250]
    for n, (before, after) in enumerate(itertools.pairwise(grey), start=1):
        waited = (after.started_at - before.finished_at).total_seconds()
        expected = backoff.delay(settings.retry, n, rand=lambda: 0.5)  # the un-jittered delay
        assert expected * 0.9 <= waited <= expected * 1.1 + 2, (n, waited, expected)

    busy = final["busy@example.com"]
    assert busy.state.value == "expired"
    last_try = attempts_of("busy@example.com")[-1].started_at
    assert abs((last_try - start).total_seconds() - 3600) < 5  # the last try is at the max age

    gone = attempts_of("gone@example.com")
    assert final["gone@example.com"].state.value == "bounced" and len(gone) == 1
    with db.session_scope() as session:
        entry = session.get(Suppression, 1)
        assert entry is not None and entry.address == "gone@example.com"
        assert "5.1.1" in entry.reason


def test_421_storm_spends_no_attempts_and_everything_goes_out_after(any_db, configure_env) -> None:
    configure_env(**POLICY, retry_max_attempts=2)
    add_template()
    transport = MemoryTransport()
    rows = [{"email": f"r{i}@example.com", "name": "x"} for i in range(20)]
    fake = clock.FakeClock()
    # for 30 minutes the relay refuses every transaction (max age 1 h, 2 attempts allowed)
    reply = SMTPReply.of(421, "4.7.0 Try again later, closing connection")
    transport.outage(fake() + timedelta(minutes=30), Phase.MAIL, reply)
    with clock.using(fake):
        mailer.send_campaign("welcome", rows)
        deliver_chunk(_ids(), transport=transport)
        assert all(d.attempts == 0 for d in deliveries())
        _run_until_quiet(fake, transport, limit=400)
    assert set(states().values()) == {"sent"}
    assert all(d.attempts == 1 for d in deliveries())  # the one attempt that succeeded
    refusals = [a for a in attempts_of("r0@example.com") if a.code == 421]
    assert len(refusals) >= 3  # well past the budget of two, and none of them counted


def test_retry_dry_run_counts_and_changes_nothing_then_retries(sqlite_db, configure_env) -> None:
    add_template()
    transport = MemoryTransport()
    for i in range(3):
        transport.script(
            f"b{i}@example.com", Phase.RCPT, SMTPReply.of(550, "5.7.1 Blocked by policy")
        )
    result = mailer.send_campaign(
        "welcome",
        [{"email": f"b{i}@example.com", "name": "x"} for i in range(3)]
        + [{"email": "ok@example.com", "name": "x"}],
    )
    deliver_chunk(_ids(), transport=transport)
    assert sorted(states().values()) == ["failed", "failed", "failed", "sent"]
    runner = CliRunner()
    out = runner.invoke(
        cli, ["retry", "--campaign", str(result.campaign_id), "--state", "failed", "--dry-run"]
    )
    assert out.exit_code == 0 and "3 deliveries would be queued again" in out.output
    assert sorted(states().values()) == ["failed", "failed", "failed", "sent"]

    out = runner.invoke(
        cli, ["retry", "--campaign", str(result.campaign_id), "--state", "failed", "--code", "5xx"]
    )
    assert "3 deliveries queued again" in out.output
    assert dispatcher.run_once(backlog=0).published == 3
    deliver_chunk(_ids(), transport=transport)
    assert set(states().values()) == {"sent"}
    assert [a.code for a in attempts_of("b0@example.com")] == [550, 250]


def test_retry_skips_suppressed_addresses_unless_asked(sqlite_db) -> None:
    add_template()
    transport = MemoryTransport()
    transport.script("gone@example.com", Phase.RCPT, SMTPReply.of(550, "5.1.1 No such user"))
    result = mailer.send_campaign("welcome", [{"email": "gone@example.com", "name": "x"}])
    deliver_chunk(_ids(), transport=transport)
    runner = CliRunner()
    args = ["retry", "--campaign", str(result.campaign_id), "--state", "bounced"]
    assert "0 deliveries would" in runner.invoke(cli, [*args, "--dry-run"]).output
    assert "1 deliveries queued" in runner.invoke(cli, [*args, "--include-suppressed"]).output
    assert count(Suppression) == 0
    dispatcher.run_once(backlog=0)
    deliver_chunk(_ids(), transport=transport)
    assert states() == {"gone@example.com": "sent"}


def test_send_at_and_expires_at(any_db, configure_env) -> None:
    configure_env(dispatch_interval=5)
    add_template()
    transport = MemoryTransport()
    fake = clock.FakeClock()
    with clock.using(fake):
        now = fake()
        mailer.send(
            template="welcome",
            to="later@example.com",
            context={"name": "x"},
            send_at=now + timedelta(minutes=10),
        )
        mailer.send(
            template="welcome",
            to="stale@example.com",
            context={"name": "x"},
            send_at=now + timedelta(minutes=10),
            expires_at=now + timedelta(minutes=15),
        )
        assert deliver_chunk(_ids(), transport=transport).claimed == 0  # a stray task: too early
        fake.advance(9 * 60 + 55)
        assert dispatcher.run_once(backlog=0).published == 0
        fake.advance(5)  # one dispatcher period later it is due
        assert dispatcher.run_once(backlog=0).published == 2
        only_later = [d.id for d in deliveries(recipient="later@example.com")]
        deliver_chunk(only_later, transport=transport)
        fake.advance(6 * 60)  # past expires_at, before anyone sent it
        assert dispatcher.run_once(backlog=0).expired == 1
        deliver_chunk(_ids(), transport=transport)
    assert states() == {"later@example.com": "sent", "stale@example.com": "expired"}
    assert [r for r, _ in transport.sent] == ["later@example.com"]


def test_the_expiry_pass_reads_what_expired_lately_and_the_claim_closes_the_rest(
    any_db, configure_env
) -> None:
    configure_env(retry_max_age=3600)
    add_template()
    transport = MemoryTransport()
    fake = clock.FakeClock()
    with clock.using(fake):
        now = fake()
        mailer.send(
            template="welcome",
            to="long-ago@example.com",
            context={"name": "x"},
            send_at=now + timedelta(minutes=1),
            expires_at=now + timedelta(minutes=2),
        )
        fake.advance(2 * 3600)  # the dispatcher was away for longer than the retry max age
        report = dispatcher.run_once(backlog=0)
        assert report.expired == 0  # out of the pass's window: it reads no older history
        deliver_chunk(_ids(), transport=transport)  # the claim closes it all the same
    assert states() == {"long-ago@example.com": "expired"}
    assert transport.sent == []


def test_cancel_and_pause(sqlite_db) -> None:
    add_template()
    result = mailer.send_campaign(
        "welcome", [{"email": f"r{i}@example.com", "name": "x"} for i in range(4)]
    )
    runner = CliRunner()
    assert "paused" in runner.invoke(cli, ["campaign", "pause", str(result.campaign_id)]).output
    transport = MemoryTransport()
    deliver_chunk(_ids(), transport=transport)
    assert transport.sent == [] and set(states().values()) == {"queued"}
    assert dispatcher.run_once(backlog=0).published == 0
    out = runner.invoke(cli, ["cancel", "--campaign", str(result.campaign_id)])
    assert "4 deliveries cancelled" in out.output
    runner.invoke(cli, ["campaign", "resume", str(result.campaign_id)])
    deliver_chunk(_ids(), transport=transport)
    assert transport.sent == [] and set(states().values()) == {"cancelled"}
    assert count(Delivery) == 4


def test_retry_without_a_selection_is_refused(sqlite_db) -> None:
    for args in (["retry"], ["retry", "--state", "failed"]):
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 2 and "say which deliveries" in out.output


def test_unknown_is_neither_cancelled_nor_expired(sqlite_db, configure_env) -> None:
    add_template()
    transport = MemoryTransport()
    transport.script("a@example.com", Phase.DOT, SMTPReply.lost("connection lost after '.'"))
    fake = clock.FakeClock()
    with clock.using(fake):
        mailer.send(
            template="welcome",
            to="a@example.com",
            context={"name": "x"},
            expires_at=fake() + timedelta(minutes=5),
        )
        message_id = deliveries()[0].message_id
        deliver_chunk(_ids(), transport=transport)
        assert states() == {"a@example.com": "unknown"}
        out = CliRunner().invoke(cli, ["cancel", "--message", str(message_id)])
        assert "0 deliveries cancelled" in out.output
        fake.advance(600)
        assert dispatcher.run_once(backlog=0).expired == 0
    assert states() == {"a@example.com": "unknown"}  # it may have been delivered: kept as is


def test_suppression_import_counts_what_it_added_and_refuses_a_bad_file_whole(
    any_db, tmp_path
) -> None:
    runner = CliRunner()
    assert "1 added" in runner.invoke(cli, ["suppress", "add", "old@example.com"]).output
    good = tmp_path / "list.csv"
    good.write_text("email\nOld@example.com\nnew1@example.com\nnew2@example.com\n")
    out = runner.invoke(cli, ["suppress", "import", str(good)])
    assert "2 added (1 were already listed)" in out.output, out.output
    bad = tmp_path / "bad.csv"
    bad.write_text("email\nnew3@example.com\nnot an address\n")
    out = runner.invoke(cli, ["suppress", "import", str(bad)])
    assert out.exit_code != 0 and "line 3" in out.output, out.output
    listed = runner.invoke(cli, ["suppress", "list"]).output
    assert "new2@example.com" in listed and "new3@example.com" not in listed
