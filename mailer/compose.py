"""Pure: rendered parts and an envelope become RFC 5322 bytes, or a clear refusal.

Header values are checked for CR, LF and NUL after rendering, including inside RFC 2047
encoded words: the Python on our hosts (3.11.7) serialises such a header as a new header
line (CVE-2024-6923). Recipients never come from headers: the transport gets them explicitly.
"""

from __future__ import annotations

import email.policy
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from email.header import decode_header
from email.message import EmailMessage
from email.utils import format_datetime

from mailer.errors import HeaderInjection, InputError
from mailer.templates import Rendered

# headers the composer writes itself; a producer's extra headers may not replace them
RESERVED = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    }
)
_FIELD_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 2.2: printable ASCII except ":"
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_FORBIDDEN = ("\r", "\n", "\0")
_POLICY = email.policy.SMTP
_POLICY_UTF8 = email.policy.SMTPUTF8


def message_id(token: str, domain: str, delivery_id: int | None) -> str:
    """A Message-ID that a retry reproduces: derived from the message's token (and the
    delivery, when each recipient gets a differently rendered copy)."""
    local = token if delivery_id is None else f"{token}.{delivery_id}"
    return f"<{local}@{domain}>"


def check_header(name: str, value: str) -> None:
    if any(ch in value for ch in _FORBIDDEN):
        raise HeaderInjection(name, value)
    for word in _ENCODED_WORD.findall(value):
        try:
            decoded = "".join(
                part.decode(charset or "ascii", "replace") if isinstance(part, bytes) else part
                for part, charset in decode_header(word)
            )
        except (LookupError, ValueError):
            continue  # an undecodable word stays literal text: it cannot become a new line
        if any(ch in decoded for ch in _FORBIDDEN):
            raise HeaderInjection(name, value)


def check_extra_headers(headers: Mapping[str, str]) -> None:
    for name, value in headers.items():
        if not _FIELD_NAME.match(name):
            raise InputError(f"header name {name!r} is not a valid field name")
        if name.lower() in RESERVED:
            raise InputError(f"header {name!r} is set by mailer; pass it as a parameter instead")
        if not isinstance(value, str):
            raise InputError(f"header {name!r} must be a string")
        check_header(name, value)


def build(
    rendered: Rendered,
    *,
    from_addr: str,
    to: Sequence[str],
    msg_id: str,
    date: datetime,
    headers: Mapping[str, str],
) -> EmailMessage:
    subject = rendered.subject
    check_header("Subject", subject)
    check_header("From", from_addr)
    for address in to:
        check_header("To", address)
    check_extra_headers(headers)
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = from_addr
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = msg_id
    for name, value in headers.items():
        msg[name] = value
    msg.set_content(rendered.text)
    if rendered.html is not None:
        msg.add_alternative(rendered.html, subtype="html")
    return msg


def to_bytes(msg: EmailMessage, *, smtputf8: bool) -> bytes:
    """Serialise with CRLF line ends; SMTPUTF8 keeps non-ASCII addresses as UTF-8."""
    return msg.as_bytes(policy=_POLICY_UTF8 if smtputf8 else _POLICY)
