"""Templates: store versions, compile once per process, render a message's parts.

Each part (subject, text, HTML, an extra header's value) renders in the Jinja2 sandbox
(mailer/sandbox.py), one part at a time; a part of text and `{{ name }}` only is first tried
by the fill fast path (mailer/fill.py), which leaves to Jinja2 whatever it does not print
exactly as Jinja2 would.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import jinja2
import jinja2.meta
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailer import clock, sandbox
from mailer.errors import NotFound, TemplateError
from mailer.fill import Fill, Unplain
from mailer.models import Template


class Rendered(NamedTuple):  # a tuple: made once a message, and cheaper to make than a dataclass
    subject: str
    text: str
    html: str | None


@dataclass(frozen=True, slots=True)
class Part:
    """One part compiled: its Jinja2 template, its fill when it is only text and names, and
    what its errors call it."""

    template: jinja2.Template
    fill: Fill | None
    what: str

    def render(self, context: dict[str, Any]) -> str:
        if self.fill is not None:
            try:
                return self.fill.fill(context)
            except Unplain:
                pass  # Jinja2 renders it, or says what is wrong
        return sandbox.render(self.template, context, self.what)


def compile_part(env: jinja2.Environment, source: str, what: str) -> Part:
    """Compile one part, or raise TemplateError naming `what` and the line."""
    tree = sandbox.parse(env, source, what)
    return Part(sandbox.template(env, tree), Fill.of(env, tree), what)


@dataclass(frozen=True)
class Compiled:
    label: str
    subject: Part
    text: Part
    html: Part | None

    def render_subject(self, context: dict[str, Any]) -> str:
        return self.subject.render(context)

    def render(self, context: dict[str, Any]) -> Rendered:
        """The parts rendered one by one; an error names its part."""
        html = self.html
        return Rendered(
            self.subject.render(context),
            self.text.render(context),
            html.render(context) if html is not None else None,
        )


def compile_parts(label: str, subject: str, text: str, html: str | None) -> Compiled:
    """Compile the three parts, or raise TemplateError naming the part and line."""
    return Compiled(
        label,
        compile_part(sandbox.PLAIN, subject, f"template {label} (subject)"),
        compile_part(sandbox.PLAIN, text, f"template {label} (text)"),
        compile_part(sandbox.HTML, html, f"template {label} (html)") if html is not None else None,
    )


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
    if not headers:
        return {}
    return {name: part.render(context) for name, part in _header_parts(tuple(headers.items()))}


# the header values used last: they may differ for every message (a request id), and a worker
# lives long. Each compiled with the name its errors give, made once
@functools.lru_cache(maxsize=1024)
def _header_parts(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, Part], ...]:
    return tuple(
        (name, compile_part(sandbox.PLAIN, value, f"header {name!r}")) for name, value in headers
    )


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
    return frozenset(jinja2.meta.find_undeclared_variables(sandbox.PLAIN.parse(source)))
