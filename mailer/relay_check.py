"""`mailer smtp check`: walk the relay connection step by step, saying each step's reply."""

from __future__ import annotations

import smtplib

from mailer.replies import Phase, ReplyCode, SMTPReply
from mailer.transport.connection import Connection, Report
from mailer.transport.failures import Failed, failing_at
from mailer.transport.relay import RelayConfig


def check(config: RelayConfig, say: Report) -> bool:
    """Connect, EHLO, STARTTLS, AUTH, NOOP and QUIT, saying each step's reply as
    say(step, detail); at the first failure, say why and return False."""
    try:
        smtp = Connection(config).establish(say)
    except Failed as failed:
        step = failed.phase.value
        if failed.phase is Phase.TLS and config.tls != "implicit":
            step = "starttls"
        say(step, f"FAILED: {failed.reply}")
        return False
    try:
        return _check_step(smtp, say, "noop", ReplyCode.OK) and _check_step(
            smtp, say, "quit", ReplyCode.CLOSING
        )
    finally:
        smtp.close()


def _check_step(smtp: smtplib.SMTP, say: Report, step: str, expected: ReplyCode) -> bool:
    try:
        with failing_at(Phase.CONNECT):
            reply = SMTPReply.of(*smtp.docmd(step.upper()))
    except Failed as failed:
        reply = failed.reply
    if reply.code != expected:
        say(step, f"FAILED: {reply}")
        return False
    say(step, str(reply))
    return True
