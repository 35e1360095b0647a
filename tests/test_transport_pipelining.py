"""PIPELINING (RFC 2920): replies matched to recipients as in lockstep, 421 mid-batch, and
servers that advertise PIPELINING but mishandle it (the session falls back to lockstep)."""

from __future__ import annotations

import dataclasses
import smtplib
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
