"""The `mailer purge` command: deletes old finished deliveries in batches (see retention.py)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import click
from sqlalchemy.exc import SQLAlchemyError

from mailer import clock, db
from mailer.models import PURGEABLE
from mailer.retention import PurgeReport

_UNITS = {"h": 3600, "d": 86400, "w": 7 * 86400}
# shorter would reach messages still being enqueued, and mail an operator still looks into
SHORTEST = timedelta(days=1)
PROGRESS_EVERY = 5.0  # seconds between two progress lines


class _Age(click.ParamType[timedelta, Any]):
    """A duration such as 90d, 12w or 36h, of at least a day."""

    name = "AGE"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        text = str(value).strip().lower()
        if not (text[:-1].isdigit() and text[-1:] in _UNITS):
            self.fail(f"{value!r} is not a duration like 90d, 12w or 36h", param, ctx)
        age = timedelta(seconds=int(text[:-1]) * _UNITS[text[-1]])
        if age < SHORTEST:
            self.fail(f"{value!r} is less than a day: purge keeps at least a day", param, ctx)
        return age


@click.command("purge")
@click.option(
    "--older-than",
    "age",
    type=_Age(),
    required=True,
    help="Delete finished deliveries whose last change is older than this (90d, 12w, 36h).",
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option(
    "--batch",
    type=click.IntRange(1, 50000),
    default=2000,
    show_default=True,
    help="Deliveries deleted a transaction at most (a batch reads ten times as many ids at "
    "most): each batch is one short transaction.",
)
def purge_cmd(age: timedelta, dry_run: bool, batch: int) -> None:
    """Delete deliveries that are sent, bounced, failed, expired, suppressed or cancelled and
    older than --older-than, with their attempts, then the messages and campaigns left
    without deliveries. `unknown` deliveries stay (they wait for an operator's decision), and
    so does the suppression list. Safe beside running workers; safe to stop and run again."""
    from mailer import retention

    cutoff = clock.now() - age
    states = ", ".join(state.value for state in PURGEABLE)
    if dry_run:
        with db.read_scope() as session:
            n = retention.count(session, cutoff)
        click.echo(f"{n} deliveries ({states}) last changed before {cutoff.isoformat()}")
        click.echo("dry run: nothing deleted")
        return
    click.echo(f"purging deliveries ({states}) last changed before {cutoff.isoformat()}")
    total = PurgeReport()
    started = shown = time.monotonic()
    try:
        for total in retention.purge(cutoff, batch):
            if time.monotonic() - shown >= PROGRESS_EVERY:
                shown = time.monotonic()
                click.echo(f"  {_summary(total)}; {_reached(total)}")
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise click.ClickException(
            f"purge stopped: {reason}\n{_summary(total)} (committed). Every batch is its own "
            "transaction: run the same command again to go on from here."
        ) from exc
    click.echo(f"done in {time.monotonic() - started:.1f}s: {_summary(total)}")


def _summary(total: PurgeReport) -> str:
    return (
        f"{total.deliveries} deliveries, {total.attempts} attempts, {total.messages} messages, "
        f"{total.campaigns} campaigns deleted in {total.batches} batches"
    )


def _reached(total: PurgeReport) -> str:
    """How far through the ids to purge: the walk goes up to the first id created after
    the cut-off."""
    return f"at delivery id {total.last_id or 0:,} of {total.horizon or 0:,}"
