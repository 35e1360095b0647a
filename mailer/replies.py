"""SMTP replies as values, their codes by name, and classify(): the only place codes are judged.

Every decision about what a server's answer means is made here, from (code, enhanced status
code, text, phase). The enhanced code (RFC 3463) refines the basic code only when both agree on
the class digit: "550 4.2.2" is judged as a 550.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum


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


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


@dataclass(frozen=True)
class SMTPReply:
    """One server reply. `code` is None when the connection failed instead of replying."""

    code: int | None
    text: str
    enhanced: str | None = None

    @classmethod
    def of(cls, code: int, message: bytes | str) -> SMTPReply:
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        text = text.strip()
        match = _ENHANCED.match(text)
        return cls(code=code, text=text, enhanced=match.group(0) if match else None)

    @classmethod
    def lost(cls, why: str) -> SMTPReply:
        return cls(code=None, text=why)

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.code is not None else f"(no reply: {self.text})"


_GREYLIST = re.compile(r"grey-?list|gray-?list", re.IGNORECASE)
_TOO_MANY_RCPT = re.compile(r"too many recipients", re.IGNORECASE)
_RELAY_DENIED = re.compile(
    r"relay(ing)? (access )?(denied|not permitted)|not allowed to relay", re.I
)
_BLOCKED = re.compile(
    r"spam|block|blacklist|denylist|reputation|policy|dmarc|spf|dkim|rbl|banned", re.IGNORECASE
)
_BEFORE_TRANSACTION = (Phase.CONNECT, Phase.GREETING, Phase.EHLO, Phase.TLS, Phase.AUTH)


def classify(reply: SMTPReply, phase: Phase) -> ReplyClass:
    """What a reply means for the recipients it concerns (see the table in the README)."""
    code = reply.code
    if code is None:
        return _without_reply(phase)
    detail = _agreeing_enhanced(reply)
    if code < 400:
        return ReplyClass.DELIVERED
    if phase in _BEFORE_TRANSACTION:
        return _before_transaction(code, reply.text, phase)
    if code < 500:
        return _transient(code, detail, reply.text)
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


def _agreeing_enhanced(reply: SMTPReply) -> tuple[int, int] | None:
    if reply.enhanced is None or reply.code is None:
        return None
    klass, subject, detail = (int(part) for part in reply.enhanced.split("."))
    return (subject, detail) if klass == reply.code // 100 else None


def _before_transaction(code: int, text: str, phase: Phase) -> ReplyClass:
    # Refused before any MAIL FROM: nothing is wrong with the recipients. A temporary refusal
    # (421 at the greeting, 454 at AUTH) is a relay to retry later; a permanent one (530, 535,
    # 554 at the greeting, 5xx to EHLO) needs a person to fix the configuration.
    if code == ReplyCode.SERVICE_UNAVAILABLE or code < 500:
        return ReplyClass.THROTTLED if _is_rate_limit(code, text) else ReplyClass.CONNECTION
    return ReplyClass.CONFIGURATION


def _is_rate_limit(code: int, text: str) -> bool:
    match = _ENHANCED.match(text)
    return bool(match and match.group(1) == "4" and match.group(2) == "7")


def _transient(code: int, detail: tuple[int, int] | None, text: str) -> ReplyClass:
    if code == ReplyCode.SERVICE_UNAVAILABLE:
        # 421: the server closes the session; it is about the relay, never one recipient
        return ReplyClass.THROTTLED if detail and detail[0] == 7 else ReplyClass.CONNECTION
    if detail == (5, 3) or (code == ReplyCode.INSUFFICIENT_STORAGE and _TOO_MANY_RCPT.search(text)):
        return ReplyClass.TOO_MANY_RECIPIENTS
    if detail and detail[0] == 7 and not _GREYLIST.search(text):
        # 4.7.x: rate limits and temporary policy blocks aimed at the sending host
        return ReplyClass.THROTTLED
    return ReplyClass.TRANSIENT


def _permanent(code: int, detail: tuple[int, int] | None, text: str, phase: Phase) -> ReplyClass:
    if code in _AUTH_CODES or _RELAY_DENIED.search(text):
        return ReplyClass.CONFIGURATION
    if code in _PROTOCOL_CODES:
        return ReplyClass.PROTOCOL
    refined = _permanent_by_detail(detail) if detail is not None else None
    if refined is not None:
        return refined
    if phase is Phase.RCPT:
        if code == ReplyCode.EXCEEDED_STORAGE:
            # a bare 552 to RCPT is "mailbox full" (RFC 5321 4.5.3.1.10 aside): retry by policy
            too_many = _TOO_MANY_RCPT.search(text)
            return ReplyClass.TOO_MANY_RECIPIENTS if too_many else ReplyClass.TRANSIENT
        if code in _MAILBOX_CODES and not _BLOCKED.search(text):
            return ReplyClass.HARD_BOUNCE
    return ReplyClass.MESSAGE_FAILURE


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
_MAILBOX_CODES = (
    ReplyCode.MAILBOX_UNAVAILABLE,
    ReplyCode.USER_NOT_LOCAL,
    ReplyCode.MAILBOX_NAME_INVALID,
)


def _permanent_by_detail(detail: tuple[int, int]) -> ReplyClass | None:
    subject, number = detail
    if detail == (2, 2):
        return ReplyClass.TRANSIENT  # mailbox full: by policy a retry, the owner may clear it
    if detail == (5, 3):
        return ReplyClass.TOO_MANY_RECIPIENTS
    if (subject == 1 and number not in (7, 8)) or detail == (2, 1):
        # 5.1.x: the address does not exist (5.1.7 and 5.1.8 are about our own sender);
        # 5.2.1: the mailbox is disabled
        return ReplyClass.HARD_BOUNCE
    if subject == 5 or detail == (0, 0):
        return None  # "5.5.x" and "5.0.0" say nothing beyond the basic code
    # 5.2.3 / 5.3.4 too big, 5.7.x policy (DMARC 5.7.26, spam 5.7.1), 5.1.7/5.1.8 sender:
    # this message fails; the recipient's address is fine and is not suppressed
    return ReplyClass.MESSAGE_FAILURE
