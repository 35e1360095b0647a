"""PIPELINING (RFC 2920): replies matched to recipients as in lockstep, 421 mid-batch, and
servers that advertise PIPELINING but mishandle it (the session falls back to lockstep)."""

from __future__ import annotations

import dataclasses
import smtplib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mailer.replies import Phase, ReplyClass, classify
from mailer.testing.smtpserver import ScriptedSMTPServer
from mailer.transport.base import Outgoing, TransactionResult
from mailer.transport.relay import RelayConfig, parse_relay_url
from mailer.transport.smtp import SMTPSession

SENDER = "sender@example.com"
A, B, C, D, E = (f"{name}@example.org" for name in ("ann", "bob", "cat", "dan", "eve"))
MSG = b"Subject: hello\r\n\r\nHello there.\r\n"


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write the client makes, as it makes it: a pipelined envelope is one write."""
    seen: list[bytes] = []
    send = smtplib.SMTP.send

    def recording(self: smtplib.SMTP, s: str | bytes) -> None:
        seen.append(s if isinstance(s, bytes) else s.encode())
        send(self, s)

    monkeypatch.setattr(smtplib.SMTP, "send", recording)
    return seen


@pytest.fixture
def sessions() -> Iterator[list[SMTPSession]]:
    made: list[SMTPSession] = []
    yield made
    for session in made:
        session.close()


@pytest.fixture
def session_to(sessions: list[SMTPSession]) -> Any:
    def make(srv: ScriptedSMTPServer, **changes: Any) -> SMTPSession:
        config: RelayConfig = parse_relay_url(srv.url())
        fields: dict[str, Any] = {"command_timeout": 5, "connect_timeout": 5, **changes}
        config = dataclasses.replace(config, **fields)
        sessions.append(SMTPSession(config))
        return sessions[-1]

    return make


def outgoing(*recipients: str) -> Outgoing:
    return Outgoing(SENDER, recipients, MSG)


def summary(result: TransactionResult) -> list[tuple[str, int | None, Phase]]:
    return [(r.recipient, r.reply.code, r.phase) for r in result.results]


def pipelined(writes: list[bytes]) -> list[bytes]:
    return [w for w in writes if w.startswith(b"MAIL FROM:") and w.endswith(b"DATA\r\n")]


def script_refusals(srv: ScriptedSMTPServer) -> None:
    srv.reply("RCPT", "550 5.1.1 No such user", recipient=B)
    srv.reply("RCPT", "451 4.3.0 Try again later", recipient=D)
    srv.reply("RCPT", "452 4.5.3 Too many recipients", recipient=E)


def test_replies_match_recipients_exactly_as_in_lockstep(
    session_to: Any, writes: list[bytes]
) -> None:
    results = {}
    for offered in (True, False):
        with ScriptedSMTPServer(pipelining=offered) as srv:
            script_refusals(srv)
            writes.clear()
            result = session_to(srv).send(outgoing(A, B, C, D, E))
            results[offered] = (summary(result), [r.reply for r in result.results])
            assert len(pipelined(writes)) == (1 if offered else 0)
            [message] = srv.messages
            assert message.rcpt_tos == [A, C]
    assert results[True] == results[False]
    assert results[True][0] == [
        (A, 250, Phase.DOT),
        (B, 550, Phase.RCPT),
        (C, 250, Phase.DOT),
        (D, 451, Phase.RCPT),
        (E, 452, Phase.RCPT),
    ]


def test_pipelining_can_be_switched_off(session_to: Any, writes: list[bytes]) -> None:
    with ScriptedSMTPServer() as srv:
        result = session_to(srv, pipelining=False).send(outgoing(A, B))
        assert summary(result) == [(A, 250, Phase.DOT), (B, 250, Phase.DOT)]
        assert pipelined(writes) == []


def test_refused_sender_keeps_the_pipelined_session_in_step(
    session_to: Any, writes: list[bytes]
) -> None:
    with ScriptedSMTPServer() as srv:
        srv.reply("MAIL", "550 5.7.1 Sender rejected", times=1)
        session = session_to(srv)
        result = session.send(outgoing(A, B))
        assert summary(result) == [(A, 550, Phase.MAIL), (B, 550, Phase.MAIL)]
        assert summary(session.send(outgoing(C))) == [(C, 250, Phase.DOT)]
        assert srv.connections == 1
        assert len(pipelined(writes)) == 2
        assert srv.copies() == {C: 1}


def test_every_recipient_refused_in_a_pipelined_batch(session_to: Any) -> None:
    with ScriptedSMTPServer() as srv:
        srv.reply("RCPT", "550 5.1.1 No such user", times=2)
        session = session_to(srv)
        result = session.send(outgoing(A, B))
        assert summary(result) == [(A, 550, Phase.RCPT), (B, 550, Phase.RCPT)]
        assert summary(session.send(outgoing(C))) == [(C, 250, Phase.DOT)]
        assert srv.connections == 1


def test_421_mid_pipeline_defers_the_undecided_and_reconnects(
    session_to: Any, writes: list[bytes]
) -> None:
    with ScriptedSMTPServer() as srv:
        srv.reply("RCPT", "550 5.1.1 No such user", recipient=B, times=1)
        srv.reply("RCPT", "421 4.3.2 Service shutting down", recipient=C, times=1)
        session = session_to(srv)
        result = session.send(outgoing(A, B, C, D))
        assert summary(result) == [
            (A, 421, Phase.RCPT),
            (B, 550, Phase.RCPT),
            (C, 421, Phase.RCPT),
            (D, 421, Phase.RCPT),
        ]
        assert classify(result.results[0].reply, Phase.RCPT) is ReplyClass.CONNECTION
        assert srv.messages == []
        assert srv.connections == 1  # a 421 is not retried at once

        assert summary(session.send(outgoing(A, C, D))) == [
            (A, 250, Phase.DOT),
            (C, 250, Phase.DOT),
            (D, 250, Phase.DOT),
        ]
        assert srv.connections == 2
        assert len(pipelined(writes)) == 2  # a 421 is not a reason to give up pipelining
        assert srv.copies() == {A: 1, C: 1, D: 1}


def test_421_at_pipelined_data(session_to: Any) -> None:
    with ScriptedSMTPServer() as srv:
        srv.reply("RCPT", "550 5.1.1 No such user", recipient=B, times=1)
        srv.reply("DATA", "421 4.3.2 Service shutting down", times=1)
        session = session_to(srv)
        result = session.send(outgoing(A, B))
        assert summary(result) == [(A, 421, Phase.DATA), (B, 550, Phase.RCPT)]
        assert summary(session.send(outgoing(A))) == [(A, 250, Phase.DOT)]
        assert (srv.connections, srv.copies()) == (2, {A: 1})


@pytest.mark.parametrize("fault", ["close", "first_only"])
def test_misbehaving_pipelining_falls_back_to_lockstep(
    session_to: Any, writes: list[bytes], fault: Any
) -> None:
    with ScriptedSMTPServer(pipelining_fault=fault) as srv:
        srv.reply("RCPT", "550 5.1.1 No such user", recipient=B)
        # "first_only" leaves the client waiting for replies that never come
        session = session_to(srv, command_timeout=0.3)
        result = session.send(outgoing(A, B, C))
        assert summary(result) == [(A, 250, Phase.DOT), (B, 550, Phase.RCPT), (C, 250, Phase.DOT)]
        assert srv.copies() == {A: 1, C: 1}
        assert srv.connections == 2
        assert len(pipelined(writes)) == 1

        assert summary(session.send(outgoing(D))) == [(D, 250, Phase.DOT)]
        assert len(pipelined(writes)) == 1  # lockstep from now on, on the same connection
        assert srv.connections == 2
        assert srv.copies() == {A: 1, C: 1, D: 1}


def test_stale_reused_session_then_broken_pipelining(session_to: Any) -> None:
    with ScriptedSMTPServer() as srv:
        session = session_to(srv)
        session.send(outgoing(A))
    with ScriptedSMTPServer(port=srv.port, pipelining_fault="close") as broken:
        # the reused connection is gone (server restarted) and the new server closes on
        # pipelined input: reconnect, then fall back to lockstep, still delivering once
        result = session.send(outgoing(B))
        assert summary(result) == [(B, 250, Phase.DOT)]
        assert broken.copies() == {B: 1}
        assert broken.connections == 2


def test_drop_inside_a_pipelined_envelope_is_retried_in_lockstep(session_to: Any) -> None:
    with ScriptedSMTPServer() as srv:
        srv.drop("rcpt", recipient=B)
        result = session_to(srv).send(outgoing(A, B))
        assert summary(result) == [(A, 250, Phase.DOT), (B, 250, Phase.DOT)]
        assert srv.copies() == {A: 1, B: 1}


def test_relay_gone_after_the_fallback(session_to: Any) -> None:
    with ScriptedSMTPServer() as srv:
        srv.drop("mail")
        session = session_to(srv)
        assert summary(session.send(outgoing(A))) == [(A, 250, Phase.DOT)]  # in lockstep
        srv.stop()
        result = session.send(outgoing(B))  # stale, then refused: no exception, no retry loop
        assert summary(result) == [(B, None, Phase.CONNECT)]
        assert classify(result.results[0].reply, Phase.CONNECT) is ReplyClass.CONNECTION


# --- across transactions: the next envelope behind this message's "." -----------------------


def send_in_turn(
    session: SMTPSession, *outs: Outgoing
) -> list[list[tuple[str, int | None, Phase]]]:
    """Send each transaction with the next one announced, as the worker does."""
    following: list[Outgoing | None] = [*outs[1:], None]
    pairs = zip(outs, following, strict=True)
    return [summary(session.send_overlapped(out, then, None)) for out, then in pairs]


def test_the_next_envelope_goes_out_behind_the_message(
    session_to: Any, writes: list[bytes]
) -> None:
    with ScriptedSMTPServer() as srv:
        results = send_in_turn(session_to(srv), outgoing(A), outgoing(B), outgoing(C))
        assert results == [[(A, 250, Phase.DOT)], [(B, 250, Phase.DOT)], [(C, 250, Phase.DOT)]]
        assert srv.copies() == {A: 1, B: 1, C: 1}
        assert srv.connections == 1
    # one envelope on its own; then each message with the next envelope right behind it
    assert len(pipelined(writes)) == 1
    bodies = [w for w in writes if MSG in w]
    assert len(bodies) == 3
    for body, then in zip(bodies, (B, C), strict=False):
        assert body.endswith(f"RCPT TO:<{then}>\r\nDATA\r\n".encode())
        assert b".\r\nMAIL FROM:<sender@example.com>" in body
    assert bodies[2].endswith(b"\r\n.\r\n")


def test_refusals_in_an_announced_transaction_keep_the_session_in_step(
    session_to: Any,
) -> None:
    with ScriptedSMTPServer() as srv:
        srv.reply("RCPT", "550 5.1.1 No such user", recipient=B)
        results = send_in_turn(session_to(srv), outgoing(A), outgoing(B, C), outgoing(D))
        assert results == [
            [(A, 250, Phase.DOT)],
            [(B, 550, Phase.RCPT), (C, 250, Phase.DOT)],
            [(D, 250, Phase.DOT)],
        ]
        assert srv.copies() == {A: 1, C: 1, D: 1}
        assert srv.connections == 1


def test_every_recipient_refused_in_an_announced_transaction(session_to: Any) -> None:
    with ScriptedSMTPServer() as srv:
        srv.reply("RCPT", "550 5.1.1 No such user", recipient=B)
        results = send_in_turn(session_to(srv), outgoing(A), outgoing(B), outgoing(C))
        assert results == [[(A, 250, Phase.DOT)], [(B, 550, Phase.RCPT)], [(C, 250, Phase.DOT)]]
        assert srv.copies() == {A: 1, C: 1}
        assert srv.connections == 1


def test_421_after_the_dot_loses_the_announced_envelope_not_its_message(
    session_to: Any,
) -> None:
    with ScriptedSMTPServer() as srv:
        srv.reply("DOT", "421 4.3.2 Service shutting down", recipient=A, times=1)
        results = send_in_turn(session_to(srv), outgoing(A), outgoing(B), outgoing(C))
        # A was refused at its "."; B's envelope went with the connection: sent anew
        assert results == [[(A, 421, Phase.DOT)], [(B, 250, Phase.DOT)], [(C, 250, Phase.DOT)]]
        assert srv.copies() == {B: 1, C: 1}
        assert srv.connections == 2


def test_a_421_to_the_announced_mail_is_retried_on_a_new_connection(session_to: Any) -> None:
    with ScriptedSMTPServer() as srv:
        srv.reply("MAIL", "250 2.1.0 Ok", times=1)  # A's
        srv.reply("MAIL", "421 4.4.2 Closing the connection", times=1)  # B's, sent behind A
        results = send_in_turn(session_to(srv), outgoing(A), outgoing(B), outgoing(C))
        # nothing of B's had been accepted: it goes again at once, on a new connection
        assert results == [[(A, 250, Phase.DOT)], [(B, 250, Phase.DOT)], [(C, 250, Phase.DOT)]]
        assert srv.copies() == {A: 1, B: 1, C: 1}
        assert srv.connections == 2


def test_a_transaction_announced_but_not_sent_is_never_delivered(
    session_to: Any,
) -> None:
    with ScriptedSMTPServer() as srv:
        session = session_to(srv)
        first = session.send_overlapped(outgoing(A), outgoing(B), None)
        assert summary(first) == [(A, 250, Phase.DOT)]
        # the caller changed its mind: the server holds B's envelope (DATA answered 354), so
        # the session drops the connection rather than let C's bytes become B's message
        assert summary(session.send(outgoing(C))) == [(C, 250, Phase.DOT)]
        assert srv.connections == 2
        e = outgoing(E)
        session.send_overlapped(outgoing(D), e, None)
        # a NOOP now would be read as E's message: the session reconnects for it, and E then
        # goes out whole
        assert session.noop().code == 250
        assert summary(session.send(e)) == [(E, 250, Phase.DOT)]
        session.send_overlapped(outgoing(A), outgoing(B), None)
        session.close()  # QUIT would be read as B's message too: the connection is dropped
        assert srv.quits == 0
    assert srv.copies() == {A: 2, C: 1, D: 1, E: 1}
    assert all(m.data == MSG for m in srv.messages)
    assert srv.connections == 3  # C and D on the second; the NOOP, E and A on the third


def test_a_server_that_drops_what_follows_the_dot_stops_envelopes_going_ahead(
    session_to: Any,
) -> None:
    with ScriptedSMTPServer(pipelining_fault="after_body") as srv:
        session = session_to(srv, command_timeout=0.3)
        outs = [outgoing(A), outgoing(B), outgoing(C), outgoing(D)]
        assert send_in_turn(session, *outs) == [[(o.recipients[0], 250, Phase.DOT)] for o in outs]
        assert srv.copies() == {A: 1, B: 1, C: 1, D: 1}
        # B's envelope went unanswered once (one wait, one new connection); from then on each
        # envelope waits for the message before it, and pipelining within one stays
        assert srv.connections == 2


def test_an_envelope_announced_before_an_idle_spell_is_not_trusted(
    session_to: Any,
) -> None:
    with ScriptedSMTPServer(idle_timeout=0.3, idle_reply="421 4.4.2 Timeout exceeded") as srv:
        session = session_to(srv, idle_noop_after=0.1)
        b = outgoing(B)
        assert summary(session.send_overlapped(outgoing(A), b, None)) == [(A, 250, Phase.DOT)]
        time.sleep(0.6)  # the server timed B's transaction out meanwhile
        assert summary(session.send(b)) == [(B, 250, Phase.DOT)]
        assert srv.copies() == {A: 1, B: 1}
        assert srv.connections == 2


def test_work_given_for_the_wait_runs_once_the_message_is_out(session_to: Any) -> None:
    with ScriptedSMTPServer() as srv:
        srv.reply("RCPT", "550 5.1.1 No such user", recipient=B)
        session = session_to(srv)
        ran: list[str] = []
        assert summary(session.send_overlapped(outgoing(A), None, lambda: ran.append("A"))) == [
            (A, 250, Phase.DOT)
        ]
        # no message went out (every recipient refused): nothing to wait for, nothing run
        session.send_overlapped(outgoing(B), None, lambda: ran.append("B"))
        assert ran == ["A"]

        def fails() -> None:
            raise RuntimeError("a bug in the work")

        # the work failing loses nothing: the message's reply is still read and reported
        assert summary(session.send_overlapped(outgoing(C), None, fails)) == [(C, 250, Phase.DOT)]
        assert summary(session.send(outgoing(D))) == [(D, 250, Phase.DOT)]
        assert srv.copies() == {A: 1, C: 1, D: 1}
        assert srv.connections == 1
