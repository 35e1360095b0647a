"""Commands on deliveries already queued or sent: report, retry and cancel."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from mailer import db
from mailer.cli import filtering
from mailer.cli.params import STATES
from mailer.filters import DeliveryFilter
from mailer.models import DeliveryState

RETRY_DEFAULT = "failed,expired,unknown"
PROGRESS_EVERY = 2.0  # seconds between progress lines of a long change


def progress_on_stderr(what: str) -> Callable[[int, int], None]:
    """A `batches.Progress` that tells stderr how far a long change has gone, now and then
    (each line is of batches committed: stopped there, running it again goes on)."""
    shown = time.monotonic()

    def tell(done: int, total: int) -> None:
        nonlocal shown
        if done < total and time.monotonic() - shown >= PROGRESS_EVERY:
            shown = time.monotonic()
            click.echo(f"  {what}: {done:,} of {total:,} done", err=True)

    return tell


@click.command("report")
@click.argument("campaign_id", type=int)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(STATES),
    help="Only these states (repeatable).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
def report_cmd(campaign_id: int, states: tuple[str, ...], fmt: str) -> None:
    """Per recipient: address, state, attempts, last code, enhanced code and reply."""
    from mailer import queries

    chosen = [DeliveryState(s) for s in states] or None
    with db.read_scope() as session:
        if fmt == "csv":
            # tuples straight into the csv module's C writer
            writer = csv.writer(sys.stdout)
            writer.writerow(queries.REPORT_COLUMNS)
            writer.writerows(queries.report_rows(session, campaign_id, chosen))
            return
        rows = queries.report(session, campaign_id, chosen)
        if fmt == "json":
            for row in rows:
                click.echo(json.dumps(row))
        else:
            click.echo(
                f"{'recipient':40} {'state':10} {'tries':>5} {'code':>4} {'enhanced':8} reply"
            )
            for row in rows:
                click.echo(
                    f"{row['recipient'][:40]:40} {row['state']:10} {row['attempts']:>5} "
                    f"{row['code'] or '':>4} {row['enhanced'] or '':8} {row['reply'][:70]}"
                )


def _chosen(given: dict[str, Any], states: str | None) -> DeliveryFilter:
    chosen = filtering.build(given, states)
    if not chosen.scoped and chosen == DeliveryFilter(states=chosen.states):
        # a state alone would reach every campaign and message ever sent
        raise click.UsageError(
            "say which deliveries: --campaign, --message, --delivery, --recipient, --code, "
            "--enhanced, --class, --domain, --reply, --since or --until"
        )
    return chosen


@click.command("retry")
@filtering.filter_options
@click.option(
    "--state",
    "states",
    default=RETRY_DEFAULT,
    show_default=True,
    help="Comma-separated states to retry.",
)
@click.option(
    "--include-suppressed",
    is_flag=True,
    help="Also addresses on the suppression list (and take them off it).",
)
@click.option("--dry-run", is_flag=True, help="Count, change nothing.")
@filtering.actor_option
def retry_cmd(
    states: str, include_suppressed: bool, dry_run: bool, actor: str | None, **given: Any
) -> None:
    """Queue matching deliveries again with a fresh attempt budget; the dispatcher sends them.
    Goes in batches, each its own short transaction: safe to stop and run again."""
    from mailer import actions

    chosen = _chosen(given, states)
    with db.session_scope() as session:
        if dry_run:
            n = actions.preview(
                session, actions.Action.RETRY, chosen, include_suppressed=include_suppressed
            )
            click.echo(f"{n} deliveries would be queued again (dry run: nothing changed)")
            return
        done = actions.retry(
            session,
            actions.cli_actor(actor),
            chosen,
            include_suppressed=include_suppressed,
            progress=progress_on_stderr("retry"),
        )
    click.echo(
        f"{done.count} deliveries queued again; the dispatcher publishes them on its next pass"
    )


@click.command("cancel")
@filtering.filter_options
@click.option("--state", "states", help="Comma-separated states (only queued, deferred change).")
@click.option("--dry-run", is_flag=True, help="Count, change nothing.")
@filtering.actor_option
def cancel_cmd(states: str | None, dry_run: bool, actor: str | None, **given: Any) -> None:
    """Cancel what has not been sent (queued, deferred); in-flight mail finishes. Goes in
    batches, each its own short transaction: safe beside running workers, and to stop and
    run again."""
    from mailer import actions

    if given.get("f_campaign") is None and given.get("f_message") is None:
        raise click.UsageError("say what to cancel: --campaign ID or --message ID")
    chosen = _chosen(given, states)
    with db.session_scope() as session:
        if dry_run:
            n = actions.preview(session, actions.Action.CANCEL, chosen)
            click.echo(f"{n} deliveries would be cancelled (dry run: nothing changed)")
            return
        done = actions.cancel(
            session, actions.cli_actor(actor), chosen, progress=progress_on_stderr("cancel")
        )
    click.echo(f"{done.count} deliveries cancelled")
