"""replies.explain: the dashboard's "why" agrees with classify() on every real reply of the
table, and says the facts that decided the class."""

from __future__ import annotations

import pytest

from mailer.replies import Phase, ReplyClass, SMTPReply, classify, explain
from tests.test_replies import LOST, ROWS


def _reply(code: int | None, text: str) -> SMTPReply:
    return SMTPReply.lost(text) if code is LOST else SMTPReply.of(code, text)


@pytest.mark.parametrize(("code", "text", "phase"), [(c, t, p) for c, t, p, _, _ in ROWS])
def test_explain_agrees_with_classify(code: int | None, text: str, phase: Phase) -> None:
    reply = _reply(code, text)
    klass, reason = explain(reply, phase)
    assert klass is classify(reply, phase)
    assert len(reason) > 20


@pytest.mark.parametrize(
    ("reply", "phase", "klass", "says"),
    [
        (
            SMTPReply.of(550, "5.1.1 No such user"),
            Phase.RCPT,
            ReplyClass.HARD_BOUNCE,
            "suppression list",
        ),
        (
            SMTPReply.of(550, "Mailbox unavailable"),
            Phase.RCPT,
            ReplyClass.MESSAGE_FAILURE,
            "not suppressed",
        ),
        (SMTPReply.of(550, "5.7.26 DMARC"), Phase.DOT, ReplyClass.MESSAGE_FAILURE, "policy"),
        (
            SMTPReply.of(552, "5.2.2 Mailbox full"),
            Phase.RCPT,
            ReplyClass.TRANSIENT,
            "mailbox is full",
        ),
        (SMTPReply.of(451, "4.7.1 Greylisted"), Phase.RCPT, ReplyClass.TRANSIENT, "greylisting"),
        (SMTPReply.of(421, "4.7.0 Too many"), Phase.MAIL, ReplyClass.THROTTLED, "rests"),
        (
            SMTPReply.of(535, "5.7.8 Bad credentials"),
            Phase.AUTH,
            ReplyClass.CONFIGURATION,
            "relay resume",
        ),
        (SMTPReply.lost("timed out"), Phase.DOT, ReplyClass.AMBIGUOUS, "held as unknown"),
        (SMTPReply.lost("refused"), Phase.CONNECT, ReplyClass.CONNECTION, "refused"),
    ],
)
def test_the_reason_names_what_decided(
    reply: SMTPReply, phase: Phase, klass: ReplyClass, says: str
) -> None:
    got, reason = explain(reply, phase)
    assert got is klass and says in reason, reason
