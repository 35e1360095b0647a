"""The scripted SMTP server, driven by plain smtplib."""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any, Literal

import pytest
import trustme

from mailer.testing.smtpserver import Phase, ScriptedSMTPServer

MSG = b"Subject: hello\r\n\r\nHello there.\r\n"
A, B = "alice@example.org", "bob@example.org"


@pytest.fixture(scope="module")
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def server() -> Iterator[ScriptedSMTPServer]:
    with ScriptedSMTPServer() as srv:
        yield srv


def connect(srv: ScriptedSMTPServer) -> smtplib.SMTP:
    return smtplib.SMTP(srv.host, srv.port, timeout=5)


def send(srv: ScriptedSMTPServer, to: list[str], msg: bytes = MSG, **kw: Any) -> dict[str, Any]:
    with connect(srv) as client:
        return client.sendmail(A, to, msg, **kw)


def test_plain_delivery_is_stored_and_counted(server: ScriptedSMTPServer) -> None:
    assert server.connections == 0  # Controller's start-up probe is not a connection

    assert send(server, [A, B]) == {}

    [message] = server.messages
    assert (message.mail_from, message.rcpt_tos, message.data) == (A, [A, B], MSG)
    assert message.smtputf8 is False
    assert server.copies() == {A: 1, B: 1}
    assert (server.connections, server.transactions, server.quits) == (1, 1, 1)
    assert server.commands == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
    assert server.wait_for(1, timeout=0.1)
    assert not server.wait_for(2, timeout=0.05)


def test_port_zero_binds_a_free_port_and_url() -> None:
    srv = ScriptedSMTPServer()
    assert srv.port == 0
    with srv:
        assert srv.port > 0
        assert srv.url() == f"smtp://127.0.0.1:{srv.port}?tls=none"
        assert srv.url(user="u@x", password="p:ss/w", tls="starttls") == (
            f"smtp://u%40x:p%3Ass%2Fw@127.0.0.1:{srv.port}?tls=starttls"
        )
        assert srv.url(tls="implicit") == f"smtps://127.0.0.1:{srv.port}"
    with pytest.raises(OSError):
        socket.create_connection((srv.host, srv.port), timeout=1)


def test_rcpt_rule_for_one_recipient_once(server: ScriptedSMTPServer) -> None:
    server.reply("RCPT", "451 4.7.1 Greylisted, try again", recipient=B.upper(), times=1)

    assert send(server, [A, B]) == {B: (451, b"4.7.1 Greylisted, try again")}
    assert send(server, [A, B]) == {}

    assert [m.rcpt_tos for m in server.messages] == [[A], [A, B]]
    assert server.copies() == {A: 2, B: 1}


def test_rules_first_match_wins_and_forever(server: ScriptedSMTPServer) -> None:
    server.reply("RCPT", "550 5.1.1 No such user", recipient=B)
    server.reply("RCPT", "452 4.5.3 Too many recipients")
    for _ in range(2):
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            send(server, [B, A])
        assert refused.value.recipients == {
            B: (550, b"5.1.1 No such user"),
            A: (452, b"4.5.3 Too many recipients"),
        }
    server.clear()
    assert send(server, [B, A]) == {}


def test_positive_rules_keep_the_session_working(server: ScriptedSMTPServer) -> None:
    server.reply("MAIL", "250 2.1.0 Sender fine")
    server.reply("RCPT", "251 2.1.5 Will forward")
    with connect(server) as client:
        assert client.ehlo()[0] == 250
        assert client.mail(A) == (250, b"2.1.0 Sender fine")
        assert client.rcpt(B) == (251, b"2.1.5 Will forward")
        assert client.data(MSG)[0] == 250
    assert server.messages[0].rcpt_tos == [B]


def test_mail_and_data_command_rules(server: ScriptedSMTPServer) -> None:
    server.reply("MAIL", "421 4.3.2 Shutting down", times=1)
    server.reply("DATA", "554 5.5.1 No valid recipients", times=1)
    with pytest.raises(smtplib.SMTPSenderRefused):
        send(server, [A])
    with pytest.raises(smtplib.SMTPDataError) as data_error:
        send(server, [A])
    assert data_error.value.smtp_code == 554
    assert server.transactions == 1  # the refused MAIL is not a transaction
    assert server.messages == []
    send(server, [A])
    assert len(server.messages) == 1


def test_dot_rule_refuses_message(server: ScriptedSMTPServer) -> None:
    server.reply("DOT", "452 4.3.1 Insufficient system storage", recipient=B, times=1)

    send(server, [A])  # rule limited to transactions including B
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server, [A, B])
    assert refused.value.smtp_code == 452
    send(server, [A, B])

    assert [m.rcpt_tos for m in server.messages] == [[A], [A, B]]


def test_positive_dot_rule_stores_with_custom_reply(server: ScriptedSMTPServer) -> None:
    server.reply("DOT", "250 2.0.0 Ok: queued as ABC123")
    with connect(server) as client:
        client.ehlo()
        client.mail(A)
        client.rcpt(A)
        assert client.data(MSG) == (250, b"2.0.0 Ok: queued as ABC123")
    assert len(server.messages) == 1


def test_ehlo_noop_rset_vrfy_quit_rules(server: ScriptedSMTPServer) -> None:
    server.reply("EHLO", "250-custom.example\r\n250 SIZE 10", times=1)
    server.reply("NOOP", "250 2.0.0 nope")
    server.reply("RSET", "250 2.0.0 reset")
    server.reply("QUIT", "221 2.0.0 see you")
    server.set_vrfy(B, "550 5.1.1 Unknown")
    with connect(server) as client:
        assert client.ehlo() == (250, b"custom.example\nSIZE 10")
        assert client.noop() == (250, b"2.0.0 nope")
        assert client.rset() == (250, b"2.0.0 reset")
        assert client.verify(A)[0] == 252
        assert client.verify(B.upper()) == (550, b"5.1.1 Unknown")
        assert client.docmd("QUIT") == (221, b"2.0.0 see you")
    assert server.commands == ["EHLO", "NOOP", "RSET", "VRFY", "VRFY", "QUIT"]
    assert server.quits == 1


@pytest.mark.parametrize(
    ("phase", "stored"),
    [
        ("greeting", 0),
        ("ehlo", 0),
        ("mail", 0),
        ("rcpt", 0),
        ("data", 0),
        ("body", 0),
        ("after_dot", 1),
    ],
)
def test_drop_at_each_phase(server: ScriptedSMTPServer, phase: Phase, stored: int) -> None:
    server.drop(phase)
    body = MSG + b"x" * 998 + b"\r\n" * 200  # big enough to still be sending at "body"

    with pytest.raises(smtplib.SMTPServerDisconnected):
        send(server, [A], body)

    assert len(server.messages) == stored
    send(server, [A], body)  # times=1: next connection is normal
    assert len(server.messages) == stored + 1
    assert server.connections == 2


def test_after_dot_drop_then_retry_duplicates(server: ScriptedSMTPServer) -> None:
    server.drop("after_dot", recipient=B)
    send(server, [A])
    with pytest.raises(smtplib.SMTPServerDisconnected):
        send(server, [B])
    send(server, [B])  # the client's retry: a second copy
    assert server.copies() == {A: 1, B: 2}


def test_rcpt_drop_limited_to_one_recipient(server: ScriptedSMTPServer) -> None:
    server.drop("rcpt", recipient=B, times=None)
    send(server, [A])
    with pytest.raises(smtplib.SMTPServerDisconnected):
        send(server, [A, B])
    assert server.commands[-3:] == ["MAIL", "RCPT", "RCPT"]
    assert len(server.messages) == 1


def test_starttls_hidden_without_tls(server: ScriptedSMTPServer) -> None:
    with connect(server) as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        assert not client.has_extn("auth")


def test_starttls_offered_and_required(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    srv = ScriptedSMTPServer(
        tls="starttls", ssl_context=server_ctx, require_starttls=True, auth={"u": "p"}
    )
    with srv, connect(srv) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")  # only after STARTTLS
        assert client.mail(A) == (530, b"5.7.0 Must issue a STARTTLS command first")
        client.starttls(context=client_ctx)
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.has_extn("auth")
        client.login("u", "p")
        assert client.sendmail(A, [B], MSG) == {}
    assert srv.commands[:4] == ["EHLO", "MAIL", "STARTTLS", "EHLO"]
    assert (srv.connections, len(srv.messages)) == (1, 1)


def test_implicit_tls(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    srv = ScriptedSMTPServer(tls="implicit", ssl_context=server_ctx, auth={"u": "p"})
    srv.drop("greeting")  # installed before start: the start-up probe must not consume it
    with srv:
        assert srv.url().startswith("smtps://")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtplib.SMTP_SSL(srv.host, srv.port, context=client_ctx, timeout=5)
        with smtplib.SMTP_SSL(srv.host, srv.port, context=client_ctx, timeout=5) as client:
            client.ehlo()
            assert not client.has_extn("starttls")
            client.login("u", "p")
            client.sendmail(A, [B], MSG)
        with pytest.raises(ssl.SSLCertVerificationError):
            smtplib.SMTP_SSL(srv.host, srv.port, context=ssl.create_default_context(), timeout=5)
    assert len(srv.messages) == 1
    assert srv.auth_successes == 1
    assert srv.connections == 3  # the failed handshake was still an accepted connection


def test_auth_good_and_bad_credentials() -> None:
    with ScriptedSMTPServer(auth={"user": "pa:ss word"}) as srv:
        with connect(srv) as client:
            client.ehlo()
            assert set(client.esmtp_features["auth"].split()) == {"LOGIN", "PLAIN"}
            assert client.mail(A)[0] == 530  # AUTH is required
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("user", "wrong")
            client.login("user", "pa:ss word")  # PLAIN
            assert client.sendmail(A, [B], MSG) == {}
        with connect(srv) as client:
            client.ehlo()
            client.user, client.password = "user", "pa:ss word"
            assert client.auth("LOGIN", client.auth_login)[0] == 235
    # smtplib's login() falls back from PLAIN to LOGIN on failure: the bad password costs two
    assert (srv.auth_attempts, srv.auth_successes) == (4, 2)
    assert "AUTH" in srv.commands


def test_size_advertised_and_enforced() -> None:
    with ScriptedSMTPServer(size_limit=1000) as srv:
        with connect(srv) as client:
            client.ehlo()
            assert client.esmtp_features["size"] == "1000"
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            send(srv, [A], MSG + b"x" * 2000 + b"\r\n")  # smtplib declares SIZE=...
        assert refused.value.smtp_code == 552
        with connect(srv) as client:  # without SIZE= the body itself is refused
            client.ehlo()
            client.mail(A)
            client.rcpt(A)
            assert client.data(MSG + b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n")[0] == 552
        assert srv.messages == []


def test_size_not_advertised_by_default(server: ScriptedSMTPServer) -> None:
    with connect(server) as client:
        client.ehlo()
        assert not client.has_extn("size")


def test_smtputf8_and_pipelining_advertised(server: ScriptedSMTPServer) -> None:
    with connect(server) as client:
        client.ehlo()
        assert client.has_extn("smtputf8")
        assert client.has_extn("pipelining")
        client.sendmail("jörg@exämple.org", [B], MSG, mail_options=["SMTPUTF8"])
    [message] = server.messages
    assert message.smtputf8
    assert message.mail_from == "jörg@exämple.org"
    assert "SMTPUTF8" in message.mail_options


def test_smtputf8_and_pipelining_can_be_hidden() -> None:
    with ScriptedSMTPServer(smtputf8=False, pipelining=False) as srv, connect(srv) as client:
        client.ehlo()
        assert not client.has_extn("smtputf8")
        assert not client.has_extn("pipelining")


def test_idle_timeout_closes_session() -> None:
    with ScriptedSMTPServer(idle_timeout=0.2) as srv, connect(srv) as client:
        client.ehlo()
        time.sleep(0.4)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()


def test_invalid_configuration_is_refused(server_ctx: ssl.SSLContext) -> None:
    with pytest.raises(ValueError):
        ScriptedSMTPServer(tls="starttls")
    with pytest.raises(ValueError):
        ScriptedSMTPServer(require_starttls=True)
    with pytest.raises(ValueError):
        ScriptedSMTPServer().drop("mail", recipient=A)
    with pytest.raises(ValueError):
        ScriptedSMTPServer().reply("RCPT", "250 OK", times=0)
    with pytest.raises(ValueError):
        ScriptedSMTPServer().reply("DATA", "354 go ahead")


@pytest.mark.parametrize("tls", ["none", "implicit"])
def test_stop_disconnects_open_sessions(
    tls: Literal["none", "implicit"], server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    srv = ScriptedSMTPServer(tls=tls, ssl_context=server_ctx).start()
    client: smtplib.SMTP = (
        smtplib.SMTP_SSL(srv.host, srv.port, context=client_ctx, timeout=5)
        if tls == "implicit"
        else connect(srv)
    )
    with client:
        client.ehlo()
        srv.stop()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()


def test_restart_keeps_port_and_observations(server: ScriptedSMTPServer) -> None:
    send(server, [A])
    port = server.port
    server.stop()
    server.start()
    assert server.port == port
    send(server, [A])
    assert (server.connections, len(server.messages)) == (2, 2)
    server.reset()
    assert (server.connections, server.messages, server.commands) == (0, [], [])
