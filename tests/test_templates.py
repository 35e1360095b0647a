"""A message's parts render as Jinja2 renders each of them, the fill fast path included."""

from __future__ import annotations

import tracemalloc
from typing import Any

import markupsafe
import pytest

from mailer import sandbox, templates
from mailer.errors import TemplateError

CONTEXT: dict[str, Any] = {"name": '<b>Tom & "Jerry"</b>', "items": ["a", "b"], "n": 3}


def jinja(part: templates.Part, context: dict[str, Any]) -> str:
    return sandbox.render(part.template, context, part.what)


def apart(
    compiled: templates.Compiled, headers: dict[str, str], context: dict[str, Any]
) -> tuple[templates.Rendered, dict[str, str]]:
    """What Jinja2 itself renders: each part, and every header, through its template."""
    rendered = {
        name: jinja(templates.compile_part(sandbox.PLAIN, value, f"header {name!r}"), context)
        for name, value in headers.items()
    }
    html = compiled.html
    parts = templates.Rendered(
        jinja(compiled.subject, context),
        jinja(compiled.text, context),
        jinja(html, context) if html is not None else None,
    )
    return parts, rendered


def one_pass(
    compiled: templates.Compiled, headers: dict[str, str], context: dict[str, Any]
) -> tuple[templates.Rendered, dict[str, str]]:
    """The message as the worker renders it (delivery._compose)."""
    return compiled.render(context), templates.render_headers(headers, context)


def parts(compiled: templates.Compiled) -> list[templates.Part]:
    return [p for p in (compiled.subject, compiled.text, compiled.html) if p is not None]


def fillable(compiled: templates.Compiled) -> bool:
    """Every part is only text and names (each is tried by the fill fast path first)."""
    return all(p.fill is not None for p in parts(compiled))


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
        ("s", "{% autoescape true %}{{ name }}{% endautoescape %}", "{{ name|forceescape }}", {}),
        ("s", "t", "{% autoescape false %}{{ name }}{% endautoescape %}{{ name }}", {}),
        ("{% macro m(x) %}<{{ x }}>{% endmacro %}{{ m(n) }}", "t", "{{ name|urlize }}", {}),
    ],
)
def test_a_message_renders_what_jinja2_renders_for_each_part(
    subject: str, text: str, html: str | None, headers: dict[str, str]
) -> None:
    compiled = templates.compile_parts("t", subject, text, html)
    assert one_pass(compiled, headers, CONTEXT) == apart(compiled, headers, CONTEXT)


@pytest.mark.parametrize(
    ("subject", "text", "html", "headers"),
    [
        # Jinja2 compiles a block apart from the template, with the environment's escaping
        # and its own names
        ("s", "t", "{% block b %}{{ name }}{% endblock %}", {}),
        ("{% set name = 'S' %}{% block s %}{{ name }}{% endblock %}", "t", None, {}),
        ("x", "{% block b %}t{% endblock %}", "{% block b %}h{% endblock %}", {}),
        ("s", "t", "{{ name }}", {"X-A": "{% block h %}{{ name }}{% endblock %}"}),
        # a part printing a NUL
        ("x{{ '\\x00' }}y", "t\n", None, {}),
    ],
)
def test_parts_with_blocks_render_as_jinja2_renders_them(
    subject: str, text: str, html: str | None, headers: dict[str, str]
) -> None:
    compiled = templates.compile_parts("t", subject, text, html)
    assert one_pass(compiled, headers, CONTEXT) == apart(compiled, headers, CONTEXT)


def test_a_block_in_the_html_is_escaped() -> None:
    compiled = templates.compile_parts("s", "t", "t", "{% block b %}{{ name }}{% endblock %}")
    rendered, _ = one_pass(compiled, {}, {"name": "<b>"})
    assert rendered.html == "&lt;b&gt;"


def test_a_set_in_one_part_does_not_leak_into_the_next() -> None:
    compiled = templates.compile_parts("t", "{% set name = 'S' %}{{ name }}", "{{ name }}", None)
    rendered, _ = one_pass(compiled, {}, {"name": "N"})
    assert (rendered.subject, rendered.text) == ("S", "N")


def test_html_is_escaped_and_text_is_not_in_one_pass() -> None:
    compiled = templates.compile_parts("t", "{{ name }}", "{{ name }}", "{{ name }}")
    rendered, _ = one_pass(compiled, {}, {"name": "<&>"})
    assert rendered == templates.Rendered("<&>", "<&>", "&lt;&amp;&gt;")


def test_headers_made_for_one_message_compile_only_themselves(monkeypatch) -> None:
    # a request id in a header makes every message's headers new: only they are compiled for
    # it, never the whole message again, and the cache of header templates stays bounded
    compiled = templates.compile_parts("t", "s", "t", "<p>{{ name }}</p>")
    built: list[int] = []
    template = sandbox.template

    def counted(*args: Any) -> Any:
        built.append(1)
        return template(*args)

    monkeypatch.setattr(sandbox, "template", counted)
    for i in range(1100):
        headers = {"X-Request-ID": f"r{i}"}
        rendered = one_pass(compiled, headers, CONTEXT)
        with monkeypatch.context() as uncounted:  # Jinja2's own rendering, to compare
            uncounted.setattr(sandbox, "template", template)
            assert rendered == apart(compiled, headers, CONTEXT)
    assert len(built) == 1100  # one header template a message, nothing more
    assert templates._header_parts.cache_info().maxsize is not None  # a bounded cache


@pytest.mark.parametrize(
    ("html", "headers", "part"),
    [
        ("{{ missing }}", {}, r"\(html\).*missing"),
        ("ok", {"X-A": "{{ missing }}"}, "header 'X-A'.*missing"),
        # over MAX_OUTPUT (10 MiB of characters) in one part
        ("{% for i in range(110) %}{{ 'x' * 100000 }}{% endfor %}", {}, r"\(html\).*over"),
    ],
)
def test_a_failure_names_its_part(html: str, headers: dict[str, str], part: str) -> None:
    compiled = templates.compile_parts("t", "s", "t", html)
    with pytest.raises(TemplateError, match=part):
        one_pass(compiled, headers, {})


@pytest.mark.parametrize("value", ["a\0b", "\0", "\0\0"])
def test_a_nul_in_the_output_renders_as_jinja2_renders_it(value: str) -> None:
    for html in (None, "<p>{{ name }}</p>"):
        compiled = templates.compile_parts("t", "s {{ name }}", "{{ name }}\n", html)
        context = {**CONTEXT, "name": value}
        assert one_pass(compiled, {}, context) == apart(compiled, {}, context)


# --- templates of text and names only, rendered by the fill fast path (mailer/fill.py) -----

FILLABLE = ("Hi {{ name }}!", "Hello {{ name }},\n\nissue {{ n }}\n\n", "<p>{{ name }}</p>\n")


@pytest.mark.parametrize(
    "value",
    [
        'Tom & "Jerry" <b>',  # escaped in the HTML only
        "Zoë 😀 \u202e",
        "",
        "'&#39;",
        7,
        -2.5,
        # values Jinja2 prints its own way: each goes to Jinja2, whatever it gives
        None,
        True,
        ["a", "<b>"],
        {"k": "v"},
        markupsafe.Markup("<i>safe</i>"),
    ],
)
def test_text_and_names_render_as_jinja2_renders_them(value: Any) -> None:
    compiled = templates.compile_parts("t", *FILLABLE)
    assert fillable(compiled)
    headers = {"List-Unsubscribe": "<https://example.com/u/{{ name }}>"}
    context = {"name": value, "n": 42}
    assert one_pass(compiled, headers, context) == apart(compiled, headers, context)


@pytest.mark.parametrize(
    ("subject", "text", "html"),
    [
        ("{{ name|upper }}", "t", None),  # a filter
        ("s", "{% if n %}{{ name }}{% endif %}", None),  # a statement
        ("s", "t", "{{ user.name }}"),  # an attribute
        ("s", "t", "{{ 'x' }}"),  # a constant
    ],
)
def test_anything_more_than_text_and_names_is_left_to_jinja2(
    subject: str, text: str, html: str | None
) -> None:
    compiled = templates.compile_parts("t", subject, text, html)
    assert not fillable(compiled)
    context = {"name": "<b>", "n": 1, "user": {"name": "<u>"}}
    assert one_pass(compiled, {}, context) == apart(compiled, {}, context)


@pytest.mark.parametrize(
    ("context", "error"),
    [
        ({"n": 1}, r"\(subject\).*'name' is undefined"),  # StrictUndefined's own error
        ({"name": "x", "n": print}, r"\(text\).*cannot print a builtin_function_or_method"),
    ],
)
def test_a_fill_that_cannot_go_on_fails_as_jinja2_does(context: dict[str, Any], error: str) -> None:
    compiled = templates.compile_parts("t", *FILLABLE)
    with pytest.raises(TemplateError, match=error):
        compiled.render(context)


def test_a_global_name_is_not_printed() -> None:
    compiled = templates.compile_parts("t", "{{ range }}", "t", None)
    assert fillable(compiled)
    with pytest.raises(TemplateError, match=r"\(subject\).*cannot print a function"):
        compiled.render({})


def test_a_fill_over_the_output_limit_fails_as_jinja2_does() -> None:
    compiled = templates.compile_parts("t", "s", "{{ name }}{{ name }}", None)
    assert fillable(compiled)
    half = sandbox.MAX_OUTPUT // 2
    assert len(compiled.render({"name": "x" * half}).text) == sandbox.MAX_OUTPUT
    with pytest.raises(TemplateError, match=r"\(text\).*over"):
        compiled.render({"name": "x" * (half + 1)})


def test_a_fill_stops_at_the_output_limit_as_it_grows() -> None:
    # a value printed a thousand times: the limit is reached after a few, and nothing more is
    # built (built whole first, this took gigabytes)
    compiled = templates.compile_parts("t", "s", "t", "<p>{{ a }}</p>" * 1000)
    assert fillable(compiled)
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError, match=r"\(html\).*over"):
            compiled.render({"a": "<" * 250_000})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20


def test_self_is_the_template_whatever_the_context_holds() -> None:
    # Jinja2 binds `self` to a TemplateReference, which the finalize refuses to print
    compiled = templates.compile_parts("t", "Hi {{ self }}", "t", None)
    assert compiled.subject.fill is None
    with pytest.raises(TemplateError, match="cannot print a TemplateReference"):
        compiled.render({"self": "Bob"})
    with pytest.raises(TemplateError, match="cannot print a TemplateReference"):
        templates.render_headers({"X-A": "{{ self }}"}, {"self": "Bob"})


def test_an_integer_too_long_to_print_fails_as_a_template_error() -> None:
    compiled = templates.compile_parts("t", "s", "{{ n }}", None)
    with pytest.raises(TemplateError, match=r"\(text\).*ValueError"):
        compiled.render({"n": 10**5000})
    with pytest.raises(TemplateError, match="ValueError"):
        templates.render_headers({"X-A": "{{ n }}"}, {"n": 10**5000})
