"""Pure: rendered parts and an envelope become RFC 5322 bytes, or a clear refusal.

Header values are checked for line breaks and NUL after rendering, including inside RFC 2047
encoded words: the Python on our hosts (3.11.7) serialises such a header as a new header
line (CVE-2024-6923). Recipients never come from headers: the transport gets them explicitly.
"""

from __future__ import annotations

import email.policy
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
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
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 2.2: printable ASCII except ":"
# CR, LF, NUL and every other character str.splitlines() breaks on: the email package refuses
# those with a bare ValueError, or (decoded from an encoded word) writes them out as a new line
LINE_BREAK = re.compile("[\r\n\0\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
_POLICY = email.policy.SMTP
_POLICY_UTF8 = email.policy.SMTPUTF8


def message_id(token: str, domain: str, delivery_id: int | None) -> str:
    """A Message-ID that a retry reproduces: derived from the message's token (and the
    delivery, when each recipient gets a differently rendered copy)."""
    local = token if delivery_id is None else f"{token}.{delivery_id}"
    return f"<{local}@{domain}>"


def check_header(name: str, value: str) -> None:
    """Refuse a value that is, or decodes to, more than one header line."""
    if LINE_BREAK.search(value):
        raise HeaderInjection(name, value)
    if "=?" in value:
        # decode the way the email package will when it writes the header, so that no charset
        # trick (unknown, RFC 2231 language, unknown-8bit) decodes differently here and there
        try:
            decoded = str(_POLICY.header_factory(name, value))
        except ValueError:  # an address header refusing a decoded CR/LF
            raise HeaderInjection(name, value) from None
        if LINE_BREAK.search(decoded):
            raise HeaderInjection(name, value)


def check_extra_headers(headers: Mapping[str, str]) -> None:
    for name, value in headers.items():
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise InputError(
                f"header name {name!r} is not a valid field name: use 1 to 76 printable ASCII "
                "characters without spaces or ':' (e.g. List-Unsubscribe)"
            )
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
        try:
            msg[name] = value
        except ValueError as exc:  # e.g. an address header (Reply-To) it cannot parse
            raise InputError(f"header {name!r} cannot be written: {exc}") from None
    msg.set_content(rendered.text)
    if rendered.html is not None:
        msg.add_alternative(rendered.html, subtype="html")
    return msg


def to_bytes(msg: EmailMessage, *, smtputf8: bool) -> bytes:
    """Serialise with CRLF line ends; SMTPUTF8 keeps non-ASCII addresses as UTF-8."""
    return msg.as_bytes(policy=_POLICY_UTF8 if smtputf8 else _POLICY)
