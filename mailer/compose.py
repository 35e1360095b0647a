"""Pure: rendered parts and an envelope become RFC 5322 bytes, or a clear refusal.

Header values are checked for line breaks and NUL after rendering, including inside RFC 2047
encoded words: the Python on our hosts (3.11.7) serialises such a header as a new header
line (CVE-2024-6923). Recipients never come from headers: the transport gets them explicitly.
"""

from __future__ import annotations

import binascii
import email.policy
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

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
_SHORT_LINE = 76  # RFC 5322 2.1.1: lines SHOULD stay within 78 characters
_MAX_LINE = 998  # RFC 5322 2.1.1: and MUST within 998
# RFC 2046 5.1.1: a boundary must not occur in the parts (checked), not differ between
# messages; drawn once a process rather than reading the system's randomness for every message
_BOUNDARY = "=_" + secrets.token_hex(12)


def message_id(token: str, domain: str, delivery_id: int | None) -> str:
    """A Message-ID that a retry reproduces: derived from the message's token (and the
    delivery, when each recipient gets a differently rendered copy)."""
    local = token if delivery_id is None else f"{token}.{delivery_id}"
    return f"<{local}@{domain}>"


def has_line_break(value: str) -> bool:
    """The header-safety rule: does the value hold CR, LF, NUL or another line break?"""
    # every character LINE_BREAK matches is unprintable: a printable value (nearly every one)
    # needs no search, and isprintable() is the cheaper scan
    return not value.isprintable() and LINE_BREAK.search(value) is not None


def is_plain_header(value: str) -> bool:
    """A value that check_header passes as it is: no line break and no encoded word to decode."""
    return "=?" not in value and not has_line_break(value)


def check_header(name: str, value: str) -> None:
    """Refuse a value that is, or decodes to, more than one header line."""
    # isprintable() first, as has_line_break starts: nearly every value passes it, without a call
    if not value.isprintable() and has_line_break(value):
        raise HeaderInjection(name, value)
    if "=?" in value:
        # decode the way the email package will when it writes the header, so that no charset
        # trick (unknown, RFC 2231 language, unknown-8bit) decodes differently here and there
        try:
            decoded = str(_POLICY.header_factory(name, value))
        except ValueError:  # an address header refusing a decoded CR/LF
            raise HeaderInjection(name, value) from None
        if has_line_break(decoded):
            raise HeaderInjection(name, value)


def check_extra_headers(headers: Mapping[str, str]) -> None:
    for name, value in headers.items():
        if name not in _valid_names:
            _check_name(name)
        if not isinstance(value, str):
            raise InputError(f"header {name!r} must be a string")
        check_header(name, value)


# names _check_name passed: the same few go out with every message, and a set lookup is
# cheaper than the match and the lower() again
_valid_names: set[str] = set()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
        raise InputError(
            f"header name {name!r} is not a valid field name: use 1 to 76 printable ASCII "
            "characters without spaces or ':' (e.g. List-Unsubscribe)"
        )
    if name.lower() in RESERVED:
        raise InputError(f"header {name!r} is set by mailer; pass it as a parameter instead")
    if type(name) is str and len(_valid_names) < 1024:
        _valid_names.add(name)


def build(  # noqa: PLR0913 - the parts of a message, each named at the call
    rendered: Rendered,
    *,
    from_addr: str,
    to: Sequence[str],
    msg_id: str,
    date: datetime,
    headers: Mapping[str, str],
    smtputf8: bool = False,
) -> bytes:
    """The message as RFC 5322 bytes with CRLF line ends: text/plain, or
    multipart/alternative when there is HTML.

    Assembled here from the email package's encoders rather than by EmailMessage, which costs
    many times more a message (BENCHMARKS.md): header values that are plain
    ASCII and short go out as they are; any other value is folded and encoded by the email
    package's own policy. Bodies are 7bit when they can be, else quoted-printable.
    """
    check_header("Subject", rendered.subject)
    check_header("From", from_addr)
    for address in to:
        check_header("To", address)
    check_extra_headers(headers)
    policy = _POLICY_UTF8 if smtputf8 else _POLICY
    fields = (
        ("From", from_addr),
        ("To", ", ".join(to)),
        ("Subject", rendered.subject),
        ("Date", _date(date)),
        ("Message-ID", msg_id),
        *headers.items(),
    )
    # a value that is ASCII and short goes out as it is, without a call (one rule for every
    # field, rather than one per standard field with its own limit: simpler, nearly as fast)
    head = "".join(
        [
            f"{name}: {value}\r\n"
            if value.isascii() and len(name) + len(value) < _SHORT_LINE
            else _folded(name, value, policy)
            for name, value in fields
        ]
    )
    head += "MIME-Version: 1.0\r\n"
    text = _part(rendered.text, "plain")
    if rendered.html is None:
        return b"".join((head.encode(), *text))
    html = _part(rendered.html, "html")
    boundary = _BOUNDARY
    delimiters = _DELIMITERS
    while delimiters[0] in text[1] or delimiters[0] in html[1]:
        boundary = "=_" + secrets.token_hex(12)
        delimiters = _delimiters(boundary)
    # the pieces joined once, the head and the first delimiter encoded together, the parts'
    # heads and the delimiters made once. Not all in one str encoded at the end: str.replace()
    # on a body is slower than bytes.replace()
    return b"".join(
        (
            f'{head}Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\n".encode(),
            *text,
            delimiters[1],
            *html,
            delimiters[2],
        )
    )


def _delimiters(boundary: str) -> tuple[bytes, bytes, bytes]:
    """The boundary, the delimiter between the parts and the closing one, as bytes. The CRLF
    before a delimiter belongs to the delimiter: the extra one keeps each part's own final line
    break."""
    return boundary.encode(), f"\r\n--{boundary}\r\n".encode(), f"\r\n--{boundary}--\r\n".encode()


_DELIMITERS = _delimiters(_BOUNDARY)


_EPOCH = datetime.fromtimestamp(0, UTC)
# the last UTC second formatted: from its first instant to the next second's, and its text
_second: tuple[datetime, datetime, str] = (_EPOCH, _EPOCH, "")


def _date(date: datetime) -> str:
    # the Date header has whole seconds: messages composed in the same second share one string,
    # found by comparing, which is cheaper than timestamp() alone. In UTC only, where the
    # fields order as the instants do, and from 1970 on, where int() rounds the timestamp down
    global _second
    utc = date.tzinfo is UTC
    start, end, text = _second
    if utc and start <= date < end:
        return text
    timestamp = int(date.timestamp())
    text = format_datetime(datetime.fromtimestamp(timestamp, date.tzinfo))
    if utc and timestamp >= 0:
        start = datetime.fromtimestamp(timestamp, UTC)
        _second = (start, start + timedelta(seconds=1), text)
    return text


def _folded(name: str, value: str, policy: email.policy.EmailPolicy[Any]) -> str:
    """A header field that is not ASCII or not short, as the email package writes it."""
    if policy.utf8 and len(name) + len(value) < _SHORT_LINE:
        return f"{name}: {value}\r\n"  # RFC 6532: UTF-8 headers as they are
    try:
        return str(policy.header_factory(name, value).fold(policy=policy))
    except (ValueError, TypeError, IndexError) as exc:
        # e.g. an address header (Reply-To) the email package cannot parse
        raise InputError(f"header {name!r} cannot be written: {exc}") from None


def _part(body: str, subtype: str) -> tuple[bytes, bytes]:
    """A text part, its head and its body: 7bit when ASCII with lines under the limit, else
    quoted-printable."""
    if "\r" in body:
        body = body.replace("\r\n", "\n").replace("\r", "\n")
    raw = body.encode("utf-8")
    if not raw.endswith(b"\n"):
        raw += b"\n"
    # a str knows whether it is ASCII without a scan (its bytes would need one). No line of a
    # body that short can be too long, and splitting it costs more than the rest
    short = len(raw) <= _MAX_LINE
    if body.isascii() and (short or max(map(len, raw.split(b"\n"))) <= _MAX_LINE):
        encoding, payload = "7bit", raw
    else:
        encoding, payload = "quoted-printable", binascii.b2a_qp(raw, istext=True)
    return _PART_HEADS[subtype, encoding], payload.replace(b"\n", b"\r\n")


_PART_HEADS = {
    (subtype, encoding): (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode()
    for subtype in ("plain", "html")
    for encoding in ("7bit", "quoted-printable")
}
