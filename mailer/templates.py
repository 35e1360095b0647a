"""Templates: store versions, compile once per process in the Jinja2 sandbox, render.

Subject and text render without escaping; HTML autoescapes. Every undefined variable is an
error (StrictUndefined), and the immutable sandbox refuses attribute walks such as
`''.__class__` and unsafe `str.format` calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailer import clock
from mailer.errors import NotFound, TemplateError
from mailer.models import Template

_plain = ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
)
_html = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=True)


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str | None


@dataclass(frozen=True)
class Compiled:
    label: str
    subject: jinja2.Template
    text: jinja2.Template
    html: jinja2.Template | None

    def render_subject(self, context: dict[str, Any]) -> str:
        try:
            return self.subject.render(context)
        except jinja2.TemplateError as exc:
            raise TemplateError(
                f"template {self.label} (subject) failed to render: {exc}"
            ) from None

    def render(self, context: dict[str, Any]) -> Rendered:
        part = "subject"
        try:
            subject = self.subject.render(context)
            part = "text"
            text = self.text.render(context)
            part = "html"
            html = self.html.render(context) if self.html is not None else None
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template {self.label} ({part}) failed to render: {exc}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
            raise TemplateError(
                f"template {self.label} ({part}) failed to render: {type(exc).__name__}: {exc}"
            ) from None
        return Rendered(subject=subject, text=text, html=html)


def compile_parts(label: str, subject: str, text: str, html: str | None) -> Compiled:
    """Compile the three parts, or raise TemplateError naming the part and line."""
    part = "subject"
    try:
        compiled_subject = _plain.from_string(subject)
        part = "text"
        compiled_text = _plain.from_string(text)
        part = "html"
        compiled_html = _html.from_string(html) if html is not None else None
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"template {label} ({part}), line {exc.lineno}: {exc.message}"
        ) from None
    return Compiled(label, compiled_subject, compiled_text, compiled_html)


# Keyed by content, not by id: ids repeat across databases (tests, a restored backup).
_cache: dict[tuple[str, int, str, str, str | None], Compiled] = {}


def compiled(template: Template) -> Compiled:
    key = (template.name, template.version, template.subject, template.text, template.html)
    found = _cache.get(key)
    if found is None:
        label = f"{template.name!r} v{template.version}"
        found = compile_parts(label, template.subject, template.text, template.html)
        _cache[key] = found
    return found


_header_cache: dict[tuple[tuple[str, str], ...], dict[str, jinja2.Template]] = {}


def render_headers(headers: dict[str, str], context: dict[str, Any]) -> dict[str, str]:
    """Extra header values are templates too (a per-recipient List-Unsubscribe URL)."""
    if not headers:
        return {}
    key = tuple(headers.items())
    compiled_headers = _header_cache.get(key)
    if compiled_headers is None:
        try:
            compiled_headers = {k: _plain.from_string(v) for k, v in headers.items()}
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"a header template does not compile: {exc.message}") from None
        _header_cache[key] = compiled_headers
    try:
        return {name: t.render(context) for name, t in compiled_headers.items()}
    except jinja2.TemplateError as exc:
        raise TemplateError(f"a header failed to render: {exc}") from None


def add(session: Session, name: str, subject: str, text: str, html: str | None = None) -> Template:
    """Store a new version of `name` after checking that it compiles."""
    subject = subject.strip()
    if not name.strip():
        raise TemplateError("a template needs a name")
    if not subject:
        raise TemplateError(f"template {name!r}: the subject is empty")
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
