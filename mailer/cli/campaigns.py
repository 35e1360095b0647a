"""Commands that queue mail: templates, one transactional message, campaigns and their status."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from mailer import db
from mailer.cli import params
from mailer.cli.filtering import actor_option
from mailer.cli.params import FILE, LATER


@click.group("template")
def template_group() -> None:
    """Templates: Jinja2 (sandboxed) subject, text and optional HTML, stored in versions."""


@template_group.command("add")
@click.argument("name")
@click.option(
    "--subject",
    "subject_file",
    required=True,
    type=FILE,
    help="File with the subject template.",
)
@click.option(
    "--text",
    "text_file",
    required=True,
    type=FILE,
    help="File with the plain-text body template.",
)
@click.option(
    "--html",
    "html_file",
    type=FILE,
    help="File with the HTML body template (autoescaped).",
)
def template_add(name: str, subject_file: Path, text_file: Path, html_file: Path | None) -> None:
    """Add a new version of template NAME (earlier versions stay, for retries)."""
    from mailer import templates

    with db.session_scope() as session:
        t = templates.add(
            session,
            name,
            params.read_text(subject_file),
            params.read_text(text_file),
            params.read_text(html_file) if html_file else None,
        )
        click.echo(f"template {t.name!r} version {t.version}")


@click.command("send")
@click.option("--template", "template", required=True, help="Template name (its latest version).")
@click.option("--to", "to", required=True, multiple=True, help="Recipient; repeat for several.")
@click.option("--context", "context", default="{}", help="JSON object for the template.")
@click.option("--from", "from_addr", help="Sender (default MAILER_FROM).")
@click.option("--idempotency-key", help="Sending twice with the same key sends once.")
@click.option("--header", "headers", multiple=True, help="Extra header 'Name: value' (a template).")
@click.option("--send-at", type=LATER, help="Not before this time (ISO 8601, or e.g. 2h from now).")
@click.option("--expires-at", type=LATER, help="Not after this time: then it expires unsent.")
def send_cmd(  # noqa: PLR0913 (a keyword per CLI option)
    template: str,
    to: tuple[str, ...],
    context: str,
    from_addr: str | None,
    idempotency_key: str | None,
    headers: tuple[str, ...],
    send_at: datetime | None,
    expires_at: datetime | None,
) -> None:
    """Queue one transactional message; prints its id."""
    from mailer import enqueue

    message_id = enqueue.send(
        template,
        list(to),
        params.json_object(context),
        from_addr=from_addr,
        idempotency_key=idempotency_key,
        headers=params.headers(headers),
        send_at=send_at,
        expires_at=expires_at,
    )
    click.echo(message_id)


@click.group("campaign")
def campaign_group() -> None:
    """Campaigns: one template to a list of recipients."""


@campaign_group.command("send")
@click.option("--template", "template", required=True, help="Template name (its latest version).")
@click.option(
    "--recipients",
    "path",
    required=True,
    type=FILE,
    help="CSV with an 'email' column (other columns become context), or JSON Lines.",
)
@click.option("--name", help="Campaign name (default: template and time).")
@click.option("--from", "from_addr", help="Sender (default MAILER_FROM).")
@click.option(
    "--header",
    "headers",
    multiple=True,
    help="Extra header 'Name: value' (a template), e.g. List-Unsubscribe.",
)
@click.option(
    "--skip-invalid", is_flag=True, help="Skip invalid rows (listed) instead of refusing the file."
)
@click.option("--send-at", type=LATER, help="Not before this time (ISO 8601, or e.g. 2h from now).")
@click.option("--expires-at", type=LATER, help="Not after this time: then it expires unsent.")
def campaign_send(  # noqa: PLR0913 (a keyword per CLI option)
    template: str,
    path: Path,
    name: str | None,
    from_addr: str | None,
    headers: tuple[str, ...],
    skip_invalid: bool,
    send_at: datetime | None,
    expires_at: datetime | None,
) -> None:
    """Queue a campaign from a recipient file; prints the campaign id."""
    from mailer import enqueue, recipients

    progress = _Progress("enqueued")
    rows = recipients.read(path)
    result = enqueue.send_campaign(
        template,
        rows,
        name=name,
        from_addr=from_addr,
        headers=params.headers(headers),
        skip_invalid=skip_invalid,
        progress=progress.update,
        send_at=send_at,
        expires_at=expires_at,
    )
    progress.done()
    for line in result.rejected:
        click.echo(f"skipped {line}", err=True)
    click.echo(
        f"campaign {result.campaign_id}: {result.queued} queued, {result.suppressed} "
        f"suppressed, {result.duplicates} duplicates dropped, {result.invalid} invalid "
        "skipped",
        err=True,
    )
    click.echo(result.campaign_id)


class _Progress:
    """A progress line on stderr when it is a terminal, at most a few times a second."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, count: int) -> None:
        if self.tty and time.monotonic() - self.last > 0.2:
            self.last = time.monotonic()
            click.echo(f"\r{self.label} {count:,} recipients", nl=False, err=True)

    def done(self) -> None:
        if self.tty:
            click.echo("", err=True)


@campaign_group.command("status")
@click.argument("campaign_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def campaign_status(campaign_id: int, as_json: bool) -> None:
    """Counts per delivery state, and progress."""
    from mailer import queries

    with db.session_scope() as session:
        status = queries.campaign_status(session, campaign_id)
    if as_json:
        click.echo(json.dumps(status.as_dict(), indent=2))
        return
    click.echo(f"campaign {status.id} {status.name!r}{' (paused)' if status.paused else ''}")
    click.echo(f"progress {status.done:,}/{status.total:,} final ({status.progress:.1%})")
    for state, n in status.counts.items():
        click.echo(f"  {state:11} {n:>9,}")


@campaign_group.command("pause")
@click.argument("campaign_id", type=int)
@actor_option
def campaign_pause(campaign_id: int, actor: str | None) -> None:
    """Stop handing out the campaign's deliveries (those in flight finish)."""
    _set_paused(campaign_id, True, actor)


@campaign_group.command("resume")
@click.argument("campaign_id", type=int)
@actor_option
def campaign_resume(campaign_id: int, actor: str | None) -> None:
    """Hand out the campaign's deliveries again (the dispatcher publishes them)."""
    _set_paused(campaign_id, False, actor)


def _set_paused(campaign_id: int, paused: bool, actor: str | None) -> None:
    from mailer import actions
    from mailer.cli.deliveries import progress_on_stderr

    who = actions.cli_actor(actor)
    with db.session_scope() as session:
        progress = progress_on_stderr("pause" if paused else "resume")
        if paused:
            actions.pause_campaign(session, who, campaign_id, progress=progress)
        else:
            actions.resume_campaign(session, who, campaign_id, progress=progress)
    click.echo(f"campaign {campaign_id} {'paused' if paused else 'resumed'}")
