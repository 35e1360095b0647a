"""Templates: store versions, compile once per process in the Jinja2 sandbox, render.

Subject and text render without escaping; HTML autoescapes. Every undefined variable is an
error (StrictUndefined), and the immutable sandbox refuses attribute walks such as
`''.__class__` and unsafe `str.format` calls. On top of the sandbox: a template naming a
private attribute (`_x`, `'__class__'` in a string) is refused when it is added; only plain
data may be printed (never the repr of a function, class or the template object); and `*` and
`**` cannot build values big enough to take a worker's memory or CPU.

A template that is only text and `{{ name }}` (most newsletters) is rendered by filling in
the names (`_Fill`), as its compiled code would, without Jinja2's per-render machinery; any
value that is not plainly printed goes back to Jinja2, which renders it or says what is wrong.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import jinja2
import jinja2.meta
import markupsafe
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailer import clock
from mailer.errors import NotFound, TemplateError
from mailer.models import Template

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


_plain = _Sandbox(
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
    finalize=_printable,
)
_html = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=True, finalize=_printable)


class Rendered(NamedTuple):  # a tuple: made once a message, where a dataclass cost 1 us
    subject: str
    text: str
    html: str | None


@dataclass(frozen=True)
class Compiled:
    label: str
    subject: jinja2.Template
    text: jinja2.Template
    html: jinja2.Template | None
    # the three parts as one template (see _joined), or None where they cannot be joined
    whole: jinja2.Template | None
    # the three parts as text and names only (see _Fill), or None where one has more
    filled: tuple[_Fill, _Fill, _Fill | None] | None = None

    def render_subject(self, context: dict[str, Any]) -> str:
        return _render(self.subject, context, f"template {self.label} (subject)")

    def render(self, context: dict[str, Any]) -> Rendered:
        """The parts, rendered in one pass of `whole`: one context a message instead of one a
        part (the bench's message with its header: 20.7 -> 15.8 us). Any failure, or output
        that cannot be split back into its parts, renders them one by one instead, so that an
        error names its part."""
        if self.filled is not None:
            subject, text, html = self.filled
            try:
                return Rendered(
                    subject.fill(context),
                    text.fill(context),
                    html.fill(context) if html is not None else None,
                )
            except _Unplain:
                pass  # Jinja2 renders it, or says what is wrong
        if self.whole is not None:
            count = 2 if self.html is None else 3
            try:
                out = _render(self.whole, context, "", MAX_OUTPUT * count)
            except TemplateError:
                return self.render_parts(context)
            # cut where the separators are: find() runs memchr, where split() compared every
            # character (a 2 KB message: 10,800 instructions for the split)
            first = out.find(_SEPARATOR)
            second = out.find(_SEPARATOR, first + 1)
            pieces: tuple[str, ...] = ()
            if count == 2:
                if second < 0 <= first:
                    pieces = (out[:first], out[first + 1 :])
            elif 0 <= first < second and out.find(_SEPARATOR, second + 1) < 0:
                pieces = (out[:first], out[first + 1 : second], out[second + 1 :])
            # (no piece is longer than the whole)
            if pieces and (len(out) <= MAX_OUTPUT or max(map(len, pieces)) <= MAX_OUTPUT):
                return Rendered(pieces[0], pieces[1], pieces[2] if count == 3 else None)
        return self.render_parts(context)

    def render_parts(self, context: dict[str, Any]) -> Rendered:
        """The parts one by one: what render() gives, each error naming its part."""
        return Rendered(
            subject=self.render_subject(context),
            text=_render(self.text, context, f"template {self.label} (text)"),
            html=(
                _render(self.html, context, f"template {self.label} (html)")
                if self.html is not None
                else None
            ),
        )


def _render(
    template: jinja2.Template, context: dict[str, Any], what: str, limit: int = MAX_OUTPUT
) -> str:
    parts: list[str] = []
    size = 0
    try:
        # the compiled template's own render function, as Template.render calls it: its
        # generate() would copy the context once more and pass every piece through a
        # generator of its own (a message and its header: 150,000 -> 136,000 instructions)
        for part in template.root_render_func(template.new_context(context)):
            size += len(part)
            if size > limit:
                raise TemplateError(
                    f"{what} failed to render: the output is over {MAX_OUTPUT:,} characters"
                )
            parts.append(part)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{what} failed to render: {exc}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, RecursionError) as exc:
        raise TemplateError(f"{what} failed to render: {type(exc).__name__}: {exc}") from None
    return "".join(parts)


class _Unplain(Exception):
    """A value that _Fill does not print as Jinja2 would by itself (Jinja2 renders it)."""


class _Fill:
    """A template that is only text and `{{ name }}`, the usual newsletter (the bench's:
    subject, text, HTML and a header), rendered without Jinja2's machinery: what its compiled
    code does for such a template (each name looked up, finalized, made a str, escaped in
    HTML), done here for the values whose output is plain, and left to Jinja2 for the rest
    (`_Unplain`): a name not in the context (StrictUndefined's error, or a global such as
    `range`, which the finalize refuses), a value that is not a str, int or float (or an int
    too long to print), an output over MAX_OUTPUT (counted as it grows); `self`, which
    Jinja2 binds to the template, is never filled in. Jinja2 builds a context for each
    render and sends every piece through a generator, a lookup and the finalize: the bench's
    template and header took 8.0 us a message, 3.5 this way, and the worker 558,969 ->
    486,402 instructions a message (BENCHMARKS.md)."""

    __slots__ = ("escape", "pieces", "text")

    def __init__(self, pieces: tuple[str, ...], escape: bool) -> None:
        self.pieces = pieces  # text, name, text, name, ..., text
        self.escape = escape
        self.text = sum(map(len, pieces[::2]))  # the template's own text, in characters

    @classmethod
    def of(cls, env: jinja2.Environment, tree: nodes.Template) -> _Fill | None:
        pieces = [""]
        for node in tree.body:
            if not isinstance(node, nodes.Output):
                return None
            for child in node.nodes:
                if isinstance(child, nodes.TemplateData):
                    pieces[-1] += child.data
                # `self` is Jinja2's own (the template), whatever the context holds
                elif isinstance(child, nodes.Name) and child.ctx == "load" and child.name != "self":
                    pieces += [child.name, ""]
                else:
                    return None
        return cls(tuple(pieces), env.autoescape is True)

    def fill(self, context: dict[str, Any]) -> str:
        out = list(self.pieces)
        escape = self.escape
        size = self.text
        try:
            for i in range(1, len(out), 2):
                value = context[out[i]]
                kind = type(value)
                if kind is not str:
                    if kind is not int and kind is not float:
                        raise _Unplain
                    value = str(value)  # (ValueError: an int of over 4,300 digits)
                if escape:
                    value = markupsafe.escape(value)
                # counted as it grows, as _render counts: a value printed many times stops
                # at the limit, not after all of it is built
                size += len(value)
                if size > MAX_OUTPUT:
                    raise _Unplain
                out[i] = value
        except (KeyError, ValueError):
            raise _Unplain from None
        return "".join(out)


def _compile(
    env: jinja2.Environment, source: str, what: str
) -> tuple[jinja2.Template, _Fill | None]:
    """Compile, refusing syntax errors and private names with the part and line named; and
    the template as a _Fill if it is only text and names."""
    tree = _parse(env, source, what)
    return _template(env, tree), _Fill.of(env, tree)


def _parse(env: jinja2.Environment, source: str, what: str) -> nodes.Template:
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


def _template(env: jinja2.Environment, tree: nodes.Template) -> jinja2.Template:
    template = env.from_string(tree)
    # Jinja2 keeps a template's globals as a ChainMap over the environment's, so that later
    # changes to those show through; ours never change, and copying a ChainMap into every
    # render's context cost more than the render itself (59 -> 24 us for the bench template)
    template.globals = dict(template.globals)
    return template


def _private_name(node: nodes.Node) -> str | None:
    if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
        return node.attr
    if isinstance(node, nodes.Const) and isinstance(node.value, str):
        found = _DUNDER.search(node.value)  # x['__class__'], '{0.__class__}'.format(x), attr()
        return found.group() if found else None
    return None


def compile_parts(label: str, subject: str, text: str, html: str | None) -> Compiled:
    """Compile the three parts, or raise TemplateError naming the part and line."""
    subject_t, subject_f = _compile(_plain, subject, f"template {label} (subject)")
    text_t, text_f = _compile(_plain, text, f"template {label} (text)")
    html_t, html_f = (
        _compile(_html, html, f"template {label} (html)") if html is not None else (None, None)
    )
    filled = None
    if subject_f is not None and text_f is not None and (html is None or html_f is not None):
        filled = (subject_f, text_f, html_f)
    return Compiled(label, subject_t, text_t, html_t, _joined(subject, text, html), filled)


# Keyed by content, not by id: ids repeat across databases (tests, a restored backup).
_cache: dict[tuple[str, int, str, str, str | None], Compiled] = {}


class Source(Protocol):
    """A stored template version: the model, or a row of its columns."""

    name: str
    version: int
    subject: str
    text: str
    html: str | None


def compiled(template: Source) -> Compiled:
    key = (template.name, template.version, template.subject, template.text, template.html)
    found = _cache.get(key)
    if found is None:
        label = f"{template.name!r} v{template.version}"
        found = compile_parts(label, template.subject, template.text, template.html)
        _cache[key] = found
    return found


def render_headers(headers: dict[str, str], context: dict[str, Any]) -> dict[str, str]:
    """Extra header values are templates too (a per-recipient List-Unsubscribe URL)."""
    rendered: dict[str, str] = {}
    if headers:
        for name, template, fill, what in _header_templates(tuple(headers.items())):
            if fill is not None:
                try:
                    rendered[name] = fill.fill(context)
                    continue
                except _Unplain:
                    pass
            rendered[name] = _render(template, context, what)
    return rendered


# the header values used last: they may differ for every message (a request id), and a worker
# lives long. Each with the name its errors give, made once (repr and format: 1,500
# instructions a header a message)
@functools.lru_cache(maxsize=1024)
def _header_templates(
    headers: tuple[tuple[str, str], ...],
) -> tuple[tuple[str, jinja2.Template, _Fill | None, str], ...]:
    made = []
    for name, value in headers:
        what = f"header {name!r}"
        made.append((name, *_compile(_plain, value, what), what))
    return tuple(made)


# Between the parts of a message rendered in one pass. No context can hold it (enqueue refuses
# NUL) and no stored template (add refuses it); an expression that prints one anyway sends the
# message back to rendering part by part.
_SEPARATOR = "\0"


def _joined(subject: str, text: str, html: str | None) -> jinja2.Template | None:
    """The parts as one template, each in a scope of its own (a `set` in one is not seen by
    another) and the HTML autoescaped, as compiled apart; None if they cannot be joined: a
    part with a block (Jinja2 compiles blocks apart from the template, with its environment's
    escaping and names, so that a block in the HTML would not be escaped), or a syntax the
    parts pass alone and not together."""
    try:
        parts = [_parse(_plain, subject, "").body, _parse(_plain, text, "").body]
        if html is not None:  # parsed as the HTML environment does (its trailing newline)
            escape = [nodes.Keyword("autoescape", nodes.Const(True))]
            autoescaped = nodes.ScopedEvalContextModifier(escape, _parse(_html, html, "").body)
            parts.append([autoescaped])
        if any(isinstance(n, nodes.Block) or n.find(nodes.Block) for p in parts for n in p):
            return None
        body: list[nodes.Node] = []
        for part in parts:
            if body:
                body.append(nodes.Output([nodes.TemplateData(_SEPARATOR)]))
            body.append(nodes.Scope(part))
        return _template(_plain, nodes.Template(body))
    except (TemplateError, jinja2.TemplateError):
        return None


def add(session: Session, name: str, subject: str, text: str, html: str | None = None) -> Template:
    """Store a new version of `name` after checking that it compiles."""
    subject = subject.strip()
    if not name.strip():
        raise TemplateError("a template needs a name")
    if not subject:
        raise TemplateError(f"template {name!r}: the subject is empty")
    if len(subject.splitlines()) > 1:
        raise TemplateError(f"template {name!r}: the subject must be one line")
    for part, source in (("name", name), ("subject", subject), ("text", text), ("html", html)):
        if source is not None and "\0" in source:  # PostgreSQL cannot store it; nor can mail
            raise TemplateError(f"template {name!r}: the {part} contains a NUL character")
    compile_parts(repr(name), subject, text, html)
    version = session.scalar(select(func.max(Template.version)).where(Template.name == name))
    template = Template(
        name=name,
        version=(version or 0) + 1,
        subject=subject,
        text=text,
        html=html,
        created_at=clock.now(),
    )
    session.add(template)
    session.flush()
    return template


def latest(session: Session, name: str) -> Template:
    template = session.scalar(
        select(Template).where(Template.name == name).order_by(Template.version.desc()).limit(1)
    )
    if template is None:
        raise NotFound(f"no template named {name!r}; add one with `mailer template add {name} ...`")
    return template


@functools.cache
def variables(source: str) -> frozenset[str]:
    """The context names a template (in the plain environment) refers to."""
    return frozenset(jinja2.meta.find_undeclared_variables(_plain.parse(source)))
