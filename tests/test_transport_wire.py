"""The SMTP wire format without a network: line ends, dot-stuffing, envelopes, reply values."""

from __future__ import annotations

import smtplib

import pytest

from mailer.replies import Phase, SMTPReply
from mailer.transport.base import Outgoing
from mailer.transport.failures import Failed
from mailer.transport.wire import (
    Features,
    closes,
    crlf_only,
    dot_stuffed,
    envelope,
    phases,
    positive,
    reply_of,
)

ALL = Features(pipelining=True, size=True, size_limit=0, smtputf8=True, eightbitmime=True)


@pytest.mark.parametrize(
    ("data", "sent"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"", b""),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n"),
        (b"a\n\rb", b"a\r\n\r\nb"),
        (b"a\r\r\nb", b"a\r\n\r\nb"),
        (b"a\r\nb\nc\rd", b"a\r\nb\r\nc\r\nd"),
    ],
)
def test_every_line_end_goes_out_as_crlf(data: bytes, sent: bytes) -> None:
    assert crlf_only(data) == sent


def test_crlf_only_data_is_passed_through_as_is() -> None:
    data = b"Subject: s\r\n\r\nbody\r\n" * 100
    assert crlf_only(data) is data


@pytest.mark.parametrize(
    ("message", "sent"),
    [
        (b"a\r\n", b"a\r\n"),
        (b"a", b"a\r\n"),
        (b".a\r\n", b"..a\r\n"),
        (b"a\r\n.\r\n.b\r\n", b"a\r\n..\r\n..b\r\n"),
        (b"a.b\r\n", b"a.b\r\n"),
    ],
)
def test_a_leading_dot_is_doubled_and_the_message_ends_with_crlf(
    message: bytes, sent: bytes
) -> None:
    assert dot_stuffed(message) == sent


def test_the_envelope_is_mail_rcpts_and_data_sent_together() -> None:
    out = Outgoing("s@example.com", ("a@example.org", "b@example.org"), b"x\ny")
    sending = envelope(out, Features())
    assert sending.commands == [
        b"MAIL FROM:<s@example.com>",
        b"RCPT TO:<a@example.org>",
        b"RCPT TO:<b@example.org>",
        b"DATA",
    ]
    assert sending.wire == b"\r\n".join(sending.commands) + b"\r\n"
    assert (sending.out, sending.message) == (out, b"x\r\ny")


def test_mail_options_follow_the_servers_features() -> None:
    out = Outgoing("s@example.com", ("ä@example.org",), "é\r\n".encode())
    [mail, *_] = envelope(out, ALL).commands
    assert mail == b"MAIL FROM:<s@example.com> SIZE=4 SMTPUTF8 BODY=8BITMIME"
    assert envelope(out._replace(recipients=("a@example.org",)), Features()).commands[0] == (
        b"MAIL FROM:<s@example.com>"
    )


@pytest.mark.parametrize(
    ("out", "features", "why"),
    [
        (Outgoing("s@x.org", ("a@x.org>\r\nRCPT TO:<e@x.org",), b"m"), ALL, "control"),
        (Outgoing("s@x.org", ("a\x00@x.org",), b"m"), ALL, "control"),
        (Outgoing("s@x.org", ("ä@x.org",), b"m"), Features(), "SMTPUTF8"),
        (Outgoing("s@x.org", ("a@x.org",), b"m", smtputf8=True), Features(), "SMTPUTF8"),
        (Outgoing("s@x.org", ("a@x.org",), b"12345"), Features(size=True, size_limit=4), "SIZE"),
    ],
)
def test_what_the_server_would_refuse_fails_locally(
    out: Outgoing, features: Features, why: str
) -> None:
    with pytest.raises(Failed) as failed:
        envelope(out, features)
    assert failed.value.phase is Phase.LOCAL
    assert failed.value.reply.code is None and why in failed.value.reply.text


def test_phases_of_an_envelope() -> None:
    assert phases(4) == (Phase.MAIL, Phase.RCPT, Phase.RCPT, Phase.DATA)


def test_reply_values() -> None:
    assert reply_of(250, b"2.1.0 Ok") == SMTPReply.of(250, "2.1.0 Ok")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        reply_of(-1, b"garbled")
    assert positive(SMTPReply.of(251, "ok")) and not positive(SMTPReply.of(354, "go"))
    assert not positive(SMTPReply.lost("gone"))
    assert closes(SMTPReply.of(421, "bye")) and not closes(SMTPReply.of(450, "later"))
