"""One-pass rendering of a message's parts gives what rendering them one by one gives."""

from __future__ import annotations

from typing import Any

import pytest

from mailer import templates
from mailer.errors import TemplateError

CONTEXT: dict[str, Any] = {"name": '<b>Tom & "Jerry"</b>', "items": ["a", "b"], "n": 3}


def apart(
    compiled: templates.Compiled, headers: dict[str, str], context: dict[str, Any]
) -> tuple[templates.Rendered, dict[str, str]]:
    return compiled.render(context), templates.render_headers(headers, context)


@pytest.mark.parametrize(
    ("subject", "text", "html", "headers"),
    [
        # text as it is, HTML escaped; the HTML's one trailing newline dropped, the text's kept
        ("Hi {{ name }}", "Hello {{ name }}\n", "<p>{{ name }}</p>\n", {}),
        ("Hi", "no html\n", None, {"X-Name": "{{ name }}", "List-Id": "<{{ n }}.example.com>"}),
        # a `set` in one part is not seen by the next
        ("{% set name = 'S' %}{{ name }}", "{{ name }}\n", "{{ name }}", {"X-A": "{{ name }}"}),
        ("{{ items|join(',') }}", "{% for i in items %}{{ i }}{% endfor %}\n", "{{ n * 2 }}", {}),
        ("{{ name|safe }}", "{{ name|e }}", "{{ name|safe }}{{ name }}", {}),
        # a block name in two parts cannot be one template: rendered apart
        ("x", "{% block b %}t{% endblock %}", "{% block b %}h{% endblock %}", {}),
        # a part printing the separator: rendered apart
        ("x{{ '\\x00' }}y", "t\n", None, {}),
    ],
)
def test_one_pass_renders_what_the_parts_render_apart(
    subject: str, text: str, html: str | None, headers: dict[str, str]
) -> None:
    compiled = templates.compile_parts("t", subject, text, html)
    assert templates.render_message(compiled, headers, CONTEXT) == apart(compiled, headers, CONTEXT)


def test_a_set_in_one_part_does_not_leak_into_the_next() -> None:
    compiled = templates.compile_parts("t", "{% set name = 'S' %}{{ name }}", "{{ name }}", None)
    rendered, _ = templates.render_message(compiled, {}, {"name": "N"})
    assert (rendered.subject, rendered.text) == ("S", "N")


def test_html_is_escaped_and_text_is_not_in_one_pass() -> None:
    compiled = templates.compile_parts("t", "{{ name }}", "{{ name }}", "{{ name }}")
    rendered, _ = templates.render_message(compiled, {}, {"name": "<&>"})
    assert rendered == templates.Rendered("<&>", "<&>", "&lt;&amp;&gt;")


@pytest.mark.parametrize(
    ("html", "headers", "part"),
    [
        ("{{ missing }}", {}, r"\(html\).*missing"),
        ("ok", {"X-A": "{{ missing }}"}, "header 'X-A'.*missing"),
        # over MAX_OUTPUT (10 MiB of characters) in one part
        ("{% for i in range(110) %}{{ 'x' * 100000 }}{% endfor %}", {}, r"\(html\).*over"),
    ],
)
def test_a_failure_in_one_pass_names_its_part(
    html: str, headers: dict[str, str], part: str
) -> None:
    compiled = templates.compile_parts("t", "s", "t", html)
    with pytest.raises(TemplateError, match=part):
        templates.render_message(compiled, headers, {})
