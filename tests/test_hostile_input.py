"""Hostile and bad input (issue 5): every refusal says what is wrong and what to do, nothing is
half-written, and the next valid call works.

Addresses, line breaks and RFC 2047 words in headers, undefined variables, the template
sandbox, oversized contexts and recipient files, through the Python API and the CLI.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import update

import mailer
from mailer import compose, db, enqueue, recipients, templates
from mailer.cli import cli
from mailer.clock import now
from mailer.delivery import deliver_chunk
from mailer.errors import HeaderInjection, InputError, InvalidAddress, TemplateError
from mailer.models import Campaign, Delivery, Message, Template
from mailer.transport.memory import MemoryTransport
from tests.helpers import add_template, count, deliveries, states

GOOD = {"email": "ok@example.com", "name": "Ok"}
INJECTED = "Bcc: victim@example.com"


def written() -> tuple[int, int, int]:
    return count(Campaign), count(Message), count(Delivery)


def nothing_written() -> bool:
    return written() == (0, 0, 0)


def assert_still_healthy() -> None:
    """After a refusal the process goes on: a valid call queues mail."""
    add_template("healthy", subject="Hi", text="Hello\n")
    before = count(Delivery)
    mailer.send(template="healthy", to="after@example.com")
    assert count(Delivery) == before + 1


def refused(exc_type: type[Exception], match: str, call: Any, *args: Any, **kwargs: Any) -> None:
    """`call` raises `exc_type` matching `match`, writes nothing, and the process stays healthy."""
    before = written()
    with pytest.raises(exc_type, match=match):
        call(*args, **kwargs)
    assert written() == before, "a refused call left rows behind"
    assert_still_healthy()


def send_welcome(**kwargs: Any) -> Any:
    """`mailer.send` of the test template to a@example.com; the test gives the rest."""
    return mailer.send(template="welcome", to="a@example.com", **kwargs)


def campaign_welcome(rows: Any, **kwargs: Any) -> Any:
    """`send_campaign` of the test template to `rows`."""
    return enqueue.send_campaign("welcome", rows, **kwargs)


# --- malformed addresses ------------------------------------------------------------------------

BAD_ADDRESSES = [
    pytest.param("", "the address is empty", id="empty"),
    pytest.param("   ", "the address is empty", id="blank"),
    pytest.param("ann.example.com", "must have an @-sign", id="no-at"),
    pytest.param(
        "ann@bob@example.com", "after the @-sign contains invalid characters: '@'", id="two-at"
    ),
    pytest.param("ann smith@example.com", "before the @-sign: SPACE", id="space"),
    pytest.param(
        "ann@exam ple.com",
        "after the @-sign contains invalid characters: SPACE",
        id="space-in-domain",
    ),
    pytest.param("ann@example.com.", "cannot end with a period", id="trailing-dot"),
    pytest.param(
        "a" * 65 + "@example.com",
        r"too long before the @-sign \(1 character too many\)",
        id="local-part-65",
    ),
    pytest.param(
        "ann@[192.0.2.1]", "bracketed IP address after the @-sign is not allowed", id="ip-literal"
    ),
    pytest.param("ann@[IPv6:2001:db8::1]", "bracketed IP address", id="ipv6-literal"),
    pytest.param("Ann <ann@example.com>", "display name and angle brackets", id="display-name"),
    pytest.param("ann@example.com, bob@example.com", "invalid characters", id="two-in-one"),
    pytest.param(
        "x" * 2_000_000 + "@example.com",
        r"2,000,012 characters long; an address has at most 254",
        id="megabytes",
    ),
    pytest.param(
        "=?utf-8?q?=0D=0AX-Injected=3A_1?=@example.com",
        "RFC 2047 encoded word",
        id="encoded-word-local-part",
    ),
]


@pytest.mark.parametrize(("address", "reason"), BAD_ADDRESSES)
def test_malformed_recipient_is_refused_by_send(any_db: str, address: str, reason: str) -> None:
    add_template()
    refused(
        InvalidAddress,
        rf"invalid address '.*': .*{reason}",
        mailer.send,
        template="welcome",
        to=address,
        context={"name": "A"},
    )


def test_the_refusal_names_the_address_but_not_megabytes_of_it(sqlite_db: str) -> None:
    add_template()
    with pytest.raises(InvalidAddress) as caught:
        mailer.send(template="welcome", to="x" * 2_000_000, context={"name": "A"})
    assert len(str(caught.value)) < 200


def test_one_bad_recipient_among_good_ones_refuses_the_message(sqlite_db: str) -> None:
    add_template()
    refused(
        InvalidAddress,
        "invalid address 'bad@': ",
        mailer.send,
        template="welcome",
        to=["a@example.com", "bad@"],
        context={"name": "A"},
    )


@pytest.mark.parametrize("address", [None, 42, b"ann@example.com"], ids=repr)
def test_a_recipient_that_is_not_a_string_is_refused(sqlite_db: str, address: Any) -> None:
    add_template()
    refused(
        InvalidAddress,
        f"an address must be a string, not {type(address).__name__}",
        mailer.send,
        template="welcome",
        to=[address],
        context={"name": "A"},
    )


@pytest.mark.parametrize(("address", "reason"), BAD_ADDRESSES)
def test_malformed_sender_is_refused(any_db: str, address: str, reason: str) -> None:
    add_template()
    refused(
        InputError,
        rf"invalid address '.*': .*{reason}",
        send_welcome,
        context={"name": "A"},
        from_addr=address or " ",
    )  # an empty from_addr falls back to MAILER_FROM


@pytest.mark.parametrize(("address", "reason"), BAD_ADDRESSES)
def test_malformed_address_in_a_campaign_names_the_row(
    any_db: str, address: str, reason: str
) -> None:
    add_template()
    rows = [GOOD, {"email": "two@example.com", "name": "Two"}, {"email": address, "name": "X"}]
    refused(
        InputError,
        rf"^recipient 3: invalid address '.*': .*{reason}",
        campaign_welcome,
        rows,
    )


def test_malformed_sender_of_a_campaign_is_refused(sqlite_db: str) -> None:
    add_template()
    refused(
        InputError,
        "'news@example.com.': An email address cannot end with a period",
        campaign_welcome,
        [GOOD],
        from_addr="news@example.com.",
    )


def test_skip_invalid_reports_each_bad_row_and_queues_the_rest(sqlite_db: str) -> None:
    add_template()
    rows = [GOOD, {"email": "ann smith@example.com", "name": "x"}, {"email": "", "name": "y"}]
    result = enqueue.send_campaign("welcome", rows, skip_invalid=True)
    assert (result.queued, result.invalid) == (1, 2)
    assert result.rejected[0].startswith("recipient 2: invalid address 'ann smith@example.com'")
    assert result.rejected[1] == "recipient 3: invalid address '': the address is empty"


# --- CR, LF and NUL in anything that reaches a header -------------------------------------------


def nul_in_context(name: str, brk: str) -> str:
    """A NUL in a context value may also be refused before any header is rendered (PostgreSQL
    cannot store it), with its own message: the regex alternative that accepts that."""
    return f"|^the context value '{name}' contains a NUL character" if brk == "\0" else ""


BREAKS = [
    pytest.param("\r\n", id="CRLF"),
    pytest.param("\r", id="CR"),
    pytest.param("\n", id="LF"),
    pytest.param("\0", id="NUL"),
    pytest.param("\u2028", id="U+2028"),  # the email package splits lines on these too
    pytest.param("\x85", id="NEL"),
]


@pytest.mark.parametrize("brk", BREAKS)
def test_line_break_in_the_subject_through_the_context(
    any_db: str, brk: str, request: pytest.FixtureRequest
) -> None:
    add_template()
    refused(
        InputError,
        r"header 'Subject' would contain a line break or NUL .*; remove CR, LF and NUL"
        + nul_in_context("name", brk),
        send_welcome,
        context={"name": f"Ann{brk}{INJECTED}"},
    )


@pytest.mark.parametrize("brk", BREAKS)
def test_line_break_in_the_sender(sqlite_db: str, brk: str) -> None:
    add_template()
    refused(
        InputError,
        "invalid address .*: contains a line break or NUL",
        send_welcome,
        context={"name": "A"},
        from_addr=f"news@example.com{brk}{INJECTED}",
    )


@pytest.mark.parametrize("brk", BREAKS)
def test_line_break_in_a_recipient(sqlite_db: str, brk: str) -> None:
    add_template()
    refused(
        InvalidAddress,
        "invalid address .*: contains a line break or NUL",
        mailer.send,
        template="welcome",
        to=f"a@example.com{brk}{INJECTED}",
        context={"name": "A"},
    )


@pytest.mark.parametrize("brk", BREAKS)
def test_line_break_in_an_extra_header_value(sqlite_db: str, brk: str) -> None:
    add_template()
    refused(
        HeaderInjection,
        "header 'List-Unsubscribe' would contain a line break or NUL",
        send_welcome,
        context={"name": "A"},
        headers={"List-Unsubscribe": f"<https://example.com/u>{brk}{INJECTED}"},
    )


@pytest.mark.parametrize(
    "name", ["X-Tag\r\nBcc", "X-Tag\n", "X-Tag\0", "X Tag", "X-Tag:", "", "X-" + "a" * 80, 7]
)
def test_bad_header_name(sqlite_db: str, name: Any) -> None:
    add_template()
    refused(
        InputError,
        r"header name .* is not a valid field name: use 1 to 76 printable ASCII characters "
        "without spaces or ':'",
        send_welcome,
        context={"name": "A"},
        headers={name: "1"},
    )


def test_a_header_mailer_writes_itself_cannot_be_replaced(sqlite_db: str) -> None:
    add_template()
    refused(
        InputError,
        "header 'Bcc' is set by mailer; pass it as a parameter instead",
        send_welcome,
        context={"name": "A"},
        headers={"Bcc": "victim@example.com"},
    )


@pytest.mark.parametrize("brk", BREAKS)
def test_line_break_in_a_context_value_that_reaches_a_header(sqlite_db: str, brk: str) -> None:
    add_template()
    refused(
        InputError,
        "header 'List-Unsubscribe' would contain a line break or NUL"
        + nul_in_context("token", brk),
        send_welcome,
        context={"name": "A", "token": f"t1{brk}{INJECTED}"},
        headers={"List-Unsubscribe": "<https://example.com/u/{{ token }}>"},
    )


@pytest.mark.parametrize(
    ("field", "header"),
    [("name", "Subject"), ("token", "List-Unsubscribe")],
)
def test_line_break_in_a_later_campaign_row_names_the_row_and_the_header(
    any_db: str, field: str, header: str
) -> None:
    add_template()
    rows = [{**GOOD, "token": "t0"} for _ in range(3)]
    rows = [{**row, "email": f"r{i}@example.com"} for i, row in enumerate(rows)]
    rows.append({"email": "r3@example.com", "name": "R", "token": "t3", field: f"x\r\n{INJECTED}"})
    refused(
        InputError,
        rf"^recipient 4: header '{header}' would contain a line break",
        campaign_welcome,
        rows,
        headers={"List-Unsubscribe": "<https://example.com/u/{{ token }}>"},
    )


# --- RFC 2047 encoded words that decode to a new header line (CVE-2024-6923) --------------------

_B64 = base64.b64encode(f"hello\r\n{INJECTED}".encode()).decode()
ENCODED_WORDS = [
    pytest.param("=?utf-8?q?hello=0D=0ABcc:_victim@example.com?=", id="q"),
    pytest.param(f"=?utf-8?b?{_B64}?=", id="b"),
    pytest.param("=?UTF-8?Q?hello=0ABcc:_victim@example.com?=", id="Q-upper-LF"),
    pytest.param("=?utf-8?q?hello=00?=", id="NUL"),
    pytest.param(
        "News =?utf-8?q?for=0D?= =?utf-8?q?=0ABcc:_victim@example.com?= today",
        id="split-over-two-words",
    ),
    pytest.param("glued=?utf-8?q?=0ABcc:_victim@example.com?=", id="glued-to-text"),
    pytest.param("=?x-unknown?q?a=0ABcc:_victim@example.com?=", id="unknown-charset"),
    pytest.param("=?utf-8*en?q?a=0ABcc:_victim@example.com?=", id="rfc2231-language"),
    pytest.param("=?unknown-8bit?q?a=0ABcc:_victim@example.com?=", id="unknown-8bit"),
    pytest.param("=?utf-8?q?a=E2=80=A8Bcc:_victim@example.com?=", id="U+2028"),
]


@pytest.mark.parametrize("word", ENCODED_WORDS)
def test_encoded_word_decoding_to_a_new_line_in_the_subject(any_db: str, word: str) -> None:
    add_template()
    refused(
        HeaderInjection,
        "header 'Subject' would contain a line break or NUL",
        send_welcome,
        context={"name": word},
    )


@pytest.mark.parametrize("word", ENCODED_WORDS)
def test_encoded_word_decoding_to_a_new_line_in_an_extra_header(sqlite_db: str, word: str) -> None:
    add_template()
    refused(
        HeaderInjection,
        "header 'List-Unsubscribe' would contain a line break or NUL",
        send_welcome,
        context={"name": "A"},
        headers={"List-Unsubscribe": word},
    )


def test_encoded_word_in_an_address_header_is_refused(sqlite_db: str) -> None:
    add_template()
    refused(
        HeaderInjection,
        "header 'Reply-To' would contain a line break or NUL",
        send_welcome,
        context={"name": "A"},
        headers={"Reply-To": '"=?utf-8?q?x=0D=0ABcc:_v@example.com?=" <r@example.com>'},
    )


@pytest.mark.parametrize("word", ENCODED_WORDS)
def test_encoded_word_in_a_later_campaign_row(sqlite_db: str, word: str) -> None:
    add_template()
    refused(
        InputError,
        "^recipient 2: header 'Subject' would contain a line break",
        campaign_welcome,
        [GOOD, {"email": "b@example.com", "name": word}],
    )


@pytest.mark.parametrize("word", ENCODED_WORDS)
def test_compose_never_writes_a_decoded_line_break(word: str) -> None:
    """The worker's own line of defence, for rows written before these checks existed."""
    rendered = templates.Rendered(subject=word, text="hi\n", html=None)
    with pytest.raises(HeaderInjection, match="header 'Subject'"):
        compose.build(
            rendered,
            from_addr="news@example.com",
            to=["a@example.com"],
            msg_id="<1@example.com>",
            date=now(),
            headers={},
        )


# every character that some reader takes for a line break, alone and in runs
BREAKS = ["\r", "\n", "\r\n", "\n\r", "\r\r\n", "\x0b", "\x0c", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("brk", BREAKS)
@pytest.mark.parametrize("html", [None, "<p>a{brk}b</p>{brk}"])
def test_composed_messages_have_crlf_line_ends_only(brk: str, html: str | None) -> None:
    """The SMTP transport rewrites a message's line ends only where it finds a bare CR or LF,
    which a composed message must never make it do: whatever the input, compose.build must
    write no other line end, folded headers and encoded bodies included."""
    long_word = "Grüße" * 30  # folded, and RFC 2047-encoded
    rendered = templates.Rendered(
        subject=f"{long_word} x",  # a line break there is refused (the tests above)
        text=f"{brk}.dot{brk}{'z' * 1200}{brk}é{brk}{brk}end{brk}",
        html=html.format(brk=brk) if html else None,
    )
    for smtputf8 in (False, True):
        data = compose.build(
            rendered,
            from_addr="news@example.com",
            to=["a@example.com"],
            msg_id="<1@example.com>",
            date=now(),
            headers={"X-Long": long_word, "List-Unsubscribe": "<https://e.example/u/1>"},
            smtputf8=smtputf8,
        )
        assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")


def test_ordinary_encoded_words_still_go_out(sqlite_db: str) -> None:
    add_template()
    mailer.send(template="welcome", to="a@example.com", context={"name": "=?utf-8?q?Ren=C3=A9e?="})
    transport = MemoryTransport()
    deliver_chunk([d.id for d in deliveries()], transport=transport)
    assert states() == {"a@example.com": "sent"}
    head = transport.sent[0][1].split(b"\r\n\r\n")[0]
    assert b"Bcc" not in head and b"Ren" in head


# --- undefined template variables ---------------------------------------------------------------


def test_undefined_variable_is_refused_at_send(any_db: str) -> None:
    add_template(text="Your code is {{ code }}\n")
    refused(
        TemplateError,
        r"template 'welcome' v1 \(text\) failed to render: 'code' is undefined",
        send_welcome,
        context={"name": "A"},
    )


def test_undefined_variable_in_an_extra_header_is_refused_at_send(sqlite_db: str) -> None:
    add_template()
    refused(
        TemplateError,
        r"header 'List-Unsubscribe' failed to render: 'token' is undefined",
        send_welcome,
        context={"name": "A"},
        headers={"List-Unsubscribe": "<https://example.com/u/{{ token }}>"},
    )


def test_first_campaign_row_is_render_checked_at_enqueue(any_db: str) -> None:
    add_template(text="Your code is {{ code }}\n")
    rows = [GOOD, {"email": "b@example.com", "name": "B", "code": "1"}]
    refused(
        InputError,
        r"^recipient 1: template 'welcome' v1 \(text\) failed to render: 'code' is undefined",
        campaign_welcome,
        rows,
    )


def test_later_campaign_row_missing_a_subject_variable_is_refused_at_enqueue(
    sqlite_db: str,
) -> None:
    add_template()
    refused(
        InputError,
        r"^recipient 2: template 'welcome' v1 \(subject\) failed to render: "
        "'name' is undefined",
        campaign_welcome,
        [GOOD, {"email": "b@example.com"}],
    )


def test_later_campaign_row_missing_a_body_variable_fails_alone_at_delivery(any_db: str) -> None:
    add_template(text="Your code is {{ code }}\n")
    rows = [{"email": f"r{i}@example.com", "name": "R", "code": str(i)} for i in range(3)]
    del rows[2]["code"]
    enqueue.send_campaign("welcome", rows)
    transport = MemoryTransport()
    deliver_chunk([d.id for d in deliveries()], transport=transport)
    assert states() == {
        "r0@example.com": "sent",
        "r1@example.com": "sent",
        "r2@example.com": "failed",
    }
    [poisoned] = deliveries(recipient="r2@example.com")
    assert "template 'welcome' v1 (text) failed to render: 'code' is undefined" in (
        poisoned.last_reply or ""
    )
    assert [r for r, _ in transport.sent] == ["r0@example.com", "r1@example.com"]


# --- the template sandbox -----------------------------------------------------------------------

PRIVATE = "is not allowed; a template may use the context's values and their public attributes"
ESCAPES = [
    pytest.param(
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "'__subclasses__' " + PRIVATE,
        id="subclasses",
    ),
    pytest.param("{{ self.__init__.__globals__ }}", "'__globals__' " + PRIVATE, id="self-globals"),
    pytest.param(
        "{{ cycler.__init__.__globals__.os }}", "'__globals__' " + PRIVATE, id="cycler-os"
    ),
    pytest.param("{{ '{0.__class__}'.format(name) }}", "'__class__' " + PRIVATE, id="str-format"),
    pytest.param('{{ "%s" % name.__class__ }}', "'__class__' " + PRIVATE, id="percent"),
    pytest.param("{{ name['__class__'] }}", "'__class__' " + PRIVATE, id="item"),
    pytest.param("{{ name|attr('__class__') }}", "'__class__' " + PRIVATE, id="attr-filter"),
    pytest.param("{{ name._private }}", "'_private' " + PRIVATE, id="underscore"),
]


@pytest.mark.parametrize("part", ["subject", "text", "html"])
@pytest.mark.parametrize(("payload", "reason"), ESCAPES)
def test_sandbox_escape_is_refused_when_the_template_is_added(
    sqlite_db: str, part: str, payload: str, reason: str
) -> None:
    parts = {"subject": "Hi", "text": "Hello\n", "html": "<p>Hello</p>", part: payload}
    with pytest.raises(TemplateError, match=rf"template 'evil' \({part}\), line 1: {reason}"):
        add_template("evil", parts["subject"], parts["text"], parts["html"])
    assert count(Template) == 0


def test_sandbox_escape_is_refused_by_template_add_on_the_cli(
    sqlite_db: str, tmp_path: Path
) -> None:
    (tmp_path / "s.txt").write_text("Hi\n")
    (tmp_path / "t.txt").write_text("{{ cycler.__init__.__globals__.os }}\n")
    out = CliRunner().invoke(
        cli,
        [
            "template",
            "add",
            "evil",
            "--subject",
            str(tmp_path / "s.txt"),
            "--text",
            str(tmp_path / "t.txt"),
        ],
    )
    assert out.exit_code != 0
    assert f"template 'evil' (text), line 1: '__globals__' {PRIVATE}" in str(out.exception)
    assert count(Template) == 0


INTERNALS = [
    pytest.param("{{ config }}", "'config' is undefined", id="config"),
    pytest.param("{{ request }}", "'request' is undefined", id="request"),
    pytest.param("{{ self }}", "cannot print a TemplateReference object", id="self"),
    pytest.param("{{ cycler }}", "cannot print a type object", id="cycler"),
    pytest.param("{{ lipsum }}", "cannot print a function object", id="lipsum"),
    pytest.param(
        "{{ name.upper }}", "cannot print a builtin_function_or_method object", id="bound-method"
    ),
    pytest.param("{{ name|map('upper') }}", "cannot print a generator object", id="generator"),
    pytest.param("{{ [joiner] }}", "cannot print a type object", id="in-a-list"),
    pytest.param(
        "{{ 'x' * 1000000000 }}", "'\\*' would build more than 100,000 characters", id="repeat-bomb"
    ),
    pytest.param(
        "{{ 2 ** 64 ** 64 ** 64 }}", "would build a number of more than 4096 bits", id="power-bomb"
    ),
    pytest.param(
        "{% for a in range(99999) %}{% for b in range(99999) %}xxxx{% endfor %}{% endfor %}",
        "the output is over 10,485,760 characters",
        id="output-bomb",
    ),
    pytest.param(
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError", id="recursion"
    ),
]


@pytest.mark.parametrize(("payload", "reason"), INTERNALS)
def test_internals_are_never_printed_and_the_first_render_refuses(
    sqlite_db: str, payload: str, reason: str
) -> None:
    add_template(text=payload + "\n")  # compiles: the problem shows only when rendered
    refused(
        TemplateError,
        rf"template 'welcome' v1 \(text\) failed to render: .*{reason}",
        send_welcome,
        context={"name": "A"},
    )
    refused(
        InputError,
        r"^recipient 1: template 'welcome' v1 \(text\) failed to render",
        campaign_welcome,
        [GOOD],
    )


@pytest.mark.parametrize(("payload", "reason"), INTERNALS[2:6])
def test_internals_in_the_subject_are_refused(sqlite_db: str, payload: str, reason: str) -> None:
    add_template(subject=payload)
    refused(
        TemplateError,
        rf"\(subject\) failed to render: {reason}",
        send_welcome,
        context={"name": "A"},
    )


def test_a_template_stored_before_these_checks_fails_its_deliveries_and_sends_nothing(
    any_db: str,
) -> None:
    add_template()
    mailer.send(template="welcome", to="a@example.com", context={"name": "A"})
    with db.session_scope() as session:  # as if the template had been stored by an older mailer
        session.execute(update(Template).values(text="{{ ''.__class__.__mro__ }}"))
    transport = MemoryTransport()
    deliver_chunk([d.id for d in deliveries()], transport=transport)
    assert transport.sent == []
    [failed] = deliveries()
    assert failed.state.value == "failed"
    assert f"'__mro__' {PRIVATE}" in (failed.last_reply or "")


def test_a_subject_template_of_two_lines_is_refused(sqlite_db: str) -> None:
    with pytest.raises(TemplateError, match="template 'two': the subject must be one line"):
        add_template("two", subject="Hello\nBcc: {{ email }}")


@pytest.mark.parametrize("part", ["name", "subject", "text", "html"])
def test_a_nul_in_a_template_is_refused_when_it_is_added(any_db: str, part: str) -> None:
    parts = {"name": "news", "subject": "Hi", "text": "Hello\n", "html": "<p>Hello</p>"}
    parts[part] = parts[part][:2] + "\0" + parts[part][2:]
    with pytest.raises(TemplateError, match=rf"the {part} contains a NUL character"):
        add_template(parts["name"], parts["subject"], parts["text"], parts["html"])
    assert count(Template) == 0


def test_ordinary_templates_still_render(sqlite_db: str) -> None:
    add_template(
        subject="{{ name|upper }} {{ '%s-%d'|format('n', 2) }} {{ '{} {}'.format('a', 1) }}",
        text="{% for i in items %}{{ loop.index }}:{{ i }} {% endfor %}{{ items }} {{ 2 ** 10 }}"
        " {{ '-' * 3 }} {{ none }} {{ 1.5 }}\n",
        html="<p>{{ name }}</p>",
    )
    mailer.send(template="welcome", to="a@example.com", context={"name": "<b>", "items": [1, 2]})
    transport = MemoryTransport()
    deliver_chunk([d.id for d in deliveries()], transport=transport)
    data = transport.sent[0][1].decode()
    assert "Subject: <B> n-2 a 1" in data
    assert "1:1 2:2 [1, 2] 1024 --- None 1.5" in data
    assert "<p>&lt;b&gt;</p>" in data


# --- a context of several megabytes -------------------------------------------------------------

SIZE = r"the context is \d+ KiB; the limit is 256 KiB \(store large data elsewhere"


def test_a_context_of_several_megabytes_is_refused_by_send(any_db: str) -> None:
    add_template()
    refused(
        InputError,
        SIZE,
        send_welcome,
        context={"name": "A", "blob": "x" * 3_000_000},
    )


def test_a_campaign_context_of_several_megabytes_is_refused(sqlite_db: str) -> None:
    add_template()
    refused(
        InputError,
        SIZE,
        campaign_welcome,
        [GOOD],
        context={"blob": "x" * 3_000_000},
    )


def test_a_campaign_row_of_several_megabytes_is_refused(sqlite_db: str) -> None:
    add_template()
    rows = [GOOD, {"email": "b@example.com", "name": "B", "blob": "x" * 3_000_000}]
    refused(InputError, "^recipient 2: " + SIZE, enqueue.send_campaign, "welcome", rows)


# --- recipient files ----------------------------------------------------------------------------

FILES = [
    pytest.param(
        "r.csv",
        b"email,name\nann@example.com,Ren\xe9e\n",
        r"r.csv, line 2: not UTF-8 \(byte 0xe9 at column 20\); save the file as UTF-8",
        id="latin-1",
    ),
    pytest.param(
        "r.csv",
        b"mail,name\nann@example.com,Ann\n",
        r"r.csv: no 'email' column in the header \(mail, name\); name the column "
        "holding the addresses 'email'",
        id="no-email-column",
    ),
    pytest.param(
        "r.csv",
        b"",
        "r.csv: the file is empty; it needs a header line with an 'email' column",
        id="empty",
    ),
    pytest.param(
        "r.csv",
        b"email,name\n",
        "r.csv: no recipients in the file; add one line per recipient",
        id="header-only",
    ),
    pytest.param(
        "r.csv",
        b"email,name\nann@example.com,Ann\nbob@example.com,Smith, Bob\n",
        "r.csv, line 3: 3 fields, the header has 2; quote fields that contain a comma",
        id="extra-field",
    ),
    pytest.param(
        "r.csv",
        b"email,name,email\nann@example.com,Ann,x\n",
        "r.csv: the header names email more than once",
        id="repeated-column",
    ),
    pytest.param(
        "r.txt",
        b"email\nann@example.com\n",
        r"r.txt: recipients must be a .csv file \(with an 'email' column\) or a .jsonl "
        r"file \(one JSON object per line\), not .txt; rename the file",
        id="txt",
    ),
    pytest.param(
        "r.jsonl",
        b'{"email": "ann@example.com"}\n["bob@example.com"]\n',
        'r.jsonl, line 2: each line must be a JSON object with an "email" string, '
        'such as {"email": "ann@example.com", "name": "Ann"}',
        id="jsonl-array",
    ),
    pytest.param(
        "r.jsonl",
        b'{"email": "ann@example.com"}\n{"mail": "bob@example.com"}\n',
        'r.jsonl, line 2: each line must be a JSON object with an "email" string',
        id="jsonl-no-email",
    ),
    pytest.param(
        "r.jsonl",
        b'{"email": "ann@example.com"}\n{"email": \n',
        "r.jsonl, line 2: not JSON: Expecting value",
        id="jsonl-broken",
    ),
    pytest.param("r.jsonl", b"\n\n", "r.jsonl: no recipients in the file", id="jsonl-blank"),
    pytest.param(
        "r.jsonl",
        b"[" * 100_000 + b"\n",
        "r.jsonl, line 1: JSON nested too deeply",
        id="jsonl-deep",
    ),
]


@pytest.mark.parametrize(("name", "content", "message"), FILES)
def test_bad_recipient_file_is_refused_by_read(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=message.replace("{", r"\{").replace("}", r"\}")):
        list(recipients.read(path))


@pytest.mark.parametrize(("name", "content", "message"), FILES)
def test_bad_recipient_file_is_refused_by_the_cli_and_writes_nothing(
    sqlite_db: str, tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    add_template()
    path = tmp_path / name
    path.write_bytes(content)
    out = CliRunner().invoke(
        cli, ["campaign", "send", "--template", "welcome", "--recipients", str(path)]
    )
    assert out.exit_code == 1
    assert isinstance(out.exception, InputError)
    assert message.replace("\\", "") in str(out.exception)
    assert nothing_written()
    good = tmp_path / "good.csv"
    good.write_text("email,name\nann@example.com,Ann\n")
    out = CliRunner().invoke(
        cli, ["campaign", "send", "--template", "welcome", "--recipients", str(good)]
    )
    assert out.exit_code == 0, out.output
    assert count(Delivery) == 1


def test_a_bad_file_is_one_line_on_stderr(sqlite_db: str, tmp_path: Path) -> None:
    add_template()
    path = tmp_path / "r.csv"
    path.write_bytes(b"email,name\nann@example.com,Ann\nbob@example.com,Ren\xe9e\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mailer",
            "campaign",
            "send",
            "--template",
            "welcome",
            "--recipients",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {path}, line 3: not UTF-8 (byte 0xe9 at column 20); save the file as UTF-8"
    ]
    assert nothing_written()


def test_a_bad_address_in_a_file_names_its_line(sqlite_db: str, tmp_path: Path) -> None:
    add_template()
    path = tmp_path / "r.csv"
    path.write_text("email,name\nann@example.com,Ann\nbob@example.com.,Bob\n")
    out = CliRunner().invoke(
        cli, ["campaign", "send", "--template", "welcome", "--recipients", str(path)]
    )
    assert out.exit_code == 1
    assert str(out.exception) == (
        "recipient 3: invalid address 'bob@example.com.': An email address cannot end with a "
        "period."
    )
    assert nothing_written()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_repeated_address_is_sent_once_and_reported(
    sqlite_db: str, tmp_path: Path, suffix: str
) -> None:
    add_template()
    rows = [
        {"email": e, "name": "N"}
        for e in ["ann@example.com", "ann@EXAMPLE.COM", " ann@Example.com ", "bob@example.com"]
    ]
    path = tmp_path / f"r{suffix}"
    if suffix == ".csv":
        path.write_text("email,name\n" + "".join(f"{r['email']},N\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = CliRunner().invoke(
        cli, ["campaign", "send", "--template", "welcome", "--recipients", str(path)]
    )
    assert out.exit_code == 0, out.output
    assert "2 queued" in out.stderr and "2 duplicates dropped" in out.stderr
    assert sorted(d.recipient for d in deliveries()) == ["ann@example.com", "bob@example.com"]
    deliver_chunk([d.id for d in deliveries()], transport=(transport := MemoryTransport()))
    assert sorted(r for r, _ in transport.sent) == ["ann@example.com", "bob@example.com"]


# --- gaps that need enqueue.py (expected to pass once it changes) -------------------------------


def test_nul_in_a_body_only_context_value_is_refused(any_db: str) -> None:
    add_template(text="Hi {{ name }}: {{ note }}\n")
    refused(
        InputError,
        "the context value 'note' contains a NUL character",
        send_welcome,
        context={"name": "A", "note": "x\0y"},
    )


def test_nul_in_a_campaign_row_is_refused(any_db: str) -> None:
    add_template(text="Hi {{ name }}: {{ note }}\n")
    rows = [{**GOOD, "note": "x"}, {"email": "b@example.com", "name": "B", "note": "x\0y"}]
    refused(
        InputError,
        "^recipient 2: the context value 'note' contains a NUL character",
        campaign_welcome,
        rows,
    )


def test_a_campaign_row_that_is_not_json_is_refused(sqlite_db: str) -> None:
    add_template()
    rows = [GOOD, {"email": "b@example.com", "name": "B", "tags": {"a", "b"}}]
    refused(
        InputError,
        "^recipient 2: the context must be JSON: Object of type set",
        campaign_welcome,
        rows,
    )


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_a_number_json_cannot_hold_is_refused_not_stored_as_null(
    any_db: str, number: float
) -> None:
    add_template()
    rows = [GOOD, {"email": "b@example.com", "name": "B", "score": number}]
    refused(
        InputError,
        "^recipient 2: the context must be JSON: Out of range float values",
        campaign_welcome,
        rows,
    )


def test_the_text_of_an_escape_is_not_a_nul_and_keys_need_not_be_strings(any_db: str) -> None:
    # "\\u0000" written out (a code sample) is six characters, not a NUL; a key that is not
    # a string is stored as JSON stores it, whatever the types of the values
    add_template()
    rows = [
        {"email": "a@example.com", "name": "A", "sample": "printf('\\u0000')"},
        {"email": "b@example.com", "name": "B", 1: "one"},
    ]
    assert campaign_welcome(rows).queued == 2
    contexts = {d.recipient: d.context for d in deliveries()}
    assert contexts["a@example.com"]["sample"] == "printf('\\u0000')"
    assert contexts["b@example.com"]["1"] == "one"
    with pytest.raises(InputError, match="the context value 'deep' contains a NUL"):
        campaign_welcome([{"email": "c@example.com", "name": "C", "deep": {"x": ["a\0b"]}}])


@pytest.mark.parametrize("call", ["idempotency_key", "campaign_name"])
def test_nul_in_an_idempotency_key_or_a_campaign_name_is_refused(any_db: str, call: str) -> None:
    add_template()
    if call == "idempotency_key":
        refused(
            InputError,
            "the idempotency_key contains a NUL character",
            send_welcome,
            context={"name": "A"},
            idempotency_key="signup\0-1",
        )
    else:
        refused(
            InputError,
            "the campaign name contains a NUL character",
            campaign_welcome,
            [GOOD],
            name="news\0letter",
        )


def test_a_header_with_a_lone_surrogate_is_read_back_and_sent(sqlite_db: str) -> None:
    # SQLite keeps the header JSON as written, the lone surrogate as an escape that orjson
    # refuses to read: db._json_loads falls back to the json module, or the claim of the whole
    # chunk would fail, again on every republication
    add_template()
    mailer.send(
        template="welcome", to="a@example.com", context={"name": "A"}, headers={"X-Tag": "a\udc80b"}
    )
    with db.session_scope() as session:
        [message] = session.query(Message).all()
        assert message.headers == {"X-Tag": "a\udc80b"}
    deliver_chunk([d.id for d in deliveries()], transport=MemoryTransport())
    assert states() == {"a@example.com": "sent"}
