"""SMTPSession against the scripted server: TLS, AUTH, partial refusals, persistence, drops,
SMTPUTF8 and SIZE, VRFY, secrets kept out of logs, and check()."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailer.errors import RelayError
from mailer.relay_check import check
from mailer.replies import Phase, ReplyClass, classify
from mailer.testing.smtpserver import ScriptedSMTPServer
from mailer.transport.base import Outgoing, TransactionResult
from mailer.transport.bounded import BoundedSocket
from mailer.transport.relay import RelayConfig, parse_relay_url
from mailer.transport.smtp import SMTPSession, close_all, new_session

SENDER = "sender@example.com"
A, B, C = "alice@example.org", "bob@example.org", "carol@example.org"
MSG = b"Subject: hello\r\n\r\nHello there.\r\n"
USER, PASSWORD = "mailer", "s3cret-p@ss:w/rd"


# --- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(autouse=True)
def _close_sessions(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every SMTPSession a test makes is closed at its end (no sockets left to the GC)."""
    made: list[SMTPSession] = []
    init = SMTPSession.__init__

    def tracked(self: SMTPSession, config: RelayConfig) -> None:
        init(self, config)
        made.append(self)

    monkeypatch.setattr(SMTPSession, "__init__", tracked)
    yield
    for session in made:
        session.close()


@pytest.fixture
def server() -> Iterator[ScriptedSMTPServer]:
    with ScriptedSMTPServer(pipelining=False) as srv:
        yield srv


@pytest.fixture
def starttls_server(server_ctx: ssl.SSLContext) -> Iterator[ScriptedSMTPServer]:
    with ScriptedSMTPServer(
        tls="starttls", ssl_context=server_ctx, require_starttls=True, auth={USER: PASSWORD}
    ) as srv:
        yield srv


def relay(srv: ScriptedSMTPServer, *, query: str = "", **changes: Any) -> RelayConfig:
    """The server's relay config, with short timeouts; `changes` replace fields."""
    url = srv.url(user=changes.pop("user", None), password=changes.pop("password", None))
    url = url.replace("?tls=", f"?{query}&tls=") if query else url
    config = dataclasses.replace(parse_relay_url(url), command_timeout=5, connect_timeout=5)
    return dataclasses.replace(config, **changes)


def outgoing(*recipients: str, data: bytes = MSG, smtputf8: bool = False) -> Outgoing:
    return Outgoing(SENDER, recipients, data, smtputf8)


def summary(result: TransactionResult) -> list[tuple[str, int | None, Phase]]:
    return [(r.recipient, r.reply.code, r.phase) for r in result.results]


def classes(result: TransactionResult) -> set[ReplyClass]:
    return {classify(r.reply, r.phase) for r in result.results}


# --- 2. plain, STARTTLS and implicit TLS -------------------------------------------------


def test_plain_relay_delivers(server: ScriptedSMTPServer) -> None:
    session = SMTPSession(relay(server))
    result = session.send(outgoing(A, B))
    assert summary(result) == [(A, 250, Phase.DOT), (B, 250, Phase.DOT)]
    assert result.tls is False
    assert result.relay == f"127.0.0.1:{server.port}"
    [message] = server.messages
    assert (message.mail_from, message.rcpt_tos, message.data) == (SENDER, [A, B], MSG)


def test_starttls_relay_delivers_with_auth(
    starttls_server: ScriptedSMTPServer, ca_file: str
) -> None:
    session = SMTPSession(relay(starttls_server, user=USER, password=PASSWORD, ca_file=ca_file))
    result = session.send(outgoing(A))
    assert summary(result) == [(A, 250, Phase.DOT)]
    assert result.tls is True
    assert starttls_server.commands[:4] == ["EHLO", "STARTTLS", "EHLO", "AUTH"]
    assert (starttls_server.auth_attempts, starttls_server.auth_successes) == (1, 1)
    assert len(starttls_server.messages) == 1


def test_implicit_tls_relay_delivers(server_ctx: ssl.SSLContext, ca_file: str) -> None:
    with ScriptedSMTPServer(tls="implicit", ssl_context=server_ctx, auth={USER: PASSWORD}) as srv:
        config = relay(srv, user=USER, password=PASSWORD, ca_file=ca_file)
        assert config.tls == "implicit"
        result = SMTPSession(config).send(outgoing(A, B))
        assert summary(result) == [(A, 250, Phase.DOT), (B, 250, Phase.DOT)]
        assert result.tls is True
        assert srv.auth_successes == 1
        assert srv.messages[0].rcpt_tos == [A, B]


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_untrusted_certificate_is_refused(server_ctx: ssl.SSLContext, tls: Any) -> None:
    with ScriptedSMTPServer(tls=tls, ssl_context=server_ctx, auth={USER: PASSWORD}) as srv:
        result = SMTPSession(relay(srv, user=USER, password=PASSWORD)).send(outgoing(A, B))
        assert {(r.reply.code, r.phase) for r in result.results} == {(None, Phase.TLS)}
        assert "certificate is not trusted" in result.results[0].reply.text
        assert "ca_file" in result.results[0].reply.text
        assert classes(result) == {ReplyClass.CONFIGURATION}
        assert srv.messages == []
        assert srv.auth_attempts == 0
        assert "MAIL" not in srv.commands


def test_unreadable_ca_file_is_a_tls_configuration_error(
    starttls_server: ScriptedSMTPServer, tmp_path: Path
) -> None:
    config = relay(starttls_server, ca_file=str(tmp_path / "missing.pem"))
    result = SMTPSession(config).send(outgoing(A))
    assert summary(result) == [(A, None, Phase.TLS)]
    assert "cannot load ca_file" in result.results[0].reply.text


def test_required_starttls_not_offered_sends_nothing() -> None:
    with ScriptedSMTPServer(auth={USER: PASSWORD}) as srv:  # plain text, AUTH offered
        config = relay(srv, user=USER, password=PASSWORD, tls="starttls")
        result = SMTPSession(config).send(outgoing(A))
        assert summary(result) == [(A, None, Phase.TLS)]
        assert "does not offer STARTTLS" in result.results[0].reply.text
        assert classes(result) == {ReplyClass.CONFIGURATION}
        assert srv.commands == ["EHLO"]
        assert (srv.auth_attempts, srv.messages) == (0, [])


def test_credentials_without_tls_are_refused_unless_tls_none() -> None:
    with ScriptedSMTPServer(auth={USER: PASSWORD}) as srv:
        refused = SMTPSession(relay(srv, user=USER, password=PASSWORD, tls="opportunistic"))
        result = refused.send(outgoing(A))
        assert summary(result) == [(A, None, Phase.AUTH)]
        assert "without TLS" in result.results[0].reply.text
        assert "AUTH" not in srv.commands
        assert srv.messages == []

        allowed = SMTPSession(relay(srv, user=USER, password=PASSWORD, tls="none"))
        assert summary(allowed.send(outgoing(A))) == [(A, 250, Phase.DOT)]
        assert srv.auth_successes == 1


# --- 3. AUTH -----------------------------------------------------------------------------


def test_bad_credentials_refuse_every_recipient_at_auth(
    starttls_server: ScriptedSMTPServer, ca_file: str
) -> None:
    config = relay(starttls_server, user=USER, password="wrong", ca_file=ca_file)
    result = SMTPSession(config).send(outgoing(A, B))
    assert summary(result) == [(A, 535, Phase.AUTH), (B, 535, Phase.AUTH)]
    assert classes(result) == {ReplyClass.CONFIGURATION}
    assert starttls_server.auth_attempts == 1  # one mechanism: a wrong password fails once
    assert starttls_server.messages == []


def test_server_without_auth(server_ctx: ssl.SSLContext, ca_file: str) -> None:
    with ScriptedSMTPServer(tls="starttls", ssl_context=server_ctx) as srv:
        config = relay(srv, user=USER, password=PASSWORD, ca_file=ca_file)
        result = SMTPSession(config).send(outgoing(A))
        assert summary(result) == [(A, None, Phase.AUTH)]
        assert "offers no AUTH" in result.results[0].reply.text
        assert classes(result) == {ReplyClass.CONFIGURATION}
        assert srv.messages == []


def test_open_raises_relay_error_naming_the_step(
    starttls_server: ScriptedSMTPServer, ca_file: str
) -> None:
    config = relay(starttls_server, user=USER, password="wrong", ca_file=ca_file)
    with pytest.raises(RelayError) as refused:
        SMTPSession(config).open()
    assert (refused.value.step, refused.value.code) == ("auth", 535)
    assert "wrong" not in str(refused.value)
    steps: list[str] = []
    good = SMTPSession(dataclasses.replace(config, password=PASSWORD))
    good.open(lambda step, detail: steps.append(step))
    assert steps == ["connect", "ehlo", "starttls", "ehlo", "auth"]
    good.close()


# --- 4. one recipient refused ------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
def test_one_recipient_refused_at_rcpt(pipelining: bool) -> None:
    with ScriptedSMTPServer(pipelining=pipelining) as srv:
        srv.reply("RCPT", "550 5.1.1 No such user", recipient=B)
        result = SMTPSession(relay(srv)).send(outgoing(A, B, C))
        assert summary(result) == [(A, 250, Phase.DOT), (B, 550, Phase.RCPT), (C, 250, Phase.DOT)]
        assert result.results[1].reply.enhanced == "5.1.1"
        assert classify(result.results[1].reply, Phase.RCPT) is ReplyClass.HARD_BOUNCE
        [message] = srv.messages
        assert message.rcpt_tos == [A, C]


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_reply_of_several_lines_is_read_whole_and_in_step(pipelining: bool) -> None:
    with ScriptedSMTPServer(pipelining=pipelining) as srv:
        srv.reply(
            "RCPT",
            "550-5.7.1 This message looks like spam.\r\n550 5.7.1 See https://example.com/x",
            recipient=B,
        )
        session = SMTPSession(relay(srv))
        result = session.send(outgoing(A, B, C))
        assert summary(result) == [(A, 250, Phase.DOT), (B, 550, Phase.RCPT), (C, 250, Phase.DOT)]
        assert result.results[1].reply.text == (
            "5.7.1 This message looks like spam.\n5.7.1 See https://example.com/x"
        )
        assert summary(session.send(outgoing(B))) == [(B, 550, Phase.RCPT)]
        assert summary(session.send(outgoing(C))) == [(C, 250, Phase.DOT)]
        assert srv.connections == 1


@pytest.mark.parametrize("pipelining", [True, False])
def test_every_recipient_refused_then_rset_and_reuse(pipelining: bool) -> None:
    with ScriptedSMTPServer(pipelining=pipelining) as srv:
        srv.reply("RCPT", "550 5.1.1 No such user", times=2)
        session = SMTPSession(relay(srv))
        assert summary(session.send(outgoing(A, B))) == [(A, 550, Phase.RCPT), (B, 550, Phase.RCPT)]
        assert srv.commands[-1] == "RSET"
        assert summary(session.send(outgoing(C))) == [(C, 250, Phase.DOT)]
        assert srv.connections == 1
        assert srv.copies() == {C: 1}


def test_any_positive_rcpt_reply_is_accepted(server: ScriptedSMTPServer) -> None:
    server.reply("RCPT", "251 2.1.5 User not local; will forward", recipient=A)
    server.reply("RCPT", "252 2.1.5 Cannot verify, will attempt delivery", recipient=B)
    result = SMTPSession(relay(server)).send(outgoing(A, B))
    assert summary(result) == [(A, 250, Phase.DOT), (B, 250, Phase.DOT)]
    assert server.messages[0].rcpt_tos == [A, B]


def test_refused_data_is_reset_and_the_session_reused(server: ScriptedSMTPServer) -> None:
    server.reply("DATA", "554 5.7.1 Not today", times=1)
    session = SMTPSession(relay(server))
    result = session.send(outgoing(A, B))
    assert summary(result) == [(A, 554, Phase.DATA), (B, 554, Phase.DATA)]
    assert server.commands[-1] == "RSET"
    assert summary(session.send(outgoing(A))) == [(A, 250, Phase.DOT)]
    assert server.connections == 1


def test_refused_message_at_dot(server: ScriptedSMTPServer) -> None:
    server.reply("DOT", "552 5.3.4 Message too big for system", times=1)
    result = SMTPSession(relay(server)).send(outgoing(A, B))
    assert summary(result) == [(A, 552, Phase.DOT), (B, 552, Phase.DOT)]
    assert classes(result) == {ReplyClass.MESSAGE_FAILURE}
    assert server.messages == []


# --- 5. persistence ----------------------------------------------------------------------


def test_thousand_sends_use_ten_connections() -> None:
    with ScriptedSMTPServer() as srv:
        session = SMTPSession(relay(srv, max_messages=100))
        for i in range(1000):
            result = session.send(outgoing(f"user{i}@example.org"))
            assert result.results[0].reply.code == 250
        assert (srv.connections, srv.quits) == (10, 10)
        assert len(srv.messages) == 1000
        assert set(srv.copies().values()) == {1}


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("idle_reply", [None, "421 4.4.2 scripted-smtp Error: timeout exceeded"])
@pytest.mark.parametrize("noop_after", [0.05, 60.0])
def test_server_closing_an_idle_session(
    pipelining: bool, idle_reply: str | None, noop_after: float
) -> None:
    with ScriptedSMTPServer(idle_timeout=0.15, idle_reply=idle_reply, pipelining=pipelining) as srv:
        session = SMTPSession(relay(srv, idle_noop_after=noop_after))
        assert summary(session.send(outgoing(A))) == [(A, 250, Phase.DOT)]
        time.sleep(0.3)
        assert summary(session.send(outgoing(B))) == [(B, 250, Phase.DOT)]
        assert summary(session.send(outgoing(C))) == [(C, 250, Phase.DOT)]
        assert srv.copies() == {A: 1, B: 1, C: 1}
        assert srv.connections == 2


def test_noop_before_reuse_only_after_idle(server: ScriptedSMTPServer) -> None:
    session = SMTPSession(relay(server, idle_noop_after=0.05))
    session.send(outgoing(A))
    session.send(outgoing(A))
    assert "NOOP" not in server.commands
    time.sleep(0.1)
    session.send(outgoing(A))
    assert server.commands.count("NOOP") == 1
    assert server.connections == 1


def test_stale_reused_session_is_retried_once_at_mail(server: ScriptedSMTPServer) -> None:
    session = SMTPSession(relay(server))
    session.send(outgoing(A))
    server.drop("mail")
    result = session.send(outgoing(B))
    assert summary(result) == [(B, 250, Phase.DOT)]
    assert server.connections == 2
    assert server.copies() == {A: 1, B: 1}


def test_fresh_session_refused_with_421_at_mail_is_not_retried(
    server: ScriptedSMTPServer,
) -> None:
    server.reply("MAIL", "421 4.3.2 System shutting down", times=1)
    session = SMTPSession(relay(server))
    result = session.send(outgoing(A, B))
    assert summary(result) == [(A, 421, Phase.MAIL), (B, 421, Phase.MAIL)]
    assert classes(result) == {ReplyClass.CONNECTION}
    assert server.connections == 1
    assert summary(session.send(outgoing(A))) == [(A, 250, Phase.DOT)]
    assert server.connections == 2


def test_close_all_quits_every_kept_session(server: ScriptedSMTPServer) -> None:
    config = relay(server)
    mine, theirs = new_session(config), new_session(config)
    assert mine is not theirs
    mine.send(outgoing(A))
    theirs.send(outgoing(B))
    close_all()
    assert server.quits == 2
    mine.send(outgoing(C))  # reopens after close_all, and a later close_all still quits it
    close_all()
    assert (server.connections, server.quits) == (3, 3)


# --- 6. connection lost ------------------------------------------------------------------


BIG = MSG + (b"x" * 998 + b"\r\n") * 8000  # ~8 MB: still being sent when the server drops


@pytest.mark.parametrize(
    ("drop", "phase"),
    [("mail", Phase.MAIL), ("rcpt", Phase.RCPT), ("data", Phase.DATA), ("body", Phase.BODY)],
)
def test_drop_before_the_dot_loses_nothing(
    server: ScriptedSMTPServer, drop: Any, phase: Phase
) -> None:
    data = BIG if drop == "body" else MSG
    server.drop(drop)
    session = SMTPSession(relay(server))
    result = session.send(outgoing(A, B, data=data))
    assert summary(result) == [(A, None, phase), (B, None, phase)]
    assert classes(result) == {ReplyClass.CONNECTION}
    assert server.messages == []
    assert summary(session.send(outgoing(A, B, data=data))) == [
        (A, 250, Phase.DOT),
        (B, 250, Phase.DOT),
    ]
    assert server.copies() == {A: 1, B: 1}


def test_drop_at_rcpt_keeps_earlier_refusals(server: ScriptedSMTPServer) -> None:
    server.reply("RCPT", "550 5.1.1 No such user", recipient=A)
    server.drop("rcpt", recipient=C)
    result = SMTPSession(relay(server)).send(outgoing(A, B, C))
    assert summary(result) == [(A, 550, Phase.RCPT), (B, None, Phase.RCPT), (C, None, Phase.RCPT)]


def test_drop_after_the_dot_is_ambiguous(server: ScriptedSMTPServer) -> None:
    server.reply("RCPT", "550 5.1.1 No such user", recipient=B)
    server.drop("after_dot")
    session = SMTPSession(relay(server))
    result = session.send(outgoing(A, B))
    assert summary(result) == [(A, None, Phase.DOT), (B, 550, Phase.RCPT)]
    assert classify(result.results[0].reply, Phase.DOT) is ReplyClass.AMBIGUOUS
    assert server.copies() == {A: 1}  # stored before the drop
    assert summary(session.send(outgoing(C))) == [(C, 250, Phase.DOT)]


def test_timeout_at_dot_is_ambiguous(server: ScriptedSMTPServer) -> None:
    # data_timeout is in force for the reply to "." (command_timeout would be far longer)
    session = SMTPSession(relay(server, data_timeout=0.2))
    server.reply("DOT", "250 2.0.0 Ok: queued", delay=1.0)
    result = session.send(outgoing(A))
    assert summary(result) == [(A, None, Phase.DOT)]
    assert "timed out" in result.results[0].reply.text


@pytest.mark.parametrize("slow", ["RCPT", "DOT"])
def test_no_reply_is_awaited_past_the_deadline(slow: str, caplog: pytest.LogCaptureFixture) -> None:
    """The caller's deadline shortens every wait of the transaction (its lease runs out
    otherwise), with no retry and no conclusion about the server (a pipelined envelope
    unanswered would otherwise have it dropped to lockstep); the session then works as
    before, with its own timeouts."""
    with ScriptedSMTPServer() as server:  # offering PIPELINING
        session = SMTPSession(relay(server))  # timeouts of a minute and of ten
        reply = "250 2.1.5 Ok" if slow == "RCPT" else "250 2.0.0 Ok: queued"
        server.reply(slow, reply, delay=1.5, times=1)
        began = time.monotonic()
        result = session.send(outgoing(A), deadline=began + 0.3)
        assert time.monotonic() - began < 1.2
        [(address, code, phase)] = summary(result)
        assert (address, code) == (A, None) and "timed out" in result.results[0].reply.text
        assert phase is (Phase.DOT if slow == "DOT" else Phase.RCPT)
        assert "lockstep" not in caplog.text and "retrying" not in caplog.text
        server.reply(slow, reply, delay=0.2, times=1)
        assert summary(session.send(outgoing(B))) == [(B, 250, Phase.DOT)]  # no deadline now


def test_each_reply_of_the_envelope_is_cut_short_by_the_deadline() -> None:
    """A relay that answers every RCPT late (a tarpit): the deadline bounds the transaction,
    not each reply (six replies of 0.25 s took 1.5 s when each got the time left at the
    start)."""
    with ScriptedSMTPServer() as server:
        server.reply("RCPT", "250 2.1.5 Ok", delay=0.25)
        session = SMTPSession(relay(server))
        began = time.monotonic()
        result = session.send(
            outgoing(*(f"r{i}@example.org" for i in range(6))), deadline=began + 0.4
        )
        assert time.monotonic() - began < 0.9
        assert {(code, phase) for _, code, phase in summary(result)} == {(None, Phase.RCPT)}


@pytest.mark.parametrize("reused", [False, True])
def test_a_connection_opened_within_a_send_waits_no_longer_than_its_deadline(
    reused: bool,
) -> None:
    """The first connection, or a new one after the reused one turned out gone: its
    handshake gets the time left too (with its own timeouts, a relay slow to answer EHLO held
    the chunk for up to a minute a step, past its lease)."""
    with ScriptedSMTPServer() as server:
        session = SMTPSession(relay(server))
        if reused:
            assert summary(session.send(outgoing(A)))[0][1] == 250
            server.reply("MAIL", "421 4.3.2 Shutting down", times=1)  # stale: a new connection
        server.reply("EHLO", "250-relay.example.org\r\n250 PIPELINING", delay=1.5, times=1)
        began = time.monotonic()
        result = session.send(outgoing(B), deadline=began + 0.3)
        assert time.monotonic() - began < 1.2
        [(address, code, phase)] = summary(result)
        assert (address, code, phase) == (B, None, Phase.EHLO)
        assert "timed out" in result.results[0].reply.text
        assert summary(session.send(outgoing(C))) == [(C, 250, Phase.DOT)]  # no deadline now


@pytest.mark.parametrize(
    ("command", "response"),
    [
        ("EHLO", "250-relay.example.org\r\n250 PIPELINING"),
        ("RCPT", "250 2.1.5 Ok"),
        ("DOT", "250 2.0.0 Ok"),
    ],
)
def test_a_reply_trickled_a_byte_at_a_time_ends_by_the_deadline(
    command: Any, response: str
) -> None:
    """A tarpit writes the reply's continuation lines a byte every 20 ms: each read returns
    well within the socket's timeout, so only a bound on the whole wait keeps the send within
    its deadline (without one, this send took the trickle's whole 4 s)."""
    with ScriptedSMTPServer() as server:
        server.reply(command, response, trickle=4.0, times=1)
        session = SMTPSession(relay(server))
        began = time.monotonic()
        result = session.send(outgoing(A), deadline=began + 0.5)
        assert time.monotonic() - began < 1.2
        assert summary(result) == [(A, None, Phase[command])]
        assert "timed out" in result.results[0].reply.text
        assert summary(session.send(outgoing(B))) == [(B, 250, Phase.DOT)]  # no deadline now


def test_a_greeting_trickled_a_byte_at_a_time_ends_by_the_deadline() -> None:
    """A tarpit that stutters its banner (as OpenBSD's spamd does): the first connection of a
    send, whose greeting is read while smtplib connects, is bound by the deadline too."""
    stutter = b"220-relay.example.org slowly\r\n" * 7  # 4.3 s at a byte every 20 ms

    def script(conn: socket.socket, stop: threading.Event) -> None:
        for byte in stutter:
            if stop.wait(0.02):
                return
            conn.sendall(bytes([byte]))

    with _RawServer(script) as url:
        config = dataclasses.replace(parse_relay_url(url), command_timeout=5, connect_timeout=5)
        began = time.monotonic()
        result = SMTPSession(config).send(outgoing(A), deadline=began + 0.5)
        assert time.monotonic() - began < 1.2
        assert summary(result) == [(A, None, Phase.CONNECT)]
        assert "timed out" in result.results[0].reply.text


def test_a_tls_handshake_that_stalls_ends_by_the_deadline(ca_file: str) -> None:
    """The STARTTLS handshake reads in C, not through the socket's recv_into: it gets the time
    left as its timeout (it had the time left when STARTTLS was sent: 1.8 s here)."""

    def script(conn: socket.socket, stop: threading.Event) -> None:
        reader = conn.makefile("rb")
        conn.sendall(b"220 relay.example.org\r\n")
        reader.readline()  # EHLO
        conn.sendall(b"250-relay.example.org\r\n250 STARTTLS\r\n")
        reader.readline()  # STARTTLS
        if not stop.wait(0.8):
            conn.sendall(b"220 2.0.0 Ready\r\n")
        stop.wait(5)  # and no handshake

    with _RawServer(script) as url:
        config = dataclasses.replace(
            parse_relay_url(url.replace("tls=none", "tls=starttls")),
            command_timeout=5,
            connect_timeout=5,
            ca_file=ca_file,
        )
        began = time.monotonic()
        result = SMTPSession(config).send(outgoing(A), deadline=began + 1.0)
        assert time.monotonic() - began < 1.4
        assert summary(result) == [(A, None, Phase.TLS)]


def test_past_the_deadline_a_read_waits_for_nothing_more() -> None:
    """Past the deadline a read takes what has come and waits no longer than 1 ms, whatever
    timeout a wait that began just before the deadline left on the socket (one of 30 ms let a
    byte every 20 ms through for the whole grace, a quarter of a second)."""
    ours, theirs = socket.socketpair()
    sock = BoundedSocket(ours.family, ours.type, ours.proto, fileno=ours.detach())
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.02):
            with contextlib.suppress(OSError):
                theirs.sendall(b"x")

    thread = threading.Thread(target=trickle, daemon=True)
    theirs.sendall(b"250")  # what came in time
    time.sleep(0.05)
    thread.start()
    try:
        sock.settimeout(0.03)
        sock.deadline = time.monotonic() - 0.01
        buffer = bytearray(64)
        began = time.monotonic()
        assert buffer[: sock.recv_into(buffer)].startswith(b"250")
        with pytest.raises(TimeoutError):
            while True:
                sock.recv_into(buffer)
        assert time.monotonic() - began < 0.15  # not the grace
    finally:
        stop.set()
        thread.join(5)
        sock.close()
        theirs.close()


def test_a_reply_that_came_in_time_is_read_after_the_deadline() -> None:
    """Two sessions in step share their chunk's deadline, and the first reads its "." reply
    only once the second's transaction, run while it waited, is over: at the deadline, when
    the second's reply is late. The first's 250, which came in time, is its verdict."""
    with ScriptedSMTPServer() as server:
        server.reply("DOT", "250 2.0.0 Ok", recipient=B, delay=2.0, times=1)
        first, second = SMTPSession(relay(server)), SMTPSession(relay(server))
        deadline = time.monotonic() + 0.5
        seconds: list[TransactionResult] = []

        def meanwhile() -> None:
            seconds.append(second.send(outgoing(B), deadline=deadline))

        result = first.send_overlapped(outgoing(A), None, meanwhile, deadline=deadline)
        assert summary(result) == [(A, 250, Phase.DOT)]
        assert summary(seconds[0]) == [(B, None, Phase.DOT)]


class _RawServer:
    """A one-connection TCP server on 127.0.0.1 whose conversation is `script(conn, stop)`,
    run in a thread (stop is set when the test is done with it); its URL as a relay's."""

    def __init__(self, script: Callable[[socket.socket, threading.Event], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.stop = threading.Event()

        def serve() -> None:
            conn, _ = self.listener.accept()
            with conn, contextlib.suppress(OSError):
                script(conn, self.stop)

        self.thread = threading.Thread(target=serve, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"smtp://127.0.0.1:{self.listener.getsockname()[1]}?tls=none"

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.listener.close()


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_a_trickled_reply_over_tls_ends_by_the_deadline(
    tls: Any, server_ctx: ssl.SSLContext, ca_file: str
) -> None:
    """The same bound on a TLS socket, implicit TLS's or the new one that STARTTLS makes (the
    session's SSLContext makes the bounded kind)."""
    with ScriptedSMTPServer(tls=tls, ssl_context=server_ctx) as srv:
        srv.reply("MAIL", "250 2.1.0 Ok", trickle=4.0, times=1)
        session = SMTPSession(relay(srv, ca_file=ca_file))
        began = time.monotonic()
        result = session.send(outgoing(A), deadline=began + 0.5)
        assert time.monotonic() - began < 1.2
        assert summary(result) == [(A, None, Phase.MAIL)]
        assert result.tls is True


def test_a_past_deadline_does_not_shorten_later_commands() -> None:
    """The socket's timeout set for a send's deadline is not left for what comes after it."""
    with ScriptedSMTPServer() as server:
        session = SMTPSession(relay(server))
        assert summary(session.send(outgoing(A), deadline=time.monotonic() + 0.25))[0][1] == 250
        time.sleep(0.3)  # that deadline is past
        server.reply("NOOP", "250 2.0.0 Ok", delay=0.4)
        assert session.noop().code == 250
        assert server.connections == 1


def test_unreachable_relay(server: ScriptedSMTPServer) -> None:
    config = relay(server)
    server.stop()
    result = SMTPSession(config).send(outgoing(A))
    assert summary(result) == [(A, None, Phase.CONNECT)]
    assert classes(result) == {ReplyClass.CONNECTION}


def test_greeting_refused(server: ScriptedSMTPServer) -> None:
    server.drop("greeting")
    result = SMTPSession(relay(server)).send(outgoing(A))
    assert classes(result) == {ReplyClass.CONNECTION}
    assert server.messages == []


def test_421_at_ehlo_closes_and_defers(server: ScriptedSMTPServer) -> None:
    server.reply("EHLO", "421 4.7.0 Too many connections", times=1)
    session = SMTPSession(relay(server))
    result = session.send(outgoing(A))
    assert summary(result) == [(A, 421, Phase.EHLO)]
    assert classes(result) == {ReplyClass.THROTTLED}
    assert summary(session.send(outgoing(A))) == [(A, 250, Phase.DOT)]


# --- 7. SMTPUTF8 and SIZE ----------------------------------------------------------------


def test_non_ascii_address_goes_out_with_smtputf8(server: ScriptedSMTPServer) -> None:
    jorg = "jörg@example.org"
    result = SMTPSession(relay(server)).send(outgoing(jorg, A, smtputf8=True))
    assert summary(result) == [(jorg, 250, Phase.DOT), (A, 250, Phase.DOT)]
    [message] = server.messages
    assert message.smtputf8 is True
    assert message.rcpt_tos == [jorg, A]


@pytest.mark.parametrize("flagged", [True, False])
def test_non_ascii_address_without_smtputf8_fails_locally(flagged: bool) -> None:
    with ScriptedSMTPServer(smtputf8=False) as srv:
        session = SMTPSession(relay(srv))
        result = session.send(outgoing("jörg@example.org", A, smtputf8=flagged))
        assert {(r.reply.code, r.phase) for r in result.results} == {(None, Phase.LOCAL)}
        assert "SMTPUTF8" in result.results[0].reply.text
        assert classes(result) == {ReplyClass.MESSAGE_FAILURE}
        assert "MAIL" not in srv.commands
        assert summary(session.send(outgoing(A))) == [(A, 250, Phase.DOT)]
        assert srv.connections == 1  # the local refusal kept the session


def test_message_larger_than_size_fails_locally() -> None:
    with ScriptedSMTPServer(size_limit=1000) as srv:
        session = SMTPSession(relay(srv))
        result = session.send(outgoing(A, B, data=MSG + b"x" * 2000 + b"\r\n"))
        assert {(r.reply.code, r.phase) for r in result.results} == {(None, Phase.LOCAL)}
        assert "SIZE" in result.results[0].reply.text
        assert "at most 1000" in result.results[0].reply.text
        assert not {"MAIL", "RCPT", "DATA"} & set(srv.commands)
        assert summary(session.send(outgoing(A))) == [(A, 250, Phase.DOT)]
        assert srv.messages[0].mail_options == [f"SIZE={len(MSG)}"]
        assert srv.connections == 1


def test_address_with_line_break_is_refused_locally(server: ScriptedSMTPServer) -> None:
    result = SMTPSession(relay(server)).send(outgoing(A, "b@x.org>\r\nRCPT TO:<evil@x.org"))
    assert {(r.reply.code, r.phase) for r in result.results} == {(None, Phase.LOCAL)}
    assert "MAIL" not in server.commands


def test_bare_line_ends_are_sent_as_crlf_and_dots_stuffed(server: ScriptedSMTPServer) -> None:
    data = b"Subject: s\n\nline\n.\nsmuggled\r.\rend"
    SMTPSession(relay(server)).send(outgoing(A, data=data))
    [message] = server.messages
    assert message.data == b"Subject: s\r\n\r\nline\r\n.\r\nsmuggled\r\n.\r\nend\r\n"


# --- 9. VRFY ----------------------------------------------------------------------------


def test_verify_returns_replies(server: ScriptedSMTPServer) -> None:
    server.set_vrfy(B, "550 5.1.1 No such user")
    server.set_vrfy(C, "250 2.1.5 Carol <carol@example.org>")
    session = SMTPSession(relay(server))
    assert session.verify(A).code == 252
    bob = session.verify(B)
    assert (bob.code, bob.enhanced) == (550, "5.1.1")
    assert session.verify(C).code == 250
    server.reply("VRFY", "502 5.5.1 VRFY command is disabled", times=1)
    assert session.verify(A).code == 502
    assert session.verify("jörg@example.org").code is None
    assert server.connections == 1


def test_verify_and_noop_on_a_dead_relay_return_a_reply(server: ScriptedSMTPServer) -> None:
    session = SMTPSession(relay(server))
    assert session.noop().code == 250
    server.stop()
    assert session.verify(A).code is None
    assert session.noop().code is None


# --- 10. secrets -------------------------------------------------------------------------


def test_password_never_logged_and_debuglevel_never_set(
    starttls_server: ScriptedSMTPServer,
    ca_file: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forbidden(self: smtplib.SMTP, level: int) -> None:
        raise AssertionError("set_debuglevel prints AUTH")

    monkeypatch.setattr(smtplib.SMTP, "set_debuglevel", forbidden)
    caplog.set_level(logging.DEBUG)
    good = relay(starttls_server, user=USER, password=PASSWORD, ca_file=ca_file)
    bad_password = PASSWORD + "-typo"
    bad = dataclasses.replace(good, password=bad_password)
    said: list[str] = []
    for config in (good, bad):
        session = SMTPSession(config)
        session.send(outgoing(A))
        if config is good:
            starttls_server.drop("mail")  # the reused session is "stale": logged, reopened
        session.send(outgoing(B))
        session.close()
        check(config, lambda step, detail: said.append(f"{step} {detail}"))
        try:
            SMTPSession(config).open().quit()
        except RelayError as error:
            said.append(str(error))
    # good: two sessions (a stale one reopened), check, open; bad: two sends, check, open
    assert (starttls_server.auth_attempts, starttls_server.auth_successes) == (8, 4)
    assert any("535" in text for text in said)
    secrets = [PASSWORD, bad_password]
    secrets += [base64.b64encode(s.encode()).decode() for s in secrets]
    secrets += [base64.b64encode(f"\0{USER}\0{s}".encode()).decode() for s in secrets[:2]]
    assert any(r.name.startswith("mailer") for r in caplog.records)
    texts = [r.getMessage() for r in caplog.records] + said + [repr(good), repr(bad)]
    for secret in secrets:
        assert not [t for t in texts if secret in t]


# --- check() -----------------------------------------------------------------------------


def test_check_walks_every_step(starttls_server: ScriptedSMTPServer, ca_file: str) -> None:
    said: list[tuple[str, str]] = []
    config = relay(starttls_server, user=USER, password=PASSWORD, ca_file=ca_file)
    assert check(config, lambda step, detail: said.append((step, detail))) is True
    assert [step for step, _ in said] == [
        "connect",
        "ehlo",
        "starttls",
        "ehlo",
        "auth",
        "noop",
        "quit",
    ]
    details = dict(said)
    assert details["connect"] == f"127.0.0.1:{starttls_server.port} connected"
    assert "starttls" in said[1][1] and "auth" in said[3][1]  # the extensions, before and after
    assert details["starttls"].startswith("220 TLS")
    assert "235" in details["auth"] and USER in details["auth"]
    assert details["quit"].startswith("221")
    assert (starttls_server.quits, starttls_server.messages) == (1, [])
    assert not [d for _, d in said if PASSWORD in d]


def test_check_implicit_tls(server_ctx: ssl.SSLContext, ca_file: str) -> None:
    with ScriptedSMTPServer(tls="implicit", ssl_context=server_ctx) as srv:
        said: list[str] = []
        assert check(relay(srv, ca_file=ca_file), lambda step, detail: said.append(step))
        assert said == ["connect", "tls", "ehlo", "auth", "noop", "quit"]


@pytest.mark.parametrize(
    ("change", "step", "why"),
    [
        ({"password": "wrong"}, "auth", "535"),
        ({"ca_file": None}, "starttls", "not trusted"),
        ({"port": 1}, "connect", "ConnectionRefusedError"),
        ({"tls": "opportunistic", "ca_file": "/nonexistent/ca.pem"}, "starttls", "ca_file"),
    ],
)
def test_check_stops_at_the_failing_step(
    starttls_server: ScriptedSMTPServer, ca_file: str, change: dict[str, Any], step: str, why: str
) -> None:
    said: list[tuple[str, str]] = []
    fields: dict[str, Any] = {"user": USER, "password": PASSWORD, "ca_file": ca_file, **change}
    config = relay(starttls_server, **fields)
    assert check(config, lambda s, detail: said.append((s, detail))) is False
    last_step, last = said[-1]
    assert last_step == step
    assert last.startswith("FAILED") and why in last
    assert not [d for _, d in said if PASSWORD in d]
    assert starttls_server.messages == []


def test_check_reports_a_refused_noop(server: ScriptedSMTPServer) -> None:
    server.reply("NOOP", "500 5.5.1 What?")
    said: list[tuple[str, str]] = []
    assert check(relay(server), lambda s, detail: said.append((s, detail))) is False
    assert said[-1] == ("noop", "FAILED: 500 5.5.1 What?")


def test_module_never_calls_set_debuglevel() -> None:
    package = Path(__file__).parents[1] / "mailer"
    sources = [*(package / "transport").glob("*.py"), package / "relay_check.py"]
    assert len(sources) > 5
    for source in sources:
        assert "set_debuglevel" not in source.read_text(), source
