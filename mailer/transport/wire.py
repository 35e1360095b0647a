"""The SMTP wire format, pure: envelope commands, CRLF line ends, dot-stuffing, reply values."""

from __future__ import annotations

import functools
import re
import smtplib
from typing import NamedTuple

from mailer.replies import Phase, ReplyCode, SMTPReply
from mailer.transport.base import Outgoing
from mailer.transport.failures import Failed

CRLF = b"\r\n"
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_EOL = re.compile(rb"\r\n|\r(?!\n)|\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_DOT_AFTER_LF = re.compile(rb"\n\.")
# RFC 5321 4.2.1: the first digit of every reply, and the one of a positive completion
_REPLY_DIGITS = (2, 3, 4, 5)
_POSITIVE_COMPLETION = 2


class Features(NamedTuple):
    """What the connected server offers that a transaction depends on, read once a
    connection (after STARTTLS, whose EHLO may offer more)."""

    pipelining: bool = False
    size: bool = False
    size_limit: int = 0  # 0: none announced
    smtputf8: bool = False
    eightbitmime: bool = False


class Envelope(NamedTuple):
    """A transaction ready to go: its envelope commands, as sent together (`wire`), and its
    message (CRLF line ends only, not yet dot-stuffed)."""

    out: Outgoing
    commands: list[bytes]
    wire: bytes
    message: bytes


def envelope(out: Outgoing, features: Features) -> Envelope:
    """The transaction's commands for a server offering `features` (raises Failed at
    Phase.LOCAL for what that server would refuse)."""
    message = crlf_only(out.data)  # a bare CR or LF is never sent (SMTP smuggling)
    options = mail_options(out, len(message), features)
    encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
    mail = " ".join([f"MAIL FROM:<{out.sender}>", *options])
    lines = [mail, *(f"RCPT TO:<{r}>" for r in out.recipients), "DATA"]
    commands = [line.encode(encoding) for line in lines]
    return Envelope(out, commands, CRLF.join(commands) + CRLF, message)


def mail_options(out: Outgoing, size: int, features: Features) -> list[str]:
    """MAIL FROM parameters; refuses here (Phase.LOCAL) what the server would refuse."""
    addresses = (out.sender, *out.recipients)
    for address in addresses:
        # (isprintable() is True for nearly every address: the search is left for the rest)
        if (
            "<" in address
            or ">" in address
            or (not address.isprintable() and CONTROL.search(address))
        ):
            raise _local(f"address {address!r} contains a control character or <>")
    limit = features.size_limit
    if limit and size > limit:
        raise _local(f"message is {size} bytes; the server accepts at most {limit} (SIZE)")
    options = [f"SIZE={size}"] if features.size else []
    if out.smtputf8 or not all(a.isascii() for a in addresses):
        if not features.smtputf8:
            raise _local("an address is not ASCII and the server does not offer SMTPUTF8")
        options.append("SMTPUTF8")
    if features.eightbitmime and not out.data.isascii():
        options.append("BODY=8BITMIME")
    return options


def _local(why: str) -> Failed:
    return Failed(SMTPReply.lost(why), Phase.LOCAL)


def crlf_only(data: bytes) -> bytes:
    """`data` with every line end a CRLF. With each CRLF blanked out, a CR or LF left is a
    bare one: one search and two memchr scans find none in a composed message, which is
    passed on as is (cheaper than counting CR, LF and CRLF); a rewrite only where one is."""
    blanked = data.replace(CRLF, b"  ")
    if b"\r" not in blanked and b"\n" not in blanked:
        return data
    return _EOL.sub(CRLF, data)


def dot_stuffed(message: bytes) -> bytes:
    """The message as sent before the final ".": a line's leading dot doubled, a CRLF at the
    end (`message` has CRLF line ends only)."""
    # the regular expression finds a line's leading dot sooner than `in` finds b"\n."
    if message.startswith(b".") or _DOT_AFTER_LF.search(message):
        message = _LEADING_DOT.sub(b"..", message)
    return message if message.endswith(CRLF) else message + CRLF


@functools.cache  # a few sizes (a transaction has at most delivery.MAX_RECIPIENTS), every message
def phases(commands: int) -> tuple[Phase, ...]:
    """The phase of each command of an envelope: MAIL, RCPT..., DATA."""
    return (Phase.MAIL, *[Phase.RCPT] * (commands - 2), Phase.DATA)


def reply_of(code: int, text: bytes) -> SMTPReply:
    """A reply as read; a garbled one raises SMTPServerDisconnected: the dialogue is out of
    step and the session cannot go on."""
    if code // 100 not in _REPLY_DIGITS:
        raise smtplib.SMTPServerDisconnected(f"unreadable reply {text[:80]!r}")
    return SMTPReply.of(code, text)


def positive(reply: SMTPReply) -> bool:
    # 250 and 251, and any other 2xx a lenient server uses (classify() counts 2xx as accepted)
    return reply.code is not None and reply.code // 100 == _POSITIVE_COMPLETION


def closes(reply: SMTPReply) -> bool:
    """Whether the server closes the session with this reply (421)."""
    return reply.code == ReplyCode.SERVICE_UNAVAILABLE
