"""What the commands share: parameter types, argument parsing and the printing of URLs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from mailer import clock
from mailer.models import DeliveryState

STATES = [s.value for s in DeliveryState]
FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class _When(click.ParamType[datetime, Any]):
    """ISO 8601 (UTC when no zone is given) or a duration such as 30m, 2h, 1d: that long from
    now (`future=True`) or that long ago."""

    name = "TIME"

    def __init__(self, *, future: bool) -> None:
        self.future = future

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip().lstrip("+")
        if text[:-1].isdigit() and text[-1:] in _UNITS:
            delta = timedelta(seconds=int(text[:-1]) * _UNITS[text[-1]])
            return clock.now() + delta if self.future else clock.now() - delta
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            self.fail(f"{value!r} is neither ISO 8601 nor a duration like 30m, 2h, 1d", param, ctx)
        return when if when.tzinfo else when.replace(tzinfo=UTC)


LATER = _When(future=True)
AGO = _When(future=False)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise click.ClickException(f"{path}: not UTF-8; save it as UTF-8") from None


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc.msg}", param_hint="--context") from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--context")
    return value


def headers(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep:
            raise click.BadParameter(f"{item!r} is not 'Name: value'", param_hint="--header")
        out[name.strip()] = value.strip()
    return out


def hide(url: str) -> str:
    """The URL with its password hidden."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]
