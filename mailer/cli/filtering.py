"""The options that make a DeliveryFilter, shared by the commands that act on deliveries, and
the `--as NAME` option that names the actor in the audit log."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import click

from mailer.cli.params import AGO
from mailer.filters import FORMS, DeliveryFilter

F = TypeVar("F", bound=Callable[..., Any])

# option name -> the filter's parameter key (filters.FORMS); --state is each command's own
_OPTIONS = {
    "campaign": "Only this campaign.",
    "message": "Only this message.",
    "delivery": "Only this delivery.",
    "recipient": "Only deliveries to this address.",
    "code": "Only deliveries whose last reply code matches: 4xx, 5xx or e.g. 550.",
    "enhanced": "Only deliveries whose last enhanced code is this (5.1.1) or starts so (5.7).",
    "class": "Only deliveries whose last reply was of this class (e.g. hard_bounce).",
    "domain": "Only recipients at this domain.",
    "reply": "Only deliveries whose last reply contains this text (any case).",
    "since": "Only those that changed since (ISO 8601, or e.g. 2h ago).",
    "until": "Only those that changed before (ISO 8601, or e.g. 2h ago).",
}
_INTS = ("campaign", "message", "delivery")
_TIMES = ("since", "until")


def filter_options(command: F) -> F:
    """Add the filter's options (each given to the command as `f_<name>`)."""
    for name in reversed(list(_OPTIONS)):
        kind: Any = int if name in _INTS else AGO if name in _TIMES else str
        command = click.option(f"--{name}", f"f_{name}", type=kind, help=_OPTIONS[name])(command)
    return command


def actor_option(command: F) -> F:
    return click.option(
        "--as",
        "actor",
        metavar="NAME",
        help="Who acts, for the audit log (default: the OS user).",
    )(command)


def build(given: dict[str, Any], states: str | None = None) -> DeliveryFilter:
    """The filter of the options given (`f_<name>` values and --state); a bad value is a
    usage error naming its option and the form it accepts."""
    params: dict[str, str] = {"state": states or ""}
    for key, value in given.items():
        if not key.startswith("f_") or value is None:
            continue
        name = key[2:]
        params[name] = value.isoformat() if isinstance(value, datetime) else str(value)
    try:
        return DeliveryFilter.from_params(params)
    except ValueError as exc:
        option = str(exc).split(":", 1)[0]
        hint = f"--{option}" if option in FORMS else None
        raise click.BadParameter(str(exc).split(": ", 1)[-1], param_hint=hint) from None
