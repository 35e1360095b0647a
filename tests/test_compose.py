"""compose.build: what the email package reads back is exactly what was rendered."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from mailer import compose
from mailer.errors import HeaderInjection, InputError
from mailer.templates import Rendered

DATE = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    assert all(not part.defects for part in msg.walk()), [part.defects for part in msg.walk()]
    return msg


def _build(rendered: Rendered, **kw: object) -> bytes:
    args: dict[str, object] = {
        "from_addr": "news@example.com",
        "to": ["ann@example.com"],
        "msg_id": "<t.1@example.com>",
        "date": DATE,
        "headers": {},
    }
    args.update(kw)
    return compose.build(rendered, **args)  # type: ignore[arg-type]


TEXTS = [
    pytest.param("Hello Ann,\nplain ASCII.\n", id="ascii"),
    pytest.param("Grüße, Renée — ça va? 😀\n", id="utf-8"),
    pytest.param("x" * 2000 + "\nshort\n", id="line-over-998"),
    pytest.param("ends without newline", id="no-final-newline"),
    pytest.param(".leading dot\n..two\nFrom here\n", id="dots-and-From"),
    pytest.param("trailing spaces   \ntab\t\n", id="trailing-space"),
    pytest.param("windows\r\nline\rends\n", id="crlf-and-cr"),
]


@pytest.mark.parametrize("text", TEXTS)
def test_text_only_round_trips(text: str) -> None:
    data = _build(Rendered(subject="Hi", text=text, html=None))
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF everywhere, no bare LF
    msg = _parse(data)
    assert msg.get_content_type() == "text/plain"
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    assert msg.get_content().replace("\r\n", "\n") == expected + (
        "" if expected.endswith("\n") else "\n"
    )


@pytest.mark.parametrize("text", TEXTS)
def test_text_and_html_round_trip(text: str) -> None:
    html = "<p>Grüße <b>Ann</b></p>\n"
    msg = _parse(_build(Rendered(subject="Hi", text=text, html=html)))
    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(("plain",))
    rich = msg.get_body(("html",))
    assert plain is not None and rich is not None
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    assert plain.get_content().replace("\r\n", "\n") == expected + (
        "" if expected.endswith("\n") else "\n"
    )
    assert rich.get_content().replace("\r\n", "\n") == html


@pytest.mark.parametrize(
    "subject",
    [
        "Short",
        "Grüße aus Köln",
        "A long subject " * 12,
        "Long ünïcode subject " * 8,
    ],
)
def test_headers_round_trip(subject: str) -> None:
    extra = {
        "List-Unsubscribe": "<https://example.com/u/" + "a" * 60 + ">",
        "Reply-To": "Support Team <help@example.com>",
        "X-Campaign": "Müller",
    }
    data = _build(Rendered(subject=subject, text="hi\n", html=None), headers=extra)
    head = data.split(b"\r\n\r\n")[0]
    assert head.isascii()
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))
    msg = _parse(data)
    assert msg["Subject"] == subject.strip() or msg["Subject"] == subject
    assert msg["From"] == "news@example.com" and msg["To"] == "ann@example.com"
    assert msg["Message-ID"] == "<t.1@example.com>" and msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime == DATE
    assert msg["X-Campaign"] == "Müller"
    assert msg["Reply-To"].addresses[0].addr_spec == "help@example.com"
    assert msg["List-Unsubscribe"] == extra["List-Unsubscribe"]


def test_smtputf8_keeps_addresses_and_headers_in_utf8() -> None:
    data = _build(
        Rendered(subject="Grüße", text="hi\n", html=None), to=["jösé@exämple.com"], smtputf8=True
    )
    assert "To: jösé@exämple.com\r\n".encode() in data
    assert "Subject: Grüße\r\n".encode() in data
    msg = email.message_from_bytes(data, policy=email.policy.SMTPUTF8)
    assert msg["To"] == "jösé@exämple.com"


def test_several_recipients_in_one_to_header() -> None:
    msg = _parse(
        _build(
            Rendered(subject="Hi", text="x\n", html=None),
            to=["a@example.com", "b@example.com", "c@example.com"],
        )
    )
    assert [a.addr_spec for a in msg["To"].addresses] == [
        "a@example.com",
        "b@example.com",
        "c@example.com",
    ]


def test_a_part_holding_the_boundary_gets_another_one() -> None:
    text = f"Our boundary, quoted: --{compose._BOUNDARY}\n"
    msg = _parse(_build(Rendered(subject="Hi", text=text, html="<p>hi</p>\n")))
    assert msg.get_boundary() != compose._BOUNDARY
    plain = msg.get_body(("plain",))
    assert plain is not None and plain.get_content().replace("\r\n", "\n") == text


def test_the_date_is_its_whole_second() -> None:
    # compose._date keeps the last second formatted: what it gives is the second's own string
    zones = [UTC, timezone(timedelta(hours=2)), timezone(timedelta(microseconds=1)), None]
    starts = [DATE, datetime(1969, 12, 31, 23, 59, 58, tzinfo=UTC)]
    for start in starts:
        for zone in zones:
            for step in range(0, 3_000_000, 250_000):
                date = (start + timedelta(microseconds=step)).replace(tzinfo=zone)
                second = datetime.fromtimestamp(int(date.timestamp()), zone)
                assert compose._date(date) == format_datetime(second), date


def test_a_bad_header_name_is_refused_after_good_ones() -> None:
    compose.check_extra_headers({"X-A": "1", "List-Unsubscribe": "<https://example.com/u>"})
    for _ in range(2):
        for name in ("Subject", "subject", "bad name", "X:Y", ""):
            with pytest.raises(InputError):
                compose.check_extra_headers({"X-A": "1", name: "v"})
    with pytest.raises(HeaderInjection):
        compose.check_extra_headers({"X-A": "1\r\nBcc: x@example.com"})
