"""The Jinja2 sandbox templates render in: its environments, limits, parsing and rendering.

Subject and text render without escaping; HTML autoescapes. Every undefined variable is an
error (StrictUndefined), and the immutable sandbox refuses attribute walks such as
`''.__class__` and unsafe `str.format` calls. On top of the sandbox: a template naming a
private attribute (`_x`, `'__class__'` in a string) is refused when it is parsed; only plain
data may be printed (never the repr of a function, class or the template object); `*` and
`**` cannot build values big enough to take a worker's memory or CPU; and a part's output
stops at MAX_OUTPUT as it grows, before a value printed many times is built whole.
"""

from __future__ import annotations

import re
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailer.errors import TemplateError

MAX_OUTPUT = 10 * 2**20  # characters one part may render to: more cannot be mail
MAX_REPEAT = 100_000  # characters or items one `*` may build
MAX_BITS = 4096  # the size of a number one `*` or `**` may build
_DUNDER = re.compile(r"__\w*")
# what `{{ }}` may print as it is; Undefined too, so that StrictUndefined says what is missing
_PLAIN = (str, int, float, type(None), jinja2.Undefined)


def _printable(value: Any) -> Any:
    """Jinja's finalize: what `{{ }}` prints must be data, never an object's repr."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple) and all(_printable(v) is v for v in value):
        return value
    if isinstance(value, dict) and all(_printable(v) is v for v in (*value, *value.values())):
        return value
    raise SecurityError(
        f"cannot print a {type(value).__name__} object; print text, numbers, lists or dicts"
    )


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_size(operator, left, right)
        return super().call_binop(context, operator, left, right)


def _check_size(operator: str, left: Any, right: Any) -> None:
    """Refuse a `*` or `**` whose result would take a worker's memory or CPU."""
    if isinstance(left, int) and isinstance(right, int):
        bits = abs(left).bit_length()
        bits = bits * right if operator == "**" else bits + abs(right).bit_length()
        if bits > MAX_BITS:
            raise SecurityError(f"'{operator}' would build a number of more than {MAX_BITS} bits")
        return
    for seq, times in ((left, right), (right, left)):
        repeats = isinstance(seq, str | list | tuple) and isinstance(times, int)
        if repeats and len(seq) * times > MAX_REPEAT:
            raise SecurityError(f"'*' would build more than {MAX_REPEAT:,} characters or items")


PLAIN = _Sandbox(
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
    finalize=_printable,
)
HTML = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=True, finalize=_printable)


def parse(env: jinja2.Environment, source: str, what: str) -> nodes.Template:
    """The template's syntax tree, or TemplateError naming `what` and the line: a syntax
    error, or a private name."""
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{what}, line {exc.lineno}: {exc.message}") from None
    for node in tree.find_all((nodes.Getattr, nodes.Const)):
        name = _private_name(node)
        if name is not None:
            raise TemplateError(
                f"{what}, line {node.lineno}: {name!r} is not allowed; a template may use the "
                "context's values and their public attributes, never names starting with '_'"
            )
    return tree


def _private_name(node: nodes.Node) -> str | None:
    if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
        return node.attr
    if isinstance(node, nodes.Const) and isinstance(node.value, str):
        found = _DUNDER.search(node.value)  # x['__class__'], '{0.__class__}'.format(x), attr()
        return found.group() if found else None
    return None


def template(env: jinja2.Environment, tree: nodes.Template) -> jinja2.Template:
    """The parsed template, compiled."""
    made = env.from_string(tree)
    # Jinja2 keeps a template's globals as a ChainMap over the environment's, so that later
    # changes to those show through; ours never change, and copying a ChainMap into every
    # render's context costs more than the render itself
    made.globals = dict(made.globals)
    return made


def render(template: jinja2.Template, context: dict[str, Any], what: str) -> str:
    """The template rendered, or TemplateError naming `what`; the output is counted as it
    grows and refused past MAX_OUTPUT."""
    parts: list[str] = []
    size = 0
    try:
        # the compiled template's own render function, as Template.render calls it: its
        # generate() would copy the context once more and pass every piece through a
        # generator of its own
        for part in template.root_render_func(template.new_context(context)):
            size += len(part)
            if size > MAX_OUTPUT:
                raise TemplateError(
                    f"{what} failed to render: the output is over {MAX_OUTPUT:,} characters"
                )
            parts.append(part)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{what} failed to render: {exc}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, RecursionError) as exc:
        raise TemplateError(f"{what} failed to render: {type(exc).__name__}: {exc}") from None
    return "".join(parts)
