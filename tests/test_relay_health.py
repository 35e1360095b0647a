"""A relay that refuses our configuration pauses; nothing is burned; resuming delivers."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from click.testing import CliRunner

import mailer
from mailer import db, delivery, dispatcher
from mailer.cli import cli
from mailer.delivery import deliver_chunk
from mailer.models import Relay
from mailer.testing.smtpserver import ScriptedSMTPServer
from tests.helpers import add_template, count, deliveries, states

SECRET = "right-password"


def _ids() -> list[int]:
    return [d.id for d in deliveries()]


def _campaign_over_sessions(
    server: ScriptedSMTPServer, configure_env: Any, sessions: int, count: int
) -> list[int]:
    """A campaign to r0..r{count-1}@example.com, workers sending over `sessions` sessions to
    `server`; the deliveries' ids."""
    configure_env(smtp_url=server.url(tls="none"), smtp_sessions=sessions)
    add_template()
    mailer.send_campaign(
        "welcome", [{"email": f"r{i}@example.com", "name": "x"} for i in range(count)]
    )
    return _ids()


def test_bad_credentials_pause_the_relay_and_keep_everyone_queued(any_db, configure_env) -> None:
    with ScriptedSMTPServer(auth={"mailer": SECRET}) as server:
        settings = configure_env(smtp_url=server.url(user="mailer", password="wrong", tls="none"))
        add_template()
        mailer.send_campaign(
            "welcome", [{"email": f"r{i}@example.com", "name": "x"} for i in range(5)]
        )
        deliver_chunk(_ids())
        assert set(states().values()) == {"queued"}
        assert all(d.attempts == 0 for d in deliveries())
        assert server.messages == []
        with db.session_scope() as session:
            relay = session.get(Relay, settings.smtp.name)
            assert relay is not None and "535" in (relay.paused_reason or "")
        status = CliRunner().invoke(cli, ["relay", "status"])
        assert "paused: auth: 535" in status.output
        blocked = dispatcher.run_once(backlog=0)
        assert blocked.published == 0 and "paused" in (blocked.relay_blocked or "")

        # the operator fixes the password and resumes the relay
        configure_env(smtp_url=server.url(user="mailer", password=SECRET, tls="none"))
        assert "resumed" in CliRunner().invoke(cli, ["relay", "resume"]).output
        assert dispatcher.run_once(backlog=0).published == 5
        deliver_chunk(_ids())
        assert set(states().values()) == {"sent"}
        assert sorted(server.copies().values()) == [1] * 5


def test_required_starttls_missing_sends_nothing_and_tries_no_auth(
    sqlite_db, configure_env
) -> None:
    with ScriptedSMTPServer(auth={"mailer": SECRET}) as server:
        configure_env(smtp_url=server.url(user="mailer", password=SECRET, tls="starttls"))
        add_template()
        mailer.send(template="welcome", to="a@example.com", context={"name": "x"})
        deliver_chunk(_ids())
        assert states() == {"a@example.com": "queued"}
        assert "AUTH" not in server.commands and "MAIL" not in server.commands
        assert server.auth_attempts == 0
        [delivery] = deliveries()
        assert delivery.attempts == 0
    assert count(type(delivery)) == 1


def test_a_chunk_goes_out_over_several_sessions_at_once(sqlite_db, configure_env) -> None:
    with ScriptedSMTPServer() as server:
        report = deliver_chunk(_campaign_over_sessions(server, configure_env, 4, 40))
        assert report.attempted == 40
        assert set(states().values()) == {"sent"}
        assert sorted(server.copies().values()) == [1] * 40
        # two lanes of two sessions, each sending its share in steps (envelopes announced
        # ahead, none of them dropped: no reconnect)
        assert server.connections == 4


def test_a_throttling_relay_stops_the_other_sessions_and_spends_nothing(
    sqlite_db, configure_env
) -> None:
    with ScriptedSMTPServer() as server:
        server.reply("MAIL", "421 4.7.0 Too many messages, slow down")
        report = deliver_chunk(_campaign_over_sessions(server, configure_env, 4, 40))
        assert report.attempted + report.released == 40
        assert report.released > 0  # the groups not yet begun were handed back untried
        assert set(states().values()) == {"deferred"}
        assert all(d.attempts == 0 for d in deliveries())
        assert server.messages == []


def test_a_chunk_too_slow_for_its_lease_hands_the_rest_back_untried(
    sqlite_db, configure_env, caplog
) -> None:
    """No transaction begins after half the lease: a slow relay cannot keep a chunk's
    deliveries past their lease, when another worker could take them over and send them
    again. What was not begun goes back queued, its attempts unspent, and the dispatcher's next
    pass publishes it."""
    with ScriptedSMTPServer() as server:
        server.reply("DOT", "250 2.0.0 Ok: queued", delay=0.1)
        ids = _campaign_over_sessions(server, configure_env, 1, 20)
        configure_env(lease_seconds=0.8)  # half of it: time for about four messages
        report = deliver_chunk(ids)
        assert 0 < report.attempted < 20
        assert report.attempted + report.released == 20
        sent = {d.recipient for d in deliveries(state="sent")}
        assert len(sent) == report.attempted and all(
            d.attempts == 1 for d in deliveries(state="sent")
        )
        rest = deliveries(state="queued")
        assert len(rest) == report.released and all(d.attempts == 0 for d in rest)
        assert sorted(server.copies()) == sorted(sent) and set(server.copies().values()) == {1}
        assert "not begun by half their lease" in caplog.text
        assert dispatcher.run_once(backlog=0).published == report.released


def test_a_reply_later_than_three_quarters_of_the_lease_is_none(sqlite_db, configure_env) -> None:
    """A relay that takes longer to answer "." than the lease leaves: the wait ends at three
    quarters of the lease, the message is held as unknown (it may have been delivered) and
    recorded before the lease runs out, so that no other worker can take it over and send it
    again; what was not begun goes back queued."""
    with ScriptedSMTPServer() as server:
        server.reply("DOT", "250 2.0.0 Ok: queued", delay=5.0)
        ids = _campaign_over_sessions(server, configure_env, 2, 6)
        configure_env(lease_seconds=3)  # begin nothing after 1.5 s; wait for nothing after 2.25
        began = time.monotonic()
        report = deliver_chunk(ids)
        assert time.monotonic() - began < 3
        assert report.attempted == 2 and report.released == 4  # one step of two sessions
        assert sorted(states().values()) == ["queued"] * 4 + ["unknown"] * 2
        held = deliveries(state="unknown")
        assert all("timed out" in (d.last_reply or "") for d in held)


@pytest.mark.parametrize("sessions", [2, 4])
def test_chunks_at_once_in_one_process_take_lanes_of_their_own(
    sqlite_db, configure_env, sessions: int
) -> None:
    # a threaded worker runs chunks side by side: each sends over lanes (two sessions each)
    # no other chunk uses, so no chunk's envelope sent ahead is ever dropped by another's
    # message, and the process keeps the sessions the setting says, whatever its threads
    with ScriptedSMTPServer() as server:
        ids = _campaign_over_sessions(server, configure_env, sessions, 40)
        chunks = [ids[:20], ids[20:]]
        threads = [threading.Thread(target=deliver_chunk, args=(chunk,)) for chunk in chunks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert set(states().values()) == {"sent"}
        assert sorted(server.copies().values()) == [1] * 40
        assert server.connections == sessions


def test_the_sessions_setting_bounds_the_connections_whatever_the_chunk(
    sqlite_db, configure_env
) -> None:
    with ScriptedSMTPServer() as server:
        ids = _campaign_over_sessions(server, configure_env, 4, 13)
        for chunk in (ids[:8], ids[8:11], ids[11:]):
            deliver_chunk(chunk)
        assert sorted(server.copies().values()) == [1] * 13
        assert server.connections == 4


def _attempts_failing_at(
    monkeypatch: Any, recipient: str, *, bug_after=0.0, others_take=0.0
) -> None:
    """delivery._attempt raises for `recipient`'s group (a bug) after `bug_after` seconds;
    every other attempt sends, then takes `others_take` seconds more."""
    attempt = delivery._attempt

    def failing(group, *args):
        if group[0].delivery.recipient == recipient:
            time.sleep(bug_after)
            raise RuntimeError("a bug")
        verdicts = attempt(group, *args)
        time.sleep(others_take)
        return verdicts

    monkeypatch.setattr(delivery, "_attempt", failing)


@pytest.mark.parametrize(
    "case",
    [
        # lanes of two and one session: the other lanes were sending when r4's failed
        (3, 9, "r4@example.com", None),
        # two lanes of two: r0 and r2 go out in step on one lane while r1's lane fails; r2 was
        # sent, though not handed on yet
        (4, 8, "r1@example.com", "r2@example.com"),
    ],
)
def test_what_other_sessions_sent_is_recorded_when_one_fails(
    sqlite_db, configure_env, monkeypatch, case: tuple[int, int, str, str | None]
) -> None:
    sessions, count, bug_at, kept = case
    # a lane failing (a bug) ends the chunk; the messages the other lanes were sending, or had
    # sent and not yet handed on, went out, and get their outcomes recorded rather than being
    # sent again later
    with ScriptedSMTPServer() as server:
        ids = _campaign_over_sessions(server, configure_env, sessions, count)
        _attempts_failing_at(monkeypatch, bug_at, bug_after=0.2, others_take=0.3)
        with pytest.raises(RuntimeError, match="a bug"):
            deliver_chunk(ids)
        sent = {address for address, state in states().items() if state == "sent"}
        assert set(server.copies()) == sent
        assert bug_at not in sent
        if kept is not None:
            assert kept in sent


def test_a_lane_writes_to_each_of_its_sessions_before_reading_their_replies(
    sqlite_db, configure_env, monkeypatch
) -> None:
    with ScriptedSMTPServer() as server:
        ids = _campaign_over_sessions(server, configure_env, 2, 6)
        attempt = delivery._attempt
        events: list[tuple[str, str]] = []

        def watched(group, *args):
            events.append(("send", group[0].delivery.recipient))
            verdicts = attempt(group, *args)
            events.append(("replied", group[0].delivery.recipient))
            return verdicts

        monkeypatch.setattr(delivery, "_attempt", watched)
        deliver_chunk(ids)
        assert set(states().values()) == {"sent"}
        assert sorted(server.copies().values()) == [1] * 6
        # r1 goes out over the second session while r0's reply is awaited: one wait for both
        r = [f"r{i}@example.com" for i in range(6)]
        assert events[:4] == [("send", r[0]), ("send", r[1]), ("replied", r[1]), ("replied", r[0])]
        assert events[4:] == [
            ("send", r[2]),
            ("send", r[3]),
            ("replied", r[3]),
            ("replied", r[2]),
            ("send", r[4]),
            ("send", r[5]),
            ("replied", r[5]),
            ("replied", r[4]),
        ]
        assert server.connections == 2  # every envelope sent ahead was kept


def test_a_failure_in_step_keeps_what_the_other_session_sent(
    sqlite_db, configure_env, monkeypatch
) -> None:
    with ScriptedSMTPServer() as server:
        ids = _campaign_over_sessions(server, configure_env, 2, 4)
        _attempts_failing_at(monkeypatch, "r1@example.com")  # while r0's reply is awaited
        with pytest.raises(RuntimeError, match="a bug"):
            deliver_chunk(ids)
        assert states()["r0@example.com"] == "sent"  # recorded, so never sent again
        assert set(server.copies()) == {"r0@example.com"}
        assert {states()[f"r{i}@example.com"] for i in (1, 2, 3)} == {"sending"}


def test_recording_failing_keeps_what_the_step_already_sent(
    sqlite_db, configure_env, monkeypatch
) -> None:
    # r0 and r1 go out in step; recording r0 fails: r1, sent but not handed on, is still kept
    with ScriptedSMTPServer() as server:
        ids = _campaign_over_sessions(server, configure_env, 2, 4)
        add = delivery._Recorder.add
        calls: list[int] = []

        def failing_add(self, verdicts):
            add(self, verdicts)
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("recording failed")

        monkeypatch.setattr(delivery._Recorder, "add", failing_add)
        with pytest.raises(RuntimeError, match="recording failed"):
            deliver_chunk(ids)
        sent = {address for address, state in states().items() if state == "sent"}
        assert set(server.copies()) == sent == {"r0@example.com", "r1@example.com"}
