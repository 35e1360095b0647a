"""SMTP replies as values, their codes by name, and classify(): the only place codes are judged.

Every decision about what a server's answer means is made here, from (code, enhanced status
code, text, phase). The enhanced code (RFC 3463) refines the basic code only when both agree on
the class digit: "550 4.2.2" is judged as a 550.
"""

from __future__ import annotations

import re
from enum import IntEnum, StrEnum
from typing import NamedTuple


class ReplyCode(IntEnum):
    """Reply codes by name (RFC 5321 4.2.2, RFC 4954, RFC 3207)."""

    HELP = 214
    READY = 220
    CLOSING = 221
    AUTH_OK = 235
    OK = 250
    WILL_FORWARD = 251
    CANNOT_VERIFY = 252
    AUTH_CONTINUE = 334
    START_INPUT = 354
    SERVICE_UNAVAILABLE = 421
    MAILBOX_BUSY = 450
    LOCAL_ERROR = 451
    INSUFFICIENT_STORAGE = 452
    TLS_UNAVAILABLE = 454
    PARAMS_UNSUPPORTED = 455
    SYNTAX_ERROR = 500
    ARGUMENT_ERROR = 501
    NOT_IMPLEMENTED = 502
    BAD_SEQUENCE = 503
    PARAMETER_NOT_IMPLEMENTED = 504
    AUTH_REQUIRED = 530
    AUTH_TOO_WEAK = 534
    AUTH_FAILED = 535
    ENCRYPTION_REQUIRED = 538
    MAILBOX_UNAVAILABLE = 550
    USER_NOT_LOCAL = 551
    EXCEEDED_STORAGE = 552
    MAILBOX_NAME_INVALID = 553
    TRANSACTION_FAILED = 554
    MAIL_RCPT_PARAMS = 555


class Phase(StrEnum):
    """Where in the SMTP dialogue a reply (or the loss of the connection) happened."""

    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    TLS = "tls"  # STARTTLS or the implicit-TLS handshake
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    BODY = "body"  # sending the content, before the final "." went out
    DOT = "dot"  # the final "." went out; waiting for the server's verdict
    LOCAL = "local"  # refused here, before the server saw it (render, compose, SIZE, SMTPUTF8)


class ReplyClass(StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    THROTTLED = "throttled"
    CONNECTION = "connection"
    TOO_MANY_RECIPIENTS = "too_many_recipients"
    HARD_BOUNCE = "hard_bounce"
    MESSAGE_FAILURE = "message_failure"
    CONFIGURATION = "configuration"
    PROTOCOL = "protocol"
    AMBIGUOUS = "ambiguous"

    @property
    def relay_wide(self) -> bool:
        """The relay, not the recipient, is at fault: back off the relay, spend no attempt."""
        return self in (ReplyClass.THROTTLED, ReplyClass.CONNECTION, ReplyClass.CONFIGURATION)


_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?![\w.])")


class SMTPReply(NamedTuple):
    """One server reply. `code` is None when the connection failed instead of replying. (A
    tuple: one is made for most messages, and a tuple is cheaper to make than a dataclass.)"""

    code: int | None
    text: str
    enhanced: str | None = None

    @classmethod
    def of(cls, code: int, message: bytes | str) -> SMTPReply:
        """A reply as smtplib returns it: the text of each line, joined by newlines.

        The enhanced status code is read from the start of the text. Lines that still carry
        the reply code, as read off the wire ("550-5.7.1 ..."), lose it as smtplib would drop it.
        """
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        text = _storable(text.strip())
        if "\n" in text or text[:3].isdigit():  # a one-line "2.0.0 Ok" carries no reply code
            text = _without_reply_code(int(code), text)
        match = _ENHANCED.match(text)
        return cls(code=code, text=text, enhanced=match.group(0) if match else None)

    @classmethod
    def lost(cls, why: str) -> SMTPReply:
        return cls(code=None, text=_storable(why))

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.code is not None else f"(no reply: {self.text})"


def _storable(text: str) -> str:
    # a NUL from a broken or hostile server: PostgreSQL refuses it in text, and an outcome that
    # cannot be recorded is sent again after its lease, for ever
    return text.replace("\0", "\ufffd") if "\0" in text else text


def _without_reply_code(code: int, text: str) -> str:
    lines = text.splitlines()
    if not any(_carries_code(line, code) for line in lines):
        return text
    return "\n".join(line[4:].strip() if _carries_code(line, code) else line for line in lines)


def _carries_code(line: str, code: int) -> bool:
    return line[:3] == str(code) and line[3:4] in ("", " ", "-")


# The subject and detail of an enhanced status code (RFC 3463 section 3) that classify() uses
_MAILBOX_FULL = (2, 2)
_TOO_MANY_RECIPIENTS = (5, 3)
_POLICY = 7  # X.7.x: security or policy status
_SAYS_NOTHING_MORE = 5  # X.5.x: protocol status, which the basic code already states
_UNDEFINED = (0, 0)
# The recipient's address does not exist or cannot be delivered to: X.1.1 bad mailbox,
# X.1.2 bad domain, X.1.3 bad syntax, X.1.4 ambiguous, X.1.6 moved, X.1.10 null MX (RFC 7505).
# Not X.1.0 (unspecific, and used for sender refusals), X.1.7 / X.1.8 / X.1.11 (our sender),
# nor X.2.1 "mailbox disabled", which Gmail also sends for a recipient receiving mail too fast.
_BAD_RECIPIENT = frozenset({(1, 1), (1, 2), (1, 3), (1, 4), (1, 6), (1, 10)})

_GREYLIST = re.compile(r"gr[ae]y[- ]?list", re.IGNORECASE)
_TOO_MANY_RCPT = re.compile(r"too many recipients", re.IGNORECASE)
_RELAY_DENIED = re.compile(
    r"relay(ing)? (access )?(denied|not permitted|not allowed|prohibited)"
    r"|(not allowed|unable) to relay|allowed rcpthosts",
    re.IGNORECASE,
)
# With Postfix's default smtpd_delay_reject, a refused sender is reported in reply to RCPT
_ABOUT_SENDER = re.compile(r"sender address rejected", re.IGNORECASE)
_BEFORE_TRANSACTION = (Phase.CONNECT, Phase.GREETING, Phase.EHLO, Phase.TLS, Phase.AUTH)

_AUTH_CODES = (
    ReplyCode.AUTH_REQUIRED,
    ReplyCode.AUTH_TOO_WEAK,
    ReplyCode.AUTH_FAILED,
    ReplyCode.ENCRYPTION_REQUIRED,
)
_PROTOCOL_CODES = (
    ReplyCode.SYNTAX_ERROR,
    ReplyCode.ARGUMENT_ERROR,
    ReplyCode.NOT_IMPLEMENTED,
    ReplyCode.BAD_SEQUENCE,
    ReplyCode.PARAMETER_NOT_IMPLEMENTED,
    ReplyCode.MAIL_RCPT_PARAMS,
)


def classify(reply: SMTPReply, phase: Phase) -> ReplyClass:
    """What a reply means for the recipients it concerns (the table in the README)."""
    code = reply.code
    if code is None:
        return _without_reply(phase)
    if 200 <= code < 300:
        return ReplyClass.DELIVERED
    if not 400 <= code < 600:
        return _unexpected(phase)
    detail = _agreeing_detail(reply)
    if phase in _BEFORE_TRANSACTION:
        return _before_transaction(code, detail)
    if _RELAY_DENIED.search(reply.text):
        # the relay will not take mail for other domains from us: credentials or relay setup
        return ReplyClass.CONFIGURATION
    if code < 500:
        return _transient(code, detail, reply.text, phase)
    return _permanent(code, detail, reply.text, phase)


def _without_reply(phase: Phase) -> ReplyClass:
    if phase is Phase.DOT:
        return ReplyClass.AMBIGUOUS  # the whole message went out; it may have been stored
    if phase in (Phase.TLS, Phase.AUTH):
        # a certificate that does not verify, STARTTLS or AUTH not offered: only a person
        # can fix these, and trying again would only repeat them
        return ReplyClass.CONFIGURATION
    if phase is Phase.LOCAL:
        return ReplyClass.MESSAGE_FAILURE
    return ReplyClass.CONNECTION


def _unexpected(phase: Phase) -> ReplyClass:
    # a 1xx/3xx where a verdict was due, or a line smtplib could not read a code from (-1)
    if phase is Phase.DOT:
        return ReplyClass.AMBIGUOUS  # the server may have stored the message all the same
    if phase in _BEFORE_TRANSACTION:
        return ReplyClass.CONFIGURATION  # not an SMTP server: wrong host, port or TLS mode
    return ReplyClass.PROTOCOL


def _agreeing_detail(reply: SMTPReply) -> tuple[int, int] | None:
    """(subject, detail) of the enhanced code, when its class agrees with the basic code."""
    match = _ENHANCED.fullmatch(reply.enhanced or "")
    if match is None or reply.code is None or int(match.group(1)) != reply.code // 100:
        return None
    return int(match.group(2)), int(match.group(3))


def _is_policy(detail: tuple[int, int] | None) -> bool:
    return detail is not None and detail[0] == _POLICY


def _before_transaction(code: int, detail: tuple[int, int] | None) -> ReplyClass:
    # Refused before any MAIL FROM: nothing is wrong with the recipients. A temporary refusal
    # (421 at the greeting, 454 at STARTTLS) is a relay to retry later; a permanent one (530,
    # 535, 554 at the greeting, 5xx to EHLO, even a 50x) needs a person to fix the
    # configuration, and failing the recipients instead would burn them for the relay's sake.
    if code >= 500:
        return ReplyClass.CONFIGURATION
    return ReplyClass.THROTTLED if _is_policy(detail) else ReplyClass.CONNECTION


def _transient(code: int, detail: tuple[int, int] | None, text: str, phase: Phase) -> ReplyClass:
    if code == ReplyCode.SERVICE_UNAVAILABLE:
        # 421: the server closes the session; it is about the relay, never one recipient
        return ReplyClass.THROTTLED if _is_policy(detail) else ReplyClass.CONNECTION
    if _too_many_recipients(code, detail, text, phase):
        return ReplyClass.TOO_MANY_RECIPIENTS
    if _is_policy(detail) and not _GREYLIST.search(text):
        # 4.7.x: rate limits and temporary blocks aimed at the sending host. Greylisting
        # (also 4.7.1) is about one sender/recipient pair and clears with an ordinary retry.
        return ReplyClass.THROTTLED
    return ReplyClass.TRANSIENT


def _permanent(code: int, detail: tuple[int, int] | None, text: str, phase: Phase) -> ReplyClass:
    if code in _AUTH_CODES:
        return ReplyClass.CONFIGURATION
    if code in _PROTOCOL_CODES:
        return ReplyClass.PROTOCOL
    if _too_many_recipients(code, detail, text, phase):
        return ReplyClass.TOO_MANY_RECIPIENTS
    if detail is None or detail == _UNDEFINED or detail[0] == _SAYS_NOTHING_MORE:
        return _permanent_by_code(code, phase)
    if detail == _MAILBOX_FULL:
        return ReplyClass.TRANSIENT  # by policy a retry: the owner may clear the mailbox
    if phase is Phase.RCPT and detail in _BAD_RECIPIENT and not _ABOUT_SENDER.search(text):
        return ReplyClass.HARD_BOUNCE
    # 5.2.3 / 5.3.4 too big, 5.7.x policy (spam 5.7.1, DMARC 5.7.26), a refused sender, or
    # an address status after MAIL or ".", which concerns the sender or every recipient alike:
    # this message fails; no address is suppressed
    return ReplyClass.MESSAGE_FAILURE


def _permanent_by_code(code: int, phase: Phase) -> ReplyClass:
    if phase is Phase.RCPT and code == ReplyCode.EXCEEDED_STORAGE:
        return ReplyClass.TRANSIENT  # a bare 552 to RCPT is "mailbox full": retry by policy
    # A bare 550 is "mailbox unavailable" for any reason, policy and spam included (RFC 5321
    # 4.2.3): without a 5.1.x to say the address is bad, nothing is suppressed.
    return ReplyClass.MESSAGE_FAILURE


def _too_many_recipients(
    code: int, detail: tuple[int, int] | None, text: str, phase: Phase
) -> bool:
    # only an answer to RCPT can mean "the rest in a new transaction"
    if phase is not Phase.RCPT:
        return False
    by_text = code in (ReplyCode.INSUFFICIENT_STORAGE, ReplyCode.EXCEEDED_STORAGE) and bool(
        _TOO_MANY_RCPT.search(text)
    )
    return detail == _TOO_MANY_RECIPIENTS or by_text


def explain(reply: SMTPReply, phase: Phase) -> tuple[ReplyClass, str]:
    """classify()'s verdict and its reason, in a sentence for an operator (the dashboard's
    "why"). Not on the worker's path: it judges the reply again, with the same rules."""
    klass = classify(reply, phase)
    return klass, _REASONS[klass](reply, phase)


def _why_delivered(reply: SMTPReply, phase: Phase) -> str:
    return "the server accepted the message"


def _why_ambiguous(reply: SMTPReply, phase: Phase) -> str:
    return (
        "no clear verdict after the final '.': the server may have stored the message, so it "
        "is held as unknown (or retried with MAILER_AMBIGUOUS=retry)"
    )


def _why_connection(reply: SMTPReply, phase: Phase) -> str:
    if reply.code is None:
        what = f"the connection failed at {phase.value} ({reply.text})"
    elif reply.code == ReplyCode.SERVICE_UNAVAILABLE:
        what = "421: the server closed the session"
    else:
        what = f"a temporary refusal ({reply.code}) before the transaction"
    return f"{what}: the relay rests and tries again; no attempt of the recipient is spent"


def _why_throttled(reply: SMTPReply, phase: Phase) -> str:
    return (
        "the server limits how fast we send (4.7.x): the relay rests and tries again; no "
        "attempt of the recipient is spent"
    )


def _why_configuration(reply: SMTPReply, phase: Phase) -> str:
    if reply.code is None:
        what = f"{phase.value} failed ({reply.text})"
    elif _RELAY_DENIED.search(reply.text):
        what = "the relay will not relay for us (credentials or relay settings)"
    elif reply.code in _AUTH_CODES:
        what = f"the relay refused authentication or asks for encryption ({reply.code})"
    elif phase in _BEFORE_TRANSACTION and reply.code >= 500:
        what = f"the relay refused the session at {phase.value} ({reply.code})"
    else:
        what = "not an SMTP server's answer: a wrong host, port or TLS mode"
    return f"{what}: the relay is paused until `mailer relay resume`; the recipient waits queued"


def _why_transient(reply: SMTPReply, phase: Phase) -> str:
    detail = _agreeing_detail(reply)
    if detail == _MAILBOX_FULL or (phase is Phase.RCPT and reply.code == 552):
        return "the mailbox is full: retried by policy, since its owner may clear it"
    if _GREYLIST.search(reply.text):
        return "greylisting: the server asks us to come back later; retried on the schedule"
    return f"a temporary failure ({reply.code}): retried on the schedule"


def _why_too_many(reply: SMTPReply, phase: Phase) -> str:
    return "too many recipients in one transaction: the rest go in a new one"


def _why_bounced(reply: SMTPReply, phase: Phase) -> str:
    return (
        f"{reply.enhanced} in reply to RCPT: the address does not exist or cannot receive "
        "mail; it was put on the suppression list"
    )


def _why_failed(reply: SMTPReply, phase: Phase) -> str:
    detail = _agreeing_detail(reply)
    if reply.code is None:
        return f"refused here before the server saw it: {reply.text}"
    if detail is None or detail == _UNDEFINED or detail[0] == _SAYS_NOTHING_MORE:
        return (
            f"a permanent refusal ({reply.code}) without an enhanced code naming the address: "
            "servers also refuse so for policy, so the message failed and the address is not "
            "suppressed"
        )
    if _is_policy(detail):
        return (
            f"a policy refusal ({reply.enhanced}: spam, DMARC, a blocked sender): the message "
            "failed; the address is not suppressed"
        )
    return (
        f"a permanent refusal of this message or its sender ({reply.enhanced}): the message "
        "failed; the address is not suppressed"
    )


def _why_protocol(reply: SMTPReply, phase: Phase) -> str:
    return (
        f"the server did not accept our command ({reply.code if reply.code else 'no code'}): "
        "a fault on one side; the message failed and it was logged"
    )


_REASONS = {
    ReplyClass.DELIVERED: _why_delivered,
    ReplyClass.AMBIGUOUS: _why_ambiguous,
    ReplyClass.CONNECTION: _why_connection,
    ReplyClass.THROTTLED: _why_throttled,
    ReplyClass.CONFIGURATION: _why_configuration,
    ReplyClass.TRANSIENT: _why_transient,
    ReplyClass.TOO_MANY_RECIPIENTS: _why_too_many,
    ReplyClass.HARD_BOUNCE: _why_bounced,
    ReplyClass.MESSAGE_FAILURE: _why_failed,
    ReplyClass.PROTOCOL: _why_protocol,
}


def vrfy_meaning(reply: SMTPReply) -> str:
    """What a reply to VRFY says about the address (RFC 5321 3.5.3)."""
    code = reply.code
    if code is None:
        return "no answer: " + reply.text
    if code in (ReplyCode.OK, ReplyCode.WILL_FORWARD):
        return "the server knows this address"
    if code == ReplyCode.CANNOT_VERIFY:
        return "the server will not say (most do this); it would accept mail and try to deliver it"
    if code in (
        ReplyCode.MAILBOX_UNAVAILABLE,
        ReplyCode.USER_NOT_LOCAL,
        ReplyCode.MAILBOX_NAME_INVALID,
    ):
        return "the server does not know this address"
    if code in _PROTOCOL_CODES:
        return "the server does not support VRFY (or refuses it)"
    if code // 100 == 4:
        return "temporary failure: try again later"
    return "unexpected reply"
