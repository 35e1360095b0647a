"""Commands on deliveries already queued or sent: report, retry and cancel."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click

from mailer import clock, db
from mailer.cli.params import AGO, STATES
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


def _selection(
    campaign_id: int | None,
    message_id: int | None,
    states: str | None,
    code: str | None,
    since: datetime | None,
) -> Any:
    from mailer import queries

    if campaign_id is None and message_id is None and code is None and since is None:
        # a state alone would reach every campaign and message ever sent
        raise click.UsageError("say which deliveries: --campaign, --message, --code or --since")
    chosen = None
    if states:
        try:
            chosen = [DeliveryState(s.strip()) for s in states.split(",") if s.strip()]
        except ValueError:
            raise click.BadParameter(
                f"states are: {', '.join(STATES)}", param_hint="--state"
            ) from None
    if code is not None:
        try:
            queries.code_range(code)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--code") from None
    return queries.Selection(campaign_id, message_id, chosen, code, since)


@click.command("retry")
@click.option("--campaign", "campaign_id", type=int, help="Only this campaign.")
@click.option("--message", "message_id", type=int, help="Only this message.")
@click.option(
    "--state",
    "states",
    default=RETRY_DEFAULT,
    show_default=True,
    help="Comma-separated states to retry.",
)
@click.option("--code", help="Only deliveries whose last reply code matches: 4xx, 5xx or e.g. 550.")
@click.option("--since", type=AGO, help="Only those that changed since (ISO 8601, or e.g. 2h ago).")
@click.option(
    "--include-suppressed",
    is_flag=True,
    help="Also addresses on the suppression list (and take them off it).",
)
@click.option("--dry-run", is_flag=True, help="Count, change nothing.")
def retry_cmd(  # noqa: PLR0913 (a keyword per CLI option)
    campaign_id: int | None,
    message_id: int | None,
    states: str,
    code: str | None,
    since: datetime | None,
    include_suppressed: bool,
    dry_run: bool,
) -> None:
    """Queue matching deliveries again with a fresh attempt budget; the dispatcher sends them.
    Goes in batches, each its own short transaction: safe to stop and run again."""
    from mailer import outcomes

    selection = _selection(campaign_id, message_id, states, code, since)
    with db.session_scope() as session:
        if dry_run:
            n = outcomes.retry_candidates(
                session, selection.ids(), include_suppressed=include_suppressed
            )
            click.echo(f"{n} deliveries would be queued again (dry run: nothing changed)")
            return
        n = outcomes.requeue(
            session,
            selection.ids(),
            clock.now(),
            include_suppressed=include_suppressed,
            progress=progress_on_stderr("retry"),
        )
    click.echo(f"{n} deliveries queued again; the dispatcher publishes them on its next pass")


@click.command("cancel")
@click.option("--campaign", "campaign_id", type=int, help="Cancel this campaign's unsent mail.")
@click.option("--message", "message_id", type=int, help="Cancel this message's unsent deliveries.")
def cancel_cmd(campaign_id: int | None, message_id: int | None) -> None:
    """Cancel what has not been sent (queued, deferred); in-flight mail finishes. Goes in
    batches, each its own short transaction: safe beside running workers, and to stop and
    run again."""
    from mailer import outcomes

    if campaign_id is None and message_id is None:
        raise click.UsageError("say what to cancel: --campaign ID or --message ID")
    selection = _selection(campaign_id, message_id, None, None, None)
    with db.session_scope() as session:
        n = outcomes.cancel(session, selection.ids(), clock.now(), progress_on_stderr("cancel"))
    click.echo(f"{n} deliveries cancelled")
