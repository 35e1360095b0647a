"""The fill fast path against the sandboxed Jinja2 path: random templates and values."""

from __future__ import annotations

import enum
import random
from typing import Any

import jinja2
import markupsafe
import pytest

from mailer import sandbox, templates
from mailer.errors import TemplateError
from mailer.fill import Fill, Unplain

# names a template may use: ordinary ones, one never in the context, a global (range), and
# names Jinja2 treats specially elsewhere (self, loop, caller, kwargs, varargs)
NAMES = ["a", "b", "name", "missing", "range", "self", "loop", "caller", "kwargs", "varargs"]
TEXT = ["", "x", "Hi ", " ", "<", ">", "&", '"', "'", "\n", "\r\n", "é", "😀", "}", "{", "%", "\0"]
NAME_FORMS = ["{{ %s }}", "{{%s}}", "{{- %s }}", "{{ %s -}}", "{{  %s  }}"]


class Colour(enum.IntEnum):
    RED = 1


class Text(str):
    pass


VALUES: list[Any] = [
    "plain",
    "",
    "<b>Tom & 'Jerry' \"x\"</b>",
    "Zoë 😀 \u202e",
    "a\r\nb\0",
    "{{ a }}",
    0,
    -7,
    2**100,
    10**5000,  # too long to print: Jinja2's ValueError
    1.5,
    -0.0,
    float("nan"),
    float("inf"),
    1e300,
    True,
    None,
    [],
    ["a", "<"],
    {"k": "<v>"},
    ("t", 1),
    markupsafe.Markup("<i>safe</i>"),
    Text("<sub>"),
    Colour.RED,
    print,
    object(),
    b"bytes",
]


def random_source(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(0, 6)):
        if rng.random() < 0.5:
            pieces.append(rng.choice(TEXT))
        else:
            pieces.append(rng.choice(NAME_FORMS) % rng.choice(NAMES))
    if rng.random() < 0.3:
        pieces.append("\n")
    return "".join(pieces)


def random_context(rng: random.Random) -> dict[str, Any]:
    names = rng.sample(NAMES, rng.randint(0, len(NAMES)))
    return {name: rng.choice(VALUES) for name in names if name != "missing"}


def jinja(part: templates.Part, context: dict[str, Any]) -> tuple[str, Any]:
    """The sandboxed Jinja2 path alone: ("ok", its output) or ("error", the error's class)."""
    try:
        return "ok", sandbox.render(part.template, context, part.what)
    except TemplateError as exc:
        return "error", type(exc)


def fast(part: templates.Part, context: dict[str, Any]) -> tuple[str, Any]:
    """The fast path as a part renders: the fill, or Jinja2 where the fill leaves it."""
    try:
        return "ok", part.render(context)
    except TemplateError as exc:
        return "error", type(exc)


@pytest.mark.parametrize("env", [sandbox.PLAIN, sandbox.HTML], ids=["plain", "html"])
@pytest.mark.parametrize("seed", range(2))
def test_the_fill_gives_what_jinja2_gives(env: jinja2.Environment, seed: int) -> None:
    rng = random.Random(seed)
    filled = fillable = 0
    for _ in range(2000):
        source = random_source(rng)
        try:
            part = templates.compile_part(env, source, "t")
        except TemplateError:
            continue  # e.g. "{" and "%" met: a syntax error on both paths
        fillable += part.fill is not None
        for _ in range(3):
            context = random_context(rng)
            if part.fill is not None:
                try:
                    out = part.fill.fill(context)
                except Unplain:
                    pass  # left to Jinja2: whatever it gives is the answer
                else:
                    filled += 1
                    assert jinja(part, context) == ("ok", out), (source, context)
            assert fast(part, context) == jinja(part, context), (source, context)
    # the random templates reach the fast path, and it fills a fair share of them
    assert fillable > 500 and filled > 300, (fillable, filled)


@pytest.mark.parametrize("env", [sandbox.PLAIN, sandbox.HTML], ids=["plain", "html"])
def test_the_fill_and_jinja2_agree_at_the_output_limit(env: jinja2.Environment) -> None:
    part = templates.compile_part(env, "<{{ a }}{{ b }}>", "t")
    assert part.fill is not None
    limit = sandbox.MAX_OUTPUT
    for a, b in [("x" * (limit - 3), "y"), ("x" * (limit - 2), "y"), ("&" * (limit // 5), "")]:
        context = {"a": a, "b": b}
        assert fast(part, context) == jinja(part, context)


def test_fill_of_takes_text_and_names_only() -> None:
    for source in ["Hi {{ a }}", "{{ a }}{{ b }}", "plain", ""]:
        assert Fill.of(sandbox.PLAIN, sandbox.PLAIN.parse(source)) is not None
    for source in ["{{ a|e }}", "{{ a.b }}", "{{ 'x' }}", "{% if a %}{% endif %}", "{{ self }}"]:
        assert Fill.of(sandbox.PLAIN, sandbox.PLAIN.parse(source)) is None
