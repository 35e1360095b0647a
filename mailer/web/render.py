"""Jinja2 for the dashboard: autoescape on for every template, and the responses built on it."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse

TEMPLATES = Path(__file__).resolve().parent / "templates"
STATIC = Path(__file__).resolve().parent / "static"


@functools.cache
def environment() -> Environment:
    # autoescape for every template whatever its name: no page may print outside data raw
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["ago"] = ago
    env.filters["number"] = lambda n: f"{n:,}" if isinstance(n, int) else n
    env.filters["percent"] = lambda x: f"{x:.1%}"
    return env


def when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(value: datetime | None) -> str:
    if value is None:
        return ""
    seconds = (datetime.now(UTC) - value).total_seconds()
    return duration(abs(seconds)) + (" ago" if seconds >= 0 else " from now")


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def page(request: Request, name: str, http_status: int = 200, **context: Any) -> HTMLResponse:
    """A template rendered with what every page needs: the user, the CSRF token, the path."""
    session = request.scope.get("session") or {}
    context.setdefault("user", getattr(request.state, "user", None))
    context.setdefault("csrf", session.get("csrf", ""))
    context.setdefault("path", request.url.path)
    html = environment().get_template(name).render(request=request, **context)
    return HTMLResponse(html, status_code=http_status)


def refusal(request: Request, status: int, title: str, detail: str) -> HTMLResponse:
    return page(request, "refused.html", http_status=status, title=title, detail=detail)
